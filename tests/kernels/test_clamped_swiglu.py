"""gpt-oss's clamped SwiGLU ("clamped_swiglu") and expert biases in every path of ``optimum_mc::moe``: the
pure-torch reference defines them; the C kernels (decode in ``mc_moe_decode``, prefill between the grouped GEMMs),
autograd and Triton (under ``TRITON_INTERPRET=1``) must match it. Inputs are scaled so that both clamps (gate > 7,
|up| > 7) are hit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers.moe import random_experts

from optimum_mc.kernels import GATED, activation_name, cpu, moe
from optimum_mc.kernels.activations import BiasedGLU, ClampedSwiGLU, clamped_swiglu, gated
from optimum_mc.kernels.reference import dequantize_reference, moe_reference

BITS = [2, 3, 4, 8]
H, INTER = 64, 32


def _experts(seed=0):
    return random_experts(BITS, H, INTER, group=32, seed=seed, scale=0.3)  # 0.3: both clamps are hit


def _inputs(tokens, seed=1):
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack([torch.randperm(len(BITS), generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    return torch.randn(tokens, H, generator=g) * 4, idx, w / w.sum(-1, keepdim=True)


def test_clamped_swiglu_is_gpt_oss_gate():
    from transformers import GptOssConfig
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts

    ex = GptOssExperts(GptOssConfig(hidden_size=8, intermediate_size=4, num_local_experts=2))
    h = torch.randn(50, 8) * 10
    # transformers interleaves gate / up columns; the op takes them as two halves
    want = ex._apply_gate(h)
    assert torch.equal(clamped_swiglu(h[:, ::2], h[:, 1::2]), want)
    assert torch.equal(GATED["clamped_swiglu"](h[:, ::2], h[:, 1::2]), want)


def test_activation_names_of_gated_objects():
    assert activation_name(ClampedSwiGLU()) == "clamped_swiglu"
    assert activation_name(ClampedSwiGLU(limit=5.0)) is None  # other parameters than the op's: not its name
    assert activation_name(ClampedSwiGLU(alpha=1.0)) is None
    assert activation_name(torch.nn.SiLU()) == "silu"
    gate, up, b = torch.randn(3, 4), torch.randn(3, 4), torch.randn(8)
    assert torch.equal(gated(BiasedGLU(torch.nn.functional.silu, b), gate, up),
                       torch.nn.functional.silu(gate + b[:4]) * (up + b[4:]))  # fmt: skip


def _clamps_hit(x, gate_up, idx):
    h = torch.cat([x @ dequantize_reference(*gate_up[e], b, torch.float32).t() for e, b in enumerate(BITS)])
    return bool((h[:, :INTER] > 7).any()) and bool((h[:, INTER:].abs() > 7).any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, cpu.GEMV_MAX_ROWS + 1, 40])
def test_cpu_kernels_match_reference(tokens, dtype):
    gate_up, down = _experts()
    x, idx, w = _inputs(tokens)
    assert _clamps_hit(x, gate_up, idx)
    x = x.to(dtype)
    ref = moe_reference(x, idx, w, gate_up, down, BITS, "clamped_swiglu")
    got = moe(x, idx, w, gate_up, down, BITS, "clamped_swiglu")
    scale = ref.float().abs().max().item()
    if dtype == torch.float32:  # accumulation order only
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
    else:  # bf16 result rounding, and on the prefill path bf16 inputs / intermediates
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=3e-2 * scale)


def test_decode_kernel_runs_the_activation_in_c():
    from optimum_mc.kernels.moe_cpu import ACT_CODES, DecodePlan

    if cpu.library() is None:
        pytest.skip("no C compiler")
    gate_up, down = _experts()
    x, idx, w = _inputs(2)
    lists = tuple([m[j] for m in gate_up] for j in range(3)) + tuple([m[j] for m in down] for j in range(3))
    plan = DecodePlan(lists, BITS, "clamped_swiglu")
    assert plan.ok and ACT_CODES["clamped_swiglu"] == 4
    ref = moe_reference(x, idx, w, gate_up, down, BITS, "clamped_swiglu")
    got = plan(x, idx, w)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_autograd_matches_reference_gradient():
    gate_up, down = _experts()
    x, idx, w = _inputs(5)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    moe(x1, idx, w, gate_up, down, BITS, "clamped_swiglu").square().sum().backward()
    moe_reference(x2, idx, w, gate_up, down, BITS, "clamped_swiglu").square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4 * x2.grad.abs().max().item())


TRITON_CHECK = r"""
import torch
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels.moe_triton import triton_moe
from optimum_mc.kernels.reference import moe_reference
from optimum_mc.packing import pack

g = torch.Generator().manual_seed(1)
bits, E, H, I = [2, 3, 4, 8], 4, 64, 32
gu, dn = [], []
for b in bits:
    q, s, z = rtn_quantize(torch.randn(2 * I, H, generator=g) * 0.3, b, 32)
    gu.append((pack(q, b), s, z))
    q, s, z = rtn_quantize(torch.randn(H, I, generator=g) * 0.3, b, 32)
    dn.append((pack(q, b), s, z))
lists = [[m[j] for m in gu] for j in range(3)] + [[m[j] for m in dn] for j in range(3)]
for tokens, gemv, dequant in ((1, None, None), (12, False, None), (5, None, True)):  # GEMV, tiled, dequantize
    idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
    w = torch.rand(tokens, 2, generator=g)
    x = torch.randn(tokens, H, generator=g) * 4
    ref = moe_reference(x, idx, w, gu, dn, bits, "clamped_swiglu")
    got = triton_moe(x, idx, w, *lists, bits, "clamped_swiglu", gemv=gemv, dequant=dequant)
    err = (got - ref).abs().max().item()
    assert err <= 1e-5 * ref.abs().max().item() + 1e-6, (tokens, err)
    print(tokens, err)
print("ok")
"""


def test_triton_moe_matches_reference_under_interpreter():
    pytest.importorskip("triton", reason="Triton is an optional extra (pip install 'optimum-mc[triton]')")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")


# ---------------------------------------------------------------- expert biases (gpt-oss) in the fused op


def _biases(seed=5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(len(BITS), 2 * INTER, generator=g) * 2, torch.randn(len(BITS), H, generator=g)


def test_reference_adds_each_experts_bias_rows():
    gate_up, down = _experts()
    x, idx, w = _inputs(3)
    gb, db = _biases()
    got = moe_reference(x, idx, w, gate_up, down, BITS, "clamped_swiglu", gb, db)
    want = torch.zeros_like(x)
    for t in range(3):
        for k in range(2):
            e = int(idx[t, k])
            h = x[t] @ dequantize_reference(*gate_up[e], BITS[e], torch.float32).t() + gb[e]
            y = clamped_swiglu(h[:INTER], h[INTER:]) @ dequantize_reference(*down[e], BITS[e], torch.float32).t()
            want[t] += w[t, k] * (y + db[e])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens", [1, 3, cpu.GEMV_MAX_ROWS + 1, 40])
def test_cpu_kernels_with_biases_match_reference(tokens, dtype):
    gate_up, down = _experts()
    x, idx, w = _inputs(tokens)
    idx[0, 1] = len(BITS)  # a slot dropped by ODP: no bias either
    gb, db = _biases()
    x = x.to(dtype)
    ref = moe_reference(x, idx, w, gate_up, down, BITS, "clamped_swiglu", gb, db)
    got = moe(x, idx, w, gate_up, down, BITS, "clamped_swiglu", gb, db)
    scale = ref.float().abs().max().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * scale)
    else:
        torch.testing.assert_close(got.float(), ref.float(), rtol=2**-7, atol=3e-2 * scale)
    assert not torch.equal(got, moe(x, idx, w, gate_up, down, BITS, "clamped_swiglu"))  # the biases count


def test_bad_biases_raise_typed_errors():
    from optimum_mc.errors import DTypeError, ShapeError

    gate_up, down = _experts()
    x, idx, w = _inputs(2)
    gb, db = _biases()
    with pytest.raises(ShapeError, match=r"gate_up_bias must be \(4, 64\)"):
        moe(x, idx, w, gate_up, down, BITS, "clamped_swiglu", gb[:, :5], db)
    with pytest.raises(DTypeError, match="down_bias must be floating point"):
        moe(x, idx, w, gate_up, down, BITS, "clamped_swiglu", gb, db.long())


def test_autograd_with_biases_matches_reference_gradient():
    gate_up, down = _experts()
    x, idx, w = _inputs(5)
    gb, db = _biases()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    moe(x1, idx, w, gate_up, down, BITS, "clamped_swiglu", gb, db).square().sum().backward()
    moe_reference(x2, idx, w, gate_up, down, BITS, "clamped_swiglu", gb, db).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-4 * x2.grad.abs().max().item())


TRITON_BIAS_CHECK = TRITON_CHECK.replace(
    'ref = moe_reference(x, idx, w, gu, dn, bits, "clamped_swiglu")',
    "idx[0, 1] = E; gb, db = torch.randn(E, 2 * I, generator=g) * 2, torch.randn(E, H, generator=g)\n"
    '    ref = moe_reference(x, idx, w, gu, dn, bits, "clamped_swiglu", gb, db)',
).replace('"clamped_swiglu", gemv=gemv', '"clamped_swiglu", "float", gb, db, gemv=gemv')


def test_triton_moe_with_biases_matches_reference_under_interpreter():
    pytest.importorskip("triton", reason="Triton is an optional extra (pip install 'optimum-mc[triton]')")
    assert "gb, db, gemv=gemv" in TRITON_BIAS_CHECK
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", TRITON_BIAS_CHECK], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
