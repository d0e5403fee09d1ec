"""GPTQ against a direct (non-lazy) reference implementation, and the OR-Tools allocation against brute force."""

from __future__ import annotations

import itertools

import pytest
import torch

from optimum_mc.allocation import ExpertFactors, allocate_bits, check_feasible, layer_budget
from optimum_mc.errors import MCConfigError, NonFiniteWeightError
from optimum_mc.gptq import HessianAccumulator, calibration_free_quantize, gptq_quantize, gptq_quantize_multi
from optimum_mc.group_quant import dequantize_codes, dequantize_matrix, group_qparams, quantize_codes, rtn_quantize


def _problem(seed=0, out_f=24, in_f=64):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    x = torch.randn(512, in_f, generator=g) @ (torch.eye(in_f) + 0.3 * torch.randn(in_f, in_f, generator=g))
    h = HessianAccumulator(in_f)
    h.add(x)
    return w, h.hessian


def naive_gptq(w, h, bits, group, damp=0.01):
    """Column-by-column OBS updates with the full inverse-Hessian Cholesky factor (no lazy blocks)."""
    w = w.clone().float()
    n = w.shape[1]
    hd = h + damp * torch.diag(h).mean() * torch.eye(n)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hd)), upper=True)
    codes = torch.zeros_like(w, dtype=torch.uint8)
    s = z = None
    for j in range(n):
        if j % group == 0:
            s, z = group_qparams(w[:, j : j + group], bits)
        q = quantize_codes(w[:, j : j + 1], s, z, bits)
        codes[:, j] = q[:, 0]
        err = (w[:, j] - dequantize_codes(q, s, z)[:, 0]) / u[j, j]
        w[:, j:] -= err.unsqueeze(1) * u[j, j:].unsqueeze(0)
    return codes


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("block", [1, 7, 128])
def test_lazy_blocks_match_direct_gptq(bits, block):
    w, h = _problem()
    ref = naive_gptq(w, h, bits, 32)
    codes, _, _ = gptq_quantize(w, h, bits, 32, block_size=block)
    assert (codes == ref).float().mean() > 0.99  # identical up to rare fp32 ties at rounding boundaries


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_beats_round_to_nearest_on_the_hessian_metric(act_order):
    w, h = _problem(1)
    for bits in (2, 3, 4):

        def err(q, s, z):
            d = dequantize_matrix(q, s, z, 32) - w
            return torch.trace(d @ h @ d.t()).item()

        assert err(*gptq_quantize(w, h, bits, 32, act_order=act_order)) < err(*rtn_quantize(w, bits, 32))


def test_act_order_keeps_original_groups_and_multi_equals_single():
    w, h = _problem(2)
    codes, scales, zeros = gptq_quantize(w, h, 3, 32, act_order=True)
    # static groups: each group's grid comes from its own original columns
    s_ref, z_ref = group_qparams(w.reshape(24, 2, 32), 3)
    assert torch.equal(scales.float(), s_ref) and torch.equal(zeros.float(), z_ref)
    multi = gptq_quantize_multi(w, h, [1, 3], 32, act_order=True)
    assert torch.equal(multi[1][0], codes)


def test_dead_columns_nan_and_calibration_free():
    w, h = _problem(3)
    h[:, 5] = 0
    h[5, :] = 0
    codes, s, z = gptq_quantize(w, h, 2, 32)
    assert torch.isfinite(dequantize_matrix(codes, s, z, 32)).all()
    bad = w.clone()
    bad[0, 0] = float("inf")
    with pytest.raises(NonFiniteWeightError):
        gptq_quantize(bad, h, 2, 32)
    heavy = torch.distributions.StudentT(2.0).sample((64, 128))
    for bits in (2, 3):
        cf = (dequantize_matrix(*calibration_free_quantize(heavy, bits, 32), 32) - heavy).pow(2).mean()
        rtn = (dequantize_matrix(*rtn_quantize(heavy, bits, 32), 32) - heavy).pow(2).mean()
        assert cf <= rtn


def _factors(seed, e=5):
    g = torch.Generator().manual_seed(seed)
    loss = torch.sort(torch.rand(e, 3, generator=g), descending=True).values
    return ExpertFactors(torch.rand(e, generator=g), torch.rand(e, generator=g), loss)


def _brute(factors, cb, target, alpha=1.0, beta=1.5, gamma=1.0, per_layer=True):
    best, best_bits = None, None
    sizes = [f.frequency.numel() for f in factors]
    costs = []
    for f in factors:
        phi = f.frequency / f.frequency.sum()
        w = f.weight_mass / f.weight_mass.sum()
        costs.append((phi**alpha * w**beta).unsqueeze(1) * f.loss**gamma)
    choices = [list(itertools.product(range(len(cb)), repeat=n)) for n in sizes]
    for combo in itertools.product(*choices):
        bits = [[cb[j] for j in layer] for layer in combo]
        ok = all(cb[-1] in b and cb[-2] in b for b in bits)
        if per_layer:
            ok &= all(sum(b) <= layer_budget(len(b), target) for b in bits)
        else:
            ok &= sum(map(sum, bits)) <= layer_budget(sum(sizes), target)
        if not ok:
            continue
        cost = sum(costs[li][e, j].item() for li, layer in enumerate(combo) for e, j in enumerate(layer))
        if best is None or cost < best - 1e-12:
            best, best_bits = cost, bits
    return best, best_bits


def _cost(factors, bits, cb):
    total = 0.0
    for f, b in zip(factors, bits):
        phi, w = f.frequency / f.frequency.sum(), f.weight_mass / f.weight_mass.sum()
        for e, be in enumerate(b):
            total += (phi[e] * w[e] ** 1.5 * f.loss[e, cb.index(be)]).item()
    return total


@pytest.mark.parametrize("seed", range(4))
def test_layer_and_global_ilp_are_optimal(seed):
    cb = [1, 2, 3]
    one = [_factors(seed)]
    best, _ = _brute(one, cb, 2.2)
    got = allocate_bits(one, cb, 2.2, "layer")
    assert _cost(one, got, cb) == pytest.approx(best, rel=1e-5)
    two = [_factors(seed, 3), _factors(seed + 10, 3)]
    best, _ = _brute(two, cb, 2.0, per_layer=False)
    got = allocate_bits(two, cb, 2.0, "global")
    assert _cost(two, got, cb) == pytest.approx(best, rel=1e-5)
    assert sum(map(sum, got)) <= 12


def test_baselines_budgets_and_errors():
    fs = [_factors(s, 8) for s in range(3)]
    for mode in ("random", "frequency"):
        bits = allocate_bits(fs, [1, 2, 3], 2.5, mode, seed=1)
        assert all(sum(b) == 20 and 3 in b and 2 in b for b in bits)
    assert allocate_bits(fs, [1, 2, 3], 2.5, "random", seed=1) == allocate_bits(fs, [1, 2, 3], 2.5, "random", seed=1)
    freq = allocate_bits(fs[:1], [1, 2, 3], 2.5, "frequency")[0]
    order = torch.argsort(fs[0].frequency, descending=True).tolist()
    assert [freq[i] for i in order] == sorted(freq, reverse=True)  # more frequent never gets fewer bits
    with pytest.raises(MCConfigError, match="infeasible"):
        check_feasible([8], [1, 2, 3], 1.2, True)
    check_feasible([8], [1, 2, 3], 1.2, False)
