"""The quantization grid: per-group scale / zero point, rounding, and dequantization.

A group of ``g`` consecutive input weights of one output row shares an fp16 ``scale`` and fp16 ``zero``; a code ``q``
dequantizes to ``(q - zero) * scale`` for every bit-width. For b >= 2 the grid spans the group's [min, max]
(asymmetric min-max). For b = 1 it is MC's binary form: codes pick ``center - magnitude`` or ``center + magnitude``
with ``center`` the group mean and ``magnitude = mean |w - center|``, i.e. ``scale = 2 * magnitude`` and
``zero = 0.5 - center / scale``.

Zero points. ``zero_point="float"`` (default): ``zero = -min / scale`` in fp16; for groups far from 0 with a small
spread the scale is floored so the zero stays where fp16 is exact to 1/8 of a step (finite at every bit-width).
``zero_point="int"`` (b >= 2): the GPTQ / compressed-tensors grid — it includes 0, the zero is an integer code
clamped to ``[0, 2^b - 1]`` (exact in the fp16 zero tensor, so the packed format is unchanged). 1-bit groups keep
the binary form in both modes (a two-level grid through 0 would waste one of its two levels).

Scale and zero are rounded to fp16 *before* codes are chosen, so codes are optimal for the stored grid and the
dequantized value is bit-identical everywhere the formula is evaluated in fp32.
"""

from __future__ import annotations

import torch

from .errors import MCConfigError, NonFiniteWeightError, ShapeError
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


ZERO_POINTS = ("float", "int")


def check_zero_point(zero_point: str) -> str:
    """Validate a zero-point form (``"float"`` or ``"int"``)."""
    if zero_point not in ZERO_POINTS:
        raise MCConfigError(f"zero_point must be one of {ZERO_POINTS}, got {zero_point!r}.")
    return zero_point


def group_qparams(w: torch.Tensor, bits: int, zero_point: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (fp32 tensors holding fp16-representable values) for groups along the last dim of ``w``.

    ``w``: ``(..., g)``; returns two tensors of shape ``(...,)``. ``zero_point="int"`` (b >= 2) gives the GPTQ
    grid: it spans ``[min(lo, 0), max(hi, 0)]`` so 0 is on it, and the zero is an integer code in ``[0, 2^b - 1]``.
    """
    check_bits(bits)
    check_zero_point(zero_point)
    w = w.float()
    if bits == 1:
        return _binary_qparams(w)
    maxq = (1 << bits) - 1
    lo, hi = w.amin(-1), w.amax(-1)
    if zero_point == "int":
        lo, hi = lo.clamp_max(0), hi.clamp_min(0)
        scale = ((hi - lo) / maxq).half().float().clamp_min(_FP16_TINY)
        flat = hi - lo <= 0
        scale = torch.where(flat, torch.ones_like(scale), scale)
        zero = torch.round(-lo / scale).clamp(0, maxq)
        return scale, zero
    rng = hi - lo
    amax = torch.maximum(lo.abs(), hi.abs())
    flat = rng <= amax * 2.0**-12
    rng = torch.where(flat, amax.clamp_min(1e-8), rng)
    # Offset groups (far from 0, small spread) would need |zero| beyond fp16's exact range: the scale floor keeps
    # |zero| <= maxq + 128, where fp16 rounds the zero by at most 1/8 of a step.
    scale = torch.maximum(rng / maxq, amax / (maxq + 128)).half().float().clamp_min(_FP16_TINY)
    zero = (-lo / scale).half().float()
    return scale, zero


def _binary_qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MC's 1-bit form (both zero-point forms): ``center -/+ magnitude`` (module docstring)."""
    center = w.mean(-1)
    magnitude = (w - center.unsqueeze(-1)).abs().mean(-1)
    floor = center.abs() * 2.0**-10 + _FP16_TINY  # constant group: keep center, tiny symmetric step
    scale = (2 * torch.maximum(magnitude, floor)).half().float()
    scale = scale.clamp_min(_FP16_TINY)
    zero = (0.5 - center / scale).half().float()
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Nearest codes for ``w`` (``(..., g)``) on the grid of ``scale`` / ``zero`` (``(...,)``), as uint8."""
    maxq = (1 << check_bits(bits)) - 1
    q = torch.round(w.float() / scale.unsqueeze(-1) + zero.unsqueeze(-1))
    return q.clamp_(0, maxq).to(torch.uint8)


def dequantize_codes(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """``(q - zero) * scale`` in fp32 for codes ``(..., g)`` and per-group ``scale`` / ``zero`` ``(...,)``."""
    return (q.float() - zero.float().unsqueeze(-1)) * scale.float().unsqueeze(-1)


def rtn_quantize(
    weight: torch.Tensor, bits: int, group_size: int, zero_point: str = "float"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest (calibration-free) quantization of ``(out, in)`` weights.

    Returns uint8 codes ``(out, in)`` and fp16 scales / zeros ``(out, in // group_size)``.
    """
    out_f, in_f = weight.shape
    g = check_group_size(in_f, group_size)
    check_finite(weight)
    wg = weight.float().reshape(out_f, in_f // g, g)
    scale, zero = group_qparams(wg, bits, zero_point)
    q = quantize_codes(wg, scale, zero, bits).reshape(out_f, in_f)
    return q, scale.half(), zero.half()


def dequantize_matrix(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """Dequantize uint8 codes ``(out, in)`` with per-group fp16 ``scales`` / ``zeros`` ``(out, groups)`` to fp32."""
    out_f, in_f = q.shape
    g = check_group_size(in_f, group_size)
    w = dequantize_codes(q.reshape(out_f, in_f // g, g), scales, zeros)
    return w.reshape(out_f, in_f)
