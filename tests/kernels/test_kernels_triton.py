"""Triton kernels under the interpreter (TRITON_INTERPRET=1, CPU tensors) against the pure-torch reference.

The interpreter is chosen when Triton JIT functions are created, so the checks run in a fresh subprocess with the
variable set (robust to whatever this pytest process imported before).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="Triton is an optional extra (pip install 'optimum-mc[triton]')")

CHECK = r"""
import torch
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels.reference import dequantize_reference, qmatmul_reference
from optimum_mc.kernels.triton import triton_dequantize, triton_gemm, triton_gemv, triton_qmatmul
from optimum_mc.packing import pack

g = torch.Generator().manual_seed(0)
# shapes: in_features where 3-bit codes straddle words; group size different from BLOCK_K; ragged out rows
for bits in (1, 2, 3, 4, 8):
    for out_f, in_f, group in ((40, 96, 32), (33, 128, 64), (17, 64, 64)):
        w = torch.randn(out_f, in_f, generator=g)
        q, s, z = rtn_quantize(w, bits, group)
        p = pack(q, bits)
        ref_w = dequantize_reference(p, s, z, bits, torch.float32)
        assert torch.equal(triton_dequantize(p, s, z, bits), ref_w), ("dequantize", bits, out_f, in_f)
        for m in (1, 3, 20):
            x = torch.randn(m, in_f, generator=g)
            ref = qmatmul_reference(x, p, s, z, bits)
            tol = 1e-5 * (x.abs() @ ref_w.abs().t()).max().item() + 1e-6  # fp32 accumulation-order differences
            outs = [triton_gemm(x, p, s, z, bits), triton_qmatmul(x, p, s, z, bits)]
            if m <= 8:
                outs.append(triton_gemv(x, p, s, z, bits))
            for y in outs:
                err = (y - ref).abs().max().item()
                assert err <= tol, ("qmatmul", bits, out_f, in_f, m, err, tol)
        xb = torch.randn(2, in_f, generator=g).bfloat16()
        assert triton_qmatmul(xb, p, s, z, bits).dtype == torch.bfloat16
        for dtype, tol in ((torch.float16, 3e-3), (torch.bfloat16, 2.5e-2)):  # half tiles: see the MoE check
            xh = torch.randn(70, in_f, generator=g).to(dtype)
            ref = qmatmul_reference(xh.float(), p, s, z, bits)
            rel = ((triton_gemm(xh, p, s, z, bits).float() - ref).norm() / ref.norm()).item()
            assert rel <= tol, ("half gemm", bits, dtype, rel)
print("triton-ok")
"""


def test_triton_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "triton-ok" in res.stdout, res.stderr[-3000:]


NO_GPU_CHECK = r"""
import sys, torch
import optimum_mc
from optimum_mc.kernels import triton as tk
assert not torch.cuda.is_available()
# Triton's ~100 MB native library is not loaded where it cannot run (no CUDA, no interpreter)
assert not tk.TRITON_AVAILABLE and "triton" not in sys.modules and tk.register() is False
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels import qmatmul
from optimum_mc.kernels.reference import qmatmul_reference
from optimum_mc.packing import pack
q, s, z = rtn_quantize(torch.randn(8, 64), 2, 32)
x = torch.randn(2, 64)
p = pack(q, 2)
torch.testing.assert_close(qmatmul(x, p, s, z, 2), qmatmul_reference(x, p, s, z, 2), rtol=1e-5, atol=1e-5)
print("cpu-ok")
"""


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the CPU-only import")
def test_import_without_gpu_skips_triton_and_keeps_reference_on_cpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", NO_GPU_CHECK], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "cpu-ok" in res.stdout, res.stderr[-3000:]


MOE_CHECK = r"""
import torch
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels.moe_triton import BLOCK_M, DEQUANT_MIN_PAIRS, sorted_layout, triton_moe
from optimum_mc.kernels.reference import moe_reference
from optimum_mc.packing import pack

g = torch.Generator().manual_seed(0)
assert 40 * 2 >= DEQUANT_MIN_PAIRS > 12 * 2  # the cases below reach each path
import optimum_mc.kernels.moe_triton as mt
dequant_calls, real_dequant = [], mt._dequant_grouped
mt._dequant_grouped = lambda *a: dequant_calls.append(a[0].dtype) or real_dequant(*a)
bits = [1, 2, 3, 4, 8, 3]  # every bit-width in one launch
E, H, I = len(bits), 64, 96
gu, dn = [], []
for b in bits:
    q, s, z = rtn_quantize(torch.randn(2 * I, H, generator=g) * 0.1, b, 32)
    gu.append((pack(q, b), s, z))
    q, s, z = rtn_quantize(torch.randn(H, I, generator=g) * 0.1, b, -1)  # another group size for down
    dn.append((pack(q, b), s, z))
lists = [[m[j] for m in gu] for j in range(3)] + [[m[j] for m in dn] for j in range(3)]
# defaults (the per-pair GEMV kernel up to GEMV_MAX_PAIRS pairs, then decode-sized tiles), the tiled kernel forced
# at one token, and prefill-style tiles whose BLOCK_K (64) exceeds gate_up's group size (32): scales per element
# and the dequantize + grouped-matmul prefill path: chosen (half dtypes) at 40 tokens = 80 pairs, forced at 5
for tokens, tiles, gemv, dequant in ((1, None, None, None), (1, None, False, None), (5, None, None, None),
                                     (12, None, None, None), (21, (64, 32, 64, 4), None, None),
                                     (40, None, None, None), (5, None, None, True)):  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
        idx[0, 1] = E  # dropped by ODP
        w = torch.rand(tokens, 2, generator=g)
        x = torch.randn(tokens, H, generator=g).to(dtype)
        bm = tiles[0] if tiles else BLOCK_M
        rows, block_expert = sorted_layout(idx, E, bm)
        kept = (idx < E).sum().item()
        assert (rows < tokens * 2).sum().item() == kept  # every kept pair once, dropped ones nowhere
        assert sorted(rows[rows < tokens * 2].tolist()) == sorted((idx.reshape(-1) < E).nonzero().view(-1).tolist())
        for b in range(block_expert.numel()):  # one expert per block, and it is the pairs' expert
            blk = rows[b * bm:(b + 1) * bm]
            live = blk[blk < tokens * 2]
            if live.numel():
                assert (idx.reshape(-1)[live] == block_expert[b]).all()
        for act in ("silu", "gelu_tanh"):
            ref = moe_reference(x, idx, w, gu, dn, bits, act)
            got = triton_moe(x, idx, w, *lists, bits, act, tiles=tiles, gemv=gemv, dequant=dequant)
            assert got.dtype == dtype
            if dtype == torch.float32:  # exact fp32 dots: only the accumulation order differs
                err = (got - ref).abs().max().item()
                assert err <= 1e-5 * ref.abs().max().item() + 1e-6, (tokens, act, err)
            else:  # half dots on weights rounded to the input dtype, like a dense layer in that dtype (measured:
                # fp16 ~5e-4, a dense fp16 layer ~8e-4; bf16 ~1e-2 here, twice a dense bf16 layer's error, because
                # the interpreter truncates fp32 -> bf16 where a GPU rounds to nearest)
                rel = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
                assert rel <= (3e-3 if dtype == torch.float16 else 2.5e-2), (tokens, dtype, act, rel)
# 40 tokens: the half dtypes (2 x 2 activations) chose it, fp32 kept the tiled kernel; forced at 5: all 3 x 2
assert dequant_calls.count(torch.float32) == 2 and len(dequant_calls) == 10, dequant_calls
print("ok")
"""


def test_triton_moe_matches_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", MOE_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


MOE_PROJECTION_CHECK = r"""
import torch
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels.moe_triton import triton_moe
from optimum_mc.kernels.reference import moe_reference
from optimum_mc.packing import pack

g = torch.Generator().manual_seed(1)
gu_bits, dn_bits = [1, 2, 3, 4], [3, 4, 1, 2]  # every expert's down matrix at another width than its gate/up
E, H, I = 4, 64, 96
gu, dn = [], []
for bg, bd in zip(gu_bits, dn_bits):
    q, s, z = rtn_quantize(torch.randn(2 * I, H, generator=g) * 0.1, bg, 32)
    gu.append((pack(q, bg), s, z))
    q, s, z = rtn_quantize(torch.randn(H, I, generator=g) * 0.1, bd, 32)
    dn.append((pack(q, bd), s, z))
lists = [[m[j] for m in gu] for j in range(3)] + [[m[j] for m in dn] for j in range(3)]
bits = gu_bits + dn_bits
for tokens, gemv, dequant in ((1, None, None), (12, False, None), (5, None, True)):  # GEMV, tiled, dequantize
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    x = torch.randn(tokens, H, generator=g)
    ref = moe_reference(x, idx, w, gu, dn, bits, "silu")
    got = triton_moe(x, idx, w, *lists, bits, "silu", gemv=gemv, dequant=dequant)
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, (tokens, err)
print("ok")
"""


def test_triton_moe_reads_per_projection_widths_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", MOE_PROJECTION_CHECK], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
