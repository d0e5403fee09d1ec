"""gptq_quantize_batched equals per-matrix gptq_quantize exactly (torch.equal) for every option combination."""

from __future__ import annotations

import pytest
import torch

from optimum_mc.errors import ShapeError
from optimum_mc.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_batched, gptq_quantize_multi


def _batch(num: int = 5, out_f: int = 24, in_f: int = 96, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(num, out_f, in_f, generator=g)
    hessians = []
    for e in range(num):
        acc = HessianAccumulator(in_f)
        acc.add(torch.randn(40 + 20 * e, in_f, generator=g) * torch.rand(in_f, generator=g))
        h = acc.hessian
        if e == 2:  # a dead input column
            h[:, 7] = 0
            h[7, :] = 0
        hessians.append(h)
    return weights, torch.stack(hessians)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size,block_size", [(32, 128), (32, 40), (-1, 64), (96, 32)])
@pytest.mark.parametrize("zero_point,clip_search", [("float", False), ("int", False), ("float", True), ("int", True)])
def test_batched_equals_per_matrix(act_order, group_size, block_size, zero_point, clip_search):
    weights, hessians = _batch()
    bits = [1, 2, 3, 4, 8]
    kw = dict(block_size=block_size, act_order=act_order, zero_point=zero_point, clip_search=clip_search)
    got = gptq_quantize_batched(weights, hessians, bits, group_size, **kw)
    for e, b in enumerate(bits):
        ref = gptq_quantize(weights[e], hessians[e], b, group_size, **kw)
        assert all(torch.equal(x, y) for x, y in zip(got[e], ref))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("zero_point,clip_search", [("float", False), ("int", True)])
def test_one_shared_hessian_equals_a_copy_per_matrix(act_order, zero_point, clip_search):
    """gptq_quantize_multi (one matrix at several widths) is the batched loop over copies with one shared Hessian
    (one Cholesky); it equals the batched loop given its own copy of the Hessian per matrix, dead column included."""
    weights, hessians = _batch()
    w, h = weights[2], hessians[2]  # matrix 2 has a dead input column
    bits = [1, 2, 3, 4, 8]
    kw = dict(block_size=40, act_order=act_order, zero_point=zero_point, clip_search=clip_search)
    multi = gptq_quantize_multi(w, h, bits, 32, **kw)
    copies = gptq_quantize_batched(w.expand(5, -1, -1), h.expand(5, -1, -1), bits, 32, **kw)
    for a, b in zip(multi, copies):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert torch.equal(w, weights[2]) and torch.equal(h, hessians[2])  # the caller's tensors are left alone


def test_batched_shape_errors():
    weights, hessians = _batch(num=2)
    with pytest.raises(ShapeError):
        gptq_quantize_batched(weights[0], hessians[0], [2], 32)
    with pytest.raises(ShapeError):
        gptq_quantize_batched(weights, hessians, [2], 32)
    assert gptq_quantize_batched(weights[:0], hessians[:0], [], 32) == []


@pytest.mark.parametrize("act_order", [False, True])
def test_consuming_the_workspace_gives_the_same_result(act_order):
    """``consume=True`` (work in the caller's stacked buffers, no copies) changes nothing but memory."""
    weights, hessians = _batch()
    bits = [1, 2, 3, 4, 8]
    kw = dict(act_order=act_order)
    want = gptq_quantize_batched(weights, hessians, bits, 32, **kw)
    got = gptq_quantize_batched(weights.clone(), hessians.clone(), bits, 32, consume=True, **kw)
    for (c1, s1, z1), (c2, s2, z2) in zip(want, got):
        assert torch.equal(c1, c2) and torch.equal(s1, s2) and torch.equal(z1, z2)


def test_in_place_inverse_cholesky_is_bit_identical_to_the_textbook_form():
    """The in-place factorization equals ``cholesky((H + damp*mean(diag)*I)^-1)^T`` computed out of place, including
    when the first damping fails and is raised (the damped diagonal is rebuilt from the saved one)."""
    from optimum_mc.gptq import _inverse_cholesky_

    def textbook(h, damp):
        mean = torch.diag(h).mean().clamp_min(1e-8)
        while True:
            lower, info = torch.linalg.cholesky_ex(h + damp * mean * torch.eye(h.shape[0]))
            if int(info) == 0:
                return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)
            damp *= 10

    _, hessians = _batch()
    for h in hessians:
        assert torch.equal(_inverse_cholesky_(h.clone(), 0.01), textbook(h, 0.01))
    g = torch.Generator().manual_seed(1)
    v = torch.randn(48, 3, generator=g)
    indefinite = v @ v.t() - 0.05 * torch.eye(48)  # not PD at 1% damping, PD after raising it
    assert torch.equal(_inverse_cholesky_(indefinite.clone(), 0.01), textbook(indefinite, 0.01))
