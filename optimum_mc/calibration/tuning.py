"""``MCConfig(tune_exponents=True)``: pick the allocation exponents per MoE layer by measured layer-output error.

A seeded share of the layer's calibration tokens is held out. For every expert and candidate width, the change of
the block output on the held-out tokens routed to it, ``r_t (f_q(x_t) - f(x_t))`` with the expert quantized by
round-to-nearest, is computed once (:func:`layer_deltas`). Each exponent triple of :data:`EXPONENT_GRID` gives an
allocation (solved exactly); its error is ``sum_t ||sum_{e in t} delta_e(x_t)||^2`` over the held-out tokens —
the real block-output error of that allocation, cross terms between a token's experts included. The triple with
the smallest error wins (ties: the earlier triple, the paper's first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..allocation import ExpertFactors, allocate_bits
from ..expert_layout import expert_act
from ..group_quant import dequantize_matrix, grid_of, rtn_quantize
from .factors import expert_forward

# (alpha, beta, gamma); the paper's phi * w^1.5 * eps first
EXPONENT_GRID: tuple[tuple[float, float, float], ...] = (
    (1.0, 1.5, 1.0),
    (1.0, 1.0, 1.0),
    (1.0, 0.0, 1.0),
    (0.0, 1.5, 1.0),
    (0.0, 0.0, 1.0),
    (0.5, 0.75, 1.0),
    (1.0, 1.5, 0.5),
    (1.0, 1.5, 2.0),
)


@dataclass
class HeldoutDeltas:
    """Per expert: the held-out token rows it changes and, per width, the change ``(n_e, H)``."""

    num_tokens: int
    hidden_dim: int
    rows: list[torch.Tensor]
    deltas: list[dict[int, torch.Tensor]]

    def error(self, bits: list[int]) -> float:
        """Squared block-output error over the held-out tokens when expert ``e`` has ``bits[e]`` bits."""
        acc = torch.zeros(self.num_tokens, self.hidden_dim)
        for e, b in enumerate(bits):
            if self.rows[e].numel():
                acc.index_add_(0, self.rows[e], self.deltas[e][b])
        return float(acc.pow(2).sum())


def heldout_tokens(num_tokens: int, fraction: float, seed: int) -> torch.Tensor:
    """Boolean mask over a layer's calibration tokens: the seeded held-out share (at least one token)."""
    if num_tokens == 0:
        return torch.zeros(0, dtype=torch.bool)
    k = min(max(int(round(fraction * num_tokens)), 1), num_tokens)
    mask = torch.zeros(num_tokens, dtype=torch.bool)
    mask[torch.randperm(num_tokens, generator=torch.Generator().manual_seed(seed))[:k]] = True
    return mask


def layer_deltas(
    experts_tokens: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    weights: list[tuple[torch.Tensor, torch.Tensor]],
    act_fn: Callable,
    bits: list[int],
    group_size: int,
    heldout: torch.Tensor,
    hidden_dim: int,
    zero_point: str = "float",
) -> HeldoutDeltas:
    """Block-output changes on the held-out tokens for every expert and width (round-to-nearest).

    ``experts_tokens[e]``: (inputs ``(n, H)``, routing weights ``(n,)``, token ids ``(n,)``) of expert ``e``;
    ``weights[e]``: its float (gate_up, down) matrices; ``heldout``: the mask of :func:`heldout_tokens`; ``act_fn``:
    the gate of every expert, or a list of one per expert (biased experts).
    """
    row_of = torch.cumsum(heldout.long(), 0) - 1
    rows, deltas = [], []
    for e, ((x, r, ids), (w_gu, w_dn)) in enumerate(zip(experts_tokens, weights)):
        act = act_fn[e] if isinstance(act_fn, (list, tuple)) else act_fn  # one gate per expert, or one for all
        keep = heldout[ids] if ids.numel() else torch.zeros(0, dtype=torch.bool)
        xh, rh = x[keep], r[keep].unsqueeze(-1)
        rows.append(row_of[ids[keep]])
        ref = expert_forward(xh, w_gu.float(), w_dn.float(), act)
        per_width = {}
        for b in bits:
            q_gu = dequantize_matrix(*rtn_quantize(w_gu.float(), b, group_size, zero_point), group_size)
            q_dn = dequantize_matrix(*rtn_quantize(w_dn.float(), b, group_size, zero_point), group_size)
            per_width[b] = (expert_forward(xh, q_gu, q_dn, act) - ref) * rh
        deltas.append(per_width)
    return HeldoutDeltas(int(heldout.sum()), hidden_dim, rows, deltas)


def tune_exponents(
    factors: ExpertFactors,
    candidate_bits: list[int],
    target_bits: float,
    deltas: HeldoutDeltas,
    constraints: bool = True,
    grid: tuple[tuple[float, float, float], ...] = EXPONENT_GRID,
    solver: str = "dp",
) -> tuple[tuple[float, float, float], list[int], list[float]]:
    """The exponent triple of ``grid`` whose allocation has the smallest held-out block-output error.

    Returns the triple, its allocation and the error of every triple (grid order).
    """
    best, best_bits, errors = None, None, []
    for alpha, beta, gamma in grid:
        bits = allocate_bits(
            [factors], candidate_bits, target_bits, "layer", alpha, beta, gamma, constraints, solver=solver
        )[0]
        err = deltas.error(bits)
        errors.append(err)
        if best is None or err < min(errors[:-1]):
            best, best_bits = (alpha, beta, gamma), bits
    return best, best_bits, errors


def tune_layer(
    routing, experts, factors: ExpertFactors, config, seed: int, code_bits: float | None = None
) -> tuple[float, float, float]:
    """The tuned exponents of one MoE layer from its :class:`~optimum_mc.calibration.capture.RoutingCapture`;
    ``code_bits``: the layer's target in code bits (default ``config.bits``)."""
    heldout = heldout_tokens(routing.seen, config.heldout_fraction, seed)
    tokens = [(*t.cat(routing.hidden_dim), t.ids()) for t in routing.experts]
    weights = [(experts.gate_up_proj[e].detach(), experts.down_proj[e].detach()) for e in range(len(tokens))]
    deltas = layer_deltas(
        tokens,
        weights,
        [expert_act(experts, e) for e in range(len(tokens))],
        config.candidate_bits,
        config.group_size,
        heldout,
        routing.hidden_dim,
        grid_of(config.zero_point, config.metadata),
    )
    best, _, _ = tune_exponents(
        factors,
        config.candidate_bits,
        config.bits if code_bits is None else code_bits,
        deltas,
        config.allocation_constraints,
        solver="dp",
    )
    return best
