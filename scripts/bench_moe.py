"""One MoE layer, fused mixed-bit op vs the dense float layer: decode (1 token) and prefill (256 tokens) on CPU.

    python scripts/bench_moe.py                           # Mixtral-8x7B layer: hidden 4096, intermediate 14336
    python scripts/bench_moe.py --hidden 256 --inter 512  # the reference model's layer shape
    python scripts/bench_moe.py --odp 0.2                 # 20% of tokens drop their second expert (ODP)
    python scripts/bench_moe.py --no-amx                  # as on a CPU with AVX512-BF16 but no AMX (AMD Zen 4)
    python scripts/bench_moe.py --avx2 --json out.json    # emulated AVX2-only CPU; results also as JSON

Experts get bits 2, 3, 2, 3, ... (2.5 on average; ``--bits`` to change); codes are random (speed does not depend on
the values). Dense = transformers' ``MixtralExperts`` forward (its eager loop over hit experts) with float weights
in fp32 and in bf16; packed = ``optimum_mc::moe`` through ``MCExperts`` with fp32 and with bf16 hidden states. Every
time is the median over routings drawn once and replayed for both, dense and packed calls interleaved (load changes
hit both alike); ratios are dense time / packed time from the same run (> 1: packed is faster). ``--clock cpu``
times this process's CPU time instead of wall time (with ``--threads 1``, less sensitive to other jobs). The dense
fp32 weights of a Mixtral layer take 5.6 GB of memory. The "packed" columns force float activations; the "int8"
ones are ``decode_activations="int8"``, which the default ("auto") picks for bf16 hidden states on CPUs with the
integer-dot kernels: there the "int8 bf16" column is what a bf16 model decodes at by default.

``--no-amx`` runs both sides without AMX, as on a CPU with AVX512-BF16 but no AMX (AMD Zen 4/5): oneDNN (dense
bf16) is capped at ``ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16`` and optimum-mc's AMX kernel is off
(``OPTIMUM_MC_CPU_AMX=0``). ``--avx2`` emulates an AVX2-only CPU: oneDNN at ``AVX2``, MKL at
``MKL_ENABLE_INSTRUCTIONS=AVX2``, optimum-mc's C kernels built with ``-march=haswell`` (``OPTIMUM_MC_CPU_MARCH``: no
AVX-512 kernel at all) and its AMX / AVX512-BF16 switches off; an emulation only (same caches, memory and
clock). Both set the variables before torch starts (they are read when oneDNN / MKL initialize).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time

ISA_ENV = {
    "--no-amx": {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16", "OPTIMUM_MC_CPU_AMX": "0"},
    "--avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "OPTIMUM_MC_CPU_AMX": "0",
               "OPTIMUM_MC_CPU_AVX512BF16": "0", "OPTIMUM_MC_CPU_MARCH": "haswell"},
}  # fmt: skip
for _flag, _env in ISA_ENV.items():  # before torch is imported: oneDNN and MKL read these when they initialize
    if _flag in sys.argv[1:]:
        os.environ.update(_env)

import torch  # noqa: E402
import transformers  # noqa: E402
from transformers.models.mixtral.modeling_mixtral import MixtralExperts  # noqa: E402

from optimum_mc.kernels import cpu  # noqa: E402
from optimum_mc.nn import MCExperts  # noqa: E402

CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def paired_medians(fns, calls: int, min_time: float, clock=time.perf_counter) -> list[float]:
    """Median time of each function, calls interleaved (a, b, a, b, ...) so load changes hit both alike."""
    for fn in fns:
        fn(0)
    times: list[list[float]] = [[] for _ in fns]
    start, i = time.perf_counter(), 0
    while i < calls or time.perf_counter() - start < min_time:
        for fn, ts in zip(fns, times):
            t = clock()
            fn(i)
            ts.append(clock() - t)
        i += 1
    return [statistics.median(ts) for ts in times]


def routings(tokens: int, experts: int, k: int, odp: float, n: int, gen: torch.Generator):
    out = []
    for _ in range(n):
        idx = torch.stack([torch.randperm(experts, generator=gen)[:k] for _ in range(tokens)])
        w = torch.rand(tokens, k, generator=gen).softmax(-1)
        drop = torch.rand(tokens, generator=gen) < odp
        idx[drop, k - 1] = experts  # ODP marks a dropped slot with index E
        out.append((idx, w))
    return out


def packed_experts(args, gen: torch.Generator) -> MCExperts:
    act = torch.nn.SiLU()
    mc = MCExperts(args.experts, args.hidden, args.inter, args.bits, args.group_size, act, torch.float32)
    mc.decode_activations = "float"  # the "packed" columns: float activations (the "int8" ones switch per call)
    for p in mc.packed:
        for lin in (p.gate_up, p.down):
            lin.qweight.copy_(torch.randint(-(2**31), 2**31, lin.qweight.shape, dtype=torch.int64, generator=gen))
            lin.scales.copy_((torch.rand(lin.scales.shape, generator=gen) * 2e-3 + 1e-4).half())
            lin.zeros.copy_((torch.rand(lin.zeros.shape, generator=gen) * ((1 << lin.bits) - 1)).half())
    return mc


def int8(mc: MCExperts, x: torch.Tensor, routing) -> torch.Tensor:
    """One call of ``mc`` with int8 activations in its decode kernel."""
    mc.decode_activations = "int8"
    try:
        return mc(x, routing[0], routing[1])
    finally:
        mc.decode_activations = "float"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=14336)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--bits", type=lambda s: [int(b) for b in s.split(",")], default=None)
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 256])
    p.add_argument("--odp", type=float, default=0.0, help="fraction of tokens dropping their last expert")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--min-time", type=float, default=2.0)
    p.add_argument("--dtypes", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    p.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or this process's CPU time (with --threads 1: robust to other jobs' load)",
    )
    isa = p.add_mutually_exclusive_group()
    isa.add_argument("--no-amx", action="store_true", help="no AMX on either side (an AVX512-BF16 CPU without AMX)")
    isa.add_argument("--avx2", action="store_true", help="emulate an AVX2-only CPU for prefill (see above)")
    p.add_argument("--json", default=None, help="also write the times and ratios to this JSON file")
    args = p.parse_args(argv)
    if (args.no_amx or args.avx2) and os.environ.get("ONEDNN_MAX_CPU_ISA") is None:
        p.error("--no-amx / --avx2 must be on the command line (they set variables before torch is imported)")
    args.bits = args.bits or [(2, 3)[e % 2] for e in range(args.experts)]
    if args.threads:
        torch.set_num_threads(args.threads)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"{os.cpu_count()} cores, load average {load}; torch {torch.__version__}, {torch.get_num_threads()} threads;"
          f" C kernels: {cpu.library() is not None}")  # fmt: skip
    names = {k for e in ISA_ENV.values() for k in e} | {cpu.ENV_BF16_DOT}
    env = {k: os.environ[k] for k in sorted(names) if k in os.environ}
    paths = {"amx": cpu.amx_available(), "avx512bf16": cpu.avx512bf16_available(), "bf16_dot": cpu.bf16_dot()}
    print(f"bf16 prefill kernels: {paths}; ISA caps: {env or 'none'}")
    mean = sum(args.bits) / len(args.bits)
    print(f"layer: hidden {args.hidden}, intermediate {args.inter}, {args.experts} experts top-{args.top_k}, "
          f"bits {args.bits} (mean {mean:.2f}), group {args.group_size}, ODP {args.odp}\n")  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    mc = packed_experts(args, gen)
    cfg = transformers.MixtralConfig(hidden_size=args.hidden, intermediate_size=args.inter,
                                     num_local_experts=args.experts, num_experts_per_tok=args.top_k)  # fmt: skip
    cfg._experts_implementation = "eager"
    times: dict[tuple[str, int], float] = {}
    plans = {t: routings(t, args.experts, args.top_k, args.odp, 8, gen) for t in args.tokens}
    xs = {t: torch.randn(t, args.hidden, generator=gen) for t in args.tokens}
    clock = CLOCKS[args.clock]
    for dtype in [{"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtypes]:
        with torch.device("meta"):
            dense = MixtralExperts(cfg)
        dense.gate_up_proj = torch.nn.Parameter(torch.empty(dense.gate_up_proj.shape, dtype=dtype).normal_(0, 0.02))
        dense.down_proj = torch.nn.Parameter(torch.empty(dense.down_proj.shape, dtype=dtype).normal_(0, 0.02))
        dense.config = cfg
        name = "fp32" if dtype == torch.float32 else "bf16"
        with torch.no_grad():
            for t in args.tokens:
                x, plan = xs[t].to(dtype), plans[t]
                calls = 20 if t == 1 else 3
                run_dense = lambda i: dense(x, plan[i % 8][0], plan[i % 8][1].to(dtype))  # noqa: B023, E731
                run_packed = lambda i: mc(x, plan[i % 8][0], plan[i % 8][1])  # noqa: B023, E731
                fns = [run_dense, run_packed]
                if t <= cpu.GEMV_MAX_ROWS:  # decode: also with int8 activations (decode_activations="int8")
                    fns.append(lambda i: int8(mc, x, plan[i % 8]))  # noqa: B023
                measured = paired_medians(fns, calls, args.min_time, clock)
                times[("dense " + name, t)], times[("packed " + name, t)] = measured[:2]
                if len(measured) == 3:
                    times[("int8 " + name, t)] = measured[2]
        dense = None  # free the float weights before the next dtype
        gc.collect()
    print(f"times: {args.clock} clock, median\n")
    print("| tokens | packed fp32 vs dense fp32 | packed bf16 vs dense bf16 | packed bf16 vs dense fp32 "
          "| packed fp32 vs dense bf16 | dense fp32 ms | dense bf16 ms | packed fp32 ms "
          "| packed bf16 ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for t in args.tokens:
        d32, d16, p32, p16 = (
            times.get((n, t), nan) for n in ("dense fp32", "dense bf16", "packed fp32", "packed bf16")
        )
        print(f"| {t} | {d32 / p32:.2f} | {d16 / p16:.2f} | {d32 / p16:.2f} | {d16 / p32:.2f} | {d32 * 1e3:.2f} "
              f"| {d16 * 1e3:.2f} | {p32 * 1e3:.2f} | {p16 * 1e3:.2f} |")  # fmt: skip
    decode = [t for t in args.tokens if ("int8 fp32", t) in times or ("int8 bf16", t) in times]
    if decode:
        print("\nwith decode_activations='int8' (GEMV inputs rounded to int8 per group):\n")
        print("| tokens | int8 fp32 vs dense fp32 | int8 bf16 vs dense bf16 | int8 fp32 vs packed fp32 | int8 fp32 ms "
              "| int8 bf16 ms |")  # fmt: skip
        print("|---|---|---|---|---|---|")
        for t in decode:
            d32, d16, p32, i32, i16 = (
                times.get((n, t), nan) for n in ("dense fp32", "dense bf16", "packed fp32", "int8 fp32", "int8 bf16")
            )
            print(f"| {t} | {d32 / i32:.2f} | {d16 / i16:.2f} | {p32 / i32:.2f} | {i32 * 1e3:.2f} | {i16 * 1e3:.2f} |")
    load_after = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\nload average after: {load_after}")
    if args.json:
        rows = [{"tokens": t, **{n.replace(" ", "_") + "_ms": times[(n, t)] * 1e3 for n, tt in times if tt == t}}
                for t in args.tokens]  # fmt: skip
        for r in rows:
            for a, b in (("dense_fp32", "packed_fp32"), ("dense_bf16", "packed_bf16"), ("dense_fp32", "packed_bf16")):
                if f"{a}_ms" in r and f"{b}_ms" in r:
                    r[f"{b}_vs_{a}"] = r[f"{a}_ms"] / r[f"{b}_ms"]
        meta = {"argv": sys.argv[1:], "load_before": load, "load_after": load_after, "cpu_count": os.cpu_count(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "clock": args.clock,
                "bf16_prefill_kernels": paths, "isa_env": env, "bits": args.bits}  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
