"""Tile sizes of the Triton MoE kernel (``optimum_mc::moe`` on CUDA) on a Mixtral-shaped layer; needs a GPU.

Times every (BLOCK_M, BLOCK_N, BLOCK_K, warps) candidate with ``triton.testing.do_bench`` (median, ms) at decode
and prefill token counts, next to the dense fp16/bf16 layer (per-expert ``F.linear``, what transformers' eager
experts do) measured in the same run, and prints the best tiles per token count with the bandwidth they reach on
the packed weights that the routed experts need.

    python scripts/tune_triton_moe.py --hidden 4096 --inter 14336 --tokens 1 16 256 1024
    python scripts/tune_triton_moe.py --dequant --tokens 8 16 32 64 256 1024   # where prefill should dequantize
"""

from __future__ import annotations

import argparse
import itertools
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kernels import dense_moe, random_words  # noqa: E402

from optimum_mc.kernels.moe_triton import GROUPED_MM_DTYPES, triton_moe  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 1024])
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    ap.add_argument("--gemv", action="store_true", help="sweep the per-pair GEMV kernel's tiles (decode) instead")
    ap.add_argument("--dequant", action="store_true", help="time the dequantize + grouped-matmul path vs the kernels")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    from triton.testing import do_bench

    dev, gen = "cuda", torch.Generator().manual_seed(0)
    bits = [(2, 3)[e % 2] for e in range(a.experts)]
    gu, dn = [], []
    for b in bits:
        gu.append(tuple(t.to(dev) for t in random_words(2 * a.inter, a.hidden, b, a.group_size, gen)))
        dn.append(tuple(t.to(dev) for t in random_words(a.hidden, a.inter, b, a.group_size, gen)))
    lists = [[m[j] for m in gu] for j in range(3)] + [[m[j] for m in dn] for j in range(3)]
    per_expert_bytes = [sum(t.numel() * t.element_size() for t in (*gu[e], *dn[e])) for e in range(a.experts)]
    print(f"GPU: {torch.cuda.get_device_name()}; layer {a.hidden}x{a.inter}x{a.experts}, top-2, bits {bits}")
    nk = ((16, 64), (16, 128), (32, 64), (32, 128), (64, 64), (64, 128))
    tiles_decode = [(16, n, k, w) for (n, k), w in itertools.product(nk, (2, 4))]
    nk = ((32, 64), (64, 32), (64, 64), (128, 32), (128, 64))
    tiles_prefill = [(m, n, k, w) for m, (n, k), w in itertools.product((64, 128), nk, (4, 8))]
    if a.gemv:
        return gemv_sweep(a, gu, dn, lists, bits, per_expert_bytes, do_bench)
    if a.dequant:
        return dequant_compare(a, lists, bits, per_expert_bytes, do_bench)
    summary = []
    for dname in a.dtypes:
        dtype = getattr(torch, dname)
        torch.manual_seed(0)
        w1, w2 = dense_weights(a, dtype)
        mats = [(m, b) for ms in (gu, dn) for m, b in zip(ms, bits)]
        deq = do_bench(lambda: [torch.ops.optimum_mc.dequantize(*m, b, dtype) for m, b in mats], return_mode="median")  # noqa: B023
        written = 2 * (w1.numel() + w2.numel())
        gbs = written / deq / 1e6
        print(f"{dname}: dequantize every expert: {deq:.3f} ms, {gbs:.0f} GB/s written ({written / 1e9:.2f} GB)")
        for tokens in a.tokens:
            idx, wts, x, weight_bytes = layer_call(a, tokens, dtype, gen, per_expert_bytes)
            dense = do_bench(lambda: dense_moe(x, idx, wts, w1, w2), return_mode="median")  # noqa: B023
            ref = triton_moe(x, idx, wts, *lists, bits, "silu").float()
            rows = []
            for m, n, k, w in tiles_decode if tokens * 2 <= 16 * a.experts else tiles_prefill:
                try:

                    def fn(tiles=(m, n, k, w)):
                        return triton_moe(x, idx, wts, *lists, bits, "silu", tiles=tiles)  # noqa: B023

                    out = fn().float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    rows.append((do_bench(fn, return_mode="median"), (m, n, k, w), err))
                except Exception as exc:  # a tile the compiler refuses (shared memory): skip it, say so
                    print(f"  tiles {(m, n, k, w)}: {type(exc).__name__}: {str(exc)[:120]}")
            rows.sort()
            t_default = do_bench(lambda: triton_moe(x, idx, wts, *lists, bits, "silu"), return_mode="median")  # noqa: B023
            print(f"{dname} tokens={tokens}: default tiles {t_default:.3f} ms, dense {dense:.3f} ms")
            for ms, tiles, err in rows[:5]:
                print(f"{dname} tokens={tokens}: tiles(M,N,K,warps)={tiles} {ms:.3f} ms  rel diff {err:.1e}")
            best_ms, best, _ = rows[0]
            summary.append((dname, tokens, dense, best_ms, best, weight_bytes / best_ms / 1e6))
    print("\n| dtype | tokens | dense ms | fused ms (best tiles) | vs dense | tiles M,N,K,warps | packed GB/s |")
    print("|---|---|---|---|---|---|---|")
    for dname, tokens, dense, best_ms, best, gbs in summary:
        print(f"| {dname} | {tokens} | {dense:.3f} | {best_ms:.3f} | {dense / best_ms:.2f} | {best} | {gbs:.0f} |")


def dequant_compare(a, lists, bits, per_expert_bytes, do_bench) -> None:
    """Per token count: dense layer, the kernels' default (GEMV or tiles) and the dequantize + grouped-matmul path,
    the crossover of which sets ``DEQUANT_MIN_PAIRS``."""
    gen = torch.Generator().manual_seed(1)
    print("| dtype | tokens | dense ms | kernel ms | dequant + grouped ms | rel diff |")
    print("|---|---|---|---|---|---|")
    for dname in a.dtypes:
        dtype = getattr(torch, dname)
        if dtype not in GROUPED_MM_DTYPES["cuda"]:
            print(f"| {dname} | - | torch's CUDA grouped_mm takes {GROUPED_MM_DTYPES['cuda']} only: skipped |")
            continue
        w1, w2 = dense_weights(a, dtype)
        for tokens in a.tokens:
            idx, wts, x, _ = layer_call(a, tokens, dtype, gen, per_expert_bytes)
            dense = do_bench(lambda: dense_moe(x, idx, wts, w1, w2), return_mode="median")  # noqa: B023
            run = [partial(triton_moe, x, idx, wts, *lists, bits, "silu", dequant=d) for d in (False, True)]
            kernel, deq = (do_bench(f, return_mode="median") for f in run)
            ref, out = (f().float() for f in run)
            err = ((out - ref).norm() / ref.norm()).item()
            print(f"| {dname} | {tokens} | {dense:.3f} | {kernel:.3f} | {deq:.3f} | {err:.1e} |")


def dense_weights(a, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense layer's stacked gate_up and down weights on the GPU (random: speed does not depend on values)."""
    w1 = torch.randn(a.experts, 2 * a.inter, a.hidden, device="cuda", dtype=dtype).mul_(0.02)
    w2 = torch.randn(a.experts, a.hidden, a.inter, device="cuda", dtype=dtype).mul_(0.02)
    return w1, w2


def layer_call(a, tokens: int, dtype: torch.dtype, gen: torch.Generator, per_expert_bytes: list[int]):
    """Random top-2 routing, routing weights and inputs for ``tokens`` tokens, and the bytes of packed weights
    the routed experts need."""
    idx = torch.stack([torch.randperm(a.experts, generator=gen)[:2] for _ in range(tokens)]).to("cuda")
    wts = torch.rand(tokens, 2, generator=gen).to("cuda")
    x = torch.randn(tokens, a.hidden, generator=gen).to("cuda", dtype)
    weight_bytes = sum(per_expert_bytes[e] for e in sorted(set(idx.flatten().tolist())))
    return idx, wts, x, weight_bytes


def gemv_sweep(a, gu, dn, lists, bits, per_expert_bytes, do_bench) -> None:
    """The per-pair GEMV kernel (decode) over (BLOCK_N, BLOCK_K, warps), vs the tiled kernel and the dense layer."""
    from optimum_mc.kernels import moe_triton

    gen = torch.Generator().manual_seed(1)
    candidates = list(itertools.product((8, 16, 32, 64), (64, 128, 256), (2, 4)))
    for dname in a.dtypes:
        dtype = getattr(torch, dname)
        w1, w2 = dense_weights(a, dtype)
        for tokens in a.tokens:
            idx, wts, x, weight_bytes = layer_call(a, tokens, dtype, gen, per_expert_bytes)
            dense = do_bench(lambda: dense_moe(x, idx, wts, w1, w2), return_mode="median")  # noqa: B023
            tiled = do_bench(lambda: triton_moe(x, idx, wts, *lists, bits, "silu", gemv=False), return_mode="median")  # noqa: B023
            ref = triton_moe(x, idx, wts, *lists, bits, "silu", gemv=False).float()
            rows = []
            for cand in candidates:
                moe_triton.GEMV_TILES = cand
                try:
                    out = triton_moe(x, idx, wts, *lists, bits, "silu", gemv=True).float()
                    err = ((out - ref).norm() / ref.norm()).item()
                    ms = do_bench(
                        partial(triton_moe, x, idx, wts, *lists, bits, "silu", gemv=True), return_mode="median"
                    )
                    rows.append((ms, cand, err))
                except Exception as exc:
                    print(f"  gemv tiles {cand}: {type(exc).__name__}: {str(exc)[:120]}")
            rows.sort()
            for ms, cand, err in rows[:4]:
                print(f"{dname} tokens={tokens}: gemv tiles (N,K,warps)={cand} {ms:.3f} ms, rel diff {err:.1e}")
            ms = rows[0][0]
            print(f"| {dname} | {tokens} | dense {dense:.3f} ms | tiled {tiled:.3f} ms | gemv {ms:.3f} ms "
                  f"| gemv vs dense {dense / ms:.2f} | packed GB/s {weight_bytes / ms / 1e6:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
