"""Whole-model speed on CPU: greedy decode (batch 1) and prefill, float fp32 / bf16 vs MC-packed fp32 / bf16 (+ ODP,
+ int8 decode activations).

    python scripts/bench_decode.py ../shared/models/mc-ref-mixtral --threads 2

The MC variants replace every MoE layer's experts by :class:`MCExperts` (bits 2, 3, 2, 3, ...: 2.5 on average)
and the attention projections by 4-bit :class:`QuantLinear`, both by round-to-nearest: speed does not depend on
the calibration, only on the modules and bit-widths, which are those of an MC 2.5 checkpoint. Each variant is
measured ``--repeats`` times, interleaved with the others, and the best run is kept (the machine is shared); ratios
are against the float fp32 model from the same run.
"""

from __future__ import annotations

import argparse
import copy
import os
import time

import torch
from transformers import AutoModelForCausalLM

from optimum_mc.architectures import moe_blocks
from optimum_mc.nn import MCExperts, QuantLinear
from optimum_mc.nn.experts import set_decode_activations
from optimum_mc.tools.speed import measure

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def quantize_rtn(model, group: int = 128):
    """MC-shaped model: 2/3-bit experts (2.5 mean), 4-bit attention, by round-to-nearest."""
    for blk in moe_blocks(model):
        bits = [(2, 3)[e % 2] for e in range(blk.experts.num_experts)]
        blk.block.experts = MCExperts.from_float(blk.experts, bits, group)
    for module in list(model.modules()):
        for name in ATTENTION:
            lin = getattr(module, name, None)
            if isinstance(lin, torch.nn.Linear):
                setattr(module, name, QuantLinear.from_linear(lin, 4, group))
    return model


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-odp", action="store_true")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall time, or this process's CPU time (with --threads 1: robust to other jobs' load)",
    )
    args = p.parse_args(argv)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    load = lambda: ", ".join(f"{v:.1f}" for v in os.getloadavg())  # noqa: E731
    print(f"{os.cpu_count()} cores, {torch.get_num_threads()} threads, load average {load()}")
    f32 = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    variants = {
        "float fp32": f32,
        "float bf16": copy.deepcopy(f32).to(torch.bfloat16),
        "MC fp32": quantize_rtn(copy.deepcopy(f32)),
    }
    variants["MC bf16"] = quantize_rtn(copy.deepcopy(f32).to(torch.bfloat16))  # default "auto": int8 on VNNI CPUs
    variants["MC bf16 float-act"] = copy.deepcopy(variants["MC bf16"])
    set_decode_activations(variants["MC bf16 float-act"], "float")
    set_decode_activations(variants["MC fp32"], "float")  # as "auto" does for fp32, made explicit
    variants["MC fp32 int8-act"] = copy.deepcopy(variants["MC fp32"])
    set_decode_activations(variants["MC fp32 int8-act"], "int8")
    if not args.no_odp:
        from optimum_mc.pruning import set_odp

        for dtype in ("fp32", "bf16"):
            odp = copy.deepcopy(variants[f"MC {dtype}"])
            set_odp(odp, True)
            variants[f"MC {dtype} + ODP"] = odp
    vocab = f32.config.vocab_size
    prompt = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    best: dict[str, list[float]] = {name: [0.0, 0.0] for name in variants}
    for rnd in range(args.repeats):
        for name, model in variants.items():
            pre, dec = measure(model, prompt, args.new_tokens, clock, warm_up=rnd == 0)
            best[name] = [max(best[name][0], pre), max(best[name][1], dec)]
    base = best["float fp32"]
    print(f"\nprefill {args.prompt_len} tokens, greedy decode {args.new_tokens} tokens, batch 1; best of "
          f"{args.repeats}; {args.clock} clock\n")  # fmt: skip
    print("| variant | prefill tok/s | decode tok/s | prefill x fp32 | decode x fp32 |")
    print("|---|---|---|---|---|")
    for name, (pre, dec) in best.items():
        print(f"| {name} | {pre:.0f} | {dec:.1f} | {pre / base[0]:.2f} | {dec / base[1]:.2f} |")
    print(f"\nload average after: {load()}")


if __name__ == "__main__":
    main()
