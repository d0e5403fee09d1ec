"""Kernel benchmark on this machine's CPU: packed size vs ideal, GEMV / GEMM speed as ratios to dense matmul.

    python scripts/bench_kernels.py                # expert shapes of the reference model and of Mixtral-8x7B
    python scripts/bench_kernels.py --quick        # small shapes only, shorter timing
    python scripts/bench_kernels.py --threads 1    # pin torch and the C kernels to one thread
    python scripts/bench_kernels.py --moe-prefill --before <rev>  # one MoE layer's prefill, JSON

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

from optimum_mc.kernels import cpu, moe, qmatmul
from optimum_mc.packing import SUPPORTED_BITS, ideal_nbytes, pack, packed_nbytes, packed_words

SMALL = [(512, 256), (256, 512)]  # reference model experts (gate/up and down projections)
LARGE = [(14336, 4096), (4096, 14336)]  # Mixtral-8x7B experts (w1/w3 and w2)


def median_time(fn, min_time: float, min_runs: int = 5, warmup: int = 2, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` over at least ``min_runs`` calls and ``min_time`` seconds (CUDA: synchronized)."""
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def random_packed(out_f: int, in_f: int, bits: int, group: int, gen: torch.Generator):
    """Random codes and grid of the right shapes (kernel speed does not depend on the values)."""
    codes = torch.randint(0, 1 << bits, (out_f, in_f), dtype=torch.uint8, generator=gen)
    groups = in_f // group
    scales = (torch.rand(out_f, groups, generator=gen) * 0.01 + 1e-3).half()
    zeros = (torch.rand(out_f, groups, generator=gen) * ((1 << bits) - 1)).half()
    return pack(codes, bits), scales, zeros


def random_words(out_f: int, in_f: int, bits: int, group: int, gen: torch.Generator):
    """Like :func:`random_packed`, drawing the packed int32 words directly (random words are random codes; this
    skips packing, which takes minutes for the 8 experts of a Mixtral-shaped layer)."""
    qweight = torch.randint(-(2**31), 2**31 - 1, (out_f, packed_words(in_f, bits)), dtype=torch.int32, generator=gen)
    groups = in_f // group
    scales = (torch.rand(out_f, groups, generator=gen) * 0.01 + 1e-3).half()
    zeros = (torch.rand(out_f, groups, generator=gen) * ((1 << bits) - 1)).half()
    return qweight, scales, zeros


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes only, shorter timing")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 256], help="rows of x (decode GEMV, prefill GEMM)")
    p.add_argument("--crossover", action="store_true", help="only: bf16 rows, fused GEMV vs the AMX kernel")
    p.add_argument(
        "--moe-decode-crossover",
        action="store_true",
        help="only: bf16 MoE layer, the one-call int8 decode kernel vs the grouped path, per token count",
    )
    p.add_argument(
        "--moe-prefill",
        action="store_true",
        help="only: one bf16 Mixtral layer of 1/4 width, 512 tokens top-2, 2/3-bit experts: the CPU op (and, with "
        "--before, the op's grouped path at that git revision) vs bf16 float experts; JSON",
    )
    p.add_argument("--before", default=None, help="--moe-prefill: also time moe_cpu._prefill and the C kernels at REV")
    p.add_argument("--rounds", type=int, default=11, help="--moe-prefill: alternating rounds")
    p.add_argument("--tokens", type=int, default=512, help="--moe-prefill: prompt tokens")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.moe_prefill:
        return moe_prefill(args.group_size, args.tokens, args.rounds, args.before)
    if args.crossover:
        return crossover(args.group_size)
    if args.moe_decode_crossover:
        return moe_decode_crossover(args.group_size)
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
    moe_section(args, min_time)


def crossover(group: int) -> None:
    """bf16 rows: the fused GEMV (on the rows widened to fp32) against the bf16 prefill kernel (AMX where present),
    per row count: where ``cpu.gemv_rows`` should hand bf16 rows over (``AMX_MIN_ROWS``)."""
    lib, gen = cpu.library(), torch.Generator().manual_seed(0)
    kernel = lib is not None and cpu.bf16_prefill_kernel(lib, 1024, group, 4)
    print(f"bf16 prefill kernel: {getattr(kernel, '__name__', None)}; AMX_MIN_ROWS = {cpu.AMX_MIN_ROWS}\n")
    print("| shape (out x in) | bits | rows | GEMV ms | bf16 kernel ms | kernel / GEMV |")
    print("|---|---|---|---|---|---|")
    for out_f, in_f, bits in ((7168, 1024, 2), (1024, 3584, 3), (1536, 1024, 4)):
        qw, s, z = random_packed(out_f, in_f, bits, group, gen)
        for rows in (1, 2, 4, 6, 8, 12):
            x = torch.randn(rows, in_f, generator=gen).bfloat16()
            xf, y = x.float(), torch.empty(rows, out_f)
            args = (qw.data_ptr(), s.data_ptr(), z.data_ptr(), y.data_ptr(), rows, out_f, in_f, bits, group)
            tg = median_time(lambda: lib.mc_gemv(xf.data_ptr(), *args, torch.get_num_threads()), 0.2)  # noqa: B023
            tk = median_time(lambda: cpu.dense_rows(lib, x, qw, s, z, bits, y), 0.2)  # noqa: B023
            row = f"| {out_f}x{in_f} | {bits} | {rows} | {tg * 1e3:.3f} | {tk * 1e3:.3f} | {tk / tg:.2f} |"
            print(row, flush=True)


def moe_decode_crossover(group: int, rounds: int = 21) -> None:
    """bf16 hidden states of a Mixtral layer of 1/4 width (8 experts top-2, experts at 2 and 3 bits, int8 decode
    activations): the whole-layer decode kernel (``mc_moe_decode``) against the grouped prefill path, per token
    count: where ``cpu.moe_decode_tokens`` should hand over (``MOE_DECODE_MAX_TOKENS_INT8``). Rounds alternate the
    two paths; each time is the minimum over the rounds (robust to other load on the machine)."""
    from optimum_mc.kernels import moe_cpu

    lib, gen = cpu.library(), torch.Generator().manual_seed(0)
    hidden, inter, experts, bits = 1024, 3584, 8, [2, 3] * 4
    gate_up = [random_words(2 * inter, hidden, b, group, gen) for b in bits]
    down = [random_words(hidden, inter, b, group, gen) for b in bits]
    gu, dn = tuple([m[j] for m in gate_up] for j in range(3)), tuple([m[j] for m in down] for j in range(3))
    paths = {
        "decode kernel": lambda x, i, w: moe_cpu._decode(lib, x, i, w, gu, dn, bits, "silu", True),
        "grouped path": lambda x, i, w: moe_cpu._prefill(lib, x, i, w, gu, dn, bits, "silu"),
    }
    print(f"int8 decode: {cpu.int8_decode('auto', torch.bfloat16)}; "
          f"MOE_DECODE_MAX_TOKENS_INT8 = {cpu.MOE_DECODE_MAX_TOKENS_INT8}\n")  # fmt: skip
    print("| tokens | decode kernel ms | grouped path ms | grouped / decode |")
    print("|---|---|---|---|")
    for tokens in (4, 8, 12, 16, 24, 32, 40, 48, 64):
        x = torch.randn(tokens, hidden, generator=gen).bfloat16()
        w, idx = torch.topk(torch.softmax(torch.randn(tokens, experts, generator=gen), -1), 2)
        w = w / w.sum(-1, keepdim=True)
        times = {k: [] for k in paths}
        for f in paths.values():
            f(x, idx, w)
        for _ in range(rounds):
            for k, f in paths.items():
                t = time.perf_counter()
                f(x, idx, w)
                times[k].append(time.perf_counter() - t)
        td, tg = (min(times[k]) for k in paths)
        print(f"| {tokens} | {td * 1e3:.2f} | {tg * 1e3:.2f} | {tg / td:.2f} |", flush=True)


def _prefill_at(rev: str):
    """``moe_cpu._prefill`` and the C kernels as they were at git revision ``rev`` (the source built here with the
    flags of today's build), to time a change against its baseline in the same process: ``(prefill, lib)``."""
    import subprocess
    import tarfile
    import tempfile
    import types

    from optimum_mc.kernels import moe_cpu

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(moe_cpu.__file__))))
    git = ["git", "-C", root]
    src = subprocess.run([*git, "show", f"{rev}:optimum_mc/kernels/moe_cpu.py"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    mod = types.ModuleType(f"optimum_mc.kernels._moe_cpu_at_{rev}")
    mod.__package__ = "optimum_mc.kernels"
    exec(compile(src, f"{rev}:moe_cpu.py", "exec"), mod.__dict__)
    tmp = tempfile.mkdtemp(prefix="mc_bench_")
    archive = os.path.join(tmp, "csrc.tar")
    subprocess.run([*git, "archive", "-o", archive, rev, "optimum_mc/kernels/csrc"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    csrc = os.path.join(tmp, "optimum_mc", "kernels", "csrc")
    flags = cpu.fallback_flags()[0]
    out = os.path.join(tmp, "mc_kernels.so")
    subprocess.run([cpu._compiler(), *flags, f"-I{csrc}", os.path.join(csrc, "mc_kernels.c"), "-o", out, "-lm"],
                   check=True)  # fmt: skip
    old, now = cpu._open(out), cpu.library()
    for name, fn in vars(now).items():  # today's signatures for the functions that revision had
        if name.startswith("mc_") and hasattr(old, name):
            getattr(old, name).argtypes, getattr(old, name).restype = fn.argtypes, fn.restype
    return mod._prefill, old


def moe_prefill(group: int, tokens: int, rounds: int, before: str | None) -> None:
    """One MoE layer's prefill with bf16 hidden states, Mixtral of 1/4 width (hidden 1024, intermediate 3584,
    8 experts top-2, experts at 2 and 3 bits alternating): ``moe_cpu._prefill`` (and the one at git revision
    ``before``, with the C kernels of that revision) vs bf16 float experts (:func:`dense_moe`, per-expert
    ``F.linear`` as transformers' eager experts).
    Rounds alternate the paths; prints JSON with each path's min and median ms and the ratios of the minima."""
    import json

    from optimum_mc.kernels import moe_cpu

    lib, gen = cpu.library(), torch.Generator().manual_seed(0)
    hidden, inter, experts, bits = 1024, 3584, 8, [2, 3] * 4
    gate_up = [random_words(2 * inter, hidden, b, group, gen) for b in bits]
    down = [random_words(hidden, inter, b, group, gen) for b in bits]
    gu, dn = tuple([m[j] for m in gate_up] for j in range(3)), tuple([m[j] for m in down] for j in range(3))
    w1 = torch.randn(experts, 2 * inter, hidden, generator=gen).mul_(0.02).bfloat16()
    w2 = torch.randn(experts, hidden, inter, generator=gen).mul_(0.02).bfloat16()
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()
    w, idx = torch.topk(torch.softmax(torch.randn(tokens, experts, generator=gen), -1), 2)
    w = w / w.sum(-1, keepdim=True)
    paths = {"mc": lambda: moe_cpu._prefill(lib, x, idx, w, gu, dn, bits, "silu")}
    if before:
        old, old_lib = _prefill_at(before)
        paths["mc_before"] = lambda: old(old_lib, x, idx, w, gu, dn, bits, "silu")
    paths["bf16_float"] = lambda: dense_moe(x, idx, w, w1, w2)
    times = {k: [] for k in paths}
    for f in paths.values():
        f()
    for _ in range(rounds):
        for k, f in paths.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    ms = {k: {"min": min(v) * 1e3, "median": statistics.median(v) * 1e3} for k, v in times.items()}
    ratios = {f"{k}/bf16_float": ms[k]["min"] / ms["bf16_float"]["min"] for k in paths if k != "bf16_float"}
    if before:
        ratios["mc/mc_before"] = ms["mc"]["min"] / ms["mc_before"]["min"]
    report = {
        "shape": {"hidden": hidden, "inter": inter, "experts": experts, "top_k": 2, "tokens": tokens, "bits": bits},
        "threads": torch.get_num_threads(), "before": before, "rounds": rounds, "ms": ms, "ratios_of_min": ratios,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }  # fmt: skip
    print(json.dumps(report, indent=1))


def dense_moe(x, idx, wts, w1, w2) -> torch.Tensor:
    """A float MoE layer, expert by expert (what transformers' eager experts do)."""
    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(idx == e)
        g, u = torch.nn.functional.linear(x[tok], w1[e]).chunk(2, -1)
        y = torch.nn.functional.linear(torch.nn.functional.silu(g) * u, w2[e])
        out.index_add_(0, tok, y * wts[tok, slot, None].to(x.dtype))
    return out


def moe_layer_rows(device: str, hidden: int, inter: int, experts: int, group: int, rows_list, min_time: float):
    """The fused MoE op (``optimum_mc::moe``, experts at 2/3 bits alternating, top-2) vs the dense layer
    (per-expert ``F.linear`` in fp16/bf16 on CUDA, fp32 and bf16 on CPU) on ``device``; prints markdown rows."""
    gen = torch.Generator().manual_seed(1)
    bits = [(2, 3)[e % 2] for e in range(experts)]
    gate_up, down = [], []
    for b in bits:
        gate_up.append(tuple(t.to(device) for t in random_words(2 * inter, hidden, b, group, gen)))
        down.append(tuple(t.to(device) for t in random_words(hidden, inter, b, group, gen)))
    dtypes = (torch.float16, torch.bfloat16) if device.startswith("cuda") else (torch.float32, torch.bfloat16)
    for dtype in dtypes:
        w1 = torch.randn(experts, 2 * inter, hidden, device=device, dtype=dtype).mul_(0.02)
        w2 = torch.randn(experts, hidden, inter, device=device, dtype=dtype).mul_(0.02)
        for rows in rows_list:
            idx = torch.stack([torch.randperm(experts, generator=gen)[:2] for _ in range(rows)]).to(device)
            wts = torch.rand(rows, 2, generator=gen).to(device)
            x = torch.randn(rows, hidden, generator=gen).to(device, dtype)

            td = median_time(lambda: dense_moe(x, idx, wts, w1, w2), min_time, device=device)  # noqa: B023
            tq = median_time(lambda: moe(x, idx, wts, gate_up, down, bits), min_time, device=device)  # noqa: B023
            print(f"| {device} | {hidden}x{inter}x{experts} | {rows} | {str(dtype)[6:]} | {td / tq:.2f} "
                  f"| {tq * 1e3:.3f} | {td * 1e3:.3f} |", flush=True)  # fmt: skip


def moe_section(args, min_time: float) -> None:
    """The fused MoE layer: the reference model's shape on CPU; Mixtral's too on CUDA when a GPU is present."""
    print("\nfused MoE layer (2.5 bits mean, top-2) vs dense experts (dense time / packed time):\n")
    print("| device | hidden x inter x experts | tokens | dtype | vs dense | packed ms | dense ms |")
    print("|---|---|---|---|---|---|---|")
    moe_layer_rows("cpu", 256, 512, 8, args.group_size, args.batches, min_time)
    if torch.cuda.is_available():
        for hidden, inter in ((256, 512), (4096, 14336)):
            moe_layer_rows("cuda", hidden, inter, 8, args.group_size, args.batches, min_time)


if __name__ == "__main__":
    main()
