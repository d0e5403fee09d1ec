"""Speed / memory benchmark behind ``optimum-mc bench``: float vs MC (float, then int8 decode activations) vs
MC + ODP (the default, "auto", decode activations), ratios from one run."""

from __future__ import annotations

import copy
import time

import torch

from ..kernels.cpu import int8_decode


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def measure(model, prompt: torch.Tensor, new_tokens: int, clock=time.perf_counter) -> tuple[float, float]:
    """(prefill tokens/s over the whole prompt, greedy decode tokens/s after a 16-token prompt); ``clock``: wall
    time by default, ``time.process_time`` for this process's CPU time (robust to other jobs at one thread)."""
    model(input_ids=prompt[:, :8])  # warm-up
    t = clock()
    model(input_ids=prompt, use_cache=False)
    prefill = prompt.numel() / (clock() - t)
    t = clock()
    out = model.generate(prompt[:, :16], max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    decode = (out.shape[1] - 16) / (clock() - t)
    return prefill, decode


def run_speed_bench(model, tokenizer, args, config) -> str:
    """Markdown table of prefill / decode tokens per second and weight memory for the four variants."""
    from ..nn.experts import set_decode_activations
    from ..pipeline import quantize_model
    from ..pruning import get_odp_stats, reset_odp_stats, set_odp

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, len(tokenizer), (1, args.prompt_len), generator=g)
    rows = [("float", *measure(model, prompt, args.new_tokens), model_bytes(model), None)]
    quant = copy.deepcopy(model)
    quantize_model(quant, config, tokenizer)
    quant.config.quantization_config = config
    set_decode_activations(quant, "float")  # both decode modes side by side; "auto" picks one of them per dtype
    rows.append(("MC, float decode activations", *measure(quant, prompt, args.new_tokens), model_bytes(quant), None))
    set_decode_activations(quant, "int8")
    rows.append(("MC, int8 decode activations", *measure(quant, prompt, args.new_tokens), model_bytes(quant), None))
    set_decode_activations(quant, "auto")  # back to the default
    set_odp(quant, True)
    reset_odp_stats(quant)
    pre, dec = measure(quant, prompt, args.new_tokens)
    skipped = get_odp_stats(quant)["total"]["skipped_fraction"]
    rows.append(("MC + ODP", pre, dec, model_bytes(quant), skipped))
    base = rows[0]
    lines = [
        "| variant | prefill tok/s | decode tok/s | weights MB | prefill x | decode x | memory x | experts skipped |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, pre, dec, mem, sk in rows:
        lines.append(
            f"| {name} | {pre:.0f} | {dec:.1f} | {mem / 2**20:.1f} | {pre / base[1]:.2f} | {dec / base[2]:.2f} "
            f"| {mem / base[3]:.2f} | {'-' if sk is None else f'{100 * sk:.1f}%'} |"
        )
    dtype = next(model.parameters()).dtype
    mode = "int8" if int8_decode("auto", dtype) else "float"
    lines.append(f"\nMC + ODP and a loaded MC model decode with {mode} activations here (decode_activations='auto', "
                 f"{str(dtype).removeprefix('torch.')}).")  # fmt: skip
    return "\n".join(lines)
