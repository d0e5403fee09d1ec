"""The AVX512-BF16 prefill kernels (for CPUs with AVX512-BF16 but no AMX; ``mc_bf16_linear``: vdpbf16ps,
``mc_bf16_linear_fma``: fp32 FMA): y = x @ bf16(W).T with fp32 sums, every bit-width, ragged shapes; the MoE op's
bf16 prefill reaches them when AMX is off (``OPTIMUM_MC_CPU_AMX=0``). CPUs with neither compute bf16 prefill in
fp32: the AVX2 + FMA kernel ``mc_fma_linear`` (exact fp32 weights), else dequantize + fp32 BLAS."""

from __future__ import annotations

import pytest
import torch
from helpers.packed import random_packed

from optimum_mc.kernels import cpu, moe, moe_cpu
from optimum_mc.kernels.reference import dequantize_reference, moe_reference

_LIB = cpu.library()
needs_bf16 = pytest.mark.skipif(
    _LIB is None or not _LIB.mc_bf16_available(), reason="no AVX512-BF16 on this CPU / build (or no C compiler)"
)
needs_fma = pytest.mark.skipif(
    _LIB is None or not _LIB.mc_fma_available(), reason="no AVX2 + FMA on this CPU / build (or no C compiler)"
)


KERNELS = ["mc_bf16_linear", "mc_bf16_linear_fma"]


def _run(x, qw, s, z, out_f, bits, group, y, threads=2, kernel="mc_bf16_linear") -> int:
    return getattr(_LIB, kernel)(x.data_ptr(), x.shape[0], x.shape[1], qw.data_ptr(), s.data_ptr(), z.data_ptr(),
                               out_f, bits, group, y.data_ptr(), y.stride(0), threads)  # fmt: skip


@pytest.mark.parametrize("kernel", KERNELS)
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
@needs_bf16
def test_bf16_linear_equals_bf16_weights_fp32_sums(kernel, bits, rows, out_f, in_f, group):
    """Rows 1..70 (not multiples of 16 tokens), outputs not multiples of its 12 / 48-row blocks, inputs spanning
    several 512-input blocks (1600) and not a multiple of them."""
    qw, s, z = random_packed(out_f, in_f, bits, group, seed=bits)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = torch.full((rows, out_f), float("nan"))
    assert _run(x, qw, s, z, out_f, bits, group, y, kernel=kernel) == 0
    w = dequantize_reference(qw, s, z, bits, torch.float32).bfloat16().double()  # the rounding the kernel applies
    exact = x.double() @ w.T
    # products of bf16 values are exact in fp32 and each of the in_f additions rounds once (2^-24 relative), so
    # |error| <= in_f * 2^-24 * sum |x| |w| in any summation order; one wrong weight would be ~1 / in_f of that sum
    bound = in_f * 2.0**-24 * (x.double().abs() @ w.abs().T) + 1e-30
    assert torch.isfinite(y).all()
    assert ((y.double() - exact).abs() <= bound).all()


@needs_bf16
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bf16_linear_dequantizes_exactly(kernel, bits):
    """x = identity: every output is one product w * 1 (exact), so y.T is the kernel's bf16 weight, bit for bit."""
    qw, s, z = random_packed(50, 256, bits, 64, seed=10 + bits)
    x = torch.eye(256, dtype=torch.bfloat16)
    y = torch.empty(256, 50)
    assert _run(x, qw, s, z, 50, bits, 64, y, kernel=kernel) == 0
    want = dequantize_reference(qw, s, z, bits, torch.float32).bfloat16().float()
    assert torch.equal(y.T, want)


@needs_bf16
@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_linear_threads_give_the_same_result(kernel):
    qw, s, z = random_packed(1000, 1024, 3, 128, seed=5)  # 40 x 1000 x 1024: the threaded region, two input blocks
    x = torch.randn(40, 1024, generator=torch.Generator().manual_seed(6)).bfloat16()
    ys = []
    for threads in (1, 2):
        y = torch.empty(40, 1000)
        assert _run(x, qw, s, z, 1000, 3, 128, y, threads, kernel) == 0
        ys.append(y)
    assert torch.equal(ys[0], ys[1])


@needs_bf16
@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_linear_writes_strided_rows_only(kernel):
    qw, s, z = random_packed(30, 64, 2, 32, seed=3)
    x = torch.randn(20, 64, generator=torch.Generator().manual_seed(4)).bfloat16()
    wide = torch.full((20, 50), -7.0)
    assert _run(x, qw, s, z, 30, 2, 32, wide[:, 10:40], kernel=kernel) == 0  # ldy = 50
    dense = torch.empty(20, 30)
    assert _run(x, qw, s, z, 30, 2, 32, dense, kernel=kernel) == 0
    assert torch.equal(wide[:, 10:40], dense)
    assert (wide[:, :10] == -7).all() and (wide[:, 40:] == -7).all()


@needs_bf16
@pytest.mark.parametrize("kernel", KERNELS)
def test_bf16_linear_refuses_shapes_it_does_not_take(kernel):
    qw, s, z = random_packed(32, 64, 2, 32, seed=0)
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    y = torch.empty(4, 32)
    for in_f, group, bits in ((48, 16, 2), (64, 16, 2), (64, 32, 5)):  # in_f % 32, group % 32, bit-width
        args = (x.data_ptr(), 4, in_f, qw.data_ptr(), s.data_ptr(), z.data_ptr(), 32, bits, group, y.data_ptr(), 32, 1)
        assert getattr(_LIB, kernel)(*args) == -1


@needs_bf16
def test_switches_read_the_environment(monkeypatch):
    for fn, var, value, want in (
        (cpu.amx_available, cpu.ENV_AMX, "0", False),
        (cpu.avx512bf16_available, cpu.ENV_AVX512BF16, "0", False),
        (cpu.bf16_dot, cpu.ENV_BF16_DOT, "dp", "dp"),
        (cpu.bf16_dot, cpu.ENV_BF16_DOT, "fma", "fma"),
    ):
        monkeypatch.setenv(var, value)
        fn.cache_clear()
        try:
            assert fn() == want
        finally:
            monkeypatch.delenv(var)
            fn.cache_clear()
    assert cpu.avx512bf16_available() and cpu.bf16_dot() in ("dp", "fma")


@needs_bf16
def test_the_two_kernels_agree_to_summation_order():
    qw, s, z = random_packed(96, 512, 3, 128, seed=7)
    x = torch.randn(37, 512, generator=torch.Generator().manual_seed(8)).bfloat16()
    y_dp, y_fma = torch.empty(37, 96), torch.empty(37, 96)
    assert _run(x, qw, s, z, 96, 3, 128, y_dp) == 0 and _run(x, qw, s, z, 96, 3, 128, y_fma, kernel=KERNELS[1]) == 0
    w = dequantize_reference(qw, s, z, 3, torch.float32).bfloat16().double()
    bound = 2 * 512 * 2.0**-24 * (x.double().abs() @ w.abs().T)
    assert ((y_dp.double() - y_fma.double()).abs() <= bound).all()


def _spy(monkeypatch, names):
    calls = []

    class Spy:
        def __getattr__(self, name):
            fn = getattr(_LIB, name)
            return (lambda *a: calls.append(name) or fn(*a)) if name in names else fn

    monkeypatch.setattr(moe_cpu.cpu, "library", lambda: Spy())
    return calls


def _layer():
    from helpers.moe import BITS, random_experts, random_routing

    gate_up, down = random_experts(BITS)
    idx, w = random_routing(70, len(BITS), skew=True)  # expert 0 gets 70 rows: above the GEMV limit
    x = torch.randn(70, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    ref = moe_reference(x, idx, w, gate_up, down, BITS, "silu")
    return (x, idx, w, gate_up, down, BITS, "silu"), ref


_NAMES = {
    "mc_bf16_linear",
    "mc_bf16_linear_fma",
    "mc_amx_linear",
    "mc_fma_linear",
    "mc_dequantize",
    "mc_dequantize_bf16",
}


@needs_bf16
@pytest.mark.parametrize(("dot", "kernel"), [("dp", "mc_bf16_linear"), ("fma", "mc_bf16_linear_fma")])
def test_moe_bf16_prefill_without_amx_uses_the_avx512bf16_kernel(monkeypatch, dot, kernel):
    from helpers.moe import tolerance

    args, ref = _layer()
    monkeypatch.setattr(moe_cpu.cpu, "amx_available", lambda: False)  # what OPTIMUM_MC_CPU_AMX=0 gives
    monkeypatch.setattr(moe_cpu.cpu, "bf16_dot", lambda: dot)  # what OPTIMUM_MC_CPU_BF16_DOT gives
    calls = _spy(monkeypatch, _NAMES)
    got = moe(*args)
    assert calls and set(calls) == {kernel}
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), **tolerance(ref, torch.bfloat16, True))


@needs_fma
@pytest.mark.parametrize(("fma", "kernel"), [(True, "mc_fma_linear"), (False, "mc_dequantize")])
def test_moe_bf16_prefill_without_either_kernel_computes_in_fp32(monkeypatch, fma, kernel):
    """CPUs with neither AMX nor AVX512-BF16: the AVX2 + FMA kernel, else fp32 dequantization and fp32 BLAS; not
    bf16 BLAS (several times slower than fp32 BLAS there). Closer to the reference than the bf16-weight kernels."""
    from helpers.moe import tolerance

    args, ref = _layer()
    monkeypatch.setattr(moe_cpu.cpu, "amx_available", lambda: False)
    monkeypatch.setattr(moe_cpu.cpu, "avx512bf16_available", lambda: False)
    monkeypatch.setattr(moe_cpu.cpu, "fma_available", lambda: fma)
    calls = _spy(monkeypatch, _NAMES)
    got = moe(*args)
    assert calls and set(calls) == {kernel}
    torch.testing.assert_close(got.float(), ref.float(), **tolerance(ref, torch.bfloat16, True))


def _run_fma(x, qw, s, z, out_f, bits, group, y, threads=2) -> int:
    return _LIB.mc_fma_linear(x.data_ptr(), x.shape[0], x.shape[1], qw.data_ptr(), s.data_ptr(), z.data_ptr(),
                              out_f, bits, group, y.data_ptr(), y.stride(0), threads)  # fmt: skip


@needs_fma
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(
    ("rows", "out_f", "in_f", "group"),
    [(1, 6, 64, 32), (13, 32, 96, 32), (17, 49, 128, 64), (70, 200, 256, 32), (40, 100, 1600, 64)],
)
def test_fma_linear_equals_fp32_weights_fp32_sums(bits, rows, out_f, in_f, group):
    qw, s, z = random_packed(out_f, in_f, bits, group, seed=bits)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1))
    y = torch.full((rows, out_f), float("nan"))
    assert _run_fma(x, qw, s, z, out_f, bits, group, y) == 0
    w = dequantize_reference(qw, s, z, bits, torch.float32).double()  # exact fp32 weights, unrounded
    exact = x.double() @ w.T
    # one FMA per input: the product is exact inside it and the sum rounds once (2^-24 relative)
    bound = in_f * 2.0**-24 * (x.double().abs() @ w.abs().T) + 1e-30
    assert torch.isfinite(y).all()
    assert ((y.double() - exact).abs() <= bound).all()


@needs_fma
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_fma_linear_dequantizes_exactly(bits):
    qw, s, z = random_packed(50, 256, bits, 64, seed=10 + bits)
    y = torch.empty(256, 50)
    assert _run_fma(torch.eye(256), qw, s, z, 50, bits, 64, y) == 0
    assert torch.equal(y.T, dequantize_reference(qw, s, z, bits, torch.float32))


@needs_fma
def test_fma_linear_threads_give_the_same_result_and_refuses_bad_shapes():
    qw, s, z = random_packed(1000, 512, 3, 128, seed=5)
    x = torch.randn(40, 512, generator=torch.Generator().manual_seed(6))
    ys = []
    for threads in (1, 2):
        y = torch.empty(40, 1000)
        assert _run_fma(x, qw, s, z, 1000, 3, 128, y, threads) == 0
        ys.append(y)
    assert torch.equal(ys[0], ys[1])
    y = torch.empty(4, 32)
    for in_f, group, bits in ((48, 16, 2), (64, 16, 2), (64, 32, 5)):
        args = (x.data_ptr(), 4, in_f, qw.data_ptr(), s.data_ptr(), z.data_ptr(), 32, bits, group, y.data_ptr(), 32, 1)
        assert _LIB.mc_fma_linear(*args) == -1


@needs_fma
def test_march_switch_builds_an_avx2_library(monkeypatch):
    """OPTIMUM_MC_CPU_MARCH=haswell (how bench_moe.py --avx2 emulates an AVX2 CPU): no AVX-512 kernels, the AVX2 one
    and the same results."""
    monkeypatch.setenv(cpu.ENV_MARCH, "haswell")
    flags = cpu.fallback_flags()[0]
    assert "-march=haswell" in flags and "-march=native" not in flags
    avx2 = cpu.load(cpu.build(cpu._compiler(), flags))
    assert not avx2.mc_bf16_available() and not avx2.mc_amx_available() and avx2.mc_fma_available()
    qw, s, z = random_packed(100, 256, 3, 64, seed=9)
    x = torch.randn(30, 256, generator=torch.Generator().manual_seed(9))
    y, y2 = torch.empty(30, 100), torch.empty(30, 100)
    assert _run_fma(x, qw, s, z, 100, 3, 64, y) == 0
    assert avx2.mc_fma_linear(x.data_ptr(), 30, 256, qw.data_ptr(), s.data_ptr(), z.data_ptr(), 100, 3, 64,
                              y2.data_ptr(), 100, 2) == 0  # fmt: skip
    w = dequantize_reference(qw, s, z, 3, torch.float32).double()
    bound = 256 * 2.0**-24 * (x.double().abs() @ w.abs().T)
    assert ((y2.double() - x.double() @ w.T).abs() <= bound).all()


@needs_bf16
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_bf16_kernels_without_vbmi(bits):
    """CPUs with AVX512-BF16 but no AVX512-VBMI (Intel Cooper Lake) dequantize in fp32 instead of by table lookup:
    a build without VBMI gives the same bf16 weights and the same sums."""
    flags = (*cpu.fallback_flags()[0], "-mno-avx512vbmi")
    lib = cpu.load(cpu.build(cpu._compiler(), flags))
    assert lib.mc_bf16_available()
    qw, s, z = random_packed(50, 256, bits, 64, seed=20 + bits)
    x = torch.randn(37, 256, generator=torch.Generator().manual_seed(3)).bfloat16()
    for kernel in KERNELS:
        y = torch.empty(256, 50)
        eye = torch.eye(256, dtype=torch.bfloat16)
        assert getattr(lib, kernel)(eye.data_ptr(), 256, 256, qw.data_ptr(), s.data_ptr(), z.data_ptr(), 50, bits, 64,
                                    y.data_ptr(), 50, 2) == 0  # fmt: skip
        assert torch.equal(y.T, dequantize_reference(qw, s, z, bits, torch.float32).bfloat16().float())
        y_novbmi, y_vbmi = torch.empty(37, 50), torch.empty(37, 50)
        for lb, out in ((lib, y_novbmi), (_LIB, y_vbmi)):
            assert getattr(lb, kernel)(x.data_ptr(), 37, 256, qw.data_ptr(), s.data_ptr(), z.data_ptr(), 50, bits, 64,
                                       out.data_ptr(), 50, 2) == 0  # fmt: skip
        assert torch.equal(y_novbmi, y_vbmi)  # same weights, same summation order
