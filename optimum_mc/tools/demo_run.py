"""``optimum-mc demo``: quantize the embedded demo MoE offline and show what MC does.

Float vs uniform 2-bit vs MC 2.5-bit experts (perplexity on held-out text and size), ODP on top of MC (share of
expert evaluations skipped and its perplexity), a generated sample, and the allocation heatmap as a PNG
(matplotlib, the ``plots`` extra; skipped with a message without it).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from .plots import plot_allocation

CALIBRATION = dict(group_size=64, num_samples=32, seq_len=128)
# (row name, expert bits, MCConfig options): the comparison at 2-2.5 bits, and the same one below 2 bits,
# where this small model's experts start to hurt (its 2-bit experts cost it little; 1-bit ones a lot)
VARIANTS = (
    ("uniform 2-bit (GPTQ)", "2", dict(bits=2.0, candidate_bits=[2])),
    ("MC 2.5-bit", "2.5", dict(bits=2.5)),
    ("uniform 1-bit (GPTQ)", "1", dict(bits=1.0, candidate_bits=[1])),
    ("MC 1.5-bit", "1.5", dict(bits=1.5)),
)
PROMPT = "class Parser:\n    def __init__(self, "
NEW_TOKENS = 40


def _expert_bytes(model) -> int:
    return sum(
        t.numel() * t.element_size()
        for n, t in list(model.named_parameters()) + list(model.named_buffers())
        if ".experts." in n
    )


def run_demo(quiet: bool = False, plot_path: Path | None = None) -> int:
    """``optimum-mc demo``: print the demo's report (only its results table with ``quiet``); the exit code."""
    measure_demo(quiet, plot_path)
    return 0


def measure_demo(quiet: bool = False, plot_path: Path | None = None) -> dict:
    """Run the demo and return what it printed as numbers: ``perplexity`` per row name, ``odp_perplexity``,
    ``odp_skipped`` (share of expert evaluations) and ``same_prefix`` (leading generated tokens MC shares with
    float).

    Quantize and evaluate on one thread: the matrices are small, and on a busy machine a second thread mostly
    waits for its turn (quantization ran several times slower with two threads at load 10+ on 2 cores). Training
    the model on first use runs on its recipe's fixed thread count (:data:`demo.RECIPE`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _run_demo(quiet, plot_path)
    finally:
        torch.set_num_threads(threads)


def _run_demo(quiet: bool, plot_path: Path | None) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import optimum_mc

    from .demo import build_demo_model, expert_usage, split_documents
    from .evaluation import perplexity, token_windows
    from .inspect_model import allocation_table
    from .speed import model_bytes

    say = (lambda *a: None) if quiet else print
    t_start = time.perf_counter()
    path = build_demo_model(quiet=quiet)
    tok = AutoTokenizer.from_pretrained(path)
    windows = token_windows(tok, "\n\n".join(split_documents()[1]), 128, 64)
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    say(f"demo model: {path} (Mixtral layout, {float_model.num_parameters() / 1e6:.1f}M parameters)")
    usage = expert_usage(float_model, windows)
    say(
        f"held-out routing: every expert's share of slots lies in {100 * usage.min():.1f}%..{100 * usage.max():.1f}%"
        f" ({usage.shape[1]} experts, {usage.shape[0]} MoE layers; {(usage == 0).sum().item()} never routed)"
    )
    rows = [("float (fp32)", "32", float_model, perplexity(float_model, windows))]
    if not quiet:
        logging.getLogger("optimum_mc").setLevel(logging.WARNING)

    def quantize(**kw):
        cfg = optimum_mc.MCConfig(**CALIBRATION, show_progress=not quiet, **kw)
        t = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg).eval()
        return model, time.perf_counter() - t

    times = {}
    for name, bits, kw in VARIANTS:
        model, times[name] = quantize(**kw)
        rows.append((name, bits, model, perplexity(model, windows)))
        if name == "MC 2.5-bit":
            mc = model
    say("\nquantized in " + ", ".join(f"{t:.0f}s ({n})" for n, t in times.items()) + "; MC 2.5's allocation:")
    qc = mc.config.quantization_config
    say(allocation_table(qc))

    optimum_mc.set_odp(mc, True)
    optimum_mc.reset_odp_stats(mc)
    ppl_odp = perplexity(mc, windows)
    skipped = optimum_mc.get_odp_stats(mc)["total"]["skipped_fraction"]
    optimum_mc.set_odp(mc, False)

    # the results table is printed even with quiet=True (--quiet silences progress, not the demo's answer)
    print("\n| model | expert bits | size (MB) | expert weights (MB) | held-out perplexity |")
    print("|---|---|---|---|---|")
    for name, bits, model, ppl in rows:
        mb, experts_mb = model_bytes(model) / 2**20, _expert_bytes(model) / 2**20
        print(f"| {name} | {bits} | {mb:.2f} | {experts_mb:.2f} | {ppl:.2f} |")
    print(f"| MC 2.5-bit + ODP ({100 * skipped:.1f}% of expert evaluations skipped) | 2.5 | | | {ppl_odp:.2f} |")
    say(
        "\nMC gives each expert its own bit-width (from routing frequency, routing weight and measured quantization "
        "error) at the average asked; ODP then skips the weakest second experts per token at inference."
    )

    samples = {}
    for name, model in (("float", float_model), ("MC 2.5-bit", mc)):
        gen = pipeline("text-generation", model=model, tokenizer=tok)
        out = gen(PROMPT, max_new_tokens=NEW_TOKENS, do_sample=False, repetition_penalty=1.2, return_tensors=True)
        samples[name] = out[0]["generated_token_ids"][len(tok(PROMPT)["input_ids"]) :]
        say(f"\npipeline('text-generation'), {name} model (greedy):\n" + tok.decode(out[0]["generated_token_ids"]))
    same = next((i for i, (a, b) in enumerate(zip(*samples.values())) if a != b), min(map(len, samples.values())))
    say(f"\nthe MC 2.5-bit model's first {same} generated tokens are the float model's")

    png_path = Path(plot_path) if plot_path else path.parent / "demo-allocation.png"
    png = plot_allocation(qc.expert_bits, qc.moe_layers, png_path)
    if png is None:
        say("\nallocation heatmap skipped: matplotlib is not installed (pip install 'optimum-mc[plots]')")
    else:
        say(f"\nallocation heatmap: {png}")
    say(f"demo finished in {time.perf_counter() - t_start:.0f}s")
    return {
        "perplexity": {name: ppl for name, _, _, ppl in rows},
        "odp_perplexity": ppl_odp,
        "odp_skipped": skipped,
        "same_prefix": same,
    }
