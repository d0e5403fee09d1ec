"""torch.library ops: reference semantics, fake (meta) implementations, torch.compile, input validation."""

import pytest
import torch

from optimum_mc.errors import DeviceMismatchError, DTypeError, ShapeError
from optimum_mc.group_quant import dequantize_matrix, rtn_quantize
from optimum_mc.kernels import dequantize, qmatmul
from optimum_mc.kernels.reference import dequantize_reference, qmatmul_reference
from optimum_mc.packing import pack


def _packed(bits, out_f=48, in_f=256, group=64, seed=0):
    w = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(seed))
    q, s, z = rtn_quantize(w, bits, group)
    return q, s, z, pack(q, bits)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_reference_dequantize_matches_grid(bits):
    q, s, z, p = _packed(bits)
    assert torch.equal(dequantize_reference(p, s, z, bits, torch.float32), dequantize_matrix(q, s, z, 64))


@pytest.mark.parametrize("bits", [2, 3])
def test_ops_meta_and_compile(bits):
    q, s, z, p = _packed(bits)
    x = torch.randn(5, 256)
    out = qmatmul(x.to("meta"), p.to("meta"), s.to("meta"), z.to("meta"), bits)
    assert out.shape == (5, 48) and out.device.type == "meta"
    assert dequantize(p.to("meta"), s.to("meta"), z.to("meta"), bits, torch.bfloat16).dtype == torch.bfloat16
    compiled = torch.compile(lambda t: qmatmul(t, p, s, z, bits), backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), qmatmul(x, p, s, z, bits))  # same kernel, traced or not
    ref = qmatmul_reference(x, p, s, z, bits)
    bound = 1e-5 * (x.abs() @ dequantize_reference(p, s, z, bits, torch.float32).abs().t()).max()
    assert (compiled(x) - ref).abs().max() <= bound  # only the fp32 summation order differs


def test_validation_errors():
    q, s, z, p = _packed(2)
    x = torch.randn(2, 256)
    with pytest.raises(DTypeError, match="int32"):
        qmatmul(x, p.long(), s, z, 2)
    with pytest.raises(DTypeError, match="float16"):
        qmatmul(x, p, s.float(), z, 2)
    with pytest.raises(ShapeError, match="features"):
        qmatmul(torch.randn(2, 128), p, s, z, 2)
    with pytest.raises(DTypeError, match="floating"):
        qmatmul(x.long(), p, s, z, 2)
    with pytest.raises(ShapeError):
        qmatmul(x, p, s[:, :3], z, 2)
    with pytest.raises(DeviceMismatchError):
        qmatmul(x.to("meta"), p, s, z, 2)
