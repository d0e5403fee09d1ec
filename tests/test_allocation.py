"""PMQ bit allocation: the ILP optimum equals brute force, exact budgets, constraints, baselines, infeasibility."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from optimum_mc.allocation import (
    ExpertFactors,
    allocate_bits,
    allocation_cost,
    check_feasible,
    format_allocation_table,
    layer_budget,
    max_total_bits,
    objective_costs,
    required_bits,
)
from optimum_mc.errors import CalibrationError, MCConfigError, ShapeError

EXPONENTS = dict(alpha=1.0, beta=1.5, gamma=2.0)


def random_factors(num_experts: int, candidate_bits, seed: int) -> ExpertFactors:
    """Heavy-tailed frequencies / masses and a loss that falls with the bit-width (with noise)."""
    gen = torch.Generator().manual_seed(seed)
    freq = torch.rand(num_experts, generator=gen).pow(3) + 1e-3
    mass = freq * (0.5 + torch.rand(num_experts, generator=gen))
    base = torch.exp(2 * torch.randn(num_experts, 1, generator=gen))
    cb = torch.tensor(sorted(candidate_bits), dtype=torch.float32)
    loss = base * 4.0 ** (-cb) * (0.7 + 0.6 * torch.rand(num_experts, len(cb), generator=gen))
    return ExpertFactors(freq, mass, loss)


def brute_force(factors, candidate_bits, total, constraints, per_layer):
    """Minimum cost over every assignment with exactly ``total`` bits (per layer, or summed over layers)."""
    cb = sorted(candidate_bits)
    req = required_bits(cb, constraints)
    costs = [objective_costs(f, **EXPONENTS) for f in factors]
    sizes = [c.shape[0] for c in costs]
    best, best_bits = np.inf, None
    for choice in itertools.product(range(len(cb)), repeat=sum(sizes)):
        bits = [cb[j] for j in choice]
        layers = np.split(np.array(bits), np.cumsum(sizes)[:-1])
        if per_layer and any(int(lb.sum()) != total for lb in layers):
            continue
        if not per_layer and sum(bits) != total:
            continue
        if any(any(r not in lb for r in req) for lb in layers):
            continue
        idx = np.split(np.array(choice), np.cumsum(sizes)[:-1])
        cost = sum(float(c[np.arange(len(j)), j].sum()) for c, j in zip(costs, idx))
        if cost < best:
            best, best_bits = cost, [lb.tolist() for lb in layers]
    return best, best_bits


CASES = [
    ([1, 2, 3], 2.5, True),
    ([1, 2, 3], 2.0, True),
    ([1, 2, 3], 1.75, False),
    ([2, 3, 4], 3.2, True),
    ([1, 2, 3, 4], 2.5, True),
    ([2, 4], 3.1, True),  # odd budget with even widths: the largest reachable total is budget - 1
    ([1, 3], 2.0, False),
]


@pytest.mark.parametrize("candidate_bits,target,constraints", CASES)
def test_layer_mode_equals_brute_force(candidate_bits, target, constraints):
    for seed in range(3):
        n = 6 if len(candidate_bits) <= 3 else 5
        factors = [random_factors(n, candidate_bits, seed)]
        bits = allocate_bits(factors, candidate_bits, target, "layer", constraints=constraints, **EXPONENTS)
        total = max_total_bits([n], candidate_bits, layer_budget(n, target), constraints)
        best, _ = brute_force(factors, candidate_bits, total, constraints, per_layer=True)
        assert sum(bits[0]) == total <= layer_budget(n, target)
        assert allocation_cost(bits, factors, candidate_bits, **EXPONENTS) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("candidate_bits,target,constraints", [CASES[0], CASES[2], CASES[5]])
def test_global_mode_equals_brute_force(candidate_bits, target, constraints):
    sizes = (4, 3, 2) if len(candidate_bits) == 3 else (4, 4, 3)
    factors = [random_factors(n, candidate_bits, 10 + i) for i, n in enumerate(sizes)]
    bits = allocate_bits(factors, candidate_bits, target, "global", constraints=constraints, **EXPONENTS)
    total = max_total_bits(list(sizes), candidate_bits, layer_budget(sum(sizes), target), constraints)
    best, _ = brute_force(factors, candidate_bits, total, constraints, per_layer=False)
    assert [len(b) for b in bits] == list(sizes)
    assert sum(map(sum, bits)) == total
    assert allocation_cost(bits, factors, candidate_bits, **EXPONENTS) == pytest.approx(best, rel=1e-9)
    per_layer = allocate_bits(factors, candidate_bits, target, "layer", constraints=constraints, **EXPONENTS)
    assert allocation_cost(bits, factors, candidate_bits, **EXPONENTS) <= allocation_cost(
        per_layer, factors, candidate_bits, **EXPONENTS
    ) * (1 + 1e-9)


def test_budget_is_used_exactly_and_constraints_hold():
    cb = [1, 2, 3]
    factors = [random_factors(n, cb, s) for s, n in enumerate([8, 8, 16, 60])]
    for target in (1.5, 2.0, 2.25, 2.5, 2.75, 2.875):
        for mode in ("layer", "random", "frequency"):
            for bits, f in zip(allocate_bits(factors, cb, target, mode), factors):
                assert sum(bits) == layer_budget(f.num_experts, target)
                assert 3 in bits and 2 in bits and set(bits) <= set(cb)
        glob = allocate_bits(factors, cb, target, "global")
        assert sum(map(sum, glob)) == layer_budget(sum(f.num_experts for f in factors), target)
        assert all(3 in b and 2 in b for b in glob)
    # at the top width itself the constraints still keep one expert at the second width
    assert [sum(b) for b in allocate_bits(factors[:2], cb, 3.0)] == [23, 23]
    assert allocate_bits(factors[:2], cb, 3.0, constraints=False) == [[3] * 8] * 2


def test_constraints_are_switchable():
    """Losses that barely fall above 2 bits: unconstrained, nobody takes 3 bits; constrained, one expert must."""
    loss = torch.tensor([[8.0, 1.0, 0.999]] * 4)
    f = ExpertFactors(torch.ones(4), torch.ones(4), loss)
    free = allocate_bits([f], [1, 2, 3], 2.0, constraints=False)[0]
    assert sorted(free) == [2, 2, 2, 2]
    forced = allocate_bits([f], [1, 2, 3], 2.0, constraints=True)[0]
    assert sorted(forced) == [1, 2, 2, 3]


def test_importance_decides_who_gets_bits():
    """Same loss curve everywhere: the most frequent / heaviest experts get the top width."""
    n = 8
    freq = torch.tensor([0.30, 0.02, 0.20, 0.01, 0.25, 0.05, 0.12, 0.05])
    loss = torch.tensor([[1.0, 0.25, 0.0625]]).expand(n, -1)
    bits = allocate_bits([ExpertFactors(freq, freq, loss)], [1, 2, 3], 2.25)[0]
    order = freq.argsort(descending=True).tolist()
    assert [bits[e] for e in order] == sorted(bits, reverse=True)
    assert bits[0] == 3 and bits[3] == 1


def test_frequency_mode_ranks_by_frequency_only():
    n = 12
    gen = torch.Generator().manual_seed(4)
    freq = torch.randperm(n, generator=gen).float() + 1
    f1 = ExpertFactors(freq, torch.rand(n, generator=gen), torch.rand(n, 3, generator=gen))
    f2 = ExpertFactors(freq, torch.rand(n, generator=gen), torch.rand(n, 3, generator=gen))
    b1 = allocate_bits([f1], [1, 2, 3], 2.5, "frequency")[0]
    b2 = allocate_bits([f2], [1, 2, 3], 2.5, "frequency")[0]
    assert b1 == b2  # masses and losses are ignored
    order = freq.argsort(descending=True).tolist()
    assert [b1[e] for e in order] == sorted(b1, reverse=True)
    assert sum(b1) == 30


def test_random_mode_is_seeded():
    cb = [1, 2, 3]
    factors = [random_factors(16, cb, s) for s in range(3)]
    a = allocate_bits(factors, cb, 2.5, "random", seed=7)
    assert a == allocate_bits(factors, cb, 2.5, "random", seed=7)
    assert a != allocate_bits(factors, cb, 2.5, "random", seed=8)
    assert a[0] != a[1]  # each layer draws its own
    for bits in a:
        assert sum(bits) == 40 and 3 in bits and 2 in bits
    # gaps in the widths: still exactly the largest reachable total
    for seed in range(5):
        bits = allocate_bits([random_factors(7, [1, 4], 0)], [1, 4], 2.5, "random", constraints=False, seed=seed)[0]
        assert sum(bits) == max_total_bits([7], [1, 4], 17, False) == 16


def test_ilp_is_deterministic_and_uniform_is_trivial():
    cb = [1, 2, 3]
    factors = [random_factors(32, cb, s) for s in range(4)]
    for mode in ("layer", "global"):
        assert allocate_bits(factors, cb, 2.5, mode) == allocate_bits(factors, cb, 2.5, mode)
    uniform = [ExpertFactors(f.frequency, f.weight_mass, f.loss[:, :1]) for f in factors]
    assert allocate_bits(uniform, [2], 2.0) == [[2] * 32] * 4


def test_infeasible_targets_raise_config_errors():
    # 8 experts at 1.25 bits: budget 10 < 3 + 2 + 6 * 1 = 11 required by the constraints
    with pytest.raises(MCConfigError, match="infeasible.*allocation_constraints=False"):
        check_feasible([8, 8], [1, 2, 3], 1.25, True)
    check_feasible([8, 8], [1, 2, 3], 1.25, False)
    check_feasible([8, 8], [1, 2, 3], 1.375, True)  # exactly 11 bits
    with pytest.raises(MCConfigError, match="constraints need one expert"):
        check_feasible([1], [1, 2, 3], 2.0, True)
    with pytest.raises(MCConfigError, match="infeasible"):
        check_feasible([8], [2, 3], 1.5, False)
    with pytest.raises(MCConfigError):
        check_feasible([8], [1, 2, 3], 2.5, True, mode="best")
    with pytest.raises(MCConfigError, match="over all MoE layers"):
        check_feasible([8, 8], [1, 2, 3], 1.25, True, mode="global")
    with pytest.raises(MCConfigError):
        allocate_bits([random_factors(8, [1, 2, 3], 0)], [1, 2, 3], 1.25)


def test_bad_factors_raise():
    good = random_factors(4, [1, 2, 3], 0)
    with pytest.raises(ShapeError):
        allocate_bits([ExpertFactors(good.frequency, good.weight_mass, good.loss[:, :2])], [1, 2, 3], 2.5)
    with pytest.raises(ShapeError):
        allocate_bits([ExpertFactors(good.frequency, good.weight_mass[:3], good.loss)], [1, 2, 3], 2.5)
    nan_loss = good.loss.clone()
    nan_loss[1, 1] = float("nan")
    with pytest.raises(CalibrationError):
        allocate_bits([ExpertFactors(good.frequency, good.weight_mass, nan_loss)], [1, 2, 3], 2.5)
    with pytest.raises(MCConfigError):
        allocate_bits([good], [1, 2, 3], 2.5, mode="greedy")


def test_objective_normalizes_per_layer_and_uses_exponents():
    f = ExpertFactors(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), torch.tensor([[4.0, 1.0], [2.0, 0.5]]))
    c = objective_costs(f, alpha=1.0, beta=2.0, gamma=0.5)
    expected = np.array([[0.25 * 0.25 * 2.0, 0.25 * 0.25 * 1.0], [0.75 * 0.25 * 2**0.5, 0.75 * 0.25 * 0.5**0.5]])
    np.testing.assert_allclose(c, expected)
    # never-routed experts (all zero) are fine: any width
    zero = ExpertFactors(torch.zeros(4), torch.zeros(4), torch.zeros(4, 3))
    assert sum(allocate_bits([zero], [1, 2, 3], 2.5)[0]) == 10


def test_allocation_table():
    table = format_allocation_table([[3, 2, 1, 3, 3, 2, 3, 3], [2] * 8], [1, 3], [1, 2, 3])
    lines = table.splitlines()
    assert "#3b" in lines[0] and "avg" in lines[0]
    assert lines[2].split("|")[1].strip() == "32133233"
    assert lines[2].split("|")[2].split() == ["1", "2", "5"] and lines[2].rstrip().endswith("2.500")
    assert lines[3].split("|")[0].strip() == "3" and lines[3].rstrip().endswith("2.000")
    assert lines[-1] == "overall average expert bits: 2.250"
    wide = format_allocation_table([[1] * 64], [0], [1, 2])
    assert "11111111 " * 7 + "11111111" in wide
