"""Backward of the packed ops: input gradients equal those of the dequantized float computation; the packed
weights never get (or need) a gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from optimum_mc.architectures import moe_blocks
from optimum_mc.group_quant import rtn_quantize
from optimum_mc.kernels import dequantize, moe, qmatmul
from optimum_mc.nn import MCExperts, QuantLinear
from optimum_mc.packing import pack

BITS = [1, 2, 3, 4, 8, 2]
# fp32: the op and the reference differ only in summation order (fp32 accumulation over <= 256 terms);
# bf16: the gradient is rounded to bf16 once (relative 2^-8), on top of bf16 inputs
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.bfloat16: dict(rtol=2**-6, atol=2**-6)}


def _packed(out_f, in_f, bits, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, s, z = rtn_quantize(torch.randn(out_f, in_f, generator=g) * 0.1, bits, group)
    return pack(q, bits), s, z


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_qmatmul_input_gradient_matches_dequantized_reference(bits, dtype):
    qw, s, z = _packed(48, 96, bits)
    x = torch.randn(2, 5, 96, generator=torch.Generator().manual_seed(1)).to(dtype).requires_grad_()
    upstream = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2)).to(dtype)
    (grad,) = torch.autograd.grad(qmatmul(x, qw, s, z, bits), x, upstream)
    xr = x.detach().float().requires_grad_()
    (ref,) = torch.autograd.grad(xr @ dequantize(qw, s, z, bits).t(), xr, upstream.float())
    assert grad.dtype == dtype and grad.shape == x.shape
    torch.testing.assert_close(grad.float(), ref, **TOL[dtype])


@pytest.mark.filterwarnings("ignore:Input #0 requires gradient:UserWarning")
def test_qmatmul_gradcheck_against_finite_differences():
    """The formula itself (not only agreement with the float path): torch's numerical check, in fp32."""
    qw, s, z = _packed(8, 32, 3)
    x = torch.randn(3, 32, generator=torch.Generator().manual_seed(3), requires_grad=True)
    # fp32 finite differences: eps 1e-2 on a linear function is exact up to rounding (~1e-6 relative)
    assert torch.autograd.gradcheck(lambda t: qmatmul(t, qw, s, z, 3), (x,), eps=1e-2, atol=1e-3, rtol=1e-3)


def _experts(hidden=64, inter=32, seed=0):
    gate_up = [_packed(2 * inter, hidden, b, seed=seed + e) for e, b in enumerate(BITS)]
    down = [_packed(hidden, inter, b, seed=seed + 100 + e) for e, b in enumerate(BITS)]
    return gate_up, down


def _moe_float(x, idx, w, gate_up, down):
    """The float reference: every expert dequantized, plain autograd-able torch."""
    out = torch.zeros_like(x)
    for e, b in enumerate(BITS):
        token, slot = torch.where(idx == e)
        h = x[token] @ dequantize(*gate_up[e], b).t()
        gate, up = h.chunk(2, dim=-1)
        y = (F.silu(gate) * up) @ dequantize(*down[e], b).t()
        out = out.index_add(0, token, y * w[token, slot, None])
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_gradients_for_input_and_routing_weights(dtype):
    gate_up, down = _experts()
    g = torch.Generator().manual_seed(4)
    tokens, e = 40, len(BITS)
    idx = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(tokens)])
    idx[::5, 1] = e  # slots dropped by ODP
    w = torch.rand(tokens, 2, generator=g)
    x = torch.randn(tokens, 64, generator=g).to(dtype).requires_grad_()
    w_in = w.to(dtype).requires_grad_()
    upstream = torch.randn(tokens, 64, generator=g).to(dtype)
    gx, gw = torch.autograd.grad(moe(x, idx, w_in, gate_up, down, BITS), (x, w_in), upstream)
    xr, wr = x.detach().float().requires_grad_(), w_in.detach().float().requires_grad_()
    rx, rw = torch.autograd.grad(_moe_float(xr, idx, wr, gate_up, down), (xr, wr), upstream.float())
    assert gx.dtype == gw.dtype == dtype
    torch.testing.assert_close(gx.float(), rx, **TOL[dtype])
    torch.testing.assert_close(gw.float(), rw, **TOL[dtype])
    assert torch.all(gw[::5, 1] == 0)  # a dropped slot's weight does not matter


def test_moe_only_routing_weights_need_grad():
    gate_up, down = _experts()
    idx = torch.tensor([[0, 1], [2, 6], [5, 3]])
    w = torch.rand(3, 2, requires_grad=True)
    x = torch.randn(3, 64)
    (gw,) = torch.autograd.grad(moe(x, idx, w, gate_up, down, BITS).sum(), (w,))
    (ref,) = torch.autograd.grad(_moe_float(x, idx, w, gate_up, down).sum(), (w,))
    torch.testing.assert_close(gw, ref, **TOL[torch.float32])


def _quantized_tiny():
    model = tiny_model("mixtral")
    for blk in moe_blocks(model):
        blk.block.experts = MCExperts.from_float(blk.experts, [2, 3, 4, 2], 32)
    for layer in model.model.layers:
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(layer.self_attn, name, QuantLinear.from_linear(getattr(layer.self_attn, name), 4, 32))
    return model


def test_model_input_gradient_matches_dequantized_model():
    """End to end through attention QuantLinears, the router and the fused MoE op of every layer."""
    from optimum_mc.quantizer import dequantize_model

    model = _quantized_tiny().train()
    float_model = dequantize_model(_quantized_tiny()).train()
    ids = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(5))
    grads = []
    for m in (model, float_model):
        emb = m.get_input_embeddings()(ids).detach().requires_grad_()
        loss = m(inputs_embeds=emb, labels=ids).loss
        grads.append(torch.autograd.grad(loss, emb)[0])
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    assert not any(b.requires_grad for b in model.buffers())
