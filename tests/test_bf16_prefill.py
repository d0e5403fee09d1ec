"""The AVX512-BF16 prefill kernel (``mc_bf16_linear``, for CPUs with AVX512-BF16 but no AMX): y = x @ bf16(W).T
with fp32 sums, every bit-width, ragged shapes; the MoE op's bf16 prefill reaches it when AMX is off
(``OPTIMUM_MC_CPU_AMX=0``), and the fallback of CPUs with neither kernel computes in fp32."""

from __future__ import annotations

import pytest
import torch

from optimum_mc.kernels import cpu, moe, moe_cpu
from optimum_mc.kernels.reference import dequantize_reference, moe_reference
from optimum_mc.packing import pack

_LIB = cpu.library()
pytestmark = pytest.mark.skipif(
    _LIB is None or not _LIB.mc_bf16_available(), reason="no AVX512-BF16 on this CPU / build (or no C compiler)"
)


def _packed(out_f: int, in_f: int, bits: int, group: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (out_f, in_f), dtype=torch.uint8, generator=g)
    scales = (torch.rand(out_f, in_f // group, generator=g) * 0.02 + 1e-3).half()
    zeros = (torch.rand(out_f, in_f // group, generator=g) * ((1 << bits) - 1)).half()
    return pack(codes, bits), scales, zeros


def _run(x, qw, s, z, out_f, bits, group, y, threads=2) -> int:
    return _LIB.mc_bf16_linear(x.data_ptr(), x.shape[0], x.shape[1], qw.data_ptr(), s.data_ptr(), z.data_ptr(),
                               out_f, bits, group, y.data_ptr(), y.stride(0), threads)  # fmt: skip


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(
    ("rows", "out_f", "in_f", "group"),
    [
        (1, 12, 64, 32),
        (13, 32, 96, 32),
        (17, 49, 128, 64),
        (33, 65, 384, 128),
        (70, 200, 256, 32),
        (40, 100, 1600, 64),
    ],  # fmt: skip
)
def test_bf16_linear_equals_bf16_weights_fp32_sums(bits, rows, out_f, in_f, group):
    """Rows 1..70 (not multiples of 16 tokens), outputs not multiples of its 12 / 48-row blocks, inputs spanning
    several 512-input blocks (1600) and not a multiple of them."""
    qw, s, z = _packed(out_f, in_f, bits, group, seed=bits)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = torch.full((rows, out_f), float("nan"))
    assert _run(x, qw, s, z, out_f, bits, group, y) == 0
    w = dequantize_reference(qw, s, z, bits, torch.float32).bfloat16().double()  # the rounding the kernel applies
    exact = x.double() @ w.T
    # products of bf16 values are exact in fp32 and each of the in_f additions rounds once (2^-24 relative), so
    # |error| <= in_f * 2^-24 * sum |x| |w| in any summation order; one wrong weight would be ~1 / in_f of that sum
    bound = in_f * 2.0**-24 * (x.double().abs() @ w.abs().T) + 1e-30
    assert torch.isfinite(y).all()
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bf16_linear_dequantizes_exactly(bits):
    """x = identity: every output is one product w * 1 (exact), so y.T is the kernel's bf16 weight, bit for bit."""
    qw, s, z = _packed(50, 256, bits, 64, seed=10 + bits)
    x = torch.eye(256, dtype=torch.bfloat16)
    y = torch.empty(256, 50)
    assert _run(x, qw, s, z, 50, bits, 64, y) == 0
    want = dequantize_reference(qw, s, z, bits, torch.float32).bfloat16().float()
    assert torch.equal(y.T, want)


def test_bf16_linear_threads_give_the_same_result():
    qw, s, z = _packed(1000, 1024, 3, 128, seed=5)  # 40 x 1000 x 1024: the threaded region, two input blocks
    x = torch.randn(40, 1024, generator=torch.Generator().manual_seed(6)).bfloat16()
    ys = []
    for threads in (1, 2):
        y = torch.empty(40, 1000)
        assert _run(x, qw, s, z, 1000, 3, 128, y, threads) == 0
        ys.append(y)
    assert torch.equal(ys[0], ys[1])


def test_bf16_linear_writes_strided_rows_only():
    qw, s, z = _packed(30, 64, 2, 32, seed=3)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    wide = torch.full((20, 50), -7.0)
    assert _run(x, qw, s, z, 30, 2, 32, wide[:, 10:40]) == 0  # ldy = 50
    dense = torch.empty(20, 30)
    assert _run(x, qw, s, z, 30, 2, 32, dense) == 0
    assert torch.equal(wide[:, 10:40], dense)
    assert (wide[:, :10] == -7).all() and (wide[:, 40:] == -7).all()


def test_bf16_linear_refuses_shapes_it_does_not_take():
    qw, s, z = _packed(32, 64, 2, 32, seed=0)
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    y = torch.empty(4, 32)
    for in_f, group, bits in ((48, 16, 2), (64, 16, 2), (64, 32, 5)):  # in_f % 32, group % 32, bit-width
        args = (x.data_ptr(), 4, in_f, qw.data_ptr(), s.data_ptr(), z.data_ptr(), 32, bits, group, y.data_ptr(), 32, 1)
        assert _LIB.mc_bf16_linear(*args) == -1


def test_switches_read_the_environment(monkeypatch):
    for fn, var in ((cpu.amx_available, cpu.ENV_AMX), (cpu.avx512bf16_available, cpu.ENV_AVX512BF16)):
        monkeypatch.setenv(var, "0")
        fn.cache_clear()
        try:
            assert fn() is False
        finally:
            monkeypatch.delenv(var)
            fn.cache_clear()
    assert cpu.avx512bf16_available()


def _spy(monkeypatch, names):
    calls = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(_LIB, name)
            return (lambda *a: calls.append(name) or fn(*a)) if name in names else fn

    monkeypatch.setattr(moe_cpu.cpu, "library", lambda: Spy())
    return calls


def _layer():
    from test_moe_op import BITS, _experts, _routing

    gate_up, down = _experts(BITS)
    idx, w = _routing(70, len(BITS), skew=True)  # expert 0 gets 70 rows: above the GEMV limit
    x = torch.randn(70, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    ref = moe_reference(x, idx, w, gate_up, down, BITS, "silu")
    return (x, idx, w, gate_up, down, BITS, "silu"), ref


def test_moe_bf16_prefill_without_amx_uses_the_avx512bf16_kernel(monkeypatch):
    from test_moe_op import _tol

    args, ref = _layer()
    monkeypatch.setattr(moe_cpu.cpu, "amx_available", lambda: False)  # what OPTIMUM_MC_CPU_AMX=0 gives
    calls = _spy(monkeypatch, {"mc_bf16_linear", "mc_amx_linear", "mc_dequantize", "mc_dequantize_bf16"})
    got = moe(*args)
    assert calls and set(calls) == {"mc_bf16_linear"}
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), **_tol(ref, torch.bfloat16, True))


def test_moe_bf16_prefill_without_either_kernel_computes_in_fp32(monkeypatch):
    """The fallback (CPUs with neither AMX nor AVX512-BF16): fp32 dequantization and fp32 BLAS, not bf16 BLAS
    (several times slower than fp32 BLAS there); closer to the reference than the bf16-weight kernels."""
    from test_moe_op import _tol

    args, ref = _layer()
    monkeypatch.setattr(moe_cpu.cpu, "amx_available", lambda: False)
    monkeypatch.setattr(moe_cpu.cpu, "avx512bf16_available", lambda: False)
    calls = _spy(monkeypatch, {"mc_bf16_linear", "mc_amx_linear", "mc_dequantize", "mc_dequantize_bf16"})
    got = moe(*args)
    assert calls and set(calls) == {"mc_dequantize"}
    torch.testing.assert_close(got.float(), ref.float(), **_tol(ref, torch.bfloat16, True))
