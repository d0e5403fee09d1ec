"""The codebook / quantizer core of the low-bit grid study (scripts/grid_quant.py): E8P's construction and exact
nearest-codeword search, and block-LDLQ against an independent (inverse-Hessian, OBS-form) reference."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import grid_quant as gq  # noqa: E402


def test_e8p_codebook_is_2_16_distinct_points_of_the_shifted_e8_coset():
    cb = gq.e8p_codebook()
    assert cb.shape == (65536, 8)
    assert torch.unique(cb, dim=0).shape[0] == 65536
    for shift in (0.25, -0.25):
        part = cb[(cb - shift - 0.5).remainder(1) == 0].reshape(-1, 8)  # rows of this shift are half-integer
        assert part.shape[0] == 32768
        assert torch.all(torch.remainder(part.sub(shift).sum(-1), 2) == 0)  # D8 + 1/2: even coordinate sum
    assert (gq.e8p_abs_patterns().pow(2).sum(-1) <= 12).all()


def test_codewords_quantize_to_themselves_also_scaled():
    cb = gq.e8p_codebook()
    pick = cb[torch.randperm(cb.shape[0], generator=torch.Generator().manual_seed(0))[:4096]]
    assert torch.equal(gq.e8p_nearest(pick), pick)
    grid, scale = gq.E8PGrid(), torch.full((4096, 1), 0.375)
    assert torch.equal(grid.quantize(pick * 0.375, scale), pick * 0.375)


def test_e8p_nearest_matches_brute_force_over_all_codewords():
    cb = gq.e8p_codebook()
    x = torch.randn(512, 8, generator=torch.Generator().manual_seed(1)) * 1.3
    brute = cb[torch.cdist(x.double(), cb.double()).argmin(1)]
    assert torch.equal(gq.e8p_nearest(x), brute)


def test_gaussian_scale_is_a_local_minimum_of_the_error():
    at = gq.gaussian_mse(gq.E8P_GAUSSIAN_SCALE, n=4096)
    assert at < gq.gaussian_mse(gq.E8P_GAUSSIAN_SCALE - 0.06, n=4096)
    assert at < gq.gaussian_mse(gq.E8P_GAUSSIAN_SCALE + 0.06, n=4096)
    assert at < 0.1  # below the 4-level Lloyd-Max quantizer's 0.1175 per weight


def test_d4_codebooks_are_symmetric_distinct_coset_points():
    for bits in (8, 9, 10):
        cb = gq.d4_codebook(bits)
        assert cb.shape == (2**bits, 4) and torch.unique(cb, dim=0).shape[0] == 2**bits
        assert torch.all((cb - 0.5).remainder(1) == 0) and torch.all(cb.sum(-1).remainder(2) == 0)
        assert torch.equal(torch.unique(cb, dim=0), torch.unique(-cb, dim=0))
        assert torch.equal(gq.codebook_nearest(cb * 1.0, cb), cb)
    # nested: a larger codebook contains the smaller one's points (whole shells first)
    small = {tuple(r) for r in gq.d4_codebook(8).tolist()}
    assert small <= {tuple(r) for r in gq.d4_codebook(9).tolist()}


GRIDS = [
    gq.E8PGrid(),
    gq.D4Grid(8),
    gq.ScalarGrid(gq.LLOYD_MAX_2BIT, "lloyd-max"),
    gq.ScalarGrid(gq.UNIFORM_2BIT, "uniform"),
]


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
def test_block_ldlq_with_identity_hessian_is_nearest_rounding(grid):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    q = gq.block_ldlq(w, torch.eye(64), grid, 32)
    d = grid.dim
    expect = [
        grid.quantize(w[:, j : j + d], grid.fit(w[:, j // 32 * 32 : j // 32 * 32 + 32])) for j in range(0, 64, d)
    ]
    expect = torch.cat(expect, 1)
    assert torch.equal(q, expect)


def _obs_reference(w: torch.Tensor, h: torch.Tensor, grid, group: int, damp: float = 0.01) -> torch.Tensor:
    """Block optimal-brain-surgeon in the inverse-Hessian form (no Cholesky), float64: quantize block ``b``, move
    the remaining columns by ``-E [Hinv_bb]^-1 Hinv_b,rest``, then eliminate ``b`` from Hinv (Schur complement)."""
    h = h.double().clone()
    h += damp * h.diagonal().mean() * torch.eye(h.shape[0], dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    w = w.double().clone()
    q = torch.empty_like(w)
    d, n = grid.dim, w.shape[1]
    params = None
    for j in range(0, n, d):
        if j % group == 0:
            params = grid.fit(w[:, j : j + group].float())
        qb = grid.quantize(w[:, j : j + d].float(), params).double()
        q[:, j : j + d] = qb
        err = w[:, j : j + d] - qb
        rest = slice(j + d, n)
        w[:, rest] -= err @ torch.linalg.solve(hinv[j : j + d, j : j + d], hinv[j : j + d, rest])
        hinv_rest = hinv[rest, rest] - hinv[rest, j : j + d] @ torch.linalg.solve(
            hinv[j : j + d, j : j + d], hinv[j : j + d, rest]
        )
        hinv = torch.zeros_like(hinv)
        hinv[rest, rest] = hinv_rest
    return q


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: g.name)
def test_block_ldlq_matches_the_inverse_hessian_reference(grid):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 64, generator=g) @ (torch.eye(64) + 0.3 * torch.randn(64, 64, generator=g))
    h = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(12, 64, generator=g)
    q = gq.block_ldlq(w, h, grid, 32)
    ref = _obs_reference(w, h, grid, 32)
    # float32 vs float64 paths: a rare rounding flip would move whole codewords, so compare entries, allow none
    assert torch.allclose(q.double(), ref, atol=1e-4), (q.double() - ref).abs().max()
    # and the feedback matters: the result differs from nearest rounding on this correlated Hessian
    assert not torch.equal(q, gq.block_ldlq(w, torch.eye(64), grid, 32))


@pytest.mark.parametrize("grid", GRIDS[2:], ids=lambda g: g.name)
def test_act_order_ldlq_identity_hessian_is_nearest_rounding_and_feedback_matches_the_reference_order(grid):
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(4))
    assert torch.equal(gq.act_order_ldlq(w, torch.eye(64), grid, 32), gq.block_ldlq(w, torch.eye(64), grid, 32))
    # with a correlated Hessian: the OBS reference run on the act-order-permuted problem, each column on the grid
    # of its original group fitted from the original weights (static groups)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, 64, generator=g) * torch.linspace(2.0, 1.0, 64) + 0.2 * torch.randn(300, 1, generator=g)
    h = 2 * x.t() @ x / x.shape[0]
    perm = torch.argsort(torch.diagonal(h), descending=True, stable=True)
    static = [grid.fit(w[:, g0 : g0 + 32]) for g0 in (0, 32)]

    class Static:
        dim = 1

        def __init__(self):
            self.calls = 0

        def fit(self, _w):
            return None

        def quantize(self, col, _params):
            c = int(perm[self.calls])
            self.calls += 1
            return grid.quantize(col, static[c // 32])

    ref = _obs_reference(w[:, perm], h[perm][:, perm], Static(), 64)[:, torch.argsort(perm)]
    assert torch.allclose(gq.act_order_ldlq(w, h, grid, 32).double(), ref, atol=1e-4)
