"""The quantization grid: fp16-exact parameters, code optimality, the 1-bit binary form, bad input."""

import pytest
import torch

from optimum_mc.errors import NonFiniteWeightError, ShapeError
from optimum_mc.group_quant import dequantize_matrix, group_qparams, quantize_codes, rtn_quantize


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_minmax_grid_hits_group_extremes(bits):
    w = torch.randn(16, 4, 32, generator=torch.Generator().manual_seed(bits))
    scale, zero = group_qparams(w, bits)
    assert torch.equal(scale, scale.half().float()) and torch.equal(zero, zero.half().float())
    q = quantize_codes(w, scale, zero, bits)
    deq = (q.float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    # every value within half a step of the grid (+ fp16 rounding of the parameters)
    step = scale.unsqueeze(-1)
    assert ((deq - w).abs() <= 0.5 * step + 2e-3 * w.abs().amax(-1, keepdim=True)).all()


def test_one_bit_is_center_plus_minus_magnitude():
    w = torch.randn(8, 2, 64, generator=torch.Generator().manual_seed(0))
    scale, zero = group_qparams(w, 1)
    q = quantize_codes(w, scale, zero, 1)
    deq = (q.float() - zero.unsqueeze(-1)) * scale.unsqueeze(-1)
    center = w.mean(-1, keepdim=True)
    magnitude = (w - center).abs().mean(-1, keepdim=True)
    expected = torch.where(w > center, center + magnitude, center - magnitude)
    torch.testing.assert_close(deq, expected, atol=2e-3, rtol=2e-3)


def test_more_bits_less_error():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1))
    errs = []
    for bits in (1, 2, 3, 4, 8):
        q, s, z = rtn_quantize(w, bits, 128)
        errs.append((dequantize_matrix(q, s, z, 128) - w).pow(2).mean().item())
    assert errs[1:] == sorted(errs[1:], reverse=True)
    assert errs[-1] < 1e-4 and errs[1] < errs[0] * 1.5


def test_constant_group_is_exact():
    w = torch.full((2, 32), 0.25)
    for bits in (1, 2, 4):
        q, s, z = rtn_quantize(w, bits, 32)
        torch.testing.assert_close(dequantize_matrix(q, s, z, 32), w, atol=1e-3, rtol=0)


def test_bad_input():
    with pytest.raises(ShapeError, match="not divisible by group_size"):
        rtn_quantize(torch.randn(4, 100), 2, 32)
    w = torch.randn(4, 64)
    w[1, 3] = float("nan")
    with pytest.raises(NonFiniteWeightError, match="NaN/Inf"):
        rtn_quantize(w, 2, 32)
