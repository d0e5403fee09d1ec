"""Backward formulas of the packed ops: gradients for the activations, never for the packed weights.

The packed buffers (int32 codes, fp16 scales / zeros) are frozen: adapters such as LoRA train *around* them, so
the ops only need the gradient with respect to their floating-point inputs.

- ``optimum_mc::qmatmul(x, W)`` (``y = x W^T``): ``dL/dx = dL/dy W`` with ``W`` dequantized in fp32.
- ``optimum_mc::moe``: for every routed (token, slot) pair the expert is recomputed in fp32 from the dequantized
  weights (the forward keeps no intermediates) and differentiated with autograd; this gives ``dL/dx`` and
  ``dL/dtop_k_weights`` (so a router, and a LoRA on it, train too). Dropped slots (index ``E``) get zero gradient.
- ``optimum_mc::dequantize`` has only integer / frozen inputs and needs no formula.

The backward passes run on any device through the dispatcher's ``dequantize`` (fast kernels where registered).
"""

from __future__ import annotations

import torch

from ..bitwidths import from_op_bits
from .activations import GATED

_FROZEN = None  # the gradient of a packed buffer, an int, or a string: none


def _dequant(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.ops.optimum_mc.dequantize(qweight, scales, zeros, bits, torch.float32)


def _qmatmul_setup(ctx, inputs, output) -> None:
    x, qweight, scales, zeros, bits, *_ = inputs  # (decode_activations, when passed: a CPU decode option)
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.x_dtype = bits, x.dtype


def _qmatmul_backward(ctx, grad: torch.Tensor):
    qweight, scales, zeros = ctx.saved_tensors
    grad_x = None
    if ctx.needs_input_grad[0]:
        grad_x = (grad.float() @ _dequant(qweight, scales, zeros, ctx.bits)).to(ctx.x_dtype)
    # one entry per input the op was called with (a trailing argument left at its default is not one)
    return (grad_x, *[_FROZEN] * (len(ctx.needs_input_grad) - 1))


def _moe_setup(ctx, inputs, output) -> None:
    x, top_k_index, top_k_weights, gq, gs, gz, dq, ds, dz, bits, activation, *rest = inputs
    ctx.save_for_backward(x, top_k_index, top_k_weights, *gq, *gs, *gz, *dq, *ds, *dz)
    ctx.bits, ctx.activation = list(bits), activation
    ctx.biases = (rest[1] if len(rest) > 1 else None, rest[2] if len(rest) > 2 else None)  # frozen, like the codes


def _moe_backward(ctx, grad: torch.Tensor):
    x, top_k_index, top_k_weights, *packed = ctx.saved_tensors
    n = len(packed) // 6
    gu_bits, dn_bits = from_op_bits(ctx.bits, n)
    gq, gs, gz, dq, ds, dz = (packed[i * n : (i + 1) * n] for i in range(6))
    glu = GATED[ctx.activation]
    want_x, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
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
            if ctx.biases[0] is not None:
                hg = hg + ctx.biases[0][e].float()
            y = glu(*hg.chunk(2, dim=-1)) @ w_dn.t()
            if ctx.biases[1] is not None:
                y = y + ctx.biases[1][e].float()
            weight = top_k_weights[token, slot].float()
            if want_w:
                grad_w[token, slot] = (g[token] * y.detach()).sum(-1)
            if want_x:
                (gh,) = torch.autograd.grad(y, h, g[token] * weight[:, None])
                grad_x.index_add_(0, token, gh)
    frozen = [_FROZEN] * n  # one per packed tensor of the six lists (the structure of the inputs)
    return (grad_x.to(x.dtype) if want_x else None, None, grad_w.to(top_k_weights.dtype) if want_w else None,
            *([frozen] * 6), *[_FROZEN] * (len(ctx.needs_input_grad) - 9))  # fmt: skip


def register() -> None:
    """Attach the backward formulas to the ops (idempotent: re-registering replaces them)."""
    torch.library.register_autograd("optimum_mc::qmatmul", _qmatmul_backward, setup_context=_qmatmul_setup)
    torch.library.register_autograd("optimum_mc::moe", _moe_backward, setup_context=_moe_setup)
