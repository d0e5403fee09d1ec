"""GPTQ for one weight matrix given its input Hessian and bit-width, plus the calibration-free fallback.

GPTQ (Frantar et al., 2023) quantizes columns one at a time and spreads each column's rounding error onto the
not-yet-quantized columns through the inverse Hessian's Cholesky factor; updates to later column blocks are
applied lazily, once per block. Codes are chosen on exactly the stored fp16 grid (``group_quant``), so
``dequantize_matrix`` reproduces what GPTQ optimized.

With ``act_order`` columns are processed by decreasing Hessian diagonal. Our packed format has no group index
(``g_idx``): groups stay contiguous in the original column order, so each group's scale / zero are fixed from the
original weights before the loop ("static groups") and every processed column uses its original group's grid.
"""

from __future__ import annotations

import torch

from .errors import ShapeError
from .group_quant import check_finite, check_group_size, dequantize_codes, group_qparams, quantize_codes

QuantResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes uint8 (out,in), scales/zeros fp16 (out,G)


class HessianAccumulator:
    """Running ``H = 2/n * sum x x^T`` over rows of inputs ``(..., in_features)`` (fp32 products, fp64 sum)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.in_features = in_features
        self._sum = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)
        self.num_tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] != self.in_features:
            raise ShapeError(f"inputs have {x.shape[-1]} features, the Hessian expects {self.in_features}.")
        x = x.to(self._sum.device, torch.float32)
        self._sum += (x.t() @ x).double()  # fp32 GEMM, fp64 running sum
        self.num_tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        """``2/n X^T X`` as fp32 (zeros when no token was seen)."""
        return (self._sum * (2.0 / max(self.num_tokens, 1))).float()


def _inverse_cholesky(h: torch.Tensor, damp_percent: float) -> torch.Tensor:
    """Upper Cholesky factor of ``H^-1`` after damping; retries with more damping if not positive definite."""
    diag_mean = torch.diag(h).mean().clamp_min(1e-8)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    damp = damp_percent
    for _ in range(8):
        try:
            lower = torch.linalg.cholesky(h + damp * diag_mean * eye)
            inv = torch.cholesky_inverse(lower)
            return torch.linalg.cholesky(inv, upper=True)
        except torch.linalg.LinAlgError:
            damp *= 10
    raise ShapeError("the Hessian is not positive definite even after heavy damping; check the calibration inputs.")


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> QuantResult:
    """Quantize ``weight (out, in)`` with GPTQ; return codes and fp16 per-group scales / zeros."""
    return gptq_quantize_multi(weight, hessian, [bits], group_size, damp_percent, block_size, act_order)[0]


def gptq_quantize_multi(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: list[int],
    group_size: int,
    damp_percent: float = 0.01,
    block_size: int = 128,
    act_order: bool = False,
) -> list[QuantResult]:
    """GPTQ of one matrix at several bit-widths at once (one column loop; results as if run separately)."""
    out_f, in_f = weight.shape
    g = check_group_size(in_f, group_size)
    if hessian.shape != (in_f, in_f):
        raise ShapeError(f"Hessian shape {tuple(hessian.shape)} does not match in_features={in_f}.")
    check_finite(weight)
    nb = len(bits)
    w0 = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w0[:, dead] = 0.0

    groups = in_f // g
    scales = torch.zeros(nb, out_f, groups)
    zeros = torch.zeros(nb, out_f, groups)
    maxq = torch.tensor([(1 << b) - 1 for b in bits], dtype=torch.float32).view(nb, 1)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else None
    if act_order:
        # static groups: parameters from the original-order weights (dead columns zeroed as GPTQ sees them)
        for k, b in enumerate(bits):
            scales[k], zeros[k] = group_qparams(w0.reshape(out_f, groups, g), b)
        w0 = w0[:, perm]
        h = h[perm][:, perm]
    col_group = ((perm if act_order else torch.arange(in_f)) // g).tolist()
    w = w0.unsqueeze(0).repeat(nb, 1, 1)  # (nb, out, in)

    hinv = _inverse_cholesky(h, damp_percent)
    codes = torch.zeros(nb, out_f, in_f, dtype=torch.uint8)
    for b0 in range(0, in_f, block_size):
        b1 = min(b0 + block_size, in_f)
        wb = w[:, :, b0:b1].clone()
        err = torch.zeros_like(wb)
        hb = hinv[b0:b1, b0:b1]
        for j in range(b1 - b0):
            col = b0 + j
            grp = col_group[col]
            if not act_order and col % g == 0:
                cur = _group_view(w, wb, err, hinv, b0, b1, col, g)
                for k, b in enumerate(bits):
                    scales[k, :, grp], zeros[k, :, grp] = group_qparams(cur[k], b)
            s, z = scales[:, :, grp], zeros[:, :, grp]  # (nb, out)
            q = torch.clamp(torch.round(wb[:, :, j] / s + z), min=torch.zeros_like(maxq), max=maxq)
            codes[:, :, col] = q.to(torch.uint8)
            e = (wb[:, :, j] - (q - z) * s) / hb[j, j]
            wb[:, :, j:] -= e.unsqueeze(2) * hb[j, j:].view(1, 1, -1)
            err[:, :, j] = e
        w[:, :, b1:] -= err @ hinv[b0:b1, b1:]
        w[:, :, b0:b1] = wb
    if act_order:
        codes = codes[:, :, torch.argsort(perm)]
    return [(codes[k], scales[k].half(), zeros[k].half()) for k in range(nb)]


def _group_view(
    w: torch.Tensor, wb: torch.Tensor, err: torch.Tensor, hinv: torch.Tensor, b0: int, b1: int, col: int, g: int
) -> torch.Tensor:
    """The up-to-date weights ``(nb, out, g)`` of the group starting at ``col``: columns inside the current block
    come from ``wb``; columns past it get this block's pending (lazy) updates applied, as plain GPTQ would have."""
    cur = w[:, :, col : col + g].clone()
    j0 = col - b0
    n = min(wb.shape[-1] - j0, g)
    cur[:, :, :n] = wb[:, :, j0 : j0 + n]
    if n < g and j0 > 0:
        cur[:, :, n:] -= err[:, :, :j0] @ hinv[b0:col, b1 : col + g]
    return cur


def calibration_free_quantize(weight: torch.Tensor, bits: int, group_size: int, grid: int = 20) -> QuantResult:
    """Quantization without calibration data: per-group MSE-optimal range shrinking (clip search).

    For every group the min/max range (or, at 1 bit, the binary magnitude) is shrunk by factors in
    ``[0.5, 1]`` and the factor with the lowest weight MSE is kept — better than plain round-to-nearest on the
    heavy-tailed weights of real models, at the cost of ``grid`` quantizations.
    """
    out_f, in_f = weight.shape
    g = check_group_size(in_f, group_size)
    check_finite(weight)
    wg = weight.detach().float().reshape(out_f, in_f // g, g)
    best_err = torch.full(wg.shape[:2], float("inf"))
    best_s = torch.zeros(wg.shape[:2])
    best_z = torch.zeros(wg.shape[:2])
    center = wg.mean(-1, keepdim=True) if bits == 1 else (wg.amax(-1, keepdim=True) + wg.amin(-1, keepdim=True)) / 2
    for i in range(grid + 1):
        shrink = 1.0 - 0.5 * i / grid
        cand = center + (wg - center).clamp(-1e30, 1e30) * shrink if bits > 1 else wg
        if bits > 1:
            lo = center + (wg.amin(-1, keepdim=True) - center) * shrink
            hi = center + (wg.amax(-1, keepdim=True) - center) * shrink
            cand = torch.cat([lo, hi], -1)
            s, z = group_qparams(cand, bits)
        else:
            s, z = group_qparams(wg, 1)
            s = (s * (0.5 + i / grid)).half().float().clamp_min(2.0**-24)  # magnitude from 0.5x to 1.5x
            z = (0.5 - center[..., 0] / s).half().float()
        q = quantize_codes(wg, s, z, bits)
        err = (dequantize_codes(q, s, z) - wg).pow(2).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    codes = quantize_codes(wg, best_s, best_z, bits).reshape(out_f, in_f)
    return codes, best_s.half(), best_z.half()
