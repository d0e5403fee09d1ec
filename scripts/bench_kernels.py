"""Kernel benchmark on this machine's CPU: packed size vs ideal, GEMV / GEMM speed as ratios to dense matmul.

    python scripts/bench_kernels.py                # expert shapes of the reference model and of Mixtral-8x7B
    python scripts/bench_kernels.py --quick        # small shapes only, shorter timing
    python scripts/bench_kernels.py --threads 1    # pin torch and the C kernels to one thread

Shapes are (out_features, in_features) of one weight. Every time is the median of repeated calls after a warm-up;
a ratio is dense time / packed time measured in the same run (> 1: the packed kernel is faster). The packed kernel
is the public ``optimum_mc.kernels.qmatmul`` (op dispatch included); dense is ``x @ W.T`` in fp32 and in bf16.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from optimum_mc.kernels import cpu, qmatmul
from optimum_mc.packing import SUPPORTED_BITS, ideal_nbytes, pack, packed_nbytes

SMALL = [(512, 256), (256, 512)]  # reference model experts (gate/up and down projections)
LARGE = [(14336, 4096), (4096, 14336)]  # Mixtral-8x7B experts (w1/w3 and w2)


def median_time(fn, min_time: float, min_runs: int = 5, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` over at least ``min_runs`` calls and ``min_time`` seconds."""
    for _ in range(warmup):
        fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_packed(out_f: int, in_f: int, bits: int, group: int, gen: torch.Generator):
    """Random codes and grid of the right shapes (kernel speed does not depend on the values)."""
    codes = torch.randint(0, 1 << bits, (out_f, in_f), dtype=torch.uint8, generator=gen)
    groups = in_f // group
    scales = (torch.rand(out_f, groups, generator=gen) * 0.01 + 1e-3).half()
    zeros = (torch.rand(out_f, groups, generator=gen) * ((1 << bits) - 1)).half()
    return pack(codes, bits), scales, zeros


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes only, shorter timing")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="rows of x (decode GEMV, prefill GEMM)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = SMALL + ([] if args.quick else LARGE)
    min_time = 0.1 if args.quick else 0.4
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, load average {load}")
    loaded = cpu.library() is not None
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; C kernels loaded: {loaded}")
    print(f"group size {args.group_size}; GEMV for <= {cpu.GEMV_MAX_ROWS} rows, dequantize + BLAS above\n")

    print("packed bytes / ideal bytes (codes n*b/8 + fp16 scale and zero per group):\n")
    print("| shape (out x in) | " + " | ".join(f"{b}-bit" for b in SUPPORTED_BITS) + " |")
    print("|---|" + "---|" * len(SUPPORTED_BITS))
    for out_f, in_f in shapes:
        ratios = [
            packed_nbytes(out_f, in_f, b, args.group_size) / ideal_nbytes(out_f, in_f, b, args.group_size)
            for b in SUPPORTED_BITS
        ]
        print(f"| {out_f}x{in_f} | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")

    print("\nspeed-up over dense matmul (dense time / packed time; > 1 is faster) and packed time:\n")
    print("| shape (out x in) | rows | bits | vs fp32 | vs bf16 | packed ms | fp32 ms | bf16 ms |")
    print("|---|---|---|---|---|---|---|---|")
    gen = torch.Generator().manual_seed(0)
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f, generator=gen) * 0.02
        wb = w.bfloat16()
        packed = {b: random_packed(out_f, in_f, b, args.group_size, gen) for b in SUPPORTED_BITS}
        for rows in args.batches:
            x = torch.randn(rows, in_f, generator=gen)
            xb = x.bfloat16()
            t32 = median_time(lambda: x @ w.t(), min_time)  # noqa: B023
            t16 = median_time(lambda: xb @ wb.t(), min_time)  # noqa: B023
            for b in SUPPORTED_BITS:
                pk, s, z = packed[b]
                tq = median_time(lambda: qmatmul(x, pk, s, z, b), min_time)  # noqa: B023
                print(
                    f"| {out_f}x{in_f} | {rows} | {b} | {t32 / tq:.2f} | {t16 / tq:.2f} "
                    f"| {tq * 1e3:.3f} | {t32 * 1e3:.3f} | {t16 * 1e3:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
