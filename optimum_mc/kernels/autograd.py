"""Backward formulas of the packed ops: gradients for the activations, never for the packed weights.

The packed buffers (int32 codes, fp16 scales / zeros) are frozen: adapters such as LoRA train *around* them, so
only the floating-point inputs get a gradient. The ops themselves carry no autograd kernel (a Python one would cost
every call, decode included, ~20 µs); the entry points (:func:`.ops.qmatmul_op`, :func:`.moe.moe_op`) run them inside
these functions when an input needs a gradient.

- ``qmatmul(x, W)`` (``y = x W^T``): ``dL/dx = dL/dy W`` with ``W`` dequantized in fp32.
- ``moe``: for every routed (token, slot) pair the expert is recomputed in fp32 from the dequantized weights (the
  forward keeps no intermediates) and differentiated with autograd; this gives ``dL/dx`` and ``dL/dtop_k_weights``
  (so a router, and a LoRA on it, train too). Dropped slots (index ``E``) get zero gradient. ODP's rule is applied
  by the caller before (in torch ops, so the gradient flows through the renormalized weights).
- ``dequantize`` has only integer / frozen inputs and needs no formula.

The backward passes run on any device through the dispatcher's ``dequantize`` (fast kernels where registered).
"""

from __future__ import annotations

import torch

from ..bitwidths import from_op_bits
from .activations import GATED


def _dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.ops.optimum_mc.dequantize.default(qweight, scales, zeros, bits, torch.float32)


class QMatmulFunction(torch.autograd.Function):
    """``optimum_mc::qmatmul`` with the input gradient."""

    @staticmethod
    def forward(ctx, x, qweight, scales, zeros, bits: int, decode_activations: str = "float"):
        ctx.save_for_backward(qweight, scales, zeros)
        ctx.bits, ctx.x_dtype = bits, x.dtype
        return torch.ops.optimum_mc.qmatmul.default(x, qweight, scales, zeros, bits, decode_activations)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        qweight, scales, zeros = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad.float() @ _dequant(qweight, scales, zeros, ctx.bits)).to(ctx.x_dtype)
        return grad_x, None, None, None, None, None


class MoEFunction(torch.autograd.Function):
    """``optimum_mc::moe`` (without ODP arguments: the caller applied the rule) with the gradients of ``x`` and
    ``top_k_weights``."""

    @staticmethod
    def forward(ctx, x, top_k_index, top_k_weights, gq, gs, gz, dq, ds, dz, bits, activation,
                decode_activations="float", gate_up_bias=None, down_bias=None):  # fmt: skip
        ctx.save_for_backward(x, top_k_index, top_k_weights, *gq, *gs, *gz, *dq, *ds, *dz)
        ctx.bits, ctx.activation, ctx.biases = list(bits), activation, (gate_up_bias, down_bias)  # biases: frozen
        return torch.ops.optimum_mc.moe.default(x, top_k_index, top_k_weights, gq, gs, gz, dq, ds, dz, bits,
                                                activation, decode_activations, gate_up_bias, down_bias)  # fmt: skip

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, top_k_index, top_k_weights, *packed = ctx.saved_tensors
        n = len(packed) // 6
        lists = [list(packed[i * n : (i + 1) * n]) for i in range(6)]
        want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        grad_x, grad_w = torch.ops.optimum_mc.moe_backward.default(
            grad, x, top_k_index, top_k_weights, *lists, ctx.bits, ctx.activation, *ctx.biases, want_x, want_w
        )
        return (grad_x if want_x else None, None, grad_w if want_w else None, *[None] * 11)


def moe_backward(grad, x, top_k_index, top_k_weights, gq, gs, gz, dq, ds, dz, bits, activation, gate_up_bias,
                 down_bias, want_x: bool, want_weights: bool) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """``optimum_mc::moe_backward`` (every device): ``(dL/dx, dL/dtop_k_weights)``, zeros where not wanted."""
    n = len(gq)
    gu_bits, dn_bits = from_op_bits(bits, n)
    glu = GATED[activation]
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grad_w = torch.zeros(top_k_weights.shape, dtype=torch.float32, device=x.device)
    g = grad.float()
    for e in range(n):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        w_gu, w_dn = _dequant(gq[e], gs[e], gz[e], gu_bits[e]), _dequant(dq[e], ds[e], dz[e], dn_bits[e])
        with torch.enable_grad():
            h = x[token].detach().float().requires_grad_(want_x)
            hg = h @ w_gu.t()
            if gate_up_bias is not None:
                hg = hg + gate_up_bias[e].float()
            y = glu(*hg.chunk(2, dim=-1)) @ w_dn.t()
            if down_bias is not None:
                y = y + down_bias[e].float()
            weight = top_k_weights[token, slot].float()
            if want_weights:
                grad_w[token, slot] = (g[token] * y.detach()).sum(-1)
            if want_x:
                (gh,) = torch.autograd.grad(y, h, g[token] * weight[:, None])
                grad_x.index_add_(0, token, gh)
    return grad_x.to(x.dtype), grad_w.to(top_k_weights.dtype)


_LIB = None


def register() -> None:
    """Register ``optimum_mc::moe_backward`` for every device (idempotent)."""
    global _LIB
    if _LIB is None:
        _LIB = torch.library.Library("optimum_mc", "IMPL")
        _LIB.impl("moe_backward", moe_backward, "CompositeExplicitAutograd")
