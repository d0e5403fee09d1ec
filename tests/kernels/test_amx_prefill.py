"""The AMX bf16 prefill kernel (``mc_amx_linear``): y = x @ bf16(W).T with fp32 sums, for every bit-width and
shapes that are not multiples of its 32-row blocks; and the fused MoE op's bf16 prefill reaches it (through
``mc_amx_linear_epi``, the same kernel with the MoE epilogues: tests/kernels/test_moe_prefill.py)."""

from __future__ import annotations

import pytest
import torch
from helpers.packed import random_packed

from optimum_mc.kernels import cpu, moe, moe_cpu
from optimum_mc.kernels.reference import dequantize_reference

pytestmark = pytest.mark.skipif(not cpu.amx_available(), reason="no AMX on this CPU / build")


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize(
    ("rows", "out_f", "in_f", "group"),
    [(70, 200, 256, 32), (13, 32, 96, 32), (33, 65, 384, 128), (300, 200, 2048, 128)],  # the last: x past 1 MiB
)
def test_amx_linear_equals_bf16_weights_fp32_sums(bits, rows, out_f, in_f, group):
    qw, s, z = random_packed(out_f, in_f, bits, group, seed=bits)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(1)).bfloat16()
    y = torch.full((rows, out_f), float("nan"))
    lib = cpu.library()
    rc = lib.mc_amx_linear(x.data_ptr(), rows, in_f, qw.data_ptr(), s.data_ptr(), z.data_ptr(), out_f, bits, group,
                           y.data_ptr(), out_f, torch.get_num_threads())  # fmt: skip
    assert rc == 0
    w = dequantize_reference(qw, s, z, bits, torch.float32).bfloat16().double()  # the rounding the kernel applies
    exact = x.double() @ w.T
    # products of bf16 values are exact in fp32; only the fp32 summation order differs from the float64 sum
    bound = 2e-6 * (x.double().abs() @ w.abs().T) + 1e-30
    assert torch.isfinite(y).all()
    assert ((y.double() - exact).abs() <= bound).all()


@pytest.mark.parametrize("rows", [40, 600])  # 600: x past 1 MiB, several weight blocks per work item
def test_amx_linear_threads_give_the_same_result(rows):
    qw, s, z = random_packed(1000, 1024, 3, 128, seed=5)  # rows x 1000 x 1024: the threaded region
    x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(6)).bfloat16()
    lib, ys = cpu.library(), []
    for threads in (1, 2):
        y = torch.empty(rows, 1000)
        assert lib.mc_amx_linear(x.data_ptr(), rows, 1024, qw.data_ptr(), s.data_ptr(), z.data_ptr(), 1000, 3, 128,
                                 y.data_ptr(), 1000, threads) == 0  # fmt: skip
        ys.append(y)
    assert torch.equal(ys[0], ys[1])


def test_amx_linear_refuses_shapes_it_does_not_take():
    qw, s, z = random_packed(32, 64, 2, 32, seed=0)
    x = torch.zeros(4, 64, dtype=torch.bfloat16)
    y = torch.empty(4, 32)
    lib = cpu.library()
    for in_f, group, bits in ((48, 16, 2), (64, 8, 2), (64, 32, 5)):  # in_f % 32, group % 16, bit-width
        args = (x.data_ptr(), 4, in_f, qw.data_ptr(), s.data_ptr(), z.data_ptr(), 32, bits, group, y.data_ptr(), 32, 1)
        assert lib.mc_amx_linear(*args) == -1


def test_moe_bf16_prefill_uses_amx(monkeypatch):
    from helpers.moe import BITS, random_experts, random_routing

    calls = []
    lib = cpu.library()

    class Spy:
        def __getattr__(self, name):
            fn = getattr(lib, name)
            return (lambda *a: calls.append(name) or fn(*a)) if name == "mc_amx_linear_epi" else fn

    gate_up, down = random_experts(BITS)
    idx, w = random_routing(70, len(BITS), skew=True)  # expert 0 gets 70 rows: above the GEMV limit
    x = torch.randn(70, 128, generator=torch.Generator().manual_seed(2)).bfloat16()
    want = moe(x, idx, w, gate_up, down, BITS, "silu")
    monkeypatch.setattr(moe_cpu.cpu, "library", lambda: Spy())
    got = moe(x, idx, w, gate_up, down, BITS, "silu")
    assert calls and torch.equal(got, want)
