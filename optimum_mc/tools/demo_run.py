"""``optimum-mc demo``: quantize the embedded demo MoE with MC offline and show what it does."""

from __future__ import annotations

import logging
import time

import torch


def run_demo(quiet: bool = False) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    import optimum_mc

    from .demo import build_demo_model, split_documents
    from .evaluation import perplexity, token_windows
    from .inspect_model import allocation_table
    from .speed import model_bytes

    say = (lambda *a: None) if quiet else print
    path = build_demo_model(quiet=quiet)
    tok = AutoTokenizer.from_pretrained(path)
    held_out = "\n\n".join(split_documents()[1])
    windows = token_windows(tok, held_out, 128, 64)
    float_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    say(f"demo model: {path} (Mixtral layout, {float_model.num_parameters() / 1e6:.1f}M parameters)")
    ppl_float = perplexity(float_model, windows)

    cfg = optimum_mc.MCConfig(bits=2.5, group_size=64, num_samples=48, seq_len=128, show_progress=not quiet)
    if not quiet:
        logging.getLogger("optimum_mc").setLevel(logging.WARNING)
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg).eval()
    seconds = time.perf_counter() - t
    say(f"\nMC quantization (2.5 average expert bits, attention 4-bit) took {seconds:.1f}s; allocation:")
    say(allocation_table(model.config.quantization_config))
    ppl_mc = perplexity(model, windows)
    optimum_mc.set_odp(model, True)
    optimum_mc.reset_odp_stats(model)
    ppl_odp = perplexity(model, windows)
    skipped = optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"]
    optimum_mc.set_odp(model, False)

    def expert_bytes(m):
        return sum(
            t.numel() * t.element_size()
            for n, t in list(m.named_parameters()) + list(m.named_buffers())
            if ".experts." in n
        )

    say("\n| model | size (MB) | expert weights (MB) | held-out perplexity |")
    say("|---|---|---|---|")
    say(
        f"| float (fp32) | {model_bytes(float_model) / 2**20:.2f} | {expert_bytes(float_model) / 2**20:.2f} | "
        f"{ppl_float:.2f} |"
    )
    say(f"| MC 2.5-bit | {model_bytes(model) / 2**20:.2f} | {expert_bytes(model) / 2**20:.2f} | {ppl_mc:.2f} |")
    say(f"| MC 2.5-bit + ODP ({100 * skipped:.1f}% expert evaluations skipped) | | | {ppl_odp:.2f} |")
    gen = pipeline("text-generation", model=model, tokenizer=tok)
    text = gen("def read_file(path):", max_new_tokens=40, do_sample=False)[0]["generated_text"]
    say("\npipeline('text-generation') with the MC model:\n" + text)
    return 0
