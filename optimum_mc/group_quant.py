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

Compact metadata (``MCConfig(metadata="q8")``; here the grid ``zero_point="q8"``). Zeros are the integer codes of
the ``"int"`` grid, stored at the code width ``b``. Scales are 8-bit codes ``q in [1, 255]`` times a power of two
``2^k`` shared by a block of ``Q8_ROWS`` (16) consecutive rows of one group column: ``scale = q * 2^k``, exact in
fp16 and fp32 (``k >= -24``: every such value is an fp16 number), so the stored value is the same wherever it is
evaluated. ``k`` is the smallest exponent (>= -24) with ``255 * 2^k >=`` the largest min-max scale of the block's
non-constant groups; each group's scale is rounded to the nearest code and its zero is then recomputed on the
quantized scale, so codes are chosen on exactly the stored grid. 1-bit groups use the symmetric binary form:
``+/- mean |w|`` (``scale = 2 mean |w|``, ``zero = 1/2``; the zero's one stored bit is written 0). GPTQ knows a
block's exponent when it reaches the group (it fixes a whole group column at once), and a checkpoint's exponents
are recomputed from the fp16 scales at save time (:func:`compact_metadata`: the smallest valid ``k`` always encodes
them exactly). Stored bits per group: ``8 + b + 8 / 16`` (scale code, zero, the int8 exponent's share), i.e.
``(8.5 + b) / g`` bits per weight: 0.082 at 2 bits and ``g = 128`` (fp16 scale + zero: 0.25).
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
# the grids group_qparams computes: the two zero-point forms with fp16 metadata, and "q8" (int zeros, 8-bit scales
# on a power-of-two exponent per block of Q8_ROWS rows; MCConfig(metadata="q8"))
GRIDS = (*ZERO_POINTS, "q8")
Q8_ROWS = 16  # rows of one group column sharing a scale exponent
Q8_SCALE_CODES = 255  # scale codes 1..255 (uint8)
_MIN_EXP = -24  # 2^-24: the smallest fp16 step; q * 2^k is an fp16 number for every k >= -24, q <= 255


def check_zero_point(zero_point: str) -> str:
    """Validate a grid (``"float"``, ``"int"`` or ``"q8"``)."""
    if zero_point not in GRIDS:
        raise MCConfigError(f"zero_point must be one of {GRIDS}, got {zero_point!r}.")
    return zero_point


def grid_of(zero_point: str, metadata: str = "fp16") -> str:
    """The grid of an MCConfig's ``zero_point`` / ``metadata`` pair (``"q8"`` for compact metadata)."""
    return "q8" if metadata == "q8" else zero_point


def group_qparams(w: torch.Tensor, bits: int, zero_point: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero (fp32 tensors holding fp16-representable values) for groups along the last dim of ``w``.

    ``w``: ``(..., g)``; returns two tensors of shape ``(...,)``. ``zero_point="int"`` (b >= 2) gives the GPTQ
    grid: it spans ``[min(lo, 0), max(hi, 0)]`` so 0 is on it, and the zero is an integer code in ``[0, 2^b - 1]``.
    """
    check_bits(bits)
    check_zero_point(zero_point)
    w = w.float()
    if zero_point == "q8":
        return q8_qparams(w, bits)
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


GROUP_FITS = ("minmax", "lsq")
LSQ_ITERATIONS = 6


def lsq_qparams(w: torch.Tensor, bits: int, zero_point: str = "float") -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the groups of ``w (..., g)`` fitted by least squares (``group_fit="lsq"``, b >= 2; 1-bit
    groups keep the binary form): from two starts, the [min, max] grid and one matched to the group's mean and
    standard deviation, :data:`LSQ_ITERATIONS` rounds of "codes for the current grid, then the affine map
    ``w ~ a * q + c`` of least squared error for those codes", each grid rounded to what is stored (fp16 scale and
    zero; an integer zero for ``zero_point="int"``) before its codes are chosen; per group the start ending with
    the lower squared error is kept. On gaussian groups of 128 this is 0.44x the min/max grid's error at 2 bits
    (docs/low-bit-study.md, "Better 2-bit grids")."""
    if bits == 1 or zero_point == "q8":
        if zero_point == "q8":
            raise MCConfigError("group_fit='lsq' works on the fp16 grid; use metadata='fp16' with it.")
        return group_qparams(w, bits, zero_point)
    w = w.float()
    maxq = (1 << bits) - 1

    def stored(scale: torch.Tensor, offset: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The grid ``w ~ scale * q + offset`` as stored: fp16 scale, fp16 (or integer) zero in code units."""
        scale = scale.half().float().clamp_min(_FP16_TINY)
        zero = -offset / scale
        zero = torch.round(zero).clamp(0, maxq) if zero_point == "int" else zero.half().float()
        return scale, zero

    def sse(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (dequantize_codes(quantize_codes(w, scale, zero, bits), scale, zero) - w).pow(2).sum(-1)

    mean = w.mean(-1)
    spread = ((maxq * (maxq + 2)) / 12) ** 0.5  # rms of the codes 0..maxq about their middle
    std_scale = (w.std(-1, correction=0) / spread).clamp_min(_FP16_TINY)
    starts = [group_qparams(w, bits, zero_point), stored(std_scale, mean - std_scale * maxq / 2)]
    best = None
    for scale, zero in starts:
        for _ in range(LSQ_ITERATIONS):
            q = quantize_codes(w, scale, zero, bits).float()
            qm = q.mean(-1, keepdim=True)
            var = (q - qm).pow(2).sum(-1)
            cov = ((q - qm) * (w - mean.unsqueeze(-1))).sum(-1)
            ok = (var > 0) & (cov > 0)
            a = torch.where(ok, cov / var.clamp_min(1e-30), scale)
            fit = stored(a, mean - a * qm[..., 0])
            scale, zero = torch.where(ok, fit[0], scale), torch.where(ok, fit[1], zero)
        err = sse(scale, zero)
        if best is None:
            best = (scale, zero, err)
        else:
            better = err < best[2]
            best = tuple(torch.where(better, new, old) for new, old in zip((scale, zero, err), best))
    return best[0], best[1]


def _binary_qparams(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MC's 1-bit form (both zero-point forms): ``center -/+ magnitude`` (module docstring)."""
    center = w.mean(-1)
    magnitude = (w - center.unsqueeze(-1)).abs().mean(-1)
    floor = center.abs() * 2.0**-10 + _FP16_TINY  # constant group: keep center, tiny symmetric step
    scale = (2 * torch.maximum(magnitude, floor)).half().float()
    scale = scale.clamp_min(_FP16_TINY)
    zero = (0.5 - center / scale).half().float()
    return scale, zero


# ------------------------------------------------------------------------------------------ compact ("q8") grid


def _q8_raw(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unquantized scale, the range's low end (<= 0) and the constant-group mask of the q8 grid's groups."""
    if bits == 1:
        lo = torch.zeros_like(w[..., 0])
        scale = 2 * w.abs().mean(-1)
        return scale, lo, scale <= 0
    lo, hi = w.amin(-1).clamp_max(0), w.amax(-1).clamp_min(0)
    return (hi - lo) / ((1 << bits) - 1), lo, hi - lo <= 0


def q8_exponents(w: torch.Tensor, bits: int) -> torch.Tensor:
    """Scale exponents ``k`` (int32, ``(..., ceil(rows / Q8_ROWS), G)``) for the groups of ``w (..., rows, G, g)``:
    per block of ``Q8_ROWS`` rows and group column, the smallest ``k >= -24`` with ``255 * 2^k`` at least every
    min-max scale of the block's non-constant groups."""
    if w.dim() < 3:
        raise ShapeError(f"the q8 grid needs weights (..., rows, groups, g), got shape {tuple(w.shape)}.")
    scale, _, flat = _q8_raw(w.float(), bits)
    return exponents_for(torch.where(flat, torch.zeros_like(scale), scale))


def exponents_for(scale: torch.Tensor) -> torch.Tensor:
    """Smallest ``k >= -24`` per block of ``Q8_ROWS`` rows of ``scale (..., rows, G)`` with ``255 * 2^k >=`` the
    block's largest value (computed exactly, in float64)."""
    rows = scale.shape[-2]
    pad = -rows % Q8_ROWS
    m = torch.nn.functional.pad(scale.double(), (0, 0, 0, pad)) if pad else scale.double()
    m = m.reshape(*m.shape[:-2], -1, Q8_ROWS, m.shape[-1]).amax(-2)
    limit = float(Q8_SCALE_CODES)
    k = torch.ceil(torch.log2((m / limit).clamp_min(2.0**_MIN_EXP))).clamp_min(_MIN_EXP)
    k = torch.where(m > limit * torch.exp2(k), k + 1, k)  # log2 rounding, both ways
    k = torch.where((k > _MIN_EXP) & (m <= limit * torch.exp2(k - 1)), k - 1, k)
    return k.to(torch.int32)


def expand_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """Per-block values ``(..., blocks, G)`` repeated to every row: ``(..., rows, G)``."""
    return t.repeat_interleave(Q8_ROWS, dim=-2)[..., :rows, :]


def snap_scales(scale: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """Nearest q8 scale ``q * unit`` (``q in [1, 255]``, ``unit = 2^k``), fp32 holding exact fp16 values."""
    return torch.round(scale / unit).clamp(1, Q8_SCALE_CODES) * unit


def q8_qparams(w: torch.Tensor, bits: int, exponents: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero of the q8 grid for the groups of ``w (..., rows, G, g)`` (module docstring); ``exponents``
    (:func:`q8_exponents` of the weights the block's exponents come from) default to those of ``w``."""
    w = w.float()
    if exponents is None:
        exponents = q8_exponents(w, bits)
    unit = torch.exp2(expand_rows(exponents, w.shape[-3]).float())
    raw, lo, _ = _q8_raw(w, bits)
    scale = snap_scales(raw, unit)
    if bits == 1:
        return scale, torch.full_like(scale, 0.5)
    return scale, torch.round(-lo / scale).clamp(0, (1 << bits) - 1)


def compact_metadata(
    scales: torch.Tensor, zeros: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The stored form of q8-grid fp16 ``scales`` / ``zeros`` ``(rows, G)``: uint8 scale codes ``(rows, G)``, int8
    exponents ``(ceil(rows / 16), G)`` and the zeros packed at ``bits`` bits (row-major, padded to 32 codes) as int32
    words. Exact: :func:`expand_metadata` gives back the same fp16 tensors; anything off the q8 grid is refused."""
    from .packing import pack

    check_bits(bits)
    s, z = scales.float(), zeros.float()
    k = exponents_for(s)
    unit = torch.exp2(expand_rows(k, s.shape[0]).float())
    q = s / unit
    zc = z - 0.5 if bits == 1 else z
    ok = (q == torch.round(q)) & (q >= 1) & (q <= Q8_SCALE_CODES) & (zc == torch.round(zc)) & (zc >= 0)
    ok &= zc <= (0 if bits == 1 else (1 << bits) - 1)
    if not bool(ok.all()):
        raise ShapeError(
            "scales / zeros are not on the q8 grid (scale = q * 2^k with q in 1..255 per 16-row block, integer "
            "zeros); quantize with metadata='q8' or save with metadata='fp16'."
        )
    flat = zc.to(torch.uint8).reshape(-1)
    flat = torch.nn.functional.pad(flat, (0, -flat.numel() % 32))
    return q.to(torch.uint8), k.to(torch.int8), pack(flat, bits)


def expand_metadata(
    scale_codes: torch.Tensor, scale_exps: torch.Tensor, zero_codes: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16 ``scales`` / ``zeros`` ``(rows, G)`` of the stored q8 form (:func:`compact_metadata`): ``scale = q *
    2^k`` (exact), ``zero`` the stored integer code (1 bit: ``1/2 + code``)."""
    from .packing import unpack

    rows, groups = scale_codes.shape
    unit = torch.exp2(expand_rows(scale_exps.to(torch.float32), rows))
    scales = (scale_codes.to(torch.float32) * unit).half()
    z = unpack(zero_codes, bits)[: rows * groups].reshape(rows, groups).float()
    return scales, (z + 0.5 if bits == 1 else z).half()


def q8_shapes(rows: int, groups: int, bits: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """(dtype, shape) of the stored q8 metadata of a ``rows x groups`` grid."""
    return {
        "scale_codes": ("uint8", (rows, groups)),
        "scale_exps": ("int8", (-(-rows // Q8_ROWS), groups)),
        "zero_codes": ("int32", (-(-rows * groups // 32) * bits,)),
    }


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
