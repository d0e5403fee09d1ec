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
print("triton-ok")
"""


def test_triton_kernels_match_reference_under_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    res = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0 and "triton-ok" in res.stdout, res.stderr[-3000:]


def test_import_without_gpu_keeps_reference_on_cpu():
    import torch

    from optimum_mc.kernels import triton as tk

    assert tk.TRITON_AVAILABLE
    assert tk.register() is True  # registers for "cuda" only; CPU dispatch is unaffected
    from optimum_mc.group_quant import rtn_quantize
    from optimum_mc.kernels import qmatmul
    from optimum_mc.kernels.reference import qmatmul_reference
    from optimum_mc.packing import pack

    q, s, z = rtn_quantize(torch.randn(8, 64), 2, 32)
    x = torch.randn(2, 64)
    p = pack(q, 2)
    torch.testing.assert_close(qmatmul(x, p, s, z, 2), qmatmul_reference(x, p, s, z, 2), rtol=1e-5, atol=1e-5)
