"""Per-expert factors of PMQ: activation frequency, routing-weight mass, and quantization loss per bit-width.

- frequency phi(e): share of calibration tokens routed to expert e (counting every top-k slot).
- weight mass w(e): router probability (softmax/sigmoid before top-k renormalization) summed over the tokens that
  select e, per calibration token.
- loss eps(e, b): Frobenius norm (un-squared, as the paper) of the change of the MoE block output when only expert
  e is quantized to b bits, relative to the norm of the block output. Only tokens routed to e change, by
  ``r * (f_q(x) - f(x))``, so ``eps(e, b) = sqrt(sum_{t -> e} ||r_t (f_q(x_t) - f(x_t))||^2 / sum_t ||y_t||^2)``.
  With ``MCConfig(loss_normalizer="residual")`` the denominator is the energy of the decoder layer's output
  (residual stream included) instead, which only matters when layers are compared (``allocation="global"``).

How eps is measured (``MCConfig(loss_method=...)``):
- ``"rtn"`` (default): the expert quantized by round-to-nearest at b bits, on all its routed tokens (the authors'
  method). Nothing is fitted to the tokens, so there is no in-sample bias, and GPTQ then runs once per expert,
  at its allocated width only.
- ``"heldout"``: GPTQ fitted on a seeded ~75% of the expert's routed tokens, measured on the other ~25%
  (:func:`heldout_split`; the squared error is rescaled to all routed tokens). The final GPTQ refits on all tokens.
- ``"insample"``: GPTQ on all routed tokens, measured on the same tokens (biased low for rarely routed experts).

The "hessian" allocation baseline uses :func:`hessian_trace_loss` instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..gptq import calibration_free_quantize, gptq_quantize_multi
from ..group_quant import dequantize_matrix, grid_of, rtn_quantize
from ..kernels.activations import intermediate

QuantTriple = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # codes uint8, scales fp16, zeros fp16


@dataclass(frozen=True)
class GPTQOptions:
    """GPTQ settings shared by every matrix of a run."""

    group_size: int
    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    min_tokens: int = 16
    zero_point: str = "float"
    clip_search: bool = False
    group_fit: str = "minmax"

    @classmethod
    def from_config(cls, config) -> GPTQOptions:
        """The options an ``MCConfig`` sets (the grid: its ``zero_point`` with its ``metadata``)."""
        return cls(
            group_size=config.group_size,
            damp_percent=config.damp_percent,
            block_size=config.block_size,
            act_order=config.act_order,
            min_tokens=config.min_expert_tokens,
            zero_point=grid_of(config.zero_point, config.metadata),
            clip_search=config.clip_search,
            group_fit=config.group_fit,
        )

    def gptq_kwargs(self) -> dict:
        """Keyword arguments of :func:`~optimum_mc.gptq.gptq_quantize` and its multi-width / batched forms."""
        return dict(
            damp_percent=self.damp_percent,
            block_size=self.block_size,
            act_order=self.act_order,
            zero_point=self.zero_point,
            clip_search=self.clip_search,
            group_fit=self.group_fit,
        )


@dataclass
class ExpertQuant:
    """One expert quantized at one bit-width: fused gate/up ``(2I, H)`` and down ``(H, I)`` matrices."""

    bits: int
    gate_up: QuantTriple
    down: QuantTriple
    method: str  # "gptq" or "calibration-free"

    def dequantized(self, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return dequantize_matrix(*self.gate_up, group_size), dequantize_matrix(*self.down, group_size)


FORWARD_CHUNK = 1024  # tokens per step: bounds the (tokens x 2I) intermediate of a measurement forward


def expert_forward(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, act_fn: Callable) -> torch.Tensor:
    """The expert MLP of transformers' fused layout: ``down(act(gate(x)) * up(x))`` in fp32, in token chunks."""
    if x.shape[0] <= FORWARD_CHUNK:
        return intermediate(act_fn, x @ w_gate_up.t()) @ w_down.t()
    return torch.cat(
        [
            expert_forward(x[i : i + FORWARD_CHUNK], w_gate_up, w_down, act_fn)
            for i in range(0, x.shape[0], FORWARD_CHUNK)
        ]
    )


def quantize_expert(
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    x: torch.Tensor,
    act_fn: Callable,
    bits: list[int],
    opts: GPTQOptions,
    token_weights: torch.Tensor | None = None,
) -> dict[int, ExpertQuant]:
    """Quantize one expert at each of ``bits`` from its routed tokens ``x`` (fp32 ``(n, H)``).

    GPTQ runs once per matrix for all bit-widths (shared Hessians and column loop). Experts that received fewer
    than ``opts.min_tokens`` tokens use calibration-free quantization (``gptq.calibration_free_quantize``).
    ``token_weights (n,)``, when given, weight each token's contribution to both Hessians (router-probability
    calibration: ``x`` is then every calibration token).
    """
    w_gate_up, w_down = w_gate_up.float(), w_down.float()
    if not bits:
        return {}
    if x.shape[0] < max(opts.min_tokens, 1):
        return {
            b: ExpertQuant(
                b,
                calibration_free_quantize(w_gate_up, b, opts.group_size, zero_point=opts.zero_point),
                calibration_free_quantize(w_down, b, opts.group_size, zero_point=opts.zero_point),
                "calibration-free",
            )
            for b in bits
        }
    from .hessians import input_hessian, mid_hessian

    kw = opts.gptq_kwargs()
    gu = gptq_quantize_multi(w_gate_up, input_hessian(x, token_weights), bits, opts.group_size, **kw)
    dn = gptq_quantize_multi(w_down, mid_hessian(w_gate_up, x, act_fn, token_weights), bits, opts.group_size, **kw)
    return {b: ExpertQuant(b, gu[k], dn[k], "gptq") for k, b in enumerate(bits)}


def output_error(
    x: torch.Tensor, r: torch.Tensor, reference: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, act_fn
) -> float:
    """``sum_t ||r_t (f_q(x_t) - f(x_t))||^2`` for the (dequantized) expert weights ``w_gate_up`` / ``w_down``."""
    if x.shape[0] == 0:
        return 0.0
    out = expert_forward(x, w_gate_up, w_down, act_fn)
    return float(((out - reference) * r.unsqueeze(-1)).pow(2).sum())


def relative_norm(squared_error: float, output_energy: float) -> float:
    """The un-squared relative Frobenius norm ``sqrt(error / energy)``."""
    return (max(squared_error, 0.0) / max(output_energy, 1e-30)) ** 0.5


def expert_loss(
    x: torch.Tensor,
    r: torch.Tensor,
    reference: torch.Tensor,
    quant: ExpertQuant,
    act_fn: Callable,
    group_size: int,
    output_energy: float,
) -> float:
    """eps(e, b) of ``quant`` measured on ``x`` (in-sample when ``quant`` was fitted to ``x``).

    ``reference`` is the float expert's output on ``x`` (:func:`expert_forward`).
    """
    q_gu, q_dn = quant.dequantized(group_size)
    return relative_norm(output_error(x, r, reference, q_gu, q_dn, act_fn), output_energy)


def heldout_split(num_tokens: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded split of ``range(num_tokens)`` into (fit, held-out) index tensors, both sorted.

    The held-out part has ``round(fraction * n)`` tokens, at least 1 and at most ``n - 1`` (empty for n < 2).
    """
    if num_tokens < 2:
        return torch.arange(num_tokens), torch.zeros(0, dtype=torch.long)
    k = min(max(int(round(fraction * num_tokens)), 1), num_tokens - 1)
    perm = torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))
    return perm[k:].sort().values, perm[:k].sort().values


def rtn_losses(
    x: torch.Tensor,
    r: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act_fn: Callable,
    bits: list[int],
    group_size: int,
    output_energy: float,
    zero_point: str = "float",
) -> list[float]:
    """eps(e, b) for each of ``bits`` with the expert quantized by round-to-nearest (the authors' method)."""
    args = (x, r, w_gate_up, w_down, act_fn, bits, group_size, output_energy, zero_point)
    return rtn_loss_table(*args, projections=False)[0]


def rtn_loss_table(
    x: torch.Tensor,
    r: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act_fn: Callable,
    bits: list[int],
    group_size: int,
    output_energy: float,
    zero_point: str = "float",
    projections: bool = True,
) -> tuple[list[float], list[list[float]] | None]:
    """Round-to-nearest eps(e, b) for each of ``bits``: the whole expert quantized (:func:`rtn_losses`) and, with
    ``projections``, ``[gate_up losses, down losses]`` with only that matrix quantized, the other one float (for
    ``allocation_granularity="projection"``). One reference forward and one grid per width serve all three."""
    w_gate_up, w_down = w_gate_up.float(), w_down.float()
    ref = expert_forward(x, w_gate_up, w_down, act_fn)
    whole: list[float] = []
    per: list[list[float]] = [[], []]

    def eps(w_gu: torch.Tensor, w_dn: torch.Tensor) -> float:
        return relative_norm(output_error(x, r, ref, w_gu, w_dn, act_fn), output_energy)

    for b in bits:
        q_gu = dequantize_matrix(*rtn_quantize(w_gate_up, b, group_size, zero_point), group_size)
        q_dn = dequantize_matrix(*rtn_quantize(w_down, b, group_size, zero_point), group_size)
        whole.append(eps(q_gu, q_dn))
        if projections:
            per[0].append(eps(q_gu, w_down))
            per[1].append(eps(w_gate_up, q_dn))
    return whole, per if projections else None


def heldout_losses(
    x: torch.Tensor,
    r: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act_fn: Callable,
    bits: list[int],
    opts: GPTQOptions,
    output_energy: float,
    fraction: float,
    seed: int,
) -> list[float]:
    """eps(e, b) for each of ``bits``: GPTQ on the fit split of ``x``, error on the held-out split, rescaled to all
    ``n`` routed tokens (``n / n_held``). Experts too rarely routed for GPTQ are calibration-free, so all their
    tokens are out of sample."""
    w_gate_up, w_down = w_gate_up.float(), w_down.float()
    fit, held = heldout_split(x.shape[0], fraction, seed)
    if x.shape[0] < max(opts.min_tokens, 1) or held.numel() == 0:
        fit, held = torch.zeros(0, dtype=torch.long), torch.arange(x.shape[0])
    cands = quantize_expert(w_gate_up, w_down, x[fit], act_fn, bits, opts)
    xh, rh = x[held], r[held]
    ref = expert_forward(xh, w_gate_up, w_down, act_fn)
    rescale = x.shape[0] / max(held.numel(), 1)
    out = []
    for b in bits:
        q_gu, q_dn = cands[b].dequantized(opts.group_size)
        out.append(relative_norm(output_error(xh, rh, ref, q_gu, q_dn, act_fn) * rescale, output_energy))
    return out


def hessian_trace_loss(
    x: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act_fn: Callable,
    bits: list[int],
    group_size: int,
    total_tokens: int,
    zero_point: str = "float",
) -> list[float]:
    """Hessian-trace importance (HAWQ-style baseline) per width: ``sum_m tr(H_m) / in_m * ||W_m - Q_b(W_m)||^2``
    over the expert's two matrices, with ``H_m = 2 / N * sum_{t -> e} x_t x_t^T`` over all ``N`` calibration tokens
    (a rarely routed expert has a small trace). ``Q_b`` is round-to-nearest."""
    w_gate_up, w_down = w_gate_up.float(), w_down.float()
    n = max(total_tokens, 1)
    mid = intermediate(act_fn, x @ w_gate_up.t())
    traces = [2.0 / n * float(x.pow(2).sum()) / x.shape[-1], 2.0 / n * float(mid.pow(2).sum()) / mid.shape[-1]]
    out = []
    for b in bits:
        total = 0.0
        for tr, w in zip(traces, (w_gate_up, w_down)):
            q = dequantize_matrix(*rtn_quantize(w, b, group_size, zero_point), group_size)
            total += tr * float((w - q).pow(2).sum())
        out.append(total)
    return out


def expert_losses(
    method: str,
    x: torch.Tensor,
    r: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    act_fn: Callable,
    bits: list[int],
    opts: GPTQOptions,
    output_energy: float,
    total_tokens: int,
    heldout_fraction: float = 0.25,
    seed: int = 0,
    candidates: dict[int, ExpertQuant] | None = None,
) -> list[float]:
    """The loss of one expert at each of ``bits`` for a measurement ``method``: ``"rtn"``, ``"heldout"``,
    ``"insample"`` (needs ``candidates`` fitted on ``x``) or ``"hessian"`` (the Hessian-trace baseline)."""
    if method == "rtn":
        return rtn_losses(x, r, w_gate_up, w_down, act_fn, bits, opts.group_size, output_energy, opts.zero_point)
    if method == "heldout":
        return heldout_losses(x, r, w_gate_up, w_down, act_fn, bits, opts, output_energy, heldout_fraction, seed)
    if method == "hessian":
        return hessian_trace_loss(x, w_gate_up, w_down, act_fn, bits, opts.group_size, total_tokens, opts.zero_point)
    ref = expert_forward(x, w_gate_up.float(), w_down.float(), act_fn)
    return [expert_loss(x, r, ref, candidates[b], act_fn, opts.group_size, output_energy) for b in bits]
