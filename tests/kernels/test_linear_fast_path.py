"""QuantLinear's per-call path: the direct CPU kernel call in eager mode, buffers checked once, grid kept fp16."""

from __future__ import annotations

import pytest
import torch

from optimum_mc.errors import DeviceMismatchError, ShapeError
from optimum_mc.kernels.reference import qmatmul_reference
from optimum_mc.nn import QuantLinear


def _layer(bits=4, bias=True):
    lin = torch.nn.Linear(256, 96, bias=bias)
    return QuantLinear.from_linear(lin, bits, group_size=128)


def _tol(x, q):
    w = q.dequantize_weight(torch.float32)
    return 2e-6 * (x.abs().reshape(-1, 256) @ w.abs().t()).max().item() + 1e-7


@pytest.mark.parametrize("shape", [(1, 256), (1, 1, 256), (2, 3, 256), (40, 256)])
def test_eager_path_matches_reference_and_dispatcher(shape):
    q = _layer()
    x = torch.randn(*shape)
    ref = qmatmul_reference(x, q.qweight, q.scales, q.zeros, 4) + q.bias
    with torch.no_grad():
        got = q(x)
    assert got.shape == (*shape[:-1], 96)
    assert (got - ref).abs().max().item() <= _tol(x, q)
    via_op = torch.ops.optimum_mc.qmatmul(x, q.qweight, q.scales, q.zeros, 4) + q.bias
    assert torch.equal(got, via_op)  # same kernel either way


def test_grid_stays_fp16_through_dtype_casts():
    q = _layer()
    scales, zeros = q.scales.clone(), q.zeros.clone()
    x = torch.randn(2, 256)
    before = q(x)
    q.to(torch.bfloat16)
    assert q.scales.dtype == torch.float16 and torch.equal(q.scales, scales) and torch.equal(q.zeros, zeros)
    assert q.bias.dtype == torch.bfloat16  # the bias follows the model dtype
    q.float()
    assert q.scales.dtype == torch.float16 and torch.equal(q.zeros, zeros)
    torch.testing.assert_close(q(x), before, rtol=1e-2, atol=1e-2)  # only the bias went through bf16


def test_replaced_buffers_are_rechecked():
    q = _layer(bias=False)
    x = torch.randn(1, 256)
    expected = q(x)
    # a non-contiguous copy with the same values: the C kernel must not read it as contiguous
    qt = q.qweight.t().contiguous().t()
    q.qweight = qt
    assert not q.qweight.is_contiguous()
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)
    q.qweight = qt.contiguous()
    torch.testing.assert_close(q(x), expected, rtol=0, atol=0)


def test_bad_input_is_a_typed_error():
    q = _layer()
    with pytest.raises(ShapeError):
        q(torch.randn(2, 255))
    with pytest.raises(DeviceMismatchError):
        q(torch.randn(2, 256, device="meta"))


def test_meta_and_grad_inputs_go_through_the_dispatcher():
    q = _layer().to("meta")
    assert q(torch.randn(3, 256, device="meta")).shape == (3, 96)
    q = _layer()
    x = torch.randn(2, 256, requires_grad=True)
    assert q(x).shape == (2, 96)
