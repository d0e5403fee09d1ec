"""The GPU check of issue 24 in one run: the Mixtral-shaped MoE layer (4096 x 14336, 8 experts, top-2, experts at 2
and 3 bits = 2.5 average code bits) under CUDA graphs against a stacked bf16 grouped-mm layer and an eager dense
loop, GB/s per width on the two expert shapes, registers / spills per kernel configuration, launches per layer.

Writes ``docs/results/gpu-layer-<device>.json`` (``--out`` to change): ``commit``, ``device``, ``layer`` (rows
``{"tokens", "mc_us", "bf16_grouped_mm_us", "dense_eager_us", ...}``), ``bandwidth``, ``kernels``, ``launches``;
rewritten after every step (``complete`` false until the end), so a run cut short keeps what it measured.

    python scripts/bench_gpu_layer.py                 # on a CUDA GPU (~2-3 minutes, compiles included)
    python scripts/bench_gpu_layer.py --dry-run --out x.json   # CPU, Triton interpreter, tiny shapes (~1 min)

``commit``: ``$MC_COMMIT`` where set (a work tree copied without ``.git``), else ``git rev-parse HEAD``.

Times: median of ``--reps`` replays of a CUDA graph holding one layer call (``mc_us``: the op as the model calls
it, fused kernels; ``mc_tiled_us``: the previous CUDA default, ``OPTIMUM_MC_CUDA_MOE=tiled``: run-time-width
GEMV / tiled kernels, and for bf16 from 32 pairs dequantize + grouped matmul;
``mc_dequant_grouped_us`` from 256 tokens: dequantize to bf16 + grouped matmul). ``dense_eager_us`` is the
per-expert ``F.linear`` loop of transformers' eager experts, which syncs (``torch.where``) and so is timed
eagerly; ``modes`` says how each number was taken. The dry run checks the script end to end: its numbers are
interpreter times, meaningless as speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shapes")
    ap.add_argument("--sweep", action="store_true", help="only: time tile candidates of the fused kernels, write "
                    "gpu-sweep-<device>.json")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--hidden", type=int, default=None)
    ap.add_argument("--inter", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--reps", type=int, default=None)
    a = ap.parse_args(argv)
    small = a.dry_run
    a.hidden = a.hidden or (64 if small else 4096)
    a.inter = a.inter or (96 if small else 14336)
    a.group_size = a.group_size or (32 if small else 128)
    a.experts = a.experts or (4 if small else 8)
    a.tokens = a.tokens or ([1, 12] if small else [1, 8, 256, 1024])
    a.reps = a.reps or (1 if small else 20 if a.sweep else 50)
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    if a.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton JIT functions are created
    import torch

    from optimum_mc.kernels.moe_fused import cuda_moe  # (importing optimum_mc.kernels registers the ops)

    dev = "cpu" if a.dry_run else "cuda"
    if dev == "cuda" and not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (or --dry-run)")
    device_name = "cpu-interpreter" if a.dry_run else torch.cuda.get_device_name()
    bits = [(2, 3)[e % 2] for e in range(a.experts)]  # 2.5 average code bits
    gu, dn = packed_experts(a, bits, dev)
    lists = [[m[j] for m in gu] for j in range(3)] + [[m[j] for m in dn] for j in range(3)]
    w1, w2 = (torch.randn(a.experts, *s, device=dev, dtype=torch.bfloat16).mul_(0.02)
              for s in ((2 * a.inter, a.hidden), (a.hidden, a.inter)))  # fmt: skip
    t0 = time.perf_counter()
    from optimum_mc.kernels.gpu_layout import layout_for

    layout = layout_for(tuple(lists), bits)
    sync(dev)
    result = {
        "commit": commit(),
        "device": device_name,
        "dry_run": a.dry_run,
        "shape": {
            "hidden": a.hidden,
            "inter": a.inter,
            "experts": a.experts,
            "top_k": 2,
            "bits": bits,
            "group_size": a.group_size,
            "dtype": "bfloat16",
        },  # fmt: skip
        "layout_build_s": round(time.perf_counter() - t0, 3),
        "torch": torch.__version__,
    }
    if a.sweep:  # rewritten after every candidate (complete: false until the end)
        partial = lambda rows: write(a, {**result, "sweep": rows, "complete": False}, "gpu-sweep", device_name)  # noqa: E731
        return write(a, {**result, "sweep": sweep(a, layout, dev, partial), "complete": True}, "gpu-sweep",
                     device_name)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    rows, launches = [], {}
    for tokens in a.tokens:
        idx = torch.stack([torch.randperm(a.experts, generator=gen)[:2] for _ in range(tokens)]).to(dev)
        wts = torch.rand(tokens, 2, generator=gen).to(dev)
        x = torch.randn(tokens, a.hidden, generator=gen).to(dev, torch.bfloat16)
        # the op as a model calls it (on CUDA the dispatcher picks cuda_moe); the dry run calls cuda_moe itself, as
        # CPU tensors would take the CPU kernels
        op = cuda_moe if a.dry_run else torch.ops.optimum_mc.moe
        mc = lambda: op(x, idx, wts, *lists, bits, "silu")  # noqa: E731, B023
        row, modes = {"tokens": tokens}, {}
        out_fused = mc()
        row["mc_us"], modes["mc_us"] = timed(mc, a.reps, dev)
        with kernel("tiled"):
            out_tiled = mc()
            row["mc_tiled_us"], modes["mc_tiled_us"] = timed(mc, a.reps, dev)
        row["rel_diff_fused_vs_tiled"] = rel(out_fused, out_tiled)
        if tokens >= 256 or (a.dry_run and tokens == a.tokens[-1]):
            from optimum_mc.kernels.moe_triton import triton_moe

            deq = lambda: triton_moe(x, idx, wts, *lists, bits, "silu", dequant=True)  # noqa: E731, B023
            row["mc_dequant_grouped_us"], modes["mc_dequant_grouped_us"] = timed(deq, a.reps, dev)
        grouped = lambda: grouped_mm_layer(x, idx, wts, w1, w2)  # noqa: E731, B023
        row["bf16_grouped_mm_us"], modes["bf16_grouped_mm_us"] = timed(grouped, a.reps, dev)
        dense = lambda: dense_eager(x, idx, wts, w1, w2)  # noqa: E731, B023
        row["dense_eager_us"], modes["dense_eager_us"] = timed(dense, a.reps, dev, graph=False)
        row["modes"] = modes
        rows.append(row)
        launches[str(tokens)] = count_launches(mc, dev)
        print(json.dumps(row), flush=True)
        write(a, {**result, "layer": rows, "launches": launches, "complete": False}, "gpu-layer", device_name)
    result["layer"] = rows
    result["launches"] = launches
    result["kernels"] = kernel_configs(a, layout, dev)
    write(a, {**result, "complete": False}, "gpu-layer", device_name)
    result["bandwidth"] = bandwidth(a, dev)
    return write(a, {**result, "complete": True}, "gpu-layer", device_name)


def write(a, result: dict, stem: str, device_name: str) -> dict:
    out = a.out or ROOT / "docs" / "results" / f"{stem}-{slug(device_name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    if result.get("complete", True):
        print(f"wrote {out}")
    return result


DECODE_CANDIDATES = [(16, 128, 4), (32, 128, 4), (32, 256, 4), (64, 64, 4), (64, 128, 8), (16, 256, 2)]
# compile for sm_90 without spills at 3 bits (scripts/triton_resources.py; (64, 128, 64, 8), (128, 64, 64, 8) spill a
# little and are kept as the larger tiles)
TILED_CANDIDATES = [(16, 64, 64, 4), (16, 128, 64, 4), (32, 64, 64, 4), (32, 64, 64, 8), (64, 64, 64, 8),
                    (64, 64, 32, 8), (128, 32, 64, 8), (64, 128, 64, 8), (128, 64, 64, 8)]  # fmt: skip


def sweep(a, layout, dev: str, partial=lambda rows: None) -> list[dict]:
    """Median µs (CUDA graph) of the fused kernels per tile candidate and token count, with the relative
    difference to the defaults' output; a candidate the compiler refuses is recorded with its error."""
    import torch

    from optimum_mc.kernels import moe_fused as mf
    from optimum_mc.kernels.moe_fused import fused_moe

    gen, rows = torch.Generator().manual_seed(2), []
    for tokens in a.tokens:
        idx = torch.stack([torch.randperm(a.experts, generator=gen)[:2] for _ in range(tokens)]).to(dev)
        wts = torch.rand(tokens, 2, generator=gen).to(dev)
        x = torch.randn(tokens, a.hidden, generator=gen).to(dev, torch.bfloat16)
        ref = fused_moe(x, idx, wts, layout, "silu")
        cands = (DECODE_CANDIDATES if tokens * 2 <= 16 else []) + (TILED_CANDIDATES if tokens > 1 else [])
        split = mf.DOWN_SPLIT_K
        cands = [(t, True, split) for t in cands] + [(None, False, split)]  # + defaults, gather unpacking
        if tokens * 2 <= 16:  # the per-pair down kernel's split-K
            cands += [(None, True, s) for s in (1, 2, 8) if s != split]
        if dev == "cpu":  # the dry run: two tile candidates and the variants of the defaults
            cands = cands[:2] + [c for c in cands if c[0] is None]
        for tiles, expand, k_split in cands:
            fn = lambda: fused_moe(x, idx, wts, layout, "silu", tiles=tiles)  # noqa: E731, B023
            row = {"tokens": tokens, "tiles": list(tiles) if tiles else "default", "expand": expand,
                   "down_split_k": k_split}  # fmt: skip
            mf.EXPAND, mf.DOWN_SPLIT_K = expand, k_split
            try:
                diff = rel(fn(), ref)
                us, mode = timed(fn, a.reps, dev)
                row.update(us=us, mode=mode, rel_diff=diff)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: recorded
                row["error"] = f"{type(exc).__name__}: {exc}"[:200]
            finally:
                mf.EXPAND, mf.DOWN_SPLIT_K = True, split
            rows.append(row)
            print(json.dumps(row), flush=True)
            partial(rows)
    return rows


def packed_experts(a, bits, dev):
    """Random packed experts drawn on the device (random words are random codes; packing real weights of this size
    takes minutes on a CPU)."""
    import torch

    g = torch.Generator(device=dev).manual_seed(0)

    def words(out_f, in_f, b):
        qw = torch.randint(-(2**31), 2**31 - 1, (out_f, in_f * b // 32), dtype=torch.int32, device=dev, generator=g)
        groups = in_f // a.group_size
        s = (torch.rand(out_f, groups, device=dev, generator=g) * 0.01 + 1e-3).half()
        z = (torch.rand(out_f, groups, device=dev, generator=g) * ((1 << b) - 1)).half()
        return qw, s, z

    return ([words(2 * a.inter, a.hidden, b) for b in bits], [words(a.hidden, a.inter, b) for b in bits])


class kernel:
    """``with kernel("tiled"):`` selects the CUDA MoE implementation (``OPTIMUM_MC_CUDA_MOE``) for the block."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self):
        self.old = os.environ.get("OPTIMUM_MC_CUDA_MOE")
        os.environ["OPTIMUM_MC_CUDA_MOE"] = self.name

    def __exit__(self, *exc):
        if self.old is None:
            os.environ.pop("OPTIMUM_MC_CUDA_MOE", None)
        else:
            os.environ["OPTIMUM_MC_CUDA_MOE"] = self.old


def sync(dev: str) -> None:
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, dev: str, graph: bool = True) -> tuple[float, str]:
    """Median µs of ``fn`` over ``reps`` CUDA-graph replays ("graph"), or eager calls ("eager": on CPU, or where
    capture fails; the reason is returned in the mode)."""
    import torch

    fn()  # warm-up: compiles, builds the layout
    mode = "eager"
    if dev == "cuda" and graph:
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()
            torch.cuda.current_stream().wait_stream(stream)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            fn, mode = g.replay, "graph"
        except Exception as exc:  # noqa: BLE001 - recorded in the JSON, the eager time taken instead
            torch.cuda.synchronize()
            mode = f"eager (capture failed: {type(exc).__name__}: {str(exc)[:100]})"
    times = []
    for _ in range(reps):
        if dev == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e6)
    return round(statistics.median(times), 2), mode


def rel(a, b) -> float:
    return float(((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item())


def grouped_mm_layer(x, idx, wts, w1, w2):
    """The stacked bf16 layer: pairs sorted by expert, two grouped matmuls (transformers' ``_grouped_linear``:
    ``torch._grouped_mm`` where the GPU has it), no host sync."""
    import torch
    import torch.nn.functional as F
    from transformers.integrations.moe import _grouped_linear

    experts, top_k = w1.shape[0], idx.shape[1]
    flat = idx.reshape(-1)
    perm = torch.argsort(flat, stable=True)
    counts = torch.zeros(experts, dtype=torch.long, device=x.device).scatter_add_(0, flat, torch.ones_like(flat))
    offsets = torch.cumsum(counts, 0).to(torch.int32)  # (bincount would sync: no capture)
    h = _grouped_linear(x[perm // top_k], w1, offsets)
    gate, up = h.chunk(2, dim=-1)
    y = _grouped_linear(F.silu(gate) * up, w2, offsets) * wts.reshape(-1)[perm].unsqueeze(-1).to(x.dtype)
    return torch.zeros_like(x).index_add_(0, perm // top_k, y)


def dense_eager(x, idx, wts, w1, w2):
    """transformers' eager experts: per-expert ``F.linear`` on the tokens routed there."""
    import torch
    import torch.nn.functional as F

    out = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        tok, slot = torch.where(idx == e)
        g, u = F.linear(x[tok], w1[e]).chunk(2, -1)
        out.index_add_(0, tok, F.linear(F.silu(g) * u, w2[e]) * wts[tok, slot, None].to(x.dtype))
    return out


def count_launches(fn, dev: str):
    """GPU kernels one layer call launches (torch.profiler); on CPU the ops it runs (no kernels to count)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CUDA] if dev == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=acts) as prof:
        fn()
        sync(dev)
    if dev == "cuda":
        return {"kernels": sum(1 for e in prof.events() if e.device_type == DeviceType.CUDA)}
    return {"cpu_ops": len(prof.events())}


def bandwidth(a, dev: str) -> list[dict]:
    """GB/s of the decode kernels (1 token, top-1) on one expert of each width, per expert shape (gate/up
    ``(2I, H)``, down ``(H, I)``): the bytes of that matrix's codes, scales and zeros over the launch's time."""
    import torch

    from optimum_mc.kernels.gpu_layout import layout_for
    from optimum_mc.kernels.moe_fused import fused_moe

    rows = []
    x = torch.randn(1, a.hidden, device=dev, dtype=torch.bfloat16)
    idx, w = torch.zeros(1, 1, dtype=torch.long, device=dev), torch.ones(1, 1, device=dev)
    for b in (1, 2, 3, 4):
        gu, dn = packed_experts(a, [b], dev)
        lists = [[m[j] for m in gu] for j in range(3)] + [[m[j] for m in dn] for j in range(3)]
        layout = layout_for(tuple(lists), [b])
        seen = []
        fused_moe(x, idx, w, layout, "silu", decode=True, compiled=seen)
        gate_up_us, down_us = launch_times(lambda: fused_moe(x, idx, w, layout, "silu", decode=True), dev, a.reps)  # noqa: B023
        for shape, packed, us in (("gate_up", gu[0], gate_up_us), ("down", dn[0], down_us)):
            nbytes = sum(t.numel() * t.element_size() for t in packed)
            out_in = [packed[0].shape[0], packed[0].shape[1] * 32 // b]
            rows.append({"bits": b, "shape": shape, "out_in": out_in, "bytes": nbytes, "us": us,
                         "gb_s": round(nbytes / us / 1e3, 1) if us else None})  # fmt: skip
    return rows


def launch_times(fn, dev: str, reps: int) -> tuple[float | None, float | None]:
    """Median device µs of the gate/up and the down decode kernels of ``fn`` (profiler); None on CPU."""
    if dev != "cuda":
        fn()
        return None, None
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        sync(dev)
    per = {"gate_up": [], "down": []}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            for key in per:
                if f"_{key}_decode" in e.name:
                    per[key].append(e.device_time_total)
    return tuple(round(statistics.median(v), 2) if v else None for v in (per["gate_up"], per["down"]))


def kernel_configs(a, layout, dev: str) -> list[dict]:
    """Registers and spills of every compiled kernel configuration the layer uses (decode, small and prefill tiles;
    Triton's compiled-kernel metadata ``n_regs`` / ``n_spills``; None under the interpreter)."""
    import torch

    from optimum_mc.kernels.moe_fused import PREFILL_TILES, SMALL_TILES, fused_moe

    out = []
    cases = ((1, None, True), (8, SMALL_TILES, False), (4 if dev == "cpu" else 64, PREFILL_TILES, False))
    for tokens, tiles, decode in cases:
        x = torch.randn(tokens, a.hidden, device=dev, dtype=torch.bfloat16)
        idx = torch.stack([torch.randperm(a.experts)[:2] for _ in range(tokens)]).to(dev)
        seen = []
        fused_moe(x, idx, torch.rand(tokens, 2, device=dev), layout, "silu", decode=decode, tiles=tiles, compiled=seen)
        for name, bits, t, k in seen:
            out.append({"kernel": name, "bits": bits, "tiles": list(t), "n_regs": getattr(k, "n_regs", None),
                        "n_spills": getattr(k, "n_spills", None)})  # fmt: skip
    return out


def commit() -> str:
    """``MC_COMMIT`` where set (a copied work tree has no .git), else ``git rev-parse HEAD``."""
    if os.environ.get("MC_COMMIT"):
        return os.environ["MC_COMMIT"]
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
