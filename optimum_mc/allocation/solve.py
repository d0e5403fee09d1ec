"""Solving the allocation: CP-SAT (the solver of record, hinted and checked with the exact DP), the random
baseline, per-projection items, and :func:`allocate_bits`, the entry point."""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

from ..bitwidths import PROJECTION_UNITS, ExpertBits, join
from ..errors import CalibrationError, MCConfigError, ShapeError
from .dp import reachable_totals, solve_dp
from .feasibility import _shift_or, check_feasible, layer_budget, max_total_bits, required_bits
from .objective import GRANULARITIES, MODES, SOLVERS, ExpertFactors, _check_factors, _mode_costs, objective_costs

logger = logging.getLogger(__name__)

_COST_RESOLUTION = 1e12  # integer units of the largest (shifted) cost in one program
_INT_LIMIT = 2**60  # the sum of all integer costs stays below this


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
