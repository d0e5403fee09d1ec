"""PMQ bit allocation: each expert's bit-width under an average-bits budget, as an integer program (OR-Tools).

Objective (MC, Huang et al., ICLR 2025). With binary ``x[e, b]`` (expert ``e`` gets candidate width ``b``)::

    minimize  sum_e sum_b  x[e, b] * phi_e^alpha * w_e^beta * eps(e, b)^gamma
    s.t.      sum_b x[e, b] = 1                      (one width per expert)
              sum_e sum_b b * x[e, b] = T            (the bit budget, see below)
              sum_e x[e, top] >= 1, sum_e x[e, second] >= 1   per layer   (optional "constraints")

``phi`` is the activation frequency and ``w`` the routing-weight mass, both normalized to sum 1 per layer (as the
reference implementation's ``norm_experts``), and ``eps(e, b)`` the block-output loss when only ``e`` is quantized
at ``b`` bits. ``top`` / ``second`` are the highest and second-highest candidate widths (with two candidates only
the top one is required; with one candidate the allocation is uniform).

Budget. The paper writes ``sum bits <= budget``; here the total is pinned to ``T``, the largest total the
candidate widths (and constraints) can reach without exceeding ``floor(target * E + 1e-9)``, so the average is
exactly the target whenever it is reachable and no bits are left unused when an extra bit would not lower the
measured loss.

Solvers. The program is a multiple-choice knapsack (plus the required-width constraints). ``solve_dp`` solves it
exactly by dynamic programming: per layer over (experts, exact bit total, which required widths are used yet),
then a min-plus convolution over the layers' totals for the global mode; float64 costs, first-found ties; O(E *
T * C * 4) per layer (milliseconds for 256 experts). OR-Tools CP-SAT is the solver of record
(``allocation_solver="cp-sat"``, the default): it receives the DP optimum as a hint and proves it (or improves
it on its integer-scaled costs) with a single worker and fixed seed (deterministic); a stop at the time limit
before proof is logged and reported (:class:`SolveReport`). Costs are made integral for CP-SAT: each expert's row
is shifted by its minimum (a per-expert constant, so the argmin is unchanged) and scaled so the largest shifted
cost is about 1e12 (smaller differences become ties, which the hint resolves). CP-SAT's presolve is disabled: it
turns this knapsack into a form whose LP bound is weak. ``allocation_solver="dp"`` skips CP-SAT.

Modes. "layer": one program per MoE layer with budget ``floor(target * E_l)``; "global": one program over all
layers with budget ``floor(target * sum_l E_l)`` and the constraints still per layer. Baselines at the per-layer
budget: "random" — experts visited in a seeded random order, each takes a uniformly random width among those that
keep the exact total and the constraints reachable; "frequency" — the same program with ``w`` dropped and the
loss replaced by ``2^-b``, i.e. cost ``phi_e * 2^-b``: a more frequent expert never gets fewer bits than a less
frequent one (swapping their widths would lower the cost), and nothing but frequency matters; "hessian" — the
paper's Hessian-based competitor (HAWQ-style): the cost is ``loss`` itself, which the pipeline fills with the
Hessian-trace importance ``tr(H) / n * ||W - Q_b(W)||^2`` summed over the expert's matrices
(:func:`~optimum_mc.calibration.factors.hessian_trace_loss`).

Granularity. ``granularity="projection"`` (modes "layer" / "global") splits every expert into two items, its gate/up
matrix (2 weight units: 2/3 of its weights) and its down matrix (1 unit), each with its own loss (that projection
alone quantized); the budget is ``floor(target * 3E)`` units and the required widths apply to the items. The same
DP (item sizes ``units * b``) and CP-SAT program solve it.

Exponents. The paper's cost is ``phi * w^1.5 * eps`` with ``eps`` an un-squared Frobenius norm, i.e. alpha=1,
beta=1.5, gamma=1 (the defaults; with them, the authors' released factor files give their released allocations).
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from .bitwidths import PROJECTION_UNITS, ExpertBits, join, mean_bits, split
from .errors import CalibrationError, MCConfigError, ShapeError

logger = logging.getLogger(__name__)

MODES = ("layer", "global", "random", "frequency", "hessian")
SOLVERS = ("cp-sat", "dp")
GRANULARITIES = ("expert", "projection")
_COST_RESOLUTION = 1e12  # integer units of the largest (shifted) cost in one program
_INT_LIMIT = 2**60  # the sum of all integer costs stays below this


@dataclass
class ExpertFactors:
    """Calibration factors of one MoE layer with ``E`` experts and ``C`` candidate bit-widths.

    frequency: ``(E,)`` activation frequency (any positive scale; normalized per layer).
    weight_mass: ``(E,)`` routing-weight mass (any positive scale; normalized per layer).
    loss: ``(E, C)`` quantization loss per candidate width (ascending candidate order).
    projection_loss: ``(E, 2, C)`` the loss with only the gate/up (``[:, 0]``) or only the down (``[:, 1]``)
        projection quantized; needed by ``granularity="projection"`` only.
    """

    frequency: torch.Tensor
    weight_mass: torch.Tensor
    loss: torch.Tensor
    projection_loss: torch.Tensor | None = None

    @property
    def num_experts(self) -> int:
        return int(self.frequency.numel())


# ---------------------------------------------------------------------------------------------------- budgets
def layer_budget(num_experts: int, target_bits: float) -> int:
    """Total expert bits allowed for ``num_experts`` experts at an average of ``target_bits``."""
    return int(math.floor(target_bits * num_experts + 1e-9))


def required_bits(candidate_bits: list[int], constraints: bool) -> list[int]:
    """Widths that must be used by at least one expert in every layer (top and second-highest candidate)."""
    cb = sorted(candidate_bits)
    if not constraints or len(cb) < 2:
        return []
    return [cb[-1], cb[-2]] if len(cb) >= 3 else [cb[-1]]


def _reachable(num_free: int, candidate_bits: list[int], cap: int) -> int:
    """Bitset (Python int) of the totals <= ``cap`` that ``num_free`` experts with free widths can reach."""
    reach = 1 if cap >= 0 else 0
    for _ in range(num_free):
        if not reach:
            break
        reach = _shift_or(reach, candidate_bits, cap)
    return reach


def _shift_or(reach: int, candidate_bits: list[int], cap: int) -> int:
    """One more free expert: the totals of ``reach`` plus any candidate width, kept <= ``cap``."""
    out = 0
    for b in candidate_bits:
        out |= reach << b
    return out & ((1 << (cap + 1)) - 1)


def max_total_bits(num_experts: list[int], candidate_bits: list[int], budget: int, constraints: bool) -> int | None:
    """The largest total <= ``budget`` reachable by layers of ``num_experts`` experts (``None``: none is)."""
    cb = sorted(candidate_bits)
    req = required_bits(cb, constraints)
    if any(n < len(req) for n in num_experts):
        return None
    fixed = sum(req) * len(num_experts)
    free = sum(num_experts) - len(req) * len(num_experts)
    reach = _reachable(free, cb, budget - fixed)
    return None if reach == 0 else fixed + reach.bit_length() - 1


def check_feasible(
    num_experts: list[int], candidate_bits: list[int], target_bits: float, constraints: bool, mode: str = "layer"
) -> None:
    """Raise :class:`MCConfigError` if no allocation meets the budget (cheap; called before any weight loads)."""
    if mode not in MODES:
        raise MCConfigError(f"allocation must be one of {MODES}, got {mode!r}.")
    cb = sorted(candidate_bits)
    if not cb or len(set(cb)) != len(cb) or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in cb):
        raise MCConfigError(f"candidate_bits must be distinct positive integers, got {candidate_bits!r}.")
    if not num_experts or any(n < 1 for n in num_experts):
        raise MCConfigError(f"every MoE layer needs at least one expert, got {num_experts!r}.")
    if not math.isfinite(target_bits):
        raise MCConfigError(f"bits must be finite, got {target_bits!r}.")
    req = required_bits(cb, constraints)
    for n in num_experts:
        if n < len(req):
            raise MCConfigError(
                f"a layer has {n} expert(s) but the allocation constraints need one expert at each of {req} bits; "
                f"pass allocation_constraints=False."
            )
    groups = [num_experts] if mode == "global" else [[n] for n in sorted(set(num_experts))]
    for sizes in groups:
        budget = layer_budget(sum(sizes), target_bits)
        if max_total_bits(sizes, cb, budget, constraints) is None:
            n = sum(sizes)
            least = (sum(req) + (sizes[0] - len(req)) * cb[0]) / sizes[0]
            where = "over all MoE layers" if mode == "global" else f"in a layer of {n} experts"
            need = f"one expert at each of {req} bits and the rest at {cb[0]}" if req else f"every expert at {cb[0]}"
            raise MCConfigError(
                f"bits={target_bits} is infeasible with candidate_bits={cb}: the budget {where} is {budget} bits, "
                f"but the smallest allocation ({need}) averages {least:.3f} bits per expert. "
                f"Raise bits{', or pass allocation_constraints=False' if req else ''}."
            )


# ---------------------------------------------------------------------------------------------------- costs
def _check_factors(factors: list[ExpertFactors], num_candidates: int) -> None:
    for i, f in enumerate(factors):
        e = f.num_experts
        if e == 0 or f.frequency.dim() != 1 or f.weight_mass.shape != (e,) or f.loss.shape != (e, num_candidates):
            raise ShapeError(
                f"factors of MoE layer #{i}: frequency {tuple(f.frequency.shape)}, weight_mass "
                f"{tuple(f.weight_mass.shape)} and loss {tuple(f.loss.shape)} must be (E,), (E,) and "
                f"(E, {num_candidates}) with E >= 1."
            )
        for name in ("frequency", "weight_mass", "loss"):
            t = getattr(f, name)
            if not torch.isfinite(t).all() or (t < 0).any():
                raise CalibrationError(f"{name} of MoE layer #{i} must be finite and >= 0.")


def objective_costs(f: ExpertFactors, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """``phi_e^alpha * w_e^beta * eps(e, b)^gamma`` as float64 ``(E, C)``, phi and w normalized per layer."""
    phi = f.frequency.detach().cpu().double().clamp_min(0)
    w = f.weight_mass.detach().cpu().double().clamp_min(0)
    phi = phi / phi.sum() if phi.sum() > 0 else torch.full_like(phi, 1 / phi.numel())
    w = w / w.sum() if w.sum() > 0 else torch.full_like(w, 1 / w.numel())
    eps = f.loss.detach().cpu().double().clamp_min(0)
    return (phi.pow(alpha) * w.pow(beta)).unsqueeze(1).mul(eps.pow(gamma)).numpy()


def allocation_cost(
    bits_per_layer: list[list[int]],
    factors: list[ExpertFactors],
    candidate_bits: list[int],
    alpha: float = 1.0,
    beta: float = 1.5,
    gamma: float = 1.0,
) -> float:
    """The objective value of an allocation."""
    cb = sorted(candidate_bits)
    total = 0.0
    for bits, f in zip(bits_per_layer, factors):
        c = objective_costs(f, alpha, beta, gamma)
        total += float(sum(c[e, cb.index(b)] for e, b in enumerate(bits)))
    return total


# ---------------------------------------------------------------------------------------------------- exact DP
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


# ---------------------------------------------------------------------------------------------------- solvers
@dataclass
class SolveReport:
    """How one allocation program was solved: solver, status (``OPTIMAL`` when proven), time, objective."""

    solver: str
    status: str
    seconds: float
    objective: float
    num_experts: int


def _cpsat(
    costs: list[np.ndarray],
    cb: list[int],
    total: int,
    constraints: bool,
    hint: list[list[int]] | None,
    time_limit: float,
    units: list[np.ndarray] | None = None,
) -> tuple[list[list[int]] | None, str]:
    """CP-SAT on integer-scaled costs, hinted with ``hint`` (if any); returns its best allocation (``hint`` when it
    found none) and status name."""
    from ortools.sat.python import cp_model

    shifted = [c - c.min(axis=1, keepdims=True) for c in costs]
    n = sum(c.shape[0] for c in shifted)
    peak = max(float(c.max()) for c in shifted)
    scale = min(_COST_RESOLUTION, _INT_LIMIT / n) / peak if peak > 0 else 0.0
    req = [cb.index(b) for b in required_bits(cb, constraints)]

    model = cp_model.CpModel()
    xs, bit_vars, bit_coefs, obj_vars, obj_coefs = [], [], [], [], []
    for li, c in enumerate(shifted):
        ic = np.rint(c * scale).astype(np.int64)
        rows = []
        for e in range(c.shape[0]):
            row = [model.new_bool_var(f"x{li}_{e}_{b}") for b in cb]
            model.add_exactly_one(row)
            rows.append(row)
            for j, b in enumerate(cb):
                if hint is not None:
                    model.add_hint(row[j], hint[li][e] == b)
                bit_vars.append(row[j])
                bit_coefs.append(b * (1 if units is None else int(units[li][e])))
                if ic[e, j]:
                    obj_vars.append(row[j])
                    obj_coefs.append(int(ic[e, j]))
        for j in req:
            model.add(sum(row[j] for row in rows) >= 1)
        xs.append(rows)
    model.add(cp_model.LinearExpr.weighted_sum(bit_vars, bit_coefs) == total)
    model.minimize(cp_model.LinearExpr.weighted_sum(obj_vars, obj_coefs))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    solver.parameters.cp_model_presolve = False
    solver.parameters.max_time_in_seconds = float(time_limit)
    solver.parameters.catch_sigint_signal = False  # leave Ctrl-C to Python (KeyboardInterrupt)
    status = solver.solve(model)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        return hint, solver.status_name(status)
    bits = [[cb[next(j for j, v in enumerate(row) if solver.boolean_value(v))] for row in rows] for rows in xs]
    return bits, solver.status_name(status)


def _solve(
    costs: list[np.ndarray],
    candidate_bits: list[int],
    total: int,
    constraints: bool,
    solver: str = "cp-sat",
    time_limit: float = 60.0,
    report: list[SolveReport] | None = None,
    units: list[np.ndarray] | None = None,
) -> list[list[int]]:
    """Minimum-cost allocation of the layers in ``costs`` with exactly ``total`` bits (``units``: see
    :func:`solve_dp`).

    ``"dp"``: the exact dynamic program alone. ``"cp-sat"`` (solver of record): OR-Tools CP-SAT, hinted with the
    DP optimum, proves (or improves) it within ``time_limit`` seconds; a stop before proof is logged as a warning
    and kept in ``report``.
    """
    cb = sorted(candidate_bits)
    t0 = time.perf_counter()
    bits = solve_dp(costs, cb, total, constraints, units)
    status = "OPTIMAL"
    if solver == "cp-sat":
        bits, status = _cpsat(costs, cb, total, constraints, bits, time_limit, units)
        if status != "OPTIMAL":
            logger.warning(
                "bit allocation: CP-SAT stopped with status %s after %.1fs (allocation_time_limit); using its best "
                "allocation, which is no worse than the exact dynamic program's on the integer-scaled costs.",
                status,
                time.perf_counter() - t0,
            )
    if report is not None:
        n = sum(c.shape[0] for c in costs)
        report.append(SolveReport(solver, status, time.perf_counter() - t0, _objective(costs, cb, bits), n))
    return bits


def _objective(costs: list[np.ndarray], cb: list[int], bits: list[list[int]]) -> float:
    """Total cost of an allocation under the cost matrices ``costs``."""
    return float(sum(c[np.arange(len(b)), [cb.index(x) for x in b]].sum() for c, b in zip(costs, bits)))


def _random(num_experts: int, candidate_bits: list[int], total: int, constraints: bool, seed: int) -> list[int]:
    """Seeded random widths with exactly ``total`` bits meeting the constraints."""
    rng = random.Random(seed)
    cb = sorted(candidate_bits)
    need = set(required_bits(cb, constraints))
    reach = [1]  # reach[k]: bitset of the totals k free experts can reach
    for _ in range(num_experts):
        reach.append(_shift_or(reach[-1], cb, total))
    order = list(range(num_experts))
    rng.shuffle(order)
    bits = [0] * num_experts
    left = total
    for k, e in enumerate(order):
        rest = num_experts - k - 1
        options = []
        for b in cb:
            still = need - {b}
            cap = left - b - sum(still)
            if len(still) <= rest and cap >= 0 and (reach[rest - len(still)] >> cap) & 1:
                options.append(b)
        b = rng.choice(options)  # non-empty: ``left`` was reachable before this expert
        bits[e] = b
        need.discard(b)
        left -= b
    return bits


def allocate_bits(
    factors: list[ExpertFactors],
    candidate_bits: list[int],
    target_bits: float,
    mode: str = "layer",
    alpha: float = 1.0,
    beta: float = 1.5,
    gamma: float = 1.0,
    constraints: bool = True,
    seed: int = 0,
    solver: str = "cp-sat",
    time_limit: float = 60.0,
    report: list[SolveReport] | None = None,
    granularity: str = "expert",
) -> list[list[ExpertBits]]:
    """Bits per expert for every layer in ``factors`` (see the module docstring for objective and modes).

    ``granularity="projection"`` (modes "layer" and "global"): each expert's gate/up and down matrices get their
    own widths, from ``factors[l].projection_loss``; an expert's width is then ``[gate_up, down]`` when they differ
    (:mod:`~optimum_mc.bitwidths`) and the budget counts weights (gate/up twice). ``report``, when given,
    receives one :class:`SolveReport` per program solved.
    """
    if mode not in MODES:
        raise MCConfigError(f"allocation must be one of {MODES}, got {mode!r}.")
    if solver not in SOLVERS:
        raise MCConfigError(f"allocation_solver must be one of {SOLVERS}, got {solver!r}.")
    if granularity not in GRANULARITIES:
        raise MCConfigError(f"allocation_granularity must be one of {GRANULARITIES}, got {granularity!r}.")
    if granularity == "projection" and mode not in ("layer", "global"):
        raise MCConfigError(f"allocation_granularity='projection' needs allocation 'layer' or 'global', got {mode!r}.")
    cb = sorted(candidate_bits)
    if not factors:
        return []
    _check_factors(factors, len(cb))
    sizes = [f.num_experts for f in factors]
    check_feasible(sizes, cb, target_bits, constraints, mode)
    if len(cb) == 1:
        return [[cb[0]] * n for n in sizes]
    if granularity == "projection":
        kw = dict(solver=solver, time_limit=time_limit, report=report)
        return _allocate_projections(factors, cb, target_bits, mode, (alpha, beta, gamma), constraints, kw)

    def per_layer_total(n: int) -> int:
        return max_total_bits([n], cb, layer_budget(n, target_bits), constraints)

    if mode == "random":
        return [_random(n, cb, per_layer_total(n), constraints, seed + i) for i, n in enumerate(sizes)]
    costs = [_mode_costs(f, cb, mode, alpha, beta, gamma) for f in factors]
    kw = dict(solver=solver, time_limit=time_limit, report=report)
    if mode == "global":
        total = max_total_bits(sizes, cb, layer_budget(sum(sizes), target_bits), constraints)
        return _solve(costs, cb, total, constraints, **kw)
    return [_solve([c], cb, per_layer_total(n), constraints, **kw)[0] for c, n in zip(costs, sizes)]


def _allocate_projections(
    factors: list[ExpertFactors],
    cb: list[int],
    target_bits: float,
    mode: str,
    exponents: tuple[float, float, float],
    constraints: bool,
    kw: dict,
) -> list[list[ExpertBits]]:
    """Per-projection allocation: a layer of ``E`` experts is ``2E`` items (the gate/up matrices, then the down
    matrices) of ``PROJECTION_UNITS`` weight units each, costed ``phi^a * w^b * eps_proj^c`` with the loss of that
    projection alone; the budget is ``target * 3E`` units (the required widths apply to the items)."""
    costs, units = [], []
    for i, f in enumerate(factors):
        e = f.num_experts
        pl = f.projection_loss
        if pl is None or tuple(pl.shape) != (e, 2, len(cb)):
            got = None if pl is None else tuple(pl.shape)
            raise ShapeError(f"allocation_granularity='projection' needs projection_loss (E, 2, C) = "
                             f"({e}, 2, {len(cb)}) for MoE layer #{i}, got {got}.")  # fmt: skip
        if not torch.isfinite(pl).all() or (pl < 0).any():
            raise CalibrationError(f"projection_loss of MoE layer #{i} must be finite and >= 0.")
        parts = [objective_costs(ExpertFactors(f.frequency, f.weight_mass, pl[:, k]), *exponents) for k in (0, 1)]
        costs.append(np.concatenate(parts))
        units.append(np.repeat(np.array(PROJECTION_UNITS, dtype=np.int64), e))
    per_unit = sum(PROJECTION_UNITS)

    def exact_total(layers: list[int]) -> int:
        cap = int(math.floor(target_bits * per_unit * sum(factors[i].num_experts for i in layers) + 1e-9))
        reach = reachable_totals(
            [2 * factors[i].num_experts for i in layers], cb, constraints, [units[i] for i in layers], cap
        )
        hits = np.flatnonzero(reach)
        if hits.size == 0:  # check_feasible passed, so an expert-level allocation (hence this one) exists
            raise MCConfigError(f"no per-projection allocation fits bits={target_bits} with candidates {cb}.")
        return int(hits[-1])

    if mode == "global":
        solved = _solve(costs, cb, exact_total(list(range(len(factors)))), constraints, units=units, **kw)
    else:
        solved = [_solve([c], cb, exact_total([i]), constraints, units=[u], **kw)[0]
                  for i, (c, u) in enumerate(zip(costs, units))]  # fmt: skip
    out = []
    for f, items in zip(factors, solved):
        e = f.num_experts
        out.append([join(items[k], items[e + k]) for k in range(e)])
    return out


def _mode_costs(f: ExpertFactors, cb: list[int], mode: str, alpha: float, beta: float, gamma: float) -> np.ndarray:
    """The ``(E, C)`` cost matrix a mode minimizes (see the module docstring)."""
    if mode == "frequency":
        synthetic = torch.tensor([2.0**-b for b in cb], dtype=torch.float64).expand(f.num_experts, -1)
        return objective_costs(ExpertFactors(f.frequency, f.weight_mass, synthetic), 1.0, 0.0, 1.0)
    if mode == "hessian":
        return f.loss.detach().cpu().double().clamp_min(0).numpy()
    return objective_costs(f, alpha, beta, gamma)


# ---------------------------------------------------------------------------------------------------- display
def format_allocation_table(
    bits_per_layer: list[list[ExpertBits]], layer_indices: list[int], candidate_bits: list[int]
) -> str:
    """A readable per-layer table: each expert's width (one digit per expert, in groups of 8; with per-projection
    widths the gate/up digits, then ``/`` and the down digits), how many matrices got each width, and the layer's
    average bits per weight; then the overall average."""
    cb = sorted(candidate_bits)
    rows = []
    for idx, bits in zip(layer_indices, bits_per_layer):
        pairs = [split(b) for b in bits]
        parts = [[p[0] for p in pairs]] + ([[p[1] for p in pairs]] if any(g != d for g, d in pairs) else [])
        digits = ["".join(str(b) for b in part) for part in parts]
        packed = " / ".join(" ".join(d[i : i + 8] for i in range(0, len(d), 8)) for d in digits)
        widths = [w for part in parts for w in part]
        counts = " ".join(f"{widths.count(b):>4d}" for b in cb)
        rows.append((f"{idx:>5d}", packed, counts, f"{np.mean([mean_bits(b) for b in bits]):.3f}" if bits else "-"))
    width = max([len(r[1]) for r in rows] + [len("experts (e0, e1, ...)")])
    head = f"layer | {'experts (e0, e1, ...)':<{width}} | " + " ".join(f"{f'#{b}b':>4s}" for b in cb) + " |   avg"
    lines = [head, "-" * len(head)]
    lines += [f"{a} | {b:<{width}} | {c} | {d:>5s}" for a, b, c, d in rows]
    total = [mean_bits(b) for layer in bits_per_layer for b in layer]
    lines.append(f"overall average expert bits: {np.mean(total):.3f}" if total else "no MoE layers")
    if any(isinstance(b, list) for layer in bits_per_layer for b in layer):
        lines.append("(per-projection widths: gate/up digits / down digits; averages per weight, gate/up counts 2x)")
    return "\n".join(lines)
