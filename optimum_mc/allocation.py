"""PMQ bit allocation: pick each expert's bit-width under an average-bits budget with an integer program.

For layer l, expert e and candidate bit-width b, the cost of giving e the width b is (the paper's objective)

    phi_e^alpha * w_e^beta * eps(e, b)^gamma

with phi the activation frequency and w the routing-weight mass (both normalized to sum 1 per layer) and eps the
block-output loss when only e is quantized at b bits. Binary variables x[e, b] with sum_b x[e, b] = 1 minimize
the total cost subject to sum bits <= budget and, optionally, the paper's constraints: at least one expert at the
top and one at the second-highest candidate bit-width in every layer. Solved exactly with OR-Tools CP-SAT
(single worker, deterministic), costs scaled to integers with 1e-7 relative resolution; ties prefer using the
whole budget.

Modes: "layer" (one program per layer, budget floor(bits * E)), "global" (one program over all layers, budget
floor(bits * sum E)), and the ablation baselines at the same per-layer budget: "random" (seeded random
assignment) and "frequency" (the same program with eps(b) = 2^-b and beta = 0: more frequent experts get more
bits, nothing else matters).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import MCConfigError

_RESOLUTION = 10_000_000


@dataclass
class ExpertFactors:
    """Calibration factors of one MoE layer: frequency ``(E,)``, weight mass ``(E,)``, loss ``(E, C)``."""

    frequency: torch.Tensor
    weight_mass: torch.Tensor
    loss: torch.Tensor


def layer_budget(num_experts: int, target_bits: float) -> int:
    """Total expert bits allowed in a layer of ``num_experts`` experts."""
    return int(np.floor(target_bits * num_experts + 1e-9))


def _required(candidate_bits: list[int], constraints: bool) -> list[int]:
    """Bit-widths that must appear at least once per layer."""
    if not constraints or len(candidate_bits) < 2:
        return []
    cb = sorted(candidate_bits)
    return [cb[-1], cb[-2]] if len(cb) >= 3 else [cb[-1]]


def check_feasible(num_experts: list[int], candidate_bits: list[int], target_bits: float, constraints: bool) -> None:
    """Raise :class:`MCConfigError` if no allocation can meet the budget (called before loading weights)."""
    cb = sorted(candidate_bits)
    req = _required(cb, constraints)
    for n in num_experts:
        if n < len(req):
            raise MCConfigError(
                f"a layer has {n} experts but the allocation constraints need {len(req)} distinct bit-widths; "
                f"pass allocation_constraints=False."
            )
        least = sum(req) + (n - len(req)) * cb[0]
        budget = layer_budget(n, target_bits)
        if least > budget:
            raise MCConfigError(
                f"bits={target_bits} is infeasible: with {n} experts the budget is {budget} bits, but the smallest "
                f"allocation allowed is {least} bits (constraints require one expert at {req} bits, the rest at "
                f"{cb[0]}). Raise bits, or pass allocation_constraints=False."
            )


def _costs(f: ExpertFactors, candidate_bits: list[int], alpha: float, beta: float, gamma: float) -> np.ndarray:
    phi = f.frequency.double().clamp_min(0)
    w = f.weight_mass.double().clamp_min(0)
    phi = phi / phi.sum().clamp_min(1e-30)
    w = w / w.sum().clamp_min(1e-30)
    eps = f.loss.double().clamp_min(0)
    sig = phi.pow(alpha) * w.pow(beta)
    return (sig.unsqueeze(1) * eps.pow(gamma)).numpy()


def _solve(
    costs: list[np.ndarray], candidate_bits: list[int], budget: int, per_layer_budget: bool, constraints: bool
) -> list[list[int]]:
    """Exact ILP over one or more layers (``per_layer_budget``: one budget per layer, else one shared)."""
    from ortools.sat.python import cp_model

    cb = list(candidate_bits)
    scale = max(float(max(c.max() for c in costs)), 1e-300)
    model = cp_model.CpModel()
    xs, bits_terms, obj = [], [], []
    req = _required(cb, constraints)
    for li, c in enumerate(costs):
        layer_x = []
        layer_bits = []
        for e in range(c.shape[0]):
            row = [model.NewBoolVar(f"x{li}_{e}_{b}") for b in cb]
            model.AddExactlyOne(row)
            layer_x.append(row)
            for j, b in enumerate(cb):
                layer_bits.append(b * row[j])
                obj.append(int(round(c[e, j] / scale * _RESOLUTION)) * row[j])
        for b in req:
            j = cb.index(b)
            model.Add(sum(row[j] for row in layer_x) >= 1)
        if per_layer_budget:
            model.Add(sum(layer_bits) <= budget)
        xs.append(layer_x)
        bits_terms.extend(layer_bits)
    if not per_layer_budget:
        model.Add(sum(bits_terms) <= budget)
    # lexicographic: cost first, then use as many bits as allowed (a unit of cost outweighs all bits)
    total_bits_max = sum(c.shape[0] for c in costs) * max(cb) + 1
    model.Minimize(sum(obj) * total_bits_max - sum(bits_terms))
    solver = cp_model.CpSolver()
    solver.parameters.num_workers = 1
    solver.parameters.random_seed = 0
    status = solver.Solve(model)
    if status not in (cp_model.OPTIMAL,):
        raise MCConfigError("the bit-allocation program has no optimal solution; check bits and candidate_bits.")
    return [[cb[next(j for j, v in enumerate(row) if solver.Value(v))] for row in layer_x] for layer_x in xs]


def _random(num_experts: int, candidate_bits: list[int], budget: int, constraints: bool, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    cb = sorted(candidate_bits)
    bits = [cb[0]] * num_experts
    order = rng.permutation(num_experts)
    fixed = set()
    for e, b in zip(order, _required(cb, constraints)):
        bits[e] = b
        fixed.add(int(e))  # keeps its required width, so the constraints hold to the end
    while True:
        room = [e for e in range(num_experts) if bits[e] < cb[-1] and e not in fixed]
        steps = [(e, cb[cb.index(bits[e]) + 1] - bits[e]) for e in room]
        steps = [(e, s) for e, s in steps if sum(bits) + s <= budget]
        if not steps:
            return bits
        e, _ = steps[int(rng.integers(len(steps)))]
        bits[e] = cb[cb.index(bits[e]) + 1]


def allocate_bits(
    factors: list[ExpertFactors],
    candidate_bits: list[int],
    target_bits: float,
    mode: str = "layer",
    alpha: float = 1.0,
    beta: float = 1.5,
    gamma: float = 2.0,
    constraints: bool = True,
    seed: int = 0,
) -> list[list[int]]:
    """Bits per expert for every layer in ``factors`` (see the module docstring for the modes)."""
    cb = sorted(candidate_bits)
    sizes = [int(f.frequency.numel()) for f in factors]
    check_feasible(sizes, cb, target_bits, constraints)
    if len(cb) == 1:
        return [[cb[0]] * n for n in sizes]
    if mode == "random":
        return [_random(n, cb, layer_budget(n, target_bits), constraints, seed + i) for i, n in enumerate(sizes)]
    if mode == "frequency":
        synthetic = torch.tensor([2.0**-b for b in cb], dtype=torch.float64)
        costs = [
            _costs(
                ExpertFactors(f.frequency, torch.ones_like(f.frequency), synthetic.expand(len(f.frequency), -1)),
                cb,
                1.0,
                0.0,
                1.0,
            )
            for f in factors
        ]
        return [_solve([c], cb, layer_budget(n, target_bits), True, constraints)[0] for c, n in zip(costs, sizes)]
    costs = [_costs(f, cb, alpha, beta, gamma) for f in factors]
    if mode == "layer":
        return [_solve([c], cb, layer_budget(n, target_bits), True, constraints)[0] for c, n in zip(costs, sizes)]
    if mode == "global":
        return _solve(costs, cb, layer_budget(sum(sizes), target_bits), False, constraints)
    raise MCConfigError(f"unknown allocation mode {mode!r}.")


def format_allocation_table(
    bits_per_layer: list[list[int]], layer_indices: list[int], candidate_bits: list[int]
) -> str:
    """A readable per-layer table: bits of each expert, how many at each width, the layer average."""
    cb = sorted(candidate_bits)
    width = max(len(b) for b in bits_per_layer)
    head = "layer | " + " ".join(f"e{e:<2d}" for e in range(width)) + " | " + " ".join(f"#{b}b" for b in cb) + " | avg"
    lines = [head, "-" * len(head)]
    for idx, bits in zip(layer_indices, bits_per_layer):
        counts = " ".join(f"{bits.count(b):>3d}" for b in cb)
        lines.append(f"{idx:>5d} | " + " ".join(f"{b:<3d}" for b in bits) + f" | {counts} | {np.mean(bits):.2f}")
    total = [b for layer in bits_per_layer for b in layer]
    lines.append(f"overall average expert bits: {np.mean(total):.3f}")
    return "\n".join(lines)
