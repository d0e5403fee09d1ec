"""GPTQ for one weight matrix given its input Hessian and bit-width, plus the calibration-free fallback.

GPTQ (Frantar et al., 2023) quantizes columns one at a time and spreads each column's rounding error onto the
not-yet-quantized columns through the upper Cholesky factor of the (damped) inverse Hessian; updates to later
column blocks are applied lazily, once per block ("lazy batch updates"). Codes are chosen on exactly the stored
fp16 grid (:mod:`optimum_mc.group_quant`), so ``dequantize_matrix(codes, scales, zeros)`` is what GPTQ optimized.

Groups. Without ``act_order`` a group's scale / zero are computed when its first column is reached, from the
weights as updated so far (including updates still pending in the lazy batch, so the result does not depend on
``block_size``). With ``act_order`` columns are processed by decreasing Hessian diagonal; our packed format has no
group index (``g_idx``), so groups stay contiguous in the original column order: every group's scale / zero are
fixed from the original weights before the loop ("static groups") and each processed column uses the grid of its
original group.

Grid search (``clip_search=True``). A group's grid spans its [min, max] by default. With the search, each group's
range is also shrunk about its midpoint by ratios down to 0.5 (``CLIP_GRID`` steps), and the grid with the lowest
error ``sum_j H_jj (w_j - Q(w_j))^2`` is kept: round-to-nearest error weighted by the Hessian diagonal (the mean
squared input of column ``j``), a per-column proxy for the output error that GPTQ then minimizes
(the same weighting as llama.cpp's importance-matrix quantization). At 1 bit the binary form is kept.

Group fit (``group_fit="lsq"``). Instead of spanning [min, max], each group's scale and zero are fitted by least
squares to the weights as GPTQ has updated them when the group is reached
(:func:`~optimum_mc.group_quant.lsq_qparams`): the same stored grid, 0.44x the min/max error on gaussian groups at
2 bits. The fit pays when groups are fitted as they are reached, i.e. without ``act_order`` (with act-order the
groups are static, fitted on the original weights); docs/low-bit-study.md measures both.
"""

from __future__ import annotations

import torch

from .errors import CalibrationError, MCConfigError, ShapeError
from .group_quant import (
    GROUP_FITS,
    check_finite,
    check_group_size,
    check_zero_point,
    dequantize_codes,
    expand_rows,
    group_qparams,
    lsq_qparams,
    q8_exponents,
    q8_qparams,
    quantize_codes,
    snap_scales,
)
from .packing import check_bits

QuantResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes uint8 (out,in), scales/zeros fp16 (out,G)

_FP16_TINY = 2.0**-24
_MAX_DAMP_RETRIES = 8
CLIP_GRID = 20  # shrink ratios 1 - 0.5 * i / CLIP_GRID, i = 1..CLIP_GRID, tried by the grid search


def searched_qparams(
    w: torch.Tensor,
    bits: int,
    zero_point: str,
    col_weight: torch.Tensor | None,
    grid: int = CLIP_GRID,
    group_fit: str = "minmax",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale / zero of the groups of ``w (..., G, g)``: :func:`group_qparams`, or (``col_weight`` given, ``(G, g)``
    non-negative, b >= 2) the clip ratio ``1 - 0.5 * i / grid`` (``i = 0..grid``) minimizing the
    ``col_weight``-weighted round-to-nearest error per group (the module docstring's grid search; all-ones weights:
    plain weight MSE). Only a strictly lower error moves a group off min/max. ``group_fit="lsq"``: the groups'
    least-squares grids (:func:`~optimum_mc.group_quant.lsq_qparams`) instead of min/max (no search)."""
    if group_fit == "lsq":
        return lsq_qparams(w, bits, zero_point)
    exps = q8_exponents(w, bits) if zero_point == "q8" else None  # one exponent per block for every candidate

    def qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return group_qparams(x, bits, zero_point) if exps is None else q8_qparams(x, bits, exps)

    s, z = qparams(w)
    if col_weight is None or bits == 1:
        return s, z
    w = w.float()
    cw = col_weight.to(w.device, torch.float32)

    def error(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ((dequantize_codes(quantize_codes(w, s, z, bits), s, z) - w).pow(2) * cw).sum(-1)

    best = error(s, z)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    mid = (lo + hi) / 2
    for i in range(1, grid + 1):
        ratio = 1.0 - 0.5 * i / grid
        cs, cz = qparams(torch.cat([mid + (lo - mid) * ratio, mid + (hi - mid) * ratio], -1))
        ok = torch.isfinite(cs) & torch.isfinite(cz) & (cs >= _FP16_TINY)
        err = torch.where(ok, error(torch.where(ok, cs, s), torch.where(ok, cz, z)), best)
        better = err < best
        s, z, best = torch.where(better, cs, s), torch.where(better, cz, z), torch.where(better, err, best)
    return s, z


class HessianAccumulator:
    """Running ``H = 2/n * sum_t x_t x_t^T`` over input rows ``(..., in_features)`` (fp32 GEMMs, fp64 sum)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        if isinstance(in_features, bool) or not isinstance(in_features, int) or in_features <= 0:
            raise ShapeError(f"in_features must be a positive integer, got {in_features!r}.")
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        """Add the rows of ``x`` (any leading shape, last dim ``in_features``)."""
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ShapeError(f"inputs have shape {tuple(x.shape)}, the Hessian expects (..., {self.in_features}).")
        x = x.reshape(-1, self.in_features).to(self._sum.device, torch.float32)
        if x.shape[0] == 0:
            return
        self._sum += (x.t() @ x).double()
        self.num_tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n X^T X`` as fp32 (all zeros when no token was seen)."""
        return (self._sum * (2.0 / max(self.num_tokens, 1))).float()


def hessian_error(weight: torch.Tensor, dequantized: torch.Tensor, hessian: torch.Tensor) -> float:
    """GPTQ's objective ``tr((W - Q) H (W - Q)^T)`` (= ``2/n * ||(W - Q) X^T||^2`` for ``H = 2/n X^T X``)."""
    delta = (weight.double() - dequantized.double()).to(hessian.device)
    return float(((delta @ hessian.double()) * delta).sum())


def weight_mse(weight: torch.Tensor, dequantized: torch.Tensor) -> float:
    """Mean squared weight error."""
    return float((weight.double() - dequantized.double()).pow(2).mean())


def _check_options(damp_percent: float, block_size: int) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size <= 0:
        raise MCConfigError(f"block_size must be a positive integer, got {block_size!r}.")
    if isinstance(damp_percent, bool) or not isinstance(damp_percent, (int, float)) or not 0 < damp_percent < 1:
        raise MCConfigError(f"damp_percent must lie in (0, 1), got {damp_percent!r}.")


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * mean(diag H) * I)^-1``; damping grows 10x until it factors."""
    return _inverse_cholesky_(h.clone(), damp_percent)


def _inverse_cholesky_(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """:func:`_inverse_cholesky` computed in ``h``'s own storage (``h`` is overwritten and returned): at most two
    more matrices of its size are alive at once, which bounds GPTQ's peak on large (intermediate-sized) Hessians.
    Bit-identical to the out-of-place form (the damped diagonal is recomputed from the saved one on each try)."""
    diag = torch.diag(h).clone()
    diag_mean = diag.mean().clamp_min(1e-8)
    damp = damp_percent
    for _ in range(_MAX_DAMP_RETRIES):
        h.diagonal().copy_(diag + damp * diag_mean)
        lower, info = torch.linalg.cholesky_ex(h)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(lower)
            del lower
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            del inverse
            if int(info) == 0 and torch.isfinite(upper).all():
                h.copy_(upper)
                return h
        damp *= 10
    raise CalibrationError(
        "the Hessian is not positive definite even after heavy damping; check the calibration inputs "
        "(degenerate or too few tokens)."
    )


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    zero_point: str = "float",
    clip_search: bool = False,
    group_fit: str = "minmax",
) -> QuantResult:
    """Quantize ``weight (out, in)`` with GPTQ given ``hessian (in, in)``.

    Returns uint8 codes ``(out, in)`` and fp16 per-group scales / zeros ``(out, in // group_size)``, on the
    weight's device. ``group_size=-1`` means one group per row. ``clip_search``: the module docstring's grid search;
    ``group_fit``: how a group's grid is chosen (module docstring).
    """
    return gptq_quantize_multi(
        weight, hessian, [bits], group_size, damp_percent, block_size, act_order, zero_point, clip_search, group_fit
    )[0]


def gptq_quantize_multi(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: list[int],
    group_size: int,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    zero_point: str = "float",
    clip_search: bool = False,
    group_fit: str = "minmax",
) -> list[QuantResult]:
    """GPTQ of one matrix at several bit-widths in one column loop; each result equals a separate run. It is
    :func:`gptq_quantize_batched` over one copy of the matrix per width, sharing one Hessian (one Cholesky)."""
    if weight.dim() != 2:
        raise ShapeError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}.")
    out_f, in_f = weight.shape
    if hessian.shape != (in_f, in_f):
        raise ShapeError(f"Hessian shape {tuple(hessian.shape)} does not match in_features={in_f}.")
    # this function's own fp32 copies, which the batched loop works in (consume=True); it checks the rest (group
    # size, widths, options, finiteness) and returns [] for no widths
    w = weight.detach().to(weight.device, torch.float32).unsqueeze(0).repeat(len(bits), 1, 1)
    h = hessian.detach().to(weight.device, torch.float32).clone().unsqueeze(0)
    return gptq_quantize_batched(
        w, h, list(bits), group_size, damp_percent, block_size, act_order, zero_point, True, clip_search, group_fit
    )


def _current_group(
    w: torch.Tensor, wb: torch.Tensor, err: torch.Tensor, hinv: torch.Tensor, b0: int, b1: int, col: int, g: int
) -> torch.Tensor:
    """Up-to-date weights ``(nb, out, g)`` of the group starting at ``col``: columns inside the current block come
    from the block copy ``wb``; later columns get the block's pending (lazy) update applied."""
    end = col + g
    inside = wb[:, :, col - b0 : min(end, b1) - b0]
    if end <= b1:
        return inside
    beyond = w[:, :, b1:end] - err @ hinv[b0:b1, b1:end]
    return torch.cat([inside, beyond], dim=-1)


def calibration_free_quantize(
    weight: torch.Tensor,
    bits: int,
    group_size: int,
    grid: int = 20,
    refine_steps: int = 8,
    zero_point: str = "float",
) -> QuantResult:
    """Quantization without calibration data: per-group weight-MSE minimization of the grid.

    Method: (1) clipping search — each group's [min, max] range is shrunk about its midpoint by ratios in
    ``[0.5, 1]`` (``grid + 1`` values, ratio 1 = plain round-to-nearest) and the best ratio per group is kept;
    (2) alternating least squares (uniform-grid Lloyd iterations) — refit the affine map ``code -> value``
    (scale, offset) to the group's weights by least squares, re-round the codes, repeat. At 1 bit only (2) runs,
    starting from MC's binary form; it is then exactly 2-means clustering of the group. Every candidate is
    evaluated on the fp16-rounded grid and a group only ever moves to a lower MSE, so the result is never worse
    than :func:`~optimum_mc.group_quant.rtn_quantize`. ``zero_point="int"`` keeps every candidate's zero an
    integer code (b >= 2).
    """
    if weight.dim() != 2:
        raise ShapeError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}.")
    check_bits(bits)
    out_f, in_f = weight.shape
    g = check_group_size(in_f, group_size)
    check_finite(weight)
    wg = weight.detach().float().reshape(out_f, in_f // g, g)

    check_zero_point(zero_point)
    # (1): the clip search, unweighted (round-to-nearest is its starting point; at 1 bit it is all there is)
    best_s, best_z = searched_qparams(wg, bits, zero_point, torch.ones(wg.shape[-2:]), grid)
    best_err = _group_sse(wg, best_s, best_z, bits)

    def consider(s: torch.Tensor, z: torch.Tensor) -> None:
        nonlocal best_s, best_z, best_err
        ok = torch.isfinite(s) & torch.isfinite(z) & (s >= _FP16_TINY)
        s, z = torch.where(ok, s, best_s), torch.where(ok, z, best_z)
        err = _group_sse(wg, s, z, bits)
        better = err < best_err
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
        best_err = torch.where(better, err, best_err)

    if zero_point == "q8" and bits == 1:  # the symmetric binary form's scale is already the least-squares one
        refine_steps = 0
    for _ in range(refine_steps):
        consider(*_affine_refit(wg, best_s, best_z, bits, zero_point))
    codes = quantize_codes(wg, best_s, best_z, bits).reshape(out_f, in_f)
    return codes, best_s.half(), best_z.half()


def _group_sse(wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int) -> torch.Tensor:
    q = quantize_codes(wg, s, z, bits)
    return (dequantize_codes(q, s, z) - wg).pow(2).sum(-1)


def _affine_refit(
    wg: torch.Tensor, s: torch.Tensor, z: torch.Tensor, bits: int, zero_point: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares ``w ~ a * q + c`` per group for the current codes ``q``; as fp16-exact ``(scale, zero)``
    (an integer code zero for ``zero_point="int"`` at b >= 2)."""
    q = quantize_codes(wg, s, z, bits).float()
    qm, wm = q.mean(-1, keepdim=True), wg.mean(-1, keepdim=True)
    var = (q - qm).pow(2).mean(-1)
    cov = ((q - qm) * (wg - wm)).mean(-1)
    a = cov / var.clamp_min(1e-30)
    c = wm[..., 0] - a * qm[..., 0]
    usable = (var > 0) & (a > _FP16_TINY)
    if zero_point == "q8":  # the scale on the group's q8 grid (its block's exponent), the zero recomputed on it
        unit = torch.exp2(expand_rows(q8_exponents(wg, bits), wg.shape[-3]).float())
        scale = snap_scales(torch.where(usable, a, s), unit)
    else:
        scale = torch.where(usable, a, s).half().float()
    zero = -c / scale.clamp_min(_FP16_TINY)
    if zero_point in ("int", "q8") and bits > 1:
        zero = torch.round(zero).clamp(0, (1 << bits) - 1)
    zero = torch.where(usable, zero, z).half().float()
    return scale, zero


def gptq_quantize_batched(
    weights: torch.Tensor,
    hessians: torch.Tensor,
    bits: list[int],
    group_size: int,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
    zero_point: str = "float",
    consume: bool = False,
    clip_search: bool = False,
    group_fit: str = "minmax",
) -> list[QuantResult]:
    """GPTQ of ``E`` same-shape matrices (e.g. one projection of every expert) at one width each, in one column loop.

    ``weights (E, out, in)``, ``hessians (E, in, in)`` or ``(1, in, in)`` (one Hessian shared by all: copies of one
    matrix at several widths, :func:`gptq_quantize_multi`), ``bits`` one width per matrix. Each result is identical
    (``torch.equal``) to ``gptq_quantize(weights[e], hessians[e], bits[e], ...)``: the per-column work runs on all
    matrices at once, while the operations whose rounding could depend on batching (Cholesky, the lazy-batch
    matrix products, the grids) run per matrix, exactly as there. ``consume=True`` lets it work in the storage of
    ``weights`` / ``hessians`` (fp32, same device) instead of copies; both are then overwritten.
    """
    if weights.dim() != 3 or hessians.dim() != 3:
        raise ShapeError(
            f"weights / hessians must be (E, out, in) / (E, in, in), got {tuple(weights.shape)} and "
            f"{tuple(hessians.shape)}."
        )
    num, out_f, in_f = weights.shape
    if hessians.shape not in ((num, in_f, in_f), (1, in_f, in_f)) or len(bits) != num:
        raise ShapeError(
            f"hessians {tuple(hessians.shape)} and {len(bits)} bit-widths do not match weights {tuple(weights.shape)}."
        )
    g = check_group_size(in_f, group_size)
    for b in bits:
        check_bits(b)
    _check_options(damp_percent, block_size)
    check_zero_point(zero_point)
    if group_fit not in GROUP_FITS:
        raise MCConfigError(f"group_fit must be one of {GROUP_FITS}, got {group_fit!r}.")
    check_finite(weights)
    if not torch.isfinite(hessians).all():
        raise CalibrationError("a Hessian contains NaN/Inf; the calibration activations are not finite.")
    if num == 0:
        return []
    w0, h, dead = _prepare_batch(weights, hessians, consume)
    groups, nh = in_f // g, h.shape[0]  # nh: 1 when every matrix shares one Hessian
    col_w = torch.diagonal(h, dim1=1, dim2=2).reshape(nh, groups, g).clone() if clip_search else None
    if col_w is not None:
        col_w = col_w.expand(num, -1, -1)
    dev = w0.device
    scales = torch.zeros(num, out_f, groups, device=dev)
    zeros = torch.zeros(num, out_f, groups, device=dev)
    maxq = torch.tensor([(1 << b) - 1 for b in bits], dtype=torch.float32, device=dev).view(num, 1)
    perms = None
    if act_order:
        for e, b in enumerate(bits):
            cw = None if col_w is None else col_w[e]
            scales[e], zeros[e] = searched_qparams(
                w0[e].reshape(out_f, groups, g), b, zero_point, cw, group_fit=group_fit
            )
        perms = torch.stack([torch.argsort(torch.diag(h[e]), descending=True, stable=True) for e in range(nh)])
        perms = perms.expand(num, -1)
        for e in range(num):  # in place, one matrix at a time (bounded extra memory)
            w0[e] = w0[e][:, perms[e]]
        for e in range(nh):
            h[e] = h[e][perms[e]][:, perms[e]]
    for e in range(nh):  # in place, one matrix at a time
        _inverse_cholesky_(h[e], damp_percent)
    hinv = h.expand(num, -1, -1)
    codes = _batched_columns(w0, hinv, bits, scales, zeros, maxq, g, block_size, perms, zero_point, col_w, group_fit)
    if perms is not None:
        codes = torch.stack([codes[e][:, torch.argsort(perms[e])] for e in range(num)])
    return [(codes[e], scales[e].half(), zeros[e].half()) for e in range(num)]


def _prepare_batch(
    weights: torch.Tensor, hessians: torch.Tensor, consume: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 working tensors (copies unless ``consume``); a dead column (zero Hessian diagonal: no calibration input
    ever reached it) gets zero weights and a unit diagonal, so the Cholesky exists and its codes are the zero's."""

    def own(t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        fresh = t.dtype != torch.float32 or t.device != weights.device
        t = t.to(weights.device, torch.float32)
        return t if consume or fresh else t.clone()

    w0, h = own(weights), own(hessians)
    diag = torch.diagonal(h, dim1=1, dim2=2)
    dead = diag == 0
    diag[dead] = 1.0
    w0.masked_fill_(dead.unsqueeze(1), 0.0)
    return w0, h, dead


def _batched_columns(
    w: torch.Tensor,
    hinv: torch.Tensor,
    bits: list[int],
    scales: torch.Tensor,
    zeros: torch.Tensor,
    maxq: torch.Tensor,
    g: int,
    block_size: int,
    perms: torch.Tensor | None,
    zero_point: str,
    col_w: torch.Tensor | None = None,
    group_fit: str = "minmax",
) -> torch.Tensor:
    """The GPTQ column loop over ``(E, out, in)`` weights (processing order); fills scales / zeros for dynamic
    groups; returns codes in processing order."""
    num, out_f, in_f = w.shape
    rows = torch.arange(num, device=w.device)
    col_group = None if perms is None else perms // g
    codes = torch.zeros(num, out_f, in_f, dtype=torch.uint8, device=w.device)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        wb = w[:, :, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[:, b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            if col_group is None:
                grp = col // g
                if col % g == 0:
                    for e in range(num):
                        cur = _current_group(w[e : e + 1], wb[e : e + 1], err[e : e + 1], hinv[e], b0, b1, col, g)
                        cw = None if col_w is None else col_w[e, grp : grp + 1]
                        se, ze = searched_qparams(cur[0].unsqueeze(1), bits[e], zero_point, cw, group_fit=group_fit)
                        scales[e, :, grp], zeros[e, :, grp] = se[:, 0], ze[:, 0]
                s, z = scales[:, :, grp], zeros[:, :, grp]
            else:
                grp = col_group[:, col]
                s, z = scales[rows, :, grp], zeros[rows, :, grp]
            q = torch.minimum(torch.round(wb[:, :, j] / s + z).clamp_min(0), maxq)
            codes[:, :, col] = q.to(torch.uint8)
            d = hb[:, j, j].unsqueeze(1)
            e_col = (wb[:, :, j] - (q - z) * s) / d
            wb[:, :, j:] -= e_col.unsqueeze(2) * hb[:, j, j:].unsqueeze(1)
            err[:, :, j] = e_col
        for e in range(num):
            w[e : e + 1, :, b1:] -= err[e : e + 1] @ hinv[e, b0:b1, b1:]
        w[:, :, b0:b1] = wb
    return codes
