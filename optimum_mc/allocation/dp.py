"""Exact solution of the allocation program by dynamic programming (the multiple-choice knapsack; see the
package docstring)."""

from __future__ import annotations

import numpy as np

from ..errors import MCConfigError
from .feasibility import required_bits


def _required_flags(cb: list[int], constraints: bool) -> tuple[list[int], int]:
    """Per candidate index, the bit of the required-width mask it sets (0 for widths that are not required), and
    the number of required widths."""
    req = required_bits(cb, constraints)
    return [(1 << req.index(b)) if b in req else 0 for b in cb], len(req)


def _layer_table(
    costs: np.ndarray, cb: list[int], cap: int, constraints: bool, units: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact multiple-choice-knapsack DP of one layer over (items, total bits, required-width flags).

    Item ``e`` at width ``b`` uses ``units[e] * b`` of the budget (1 for a whole expert; 2 / 1 for an expert's
    gate/up / down projection, which hold 2/3 and 1/3 of its weights). Returns ``best (cap + 1,)``: the minimum
    cost of the layer with exactly ``t`` budget units and every required width used (``inf`` where impossible),
    and ``choice (E, masks, cap + 1)`` for :func:`_layer_backtrack`.
    """
    flags, num_req = _required_flags(cb, constraints)
    masks = 1 << num_req
    num_e = costs.shape[0]
    dp = np.full((masks, cap + 1), np.inf)
    dp[0, 0] = 0.0
    choice = np.zeros((num_e, masks, cap + 1), dtype=np.int16)
    for e in range(num_e):
        new = np.full_like(dp, np.inf)
        for j, width in enumerate(cb):
            b = width * (1 if units is None else int(units[e]))
            if b > cap:
                continue
            for m in range(masks):
                cand = dp[m, : cap + 1 - b] + costs[e, j]
                m2 = m | flags[j]
                better = cand < new[m2, b:]
                new[m2, b:][better] = cand[better]
                choice[e, m2, b:][better] = j * masks + m
        dp = new
    return dp[masks - 1], choice


def _layer_backtrack(choice: np.ndarray, cb: list[int], total: int, units: np.ndarray | None = None) -> list[int]:
    """The widths of the optimal layer allocation with ``total`` bits from :func:`_layer_table`'s choices."""
    masks = choice.shape[1]
    m, t = masks - 1, total
    bits = [0] * choice.shape[0]
    for e in range(choice.shape[0] - 1, -1, -1):
        code = int(choice[e, m, t])
        j, m = divmod(code, masks)
        bits[e] = cb[j]
        t -= cb[j] * (1 if units is None else int(units[e]))
    return bits


def solve_dp(
    costs: list[np.ndarray],
    candidate_bits: list[int],
    total: int,
    constraints: bool,
    units: list[np.ndarray] | None = None,
) -> list[list[int]]:
    """Exact minimum-cost allocation of the layers in ``costs`` with exactly ``total`` bits (summed over layers;
    item ``e`` of layer ``l`` at width ``b`` counts ``units[l][e] * b``, 1 when ``units`` is None).

    Each layer's table gives its minimum cost for every exact bit total; the layers are then combined by a
    min-plus convolution over totals. Costs are compared in float64, ties go to the first choice found.
    """
    cb = sorted(candidate_bits)
    units = units or [None] * len(costs)
    tables = [
        _layer_table(c, cb, min(total, cb[-1] * _units_sum(c.shape[0], u)), constraints, u)
        for c, u in zip(costs, units)
    ]
    acc = np.zeros(1)
    splits = []
    for best, _ in tables:
        width = min(total, len(acc) - 1 + len(best) - 1) + 1
        new = np.full(width, np.inf)
        arg = np.zeros(width, dtype=np.int64)
        for s in np.flatnonzero(np.isfinite(best)):
            n = min(len(acc), width - s)
            if n <= 0:
                continue
            cand = acc[:n] + best[s]
            better = cand < new[s : s + n]
            new[s : s + n][better] = cand[better]
            arg[s : s + n][better] = s
        acc = new
        splits.append(arg)
    if total >= len(acc) or not np.isfinite(acc[total]):
        raise MCConfigError(f"no allocation reaches exactly {total} bits with candidate_bits={cb}.")
    out, t = [], total
    for (_, choice), arg, u in zip(reversed(tables), reversed(splits), reversed(units)):
        s = int(arg[t])
        out.append(_layer_backtrack(choice, cb, s, u))
        t -= s
    return out[::-1]


def _units_sum(num_items: int, units: np.ndarray | None) -> int:
    return num_items if units is None else int(np.sum(units))


def reachable_totals(
    num_items: list[int], candidate_bits: list[int], constraints: bool, units: list[np.ndarray] | None, cap: int
) -> np.ndarray:
    """Boolean ``(cap + 1,)``: which exact totals the layers can reach (every layer's constraints met)."""
    units = units or [None] * len(num_items)
    acc = np.zeros(1, dtype=bool)
    acc[0] = True
    for n, u in zip(num_items, units):
        best, _ = _layer_table(np.zeros((n, len(candidate_bits))), sorted(candidate_bits), cap, constraints, u)
        layer = np.isfinite(best)
        new = np.zeros(min(cap, len(acc) - 1 + len(layer) - 1) + 1, dtype=bool)
        for s in np.flatnonzero(layer):
            m = min(len(acc), len(new) - s)
            if m > 0:
                new[s : s + m] |= acc[:m]
        acc = new
    return acc
