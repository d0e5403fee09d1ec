"""Speed / memory benchmark behind ``optimum-mc bench``: float vs MC (float, then int8 decode activations) vs
MC + ODP (the default, "auto", decode activations), ratios from one run: ``repeats`` rounds over the variants,
interleaved so that a change in the machine's load hits every variant alike, best of the rounds kept."""

from __future__ import annotations

import copy
import time

import torch

from ..kernels import int8_decode


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def measure(
    model, prompt: torch.Tensor, new_tokens: int, clock=time.perf_counter, warm_up: bool = True
) -> tuple[float, float]:
    """(prefill tokens/s over the whole prompt, greedy decode tokens/s after a 16-token prompt); ``clock``: wall
    time by default, ``time.process_time`` for this process's CPU time (robust to other jobs at one thread).
    ``warm_up``: first run the timed shapes once (needed once per model and setting, not per repeat)."""
    if warm_up:  # the first call of a shape creates BLAS / oneDNN kernels (bf16 prefill of 256 tokens: ~3x slower)
        model(input_ids=prompt, use_cache=False)
        model.generate(prompt[:, :16], max_new_tokens=2, min_new_tokens=2, do_sample=False)
    t = clock()
    model(input_ids=prompt, use_cache=False)
    prefill = prompt.numel() / (clock() - t)
    t = clock()
    out = model.generate(prompt[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    decode = (out.shape[1] - 16) / (clock() - t)
    return prefill, decode


def run_speed_bench(model, tokenizer, args, config) -> str:
    """Markdown table of prefill / decode tokens per second and weight memory for the four variants.

    ``config`` None: ``model`` is an MC model as loaded; the float baseline is its own weights dequantized to the
    model's dtype (the same architecture and shapes: a speed baseline, not the original float model's quality).
    """
    from ..nn.experts import set_decode_activations
    from ..pipeline import quantize_model
    from ..pruning import get_odp_stats, reset_odp_stats, set_odp
    from ..quantizer import dequantize_model

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, len(tokenizer), (1, args.prompt_len), generator=g)
    dtype = next(model.parameters()).dtype
    if config is None:
        quant = model
        model = dequantize_model(copy.deepcopy(quant), dtype)
        baseline = f"float = this MC model's weights dequantized to {str(dtype).removeprefix('torch.')}"
    else:
        quant = copy.deepcopy(model)
        quantize_model(quant, config, tokenizer)
        quant.config.quantization_config = config
        baseline = "float = the model as loaded; MC = it quantized here with the command's options"

    def mc(decode: str, odp: bool):
        def configure():  # one quantized copy, switched per measurement (no second copy of the model in memory)
            set_decode_activations(quant, decode)
            set_odp(quant, odp)
            reset_odp_stats(quant)

        return configure

    variants = [
        ("float", model, None),
        ("MC, float decode activations", quant, mc("float", False)),  # both decode modes side by side; "auto"
        ("MC, int8 decode activations", quant, mc("int8", False)),  # picks one of them per dtype
        ("MC + ODP", quant, mc("auto", True)),  # the default decode activations
    ]
    best = {name: (0.0, 0.0) for name, _, _ in variants}
    skipped = None
    for rnd in range(getattr(args, "repeats", 1)):
        for name, m, configure in variants:
            if configure is not None:
                configure()
            pre, dec = measure(m, prompt, args.new_tokens, warm_up=rnd == 0)
            best[name] = (max(best[name][0], pre), max(best[name][1], dec))
        skipped = get_odp_stats(quant)["total"]["skipped_fraction"]  # ODP was the last variant measured
    set_decode_activations(quant, "auto")
    rows = [(name, *best[name], model_bytes(m), skipped if name == "MC + ODP" else None) for name, m, _ in variants]
    base = rows[0]
    lines = [
        f"{baseline}; best of {getattr(args, 'repeats', 1)} round(s), prompt {args.prompt_len} tokens, "
        f"{args.new_tokens} new tokens\n",
        "| variant | prefill tok/s | decode tok/s | weights MB | prefill x | decode x | memory x | experts skipped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, pre, dec, mem, sk in rows:
        lines.append(
            f"| {name} | {pre:.0f} | {dec:.1f} | {mem / 2**20:.1f} | {pre / base[1]:.2f} | {dec / base[2]:.2f} "
            f"| {mem / base[3]:.2f} | {'-' if sk is None else f'{100 * sk:.1f}%'} |"
        )
    mode = "int8" if int8_decode("auto", dtype) else "float"
    lines.append(f"\nMC + ODP and a loaded MC model decode with {mode} activations here (decode_activations='auto', "
                 f"{str(dtype).removeprefix('torch.')}).")  # fmt: skip
    return "\n".join(lines)
