"""Registers, spills and shared memory of the fused MoE kernels (``kernels/moe_fused.py``) per configuration,
compiled for a CUDA target without a GPU: Triton's front end and its bundled ``ptxas``, then ``cuobjdump
--dump-resource-usage`` on the cubin (``REG``; ``STACK`` > 0 means local-memory spills).

    python scripts/triton_resources.py                      # sm_90 (H100 / H200), the default configurations
    python scripts/triton_resources.py --arch 80 --json out.json

The GPU run (scripts/bench_gpu_layer.py) reads the same numbers from the loaded kernels (``n_regs``, ``n_spills``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTERS = {"x_ptr": "*bf16", "a_ptr": "*bf16", "rows_ptr": "*i64", "block_expert": "*i64", "group_of": "*i32",
            "local": "*i32", "qw_ptr": "*i32", "qhi_ptr": "*i32", "s_ptr": "*fp16", "z_ptr": "*fp16",
            "w_ptr": "*fp32", "y_ptr": "*fp32", "idx_ptr": "*i32", "alpha": "fp32", "limit": "fp32"}  # fmt: skip


def configurations(bits=(1, 2, 3, 4, 8)):
    """(kernel name, constexprs, warps) of the default tiles, per width: bf16 inputs, silu, scales per k-step."""
    from optimum_mc.kernels import moe_fused as mf

    (bn, bk, dw), (sm, sn, sk, sw), (pm, pn, pk, pw) = mf.DECODE_TILES, mf.SMALL_TILES, mf.PREFILL_TILES
    for b in bits:
        common = dict(BITS=b, GROUP_TILE=True, EXPAND=mf.EXPAND)
        yield "gate_up_decode", dict(common, ACT=0, BLOCK_N=bn, BLOCK_K=bk), dw
        yield "down_decode", dict(common, BLOCK_N=bn, BLOCK_K=bk), dw
        for m, n, k, w in ((sm, sn, sk, sw), (pm, pn, pk, pw)):
            yield "gate_up_tiled", dict(common, ACT=0, HALF=1, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), w
            yield "down_tiled", dict(common, HALF=1, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k), w


def resources(name: str, consts: dict, warps: int, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from optimum_mc.kernels import moe_fused as mf

    fn = getattr(mf, f"_{name}")
    sig = {n: ("constexpr" if n in consts else POINTERS.get(n, "i32")) for n in fn.arg_names}
    if name.endswith("decode"):
        sig["a_ptr"] = "*fp32"  # the per-pair kernels keep the intermediate in fp32
    src = ASTSource(fn, sig, {(fn.arg_names.index(n),): v for n, v in consts.items()})
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        usage = subprocess.run([str(tool), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                               check=True).stdout  # fmt: skip
    regs, stack = (int(v) for v in re.search(r"REG:(\d+) STACK:(\d+)", usage).groups())
    tiles = [consts[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in consts]
    return {"kernel": name, "bits": consts["BITS"], "tiles": tiles + [warps], "arch": arch, "regs": regs,
            "stack_bytes": stack, "shared_bytes": kernel.metadata.shared}  # fmt: skip


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, default=90, help="compute capability x 10 (80 A100, 90 H100 / H200)")
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 3, 4, 8])
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    import torch

    torch.cuda.is_available = lambda: True  # only so that optimum_mc defines its Triton kernels: nothing runs
    os.environ.pop("TRITON_INTERPRET", None)
    rows = [resources(name, consts, warps, a.arch) for name, consts, warps in configurations(a.bits)]
    for r in rows:
        print(json.dumps(r), flush=True)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
