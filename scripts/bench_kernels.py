"""Kernel benchmark on this machine's CPU: packed size vs ideal, GEMV / GEMM time as ratios to dense matmul.

    python scripts/bench_kernels.py            # reference-model and Mixtral-8x7B expert shapes
    python scripts/bench_kernels.py --quick    # small shapes only

Each ratio is dense time / packed-kernel time measured in the same run (> 1 means the packed kernel is faster).
"""

from __future__ import annotations

import argparse
import time

import torch

from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels import qmatmul
from optimum_mc.kernels.cpu import library
from optimum_mc.packing import SUPPORTED_BITS, ideal_nbytes, pack, packed_nbytes


def median_time(fn, min_time: float = 0.3, min_runs: int = 5) -> float:
    fn()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--group-size", type=int, default=128)
    args = p.parse_args(argv)
    shapes = [(512, 256), (256, 512)] + ([] if args.quick else [(14336, 4096), (4096, 14336)])
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, C kernels: {library() is not None}")
    print("\npacked bytes / ideal (n*b/8 + 2x16 bits per group):")
    for out_f, in_f in shapes:
        row = [
            f"{packed_nbytes(out_f, in_f, b, args.group_size) / ideal_nbytes(out_f, in_f, b, args.group_size):.3f}"
            for b in SUPPORTED_BITS
        ]
        print(f"  {out_f}x{in_f}: " + "  ".join(f"{b}b={r}" for b, r in zip(SUPPORTED_BITS, row)))
    print("\nspeed-up over dense matmul (dense time / packed time), out x in, batch rows:")
    print("| shape | batch | bits | vs fp32 | vs bf16 | packed ms |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f in shapes:
        w = torch.randn(out_f, in_f) * 0.02
        for batch in (1, 256):
            x = torch.randn(batch, in_f)
            xb, wb = x.bfloat16(), w.bfloat16()
            t32 = median_time(lambda x=x, w=w: x @ w.t())
            t16 = median_time(lambda xb=xb, wb=wb: xb @ wb.t())
            for bits in SUPPORTED_BITS:
                q, s, z = rtn_quantize(w, bits, args.group_size)
                pk = pack(q, bits)
                tq = median_time(lambda x=x, pk=pk, s=s, z=z, bits=bits: qmatmul(x, pk, s, z, bits))
                print(
                    f"| {out_f}x{in_f} | {batch} | {bits} | {t32 / tq:.2f} | {t16 / tq:.2f} | {tq * 1e3:.3f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
