"""The pure-torch default of every ``optimum_mc::`` op (:mod:`.ops`): runs on any device, defines the expected
results; registered for "CompositeExplicitAutograd", so a device without a kernel of its own gets these."""

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


def moe_default(x, top_k_index, top_k_weights, gate_up_qweight, gate_up_scales, gate_up_zeros, down_qweight,
                down_scales, down_zeros, bits, activation, decode_activations="float", gate_up_bias=None,
                down_bias=None, odp_threshold=0.0, odp_counts=None) -> torch.Tensor:  # fmt: skip
    """``optimum_mc::moe`` in torch ops: ODP's rule and counts (:func:`~.odp_rule.apply_odp`), then
    :func:`moe_reference` (``decode_activations`` is a CPU decode option: ignored)."""
    from .moe import check_index_values
    from .odp_rule import apply_odp

    check_index_values(top_k_index, len(gate_up_qweight))
    top_k_index, top_k_weights = apply_odp(top_k_index, top_k_weights, odp_threshold, odp_counts,
                                           len(gate_up_qweight))  # fmt: skip
    gate_up = list(zip(gate_up_qweight, gate_up_scales, gate_up_zeros))
    down = list(zip(down_qweight, down_scales, down_zeros))
    return moe_reference(x, top_k_index, top_k_weights, gate_up, down, bits, activation, gate_up_bias, down_bias)


_LIB = None


def register() -> None:
    """Register the defaults (idempotent)."""
    global _LIB
    if _LIB is not None:
        return
    _LIB = torch.library.Library("optimum_mc", "IMPL")
    key = "CompositeExplicitAutograd"
    _LIB.impl("dequantize", dequantize_reference, key)
    _LIB.impl("qmatmul", lambda x, qw, s, z, bits, decode_activations="float": qmatmul_reference(x, qw, s, z, bits),
              key)  # fmt: skip
    _LIB.impl("moe", moe_default, key)
