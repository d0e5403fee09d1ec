"""The quantization grid: per-group scale / zero point, rounding, and dequantization.

A group of ``g`` consecutive input weights of one output row shares an fp16 ``scale`` and fp16 ``zero``; a code ``q``
dequantizes to ``(q - zero) * scale`` for every bit-width. For b >= 2 the grid spans the group's [min, max]
(asymmetric min-max). For b = 1 it is MC's binary form: codes pick ``center - magnitude`` or ``center + magnitude``
with ``center`` the group mean and ``magnitude = mean |w - center|``, i.e. ``scale = 2 * magnitude`` and
``zero = 0.5 - center / scale``.

Scale and zero are rounded to fp16 *before* codes are chosen, so codes are optimal for the stored grid and the
dequantized value is bit-identical everywhere the formula is evaluated in fp32.
"""

from __future__ import annotations

import torch

from .errors import NonFiniteWeightError, ShapeError
from .packing import check_bits

_FP16_TINY = 2.0**-24  # smallest positive fp16 (subnormal); scales never round to zero


def check_group_size(in_features: int, group_size: int) -> int:
    """Resolve ``group_size`` (-1 = one group per row) and check it divides ``in_features``."""
    g = in_features if group_size == -1 else group_size
    if g <= 0 or in_features % g:
        raise ShapeError(
            f"in_features={in_features} is not divisible by group_size={group_size}; "
            f"choose a group_size that divides it (e.g. 32, 64, 128) or -1 for one group per row."
        )
    return g


def check_finite(w: torch.Tensor, name: str = "weight") -> None:
    """Raise :class:`NonFiniteWeightError` if ``w`` holds NaN or Inf."""
    if not torch.isfinite(w).all():
        bad = int((~torch.isfinite(w)).sum())
        raise NonFiniteWeightError(f"{name} contains {bad} NaN/Inf values; fix the checkpoint before quantizing.")


def group_qparams(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (fp32 tensors holding fp16-representable values) for groups along the last dim of ``w``.

    ``w``: ``(..., g)``; returns two tensors of shape ``(...,)``.
    """
    check_bits(bits)
    w = w.float()
    if bits == 1:
        center = w.mean(-1)
        magnitude = (w - center.unsqueeze(-1)).abs().mean(-1)
        floor = center.abs() * 2.0**-10 + _FP16_TINY  # constant group: keep center, tiny symmetric step
        scale = (2 * torch.maximum(magnitude, floor)).half().float()
        scale = scale.clamp_min(_FP16_TINY)
        zero = (0.5 - center / scale).half().float()
        return scale, zero
    maxq = (1 << bits) - 1
    lo, hi = w.amin(-1), w.amax(-1)
    rng = hi - lo
    flat = rng <= torch.maximum(lo.abs(), hi.abs()) * 2.0**-12
    rng = torch.where(flat, torch.maximum(hi.abs(), lo.abs()).clamp_min(1e-8), rng)
    scale = (rng / maxq).half().float().clamp_min(_FP16_TINY)
    zero = (-lo / scale).half().float()
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes for ``w`` (``(..., g)``) on the grid of ``scale`` / ``zero`` (``(...,)``), as uint8."""
    maxq = (1 << check_bits(bits)) - 1
    q = torch.round(w.float() / scale.unsqueeze(-1) + zero.unsqueeze(-1))
    return q.clamp_(0, maxq).to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` in fp32 for codes ``(..., g)`` and per-group ``scale`` / ``zero`` ``(...,)``."""
    return (q.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)


def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest (calibration-free) quantization of ``(out, in)`` weights.

    Returns uint8 codes ``(out, in)`` and fp16 scales / zeros ``(out, in // group_size)``.
    """
    out_f, in_f = weight.shape
    g = check_group_size(in_f, group_size)
    check_finite(weight)
    wg = weight.float().reshape(out_f, in_f // g, g)
    scale, zero = group_qparams(wg, bits)
    q = quantize_codes(wg, scale, zero, bits).reshape(out_f, in_f)
    return q, scale.half(), zero.half()


def dequantize_matrix(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantize uint8 codes ``(out, in)`` with per-group fp16 ``scales`` / ``zeros`` ``(out, groups)`` to fp32."""
    out_f, in_f = q.shape
    g = check_group_size(in_f, group_size)
    w = dequantize_codes(q.reshape(out_f, in_f // g, g), scales, zeros)
    return w.reshape(out_f, in_f)
