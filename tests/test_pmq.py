"""PMQ pieces of issue 9: the exact DP allocation solver (vs brute force and CP-SAT), the Hessian baseline, loss
measurement (held-out split, RTN / held-out / Hessian-trace losses), integer and float zero points, exponent tuning
and the new config options."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from optimum_mc import MCConfig
from optimum_mc.allocation import (
    ExpertFactors,
    SolveReport,
    allocate_bits,
    layer_budget,
    max_total_bits,
    objective_costs,
    required_bits,
    solve_dp,
)
from optimum_mc.allocation.solve import _cpsat
from optimum_mc.calibration.factors import (
    GPTQOptions,
    expert_forward,
    heldout_losses,
    heldout_split,
    hessian_trace_loss,
    rtn_losses,
)
from optimum_mc.calibration.tuning import EXPONENT_GRID, HeldoutDeltas, heldout_tokens, layer_deltas, tune_exponents
from optimum_mc.errors import MCConfigError
from optimum_mc.gptq import HessianAccumulator, calibration_free_quantize, gptq_quantize
from optimum_mc.group_quant import dequantize_matrix, group_qparams, quantize_codes, rtn_quantize
from optimum_mc.nn import QuantLinear


def random_costs(num_experts: int, cb: list[int], seed: int) -> np.ndarray:
    gen = np.random.default_rng(seed)
    base = np.exp(gen.normal(size=(num_experts, 1)))
    return base * 2.0 ** -np.asarray(cb, float) * gen.uniform(0.6, 1.4, size=(num_experts, len(cb)))


def brute(costs: list[np.ndarray], cb: list[int], total: int, constraints: bool) -> float:
    req = required_bits(cb, constraints)
    sizes = [c.shape[0] for c in costs]
    best = np.inf
    for choice in itertools.product(range(len(cb)), repeat=sum(sizes)):
        parts = np.split(np.array(choice), np.cumsum(sizes)[:-1])
        if sum(cb[j] for j in choice) != total or any(any(cb.index(r) not in p for r in req) for p in parts):
            continue
        best = min(best, sum(float(c[np.arange(len(p)), p].sum()) for c, p in zip(costs, parts)))
    return best


def cost_of(costs, cb, bits) -> float:
    return sum(float(c[np.arange(len(b)), [cb.index(x) for x in b]].sum()) for c, b in zip(costs, bits))


# ---------------------------------------------------------------- the exact solver
@pytest.mark.parametrize(
    "cb,sizes,target,constraints",
    [
        ([1, 2, 3], [6], 2.5, True),
        ([1, 2, 3], [7], 1.9, False),
        ([1, 2, 3, 4], [6], 2.5, True),
        ([2, 4], [5], 3.1, True),
        ([1, 2, 3], [3, 4], 2.2, True),
        ([1, 3], [4, 3], 2.0, False),
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_dp_equals_brute_force_and_cpsat(cb, sizes, target, constraints, seed):
    costs = [random_costs(n, cb, seed + i) for i, n in enumerate(sizes)]
    total = max_total_bits(sizes, cb, layer_budget(sum(sizes), target), constraints)
    bits = solve_dp(costs, cb, total, constraints)
    assert sum(map(sum, bits)) == total and [len(b) for b in bits] == sizes
    assert all(r in b for b in bits for r in required_bits(cb, constraints))
    best = brute(costs, cb, total, constraints)
    assert cost_of(costs, cb, bits) == pytest.approx(best, rel=1e-12)
    unhinted, status = _cpsat(costs, cb, total, constraints, None, 30.0)
    assert status == "OPTIMAL"
    assert cost_of(costs, cb, unhinted) == pytest.approx(best, rel=1e-9)


def test_cpsat_is_the_solver_of_record_and_reports():
    cb = [1, 2, 3]
    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.rand(*shape, generator=gen)  # noqa: E731
    fs = [ExpertFactors(rand(16) + 0.01, rand(16) + 0.01, rand(16, 3).sort(1, True).values)]
    for mode in ("layer", "global"):
        report: list[SolveReport] = []
        a = allocate_bits(fs * 3, cb, 2.5, mode, report=report)
        b = allocate_bits(fs * 3, cb, 2.5, mode, solver="dp")
        assert a == b
        assert report and all(r.status == "OPTIMAL" and r.solver == "cp-sat" for r in report)
        assert len(report) == (3 if mode == "layer" else 1)
    with pytest.raises(MCConfigError, match="allocation_solver"):
        allocate_bits(fs, cb, 2.5, solver="simplex")


def test_dp_handles_many_experts_exactly():
    cb = [1, 2, 3]
    costs = [random_costs(128, cb, s) for s in range(4)]
    total = max_total_bits([128] * 4, cb, layer_budget(512, 2.5), True)
    glob = solve_dp(costs, cb, total, True)
    per = [solve_dp([c], cb, 320, True)[0] for c in costs]
    assert sum(map(sum, glob)) == total == 1280
    assert cost_of(costs, cb, glob) <= cost_of(costs, cb, per) + 1e-12  # global is never worse than per layer


def test_hessian_mode_minimizes_the_loss_column_directly():
    cb = [1, 2, 3]
    loss = torch.tensor([[9.0, 3.0, 1.0], [1.0, 0.5, 0.2], [8.0, 2.0, 0.1], [0.3, 0.2, 0.1]])
    freq = torch.tensor([0.1, 0.9, 0.1, 0.9])  # ignored by the Hessian baseline
    f = ExpertFactors(freq, freq, loss)
    bits = allocate_bits([f], cb, 2.0, "hessian")[0]
    assert sum(bits) == 8
    costs = [loss.double().numpy()]
    assert cost_of(costs, cb, [bits]) == pytest.approx(brute(costs, cb, 8, True))


def test_default_objective_is_the_papers():
    f = ExpertFactors(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 2.0]), torch.tensor([[0.5, 0.25], [0.4, 0.1]]))
    c = objective_costs(f, 1.0, 1.5, 1.0)
    w = 0.5**1.5
    np.testing.assert_allclose(c, np.array([[0.25 * w * 0.5, 0.25 * w * 0.25], [0.75 * w * 0.4, 0.75 * w * 0.1]]))
    cfg = MCConfig()
    assert (cfg.alpha, cfg.beta, cfg.gamma) == (1.0, 1.5, 1.0)


# ---------------------------------------------------------------- losses
def _expert(seed: int, n: int = 40, h: int = 32, i: int = 64):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, h, generator=g),
        torch.rand(n, generator=g),
        torch.randn(2 * i, h, generator=g) * 0.2,
        torch.randn(h, i, generator=g) * 0.2,
    )


def test_heldout_split_is_deterministic_and_disjoint():
    a_fit, a_held = heldout_split(50, 0.25, seed=3)
    b_fit, b_held = heldout_split(50, 0.25, seed=3)
    assert torch.equal(a_fit, b_fit) and torch.equal(a_held, b_held)
    assert len(a_held) == 12 and sorted(torch.cat([a_fit, a_held]).tolist()) == list(range(50))
    c_fit, _ = heldout_split(50, 0.25, seed=4)
    assert not torch.equal(a_fit, c_fit)
    assert heldout_split(1, 0.25, 0)[1].numel() == 0 and heldout_split(2, 0.01, 0)[1].numel() == 1
    m1, m2 = heldout_tokens(100, 0.3, 7), heldout_tokens(100, 0.3, 7)
    assert torch.equal(m1, m2) and int(m1.sum()) == 30


def test_losses_fall_with_bits_and_are_deterministic():
    x, r, w_gu, w_dn = _expert(0)
    act = torch.nn.functional.silu
    energy = float(expert_forward(x, w_gu, w_dn, act).pow(2).sum())
    opts = GPTQOptions(group_size=32, min_tokens=8)
    rtn = rtn_losses(x, r, w_gu, w_dn, act, [1, 2, 3, 4], 32, energy)
    held = heldout_losses(x, r, w_gu, w_dn, act, [2, 3, 4], opts, energy, 0.25, seed=1)
    assert rtn == sorted(rtn, reverse=True) and held == sorted(held, reverse=True)
    assert held == heldout_losses(x, r, w_gu, w_dn, act, [2, 3, 4], opts, energy, 0.25, seed=1)
    assert all(0 < v < 10 for v in rtn + held)
    hess = hessian_trace_loss(x, w_gu, w_dn, act, [2, 3, 4], 32, total_tokens=100)
    assert hess == sorted(hess, reverse=True) and hess[-1] > 0
    half = hessian_trace_loss(x, w_gu, w_dn, act, [2, 3, 4], 32, total_tokens=200)
    np.testing.assert_allclose(half, np.array(hess) / 2, rtol=1e-6)


def test_rtn_loss_is_unsquared_relative_norm():
    x, r, w_gu, w_dn = _expert(1)
    act = torch.nn.functional.silu
    ref = expert_forward(x, w_gu, w_dn, act)
    q_gu = dequantize_matrix(*rtn_quantize(w_gu, 2, 32), 32)
    q_dn = dequantize_matrix(*rtn_quantize(w_dn, 2, 32), 32)
    err = ((expert_forward(x, q_gu, q_dn, act) - ref) * r[:, None]).pow(2).sum()
    (got,) = rtn_losses(x, r, w_gu, w_dn, act, [2], 32, output_energy=4.0)
    assert got == pytest.approx(float(err.sqrt() / 2.0), rel=1e-5)


# ---------------------------------------------------------------- exponent tuning
def test_layer_deltas_error_matches_a_direct_block_output():
    act = torch.nn.functional.silu
    experts = [_expert(s, n=30) for s in range(3)]
    num_tokens = 50
    gen = torch.Generator().manual_seed(0)
    tokens = [(x, r, torch.randperm(num_tokens, generator=gen)[:30].sort().values) for x, r, _, _ in experts]
    weights = [(gu, dn) for _, _, gu, dn in experts]
    held = heldout_tokens(num_tokens, 0.4, 1)
    deltas = layer_deltas(tokens, weights, act, [2, 3], 32, held, 32)
    bits = [2, 3, 2]
    direct = torch.zeros(num_tokens, 32)
    for (x, r, ids), (gu, dn), b in zip(tokens, weights, bits):
        q_gu = dequantize_matrix(*rtn_quantize(gu, b, 32), 32)
        q_dn = dequantize_matrix(*rtn_quantize(dn, b, 32), 32)
        direct.index_add_(0, ids, (expert_forward(x, q_gu, q_dn, act) - expert_forward(x, gu, dn, act)) * r[:, None])
    assert deltas.error(bits) == pytest.approx(float(direct[held].pow(2).sum()), rel=1e-5)


def test_tune_exponents_picks_the_smallest_measured_error():
    e = 6
    gen = torch.Generator().manual_seed(0)
    loss = torch.rand(e, 3, generator=gen).sort(1, True).values
    f = ExpertFactors(torch.linspace(1, 2, e), torch.linspace(2, 1, e), loss)
    changes = [{b: torch.randn(10, 4, generator=gen) / b for b in (1, 2, 3)} for _ in range(e)]
    deltas = HeldoutDeltas(10, 4, [torch.arange(10)] * e, changes)
    best, bits, errors = tune_exponents(f, [1, 2, 3], 2.5, deltas)
    assert len(errors) == len(EXPONENT_GRID) and errors[EXPONENT_GRID.index(best)] == min(errors)
    assert deltas.error(bits) == min(errors) and sum(bits) == 15


# ---------------------------------------------------------------- zero points
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_integer_zero_points_are_codes_and_grid_contains_zero(bits):
    gen = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 4, 32, generator=gen) * torch.rand(16, 4, 1, generator=gen)
    w = w + torch.randn(16, 4, 1, generator=gen) * 0.5
    s, z = group_qparams(w, bits, "int")
    assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= (1 << bits) - 1
    assert torch.equal(s, s.half().float())
    zero_code = quantize_codes(torch.zeros(16, 4, 1), s, z, bits)
    assert torch.equal(zero_code.float()[..., 0], z)  # 0 is exactly on the grid
    err = (dequantize_matrix(*rtn_quantize(w.reshape(16, 128), bits, 32, "int"), 32) - w.reshape(16, 128)).abs()
    step = s.reshape(16, 4).repeat_interleave(32, dim=1)
    # rounding the zero to a code shifts the grid by <= 1/2 step, so the range ends may be clamped by up to one
    # step; fp16 rounding of the scale adds <= 2^-11 relative over 2^b steps
    assert (err <= step * (1.0 + (1 << bits) * 2.0**-11) + 1e-6).all()
    assert (err <= step * 0.5 + 1e-6).float().mean() > 0.9  # interior values: nearest grid point


@pytest.mark.parametrize("zero_point", ["float", "int"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_offset_groups_stay_finite_and_within_half_a_step(bits, zero_point):
    """A group far from 0 with a tiny spread (the fp16 zero used to overflow at 8 bits)."""
    w = 1000.0 + torch.linspace(0, 1e-3, 64).repeat(4, 1)
    w[1] = -3000.0 + torch.linspace(0, 1e-2, 64)
    w[2] = 2.0 + torch.linspace(0, 1e-4, 64)
    codes, s, z = rtn_quantize(w, bits, 32, zero_point)
    deq = dequantize_matrix(codes, s, z, 32)
    assert torch.isfinite(deq).all() and torch.isfinite(s).all() and torch.isfinite(z).all()
    step = s.float().repeat_interleave(32, dim=1)
    slack = 0.625 if zero_point == "float" else 0.5  # fp16 rounds a float zero by at most 1/8 step
    assert ((deq - w).abs() <= step * slack + 1e-6 * w.abs()).all()


@pytest.mark.parametrize("zero_point", ["float", "int"])
def test_zero_points_round_trip_exactly_through_pack_and_safetensors(zero_point, tmp_path):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen) + 0.3
    x = torch.randn(200, 64, generator=gen)
    acc = HessianAccumulator(64)
    acc.add(x)
    for bits in (2, 3, 4, 8):
        codes, s, z = gptq_quantize(w, acc.hessian, bits, 32, act_order=True, zero_point=zero_point)
        if zero_point == "int":
            assert torch.equal(z.float(), z.float().round())
        lin = QuantLinear.from_codes(codes, s, z, bits)
        save_file(lin.state_dict(), tmp_path / f"q{bits}.safetensors")
        again = QuantLinear(64, 48, bits, 32)
        again.load_state_dict(load_file(tmp_path / f"q{bits}.safetensors"))
        assert torch.equal(again.zeros, z) and torch.equal(again.scales, s)
        assert torch.equal(again.dequantize_weight(torch.float32), dequantize_matrix(codes, s, z, 32))
        cf = calibration_free_quantize(w, bits, 32, zero_point=zero_point)
        if zero_point == "int":
            assert torch.equal(cf[2].float(), cf[2].float().round())


def test_int_and_float_zero_points_are_deterministic():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    for zp in ("float", "int"):
        a, b = rtn_quantize(w, 3, 32, zp), rtn_quantize(w, 3, 32, zp)
        assert all(torch.equal(u, v) for u, v in zip(a, b))


# ---------------------------------------------------------------- config
@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"loss_method": "mse"}, "loss_method"),
        ({"allocation_solver": "glpk"}, "allocation_solver"),
        ({"zero_point": "int8"}, "zero_point"),
        ({"expert_hessian": "all"}, "expert_hessian"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"heldout_fraction": True}, "heldout_fraction"),
        ({"allocation_time_limit": 0}, "allocation_time_limit"),
        ({"allocation_time_limit": float("inf")}, "allocation_time_limit"),
        ({"tune_exponents": 1}, "tune_exponents"),
        ({"tune_exponents": True, "allocation": "global"}, "tune_exponents"),
        ({"allocation": "hessians"}, "allocation"),
        ({"loss_normalizer": "layer"}, "loss_normalizer"),
    ],
)
def test_new_options_are_validated(kwargs, match):
    with pytest.raises(MCConfigError, match=match):
        MCConfig(**kwargs)


def test_new_options_round_trip_through_json():
    cfg = MCConfig(
        zero_point="int",
        loss_method="heldout",
        heldout_fraction=0.3,
        allocation="hessian",
        allocation_solver="dp",
        allocation_time_limit=5.0,
        expert_hessian="router-weighted",
        loss_normalizer="residual",
    )
    again = MCConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.zero_point == "int" and again.expert_hessian == "router-weighted"
    assert again.loss_normalizer == "residual"
    tuned = MCConfig.from_dict({**MCConfig(tune_exponents=True).to_dict(), "tuned_exponents": [[1.0, 1.5, 1.0]]})
    assert tuned.tuned_exponents == [[1.0, 1.5, 1.0]]
