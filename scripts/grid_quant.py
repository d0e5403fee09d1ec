"""Fake-quant 2-bit grids for the low-bit grid study (scripts/study_grids.py): scalar grids with an affine
per-group fit, the E8P vector codebook, and block-LDLQ (GPTQ over blocks of ``dim`` columns with error feedback).

Study code, not a checkpoint format: it returns dequantized fp32 weights (metadata rounded to fp16 as it would be
stored) so perplexity can be measured before any packing or kernel exists.

E8P (the construction of QuIP#, Tseng et al. 2024, re-implemented here): ``D8^ = D8 + 1/2`` (half-integer
vectors with an even coordinate sum) intersected with the ball of squared norm 10 has 227 distinct absolute-value
patterns; 29 patterns of squared norm 12 (five 3/2 and three 1/2; the first 29 of the 56 in a fixed order) pad them
to 256 (8 bits). A codeword is such a pattern with signs making the coordinate sum even (7 free sign bits: every
flip changes the sum's parity, since each |entry| is an odd multiple of 1/2), shifted by +1/4 or -1/4 (1 bit):
2^16 entries, a 16-bit code per 8 weights = 2 bits per weight, fixed and data-independent (no per-model bytes).
Nearest-codeword search uses that structure: per shift and pattern the best signs are the input's own signs; if
their parity is wrong, the cheapest fix flips the coordinate with the smallest ``|u_i| * a_i`` (cost
``4 |u_i| a_i``). That is 512 candidates per vector instead of 65536, and exact.

Block-LDLQ: with ``U`` the upper Cholesky factor of the damped inverse Hessian (as GPTQ), a block ``b`` of
columns is quantized jointly after the feedback of all earlier blocks, and its error ``E`` moves the later
columns by ``-E U_bb^-1 U_b,rest`` (the optimal compensation given ``b``'s errors; for 1-column blocks it is
GPTQ's update). With an identity Hessian ``U`` is diagonal, nothing is fed back, and the result is
nearest-codeword rounding.
"""

from __future__ import annotations

import itertools
import math
from functools import lru_cache

import torch

# 4-level Lloyd-Max quantizer of a unit gaussian (Max 1960): +-0.4528, +-1.5104
LLOYD_MAX_2BIT = (-1.5104, -0.4528, 0.4528, 1.5104)
UNIFORM_2BIT = (-1.5, -0.5, 0.5, 1.5)


# ---------------------------------------------------------------------------------------------- E8P codebook
@lru_cache(maxsize=1)
def e8p_abs_patterns() -> torch.Tensor:
    """The 256 absolute-value patterns ``(256, 8)`` of E8P (module docstring), float32, multiples of 1/2."""
    halves = (0.5, 1.5, 2.5, 3.5)
    pats = set()
    for p in itertools.product(halves, repeat=8):
        if sum(x * x for x in p) <= 10:
            # some sign choice gives an even sum: always true (each flip changes parity), so every pattern counts
            pats.add(p)
    base = sorted(pats)
    norm12 = sorted(
        {tuple(1.5 if i in five else 0.5 for i in range(8)) for five in itertools.combinations(range(8), 5)},
        reverse=True,
    )[:29]
    out = torch.tensor(base + norm12, dtype=torch.float32)
    if out.shape != (256, 8):
        raise AssertionError(f"E8P pattern count {out.shape[0]} != 256")
    return out


def e8p_codebook() -> torch.Tensor:
    """All 2^16 E8P codewords ``(65536, 8)`` (for tests and brute-force checks; the search never builds it)."""
    pats = e8p_abs_patterns()
    signs = torch.tensor(list(itertools.product((1.0, -1.0), repeat=8)))  # (256, 8)
    cw = (pats[:, None, :] * signs[None, :, :]).reshape(-1, 8)
    even = torch.remainder(torch.round(cw.sum(-1)), 2) == 0
    cw = cw[even]  # 256 patterns x 128 sign choices
    return torch.cat([cw + 0.25, cw - 0.25])


def e8p_nearest(u: torch.Tensor) -> torch.Tensor:
    """The nearest E8P codeword to each row of ``u (N, 8)`` (fp32), exactly (module docstring)."""
    pats = e8p_abs_patterns()
    psq = (pats * pats).sum(-1)  # (256,)
    best_d = torch.full((u.shape[0],), math.inf)
    best = torch.zeros_like(u)
    for shift in (0.25, -0.25):
        v = u - shift
        sg = torch.where(v < 0, -1.0, 1.0)
        a = v.abs()
        d = (a * a).sum(-1, keepdim=True) - 2 * a @ pats.t() + psq  # (N, 256) with free signs
        odd = torch.remainder(torch.round(sg @ pats.t()), 2) != 0  # (N, 256) parity of sum(sign * pattern)
        prod = a[:, None, :] * pats[None, :, :]  # (N, 256, 8)
        fix, where = prod.min(-1)  # the cheapest coordinate to flip
        d = d + odd * 4 * fix
        dmin, k = d.min(-1)
        s = sg.clone()
        kk = where.gather(1, k[:, None]).squeeze(1)
        flip = odd.gather(1, k[:, None]).squeeze(1)
        rows = torch.nonzero(flip).squeeze(1)
        s[rows, kk[rows]] = -s[rows, kk[rows]]
        cand = s * pats[k] + shift
        take = dmin < best_d
        best = torch.where(take[:, None], cand, best)
        best_d = torch.where(take, dmin, best_d)
    return best


# The step ``alpha`` minimizing ``E |x - alpha Q(x / alpha)|^2`` for a unit gaussian ``x`` (grid of 0.01 over
# [0.30, 1.00], measured with :func:`gaussian_mse`; tests/tools/test_grid_quant.py checks it is a local minimum):
# a group's scale is ``alpha * rms(group)``.
E8P_GAUSSIAN_SCALE = 0.96


def gaussian_mse(alpha: float, n: int = 8192, seed: int = 0) -> float:
    """Mean squared error per weight of E8P at step ``alpha`` on ``n`` unit-gaussian 8-vectors (fixed seed)."""
    x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))
    return float(((x - alpha * e8p_nearest(x / alpha)) ** 2).mean())


# ---------------------------------------------------------------------------------------------- D4 codebooks
@lru_cache(maxsize=4)
def d4_codebook(bits: int) -> torch.Tensor:
    """The ``2^bits`` points of the D4 coset ``{x in (Z + 1/2)^4 : sum x even}`` nearest the origin ``(2^bits, 4)``:
    whole shells by norm, the last shell cut in a fixed order that keeps ``x`` and ``-x`` together, so the codebook
    is symmetric under negation (as the coset is); fixed and data-independent; searched by brute force
    (``bits`` <= 10: at most 1024 entries)."""
    r = torch.arange(-6, 6, dtype=torch.float32) + 0.5
    pts = torch.cartesian_prod(r, r, r, r)
    pts = pts[torch.remainder(pts.sum(-1), 2) == 0]
    key = [(float(p.pow(2).sum()), min(p.tolist(), (-p).tolist()), p.tolist()) for p in pts]  # x next to -x
    order = sorted(range(pts.shape[0]), key=key.__getitem__)
    return pts[order[: 2**bits]].contiguous()


@lru_cache(maxsize=8)
def lattice_gaussian_scale(bits: int) -> float:
    """The step ``alpha`` minimizing the mean squared error of ``alpha * Q(x / alpha)`` for unit gaussian ``x`` on
    :func:`d4_codebook` (fixed sample, seed 0): a 0.05 grid over [0.10, 1.50], then a 0.01 grid around its best."""
    x = torch.randn(4096, 4, generator=torch.Generator().manual_seed(0))
    cb = d4_codebook(bits)

    def mse(alpha: float) -> float:
        return float(((x - alpha * codebook_nearest(x / alpha, cb)) ** 2).mean())

    coarse = min((mse(a / 100), a) for a in range(10, 151, 5))[1]
    return min((mse(a / 100), a) for a in range(coarse - 5, coarse + 6))[1] / 100


def codebook_nearest(u: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """The nearest row of ``cb (K, d)`` to each row of ``u (N, d)`` (brute force)."""
    d = (cb * cb).sum(-1) - 2 * u @ cb.t()
    return cb[d.argmin(-1)]


# ---------------------------------------------------------------------------------------------- group fits
def _fp16(t: torch.Tensor) -> torch.Tensor:
    return t.half().float()


def scalar_nearest(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted ``levels`` for every entry of ``x``."""
    mids = (levels[1:] + levels[:-1]) / 2
    return torch.bucketize(x.contiguous(), mids)


def affine_fit(w: torch.Tensor, levels: torch.Tensor, iters: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale / offset ``(rows, 1)`` (fp16-rounded) of the grid ``s * levels + z`` for a group ``w (rows, g)``:
    alternating least squares from two starts (min/max and mean/std), the lower squared error kept per row."""
    lo, hi = w.min(-1, keepdim=True).values, w.max(-1, keepdim=True).values
    starts = [
        ((hi - lo) / (levels[-1] - levels[0]), None),
        (w.std(-1, keepdim=True) / levels.pow(2).mean().sqrt(), w.mean(-1, keepdim=True)),
    ]
    best_s = best_z = best_e = None
    for s, z in starts:
        z = lo - s * levels[0] if z is None else z
        for _ in range(iters):
            s_, z_ = _fp16(s).clamp_min(2.0**-24), _fp16(z)
            lv = levels[scalar_nearest((w - z_) / s_, levels)]
            lm, wm = lv.mean(-1, keepdim=True), w.mean(-1, keepdim=True)
            var = ((lv - lm) ** 2).sum(-1, keepdim=True)
            cov = ((lv - lm) * (w - wm)).sum(-1, keepdim=True)
            s = torch.where(var > 0, cov / var.clamp_min(1e-30), s)
            z = wm - s * lm
        s, z = _fp16(s).clamp_min(2.0**-24), _fp16(z)
        e = ((w - (s * levels[scalar_nearest((w - z) / s, levels)] + z)) ** 2).sum(-1, keepdim=True)
        if best_e is None:
            best_s, best_z, best_e = s, z, e
        else:
            better = e < best_e
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
            best_e = torch.where(better, e, best_e)
    return best_s, best_z


class ScalarGrid:
    """A fixed normalized 1-d grid, fitted per (row, group) by an fp16 scale and offset (0.25 bits at group 128)."""

    dim = 1

    def __init__(self, levels, name: str):
        self.levels = torch.tensor(sorted(levels), dtype=torch.float32)
        self.name = name
        self.code_bits = math.log2(len(levels))

    def fit(self, w: torch.Tensor):
        return affine_fit(w, self.levels)

    def quantize(self, w: torch.Tensor, params) -> torch.Tensor:
        s, z = params
        return s * self.levels[scalar_nearest((w - z) / s, self.levels)] + z

    def metadata_bits(self, group_size: int) -> float:
        return 32 / group_size


class E8PGrid:
    """E8P over 8 consecutive input columns, one fp16 scale per (row, group) (0.125 bits at group 128)."""

    dim = 8
    code_bits = 2.0
    name = "e8p"

    def fit(self, w: torch.Tensor):
        rms = w.pow(2).mean(-1, keepdim=True).sqrt()
        return _fp16(E8P_GAUSSIAN_SCALE * rms).clamp_min(2.0**-24)

    def quantize(self, w: torch.Tensor, scale) -> torch.Tensor:
        return e8p_nearest(w / scale) * scale

    def metadata_bits(self, group_size: int) -> float:
        return 16 / group_size


class D4Grid:
    """A :func:`d4_codebook` over 4 consecutive input columns, one fp16 scale per (row, group)."""

    dim = 4

    def __init__(self, bits: int):
        self.codebook, self.code_bits, self.name = d4_codebook(bits), bits / 4, f"d4-{bits}bit"
        self.alpha = lattice_gaussian_scale(bits)

    def fit(self, w: torch.Tensor):
        return _fp16(self.alpha * w.pow(2).mean(-1, keepdim=True).sqrt()).clamp_min(2.0**-24)

    def quantize(self, w: torch.Tensor, scale) -> torch.Tensor:
        return codebook_nearest(w / scale, self.codebook) * scale

    def metadata_bits(self, group_size: int) -> float:
        return 16 / group_size


# ---------------------------------------------------------------------------------------------- block-LDLQ
def inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of the damped inverse Hessian, exactly as the library's GPTQ computes it."""
    from optimum_mc.gptq import _inverse_cholesky

    return _inverse_cholesky(h.float(), damp_percent)


def block_ldlq(
    weight: torch.Tensor, hessian: torch.Tensor, grid, group_size: int, damp_percent: float = 0.01
) -> torch.Tensor:
    """Fake-quantized ``weight (out, in)`` on ``grid`` (``dim`` columns at a time, natural column order), each group
    fitted when its first column is reached from the weights as updated so far (as the library's GPTQ without
    act-order). Returns the dequantized fp32 matrix."""
    out_f, in_f = weight.shape
    d = grid.dim
    if in_f % group_size or group_size % d:
        raise ValueError(f"in_features {in_f} / group {group_size} / block {d} do not divide")
    u = inverse_cholesky(hessian, damp_percent)
    w = weight.detach().float().clone()
    q = torch.empty_like(w)
    for g0 in range(0, in_f, group_size):
        params = grid.fit(w[:, g0 : g0 + group_size])
        for j in range(g0, g0 + group_size, d):
            b = slice(j, j + d)
            wb = w[:, b]
            qb = grid.quantize(wb.reshape(-1, d) if d > 1 else wb, params)
            qb = qb.reshape(out_f, d)
            q[:, b] = qb
            if j + d < in_f:
                upd = torch.linalg.solve_triangular(u[b, b], u[b, j + d :], upper=True)
                w[:, j + d :] -= (wb - qb) @ upd
    return q


def act_order_ldlq(
    weight: torch.Tensor, hessian: torch.Tensor, grid, group_size: int, damp_percent: float = 0.01
) -> torch.Tensor:
    """As :func:`block_ldlq` for a scalar grid (``dim`` 1), with the library's act-order: columns by decreasing
    Hessian diagonal, every group fitted once from the original weights ("static groups"; groups stay contiguous
    in the original order, as the packed format has no group index)."""
    if grid.dim != 1:
        raise ValueError("act-order is implemented for scalar grids only")
    out_f, in_f = weight.shape
    if in_f % group_size:
        raise ValueError(f"in_features {in_f} / group {group_size} do not divide")
    w0 = weight.detach().float()
    params = [grid.fit(w0[:, g0 : g0 + group_size]) for g0 in range(0, in_f, group_size)]
    perm = torch.argsort(torch.diagonal(hessian), descending=True, stable=True)
    u = inverse_cholesky(hessian[perm][:, perm], damp_percent)
    w = w0[:, perm].clone()
    q = torch.empty_like(w)
    for k in range(in_f):
        q[:, k : k + 1] = grid.quantize(w[:, k : k + 1], params[int(perm[k]) // group_size])
        if k + 1 < in_f:
            w[:, k + 1 :] -= (w[:, k : k + 1] - q[:, k : k + 1]) / u[k, k] * u[k, k + 1 :]
    return q[:, torch.argsort(perm)]
