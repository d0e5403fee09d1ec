"""gptq_quantize_batched equals per-matrix gptq_quantize exactly (torch.equal) for every option combination."""

from __future__ import annotations

import pytest
import torch

from optimum_mc.errors import ShapeError
from optimum_mc.gptq import HessianAccumulator, gptq_quantize, gptq_quantize_batched


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
@pytest.mark.parametrize("zero_point", ["float", "int"])
def test_batched_equals_per_matrix(act_order, group_size, block_size, zero_point):
    weights, hessians = _batch()
    bits = [1, 2, 3, 4, 8]
    kw = dict(block_size=block_size, act_order=act_order, zero_point=zero_point)
    got = gptq_quantize_batched(weights, hessians, bits, group_size, **kw)
    for e, b in enumerate(bits):
        ref = gptq_quantize(weights[e], hessians[e], b, group_size, **kw)
        assert all(torch.equal(x, y) for x, y in zip(got[e], ref))


def test_batched_shape_errors():
    weights, hessians = _batch(num=2)
    with pytest.raises(ShapeError):
        gptq_quantize_batched(weights[0], hessians[0], [2], 32)
    with pytest.raises(ShapeError):
        gptq_quantize_batched(weights, hessians, [2], 32)
    assert gptq_quantize_batched(weights[:0], hessians[:0], [], 32) == []
