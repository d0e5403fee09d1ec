"""Pure-torch implementations of the packed-weight ops; they run on any device and define the expected results."""

from __future__ import annotations

import torch

from ..group_quant import dequantize_matrix
from ..packing import unpack


def dequantize_reference(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int, dtype: torch.dtype
) -> torch.Tensor:
    """Packed ``(out, in*bits/32)`` int32 codes + fp16 ``(out, groups)`` scales/zeros -> ``(out, in)`` weights."""
    codes = unpack(qweight, bits)
    group_size = codes.shape[1] // scales.shape[1]
    return dequantize_matrix(codes, scales, zeros, group_size).to(dtype)


def qmatmul_reference(
    x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> torch.Tensor:
    """``x @ W.T`` with ``W`` dequantized in fp32; the result has ``x``'s dtype."""
    w = dequantize_reference(qweight, scales, zeros, bits, torch.float32)
    return (x.float() @ w.t()).to(x.dtype)


def moe_reference(
    x: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    gate_up: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    down: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    bits: list[int],
    activation: str,
    gate_up_bias: torch.Tensor | None = None,
    down_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The fused MoE op, expert by expert: ``sum_slots w * down(glu(gate, up))`` in fp32, cast to ``x.dtype``.

    ``gate_up[e]`` / ``down[e]`` are expert ``e``'s packed ``(qweight, scales, zeros)``; ``bits`` holds ``E`` widths
    (both projections) or ``2E`` (gate/up widths, then down widths: :func:`~optimum_mc.bitwidths.op_bits`). Slots
    whose index is ``E`` (dropped by online dynamic pruning) are skipped. ``gate_up_bias (E, 2I)`` /
    ``down_bias (E, H)`` (optional, any float dtype) are added to the projections' outputs (gpt-oss).
    """
    from ..bitwidths import from_op_bits
    from .activations import GATED

    glu = GATED[activation]
    gu_bits, dn_bits = from_op_bits(bits, len(gate_up))
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e, (bg, bd) in enumerate(zip(gu_bits, dn_bits)):
        token, slot = torch.where(top_k_index == e)
        if token.numel() == 0:
            continue
        h = xf[token] @ dequantize_reference(*gate_up[e], bg, torch.float32).t()
        if gate_up_bias is not None:
            h = h + gate_up_bias[e].float()
        gate, up = h.chunk(2, dim=-1)
        y = glu(gate, up) @ dequantize_reference(*down[e], bd, torch.float32).t()
        if down_bias is not None:
            y = y + down_bias[e].float()
        out.index_add_(0, token, y * top_k_weights[token, slot, None].float())
    return out.to(x.dtype)
