"""The MoE prefill's epilogues (``csrc/moe_epilogue.c``, ``kernels/moe_prefill.py``): the gated activation written
as the activated hidden against torch's ``GATED``, the routing-weighted scatter-add bit for bit against torch's
ops, the AMX kernel with the epilogues fused bit for bit against its plain sums through ``mc_moe_epilogue``, and the
bf16 prefill with every activation and biases against the pure-torch reference."""

from __future__ import annotations

import ctypes

import pytest
import torch
from helpers.packed import random_packed

from optimum_mc.kernels import cpu, moe
from optimum_mc.kernels.activations import GATED
from optimum_mc.kernels.moe_prefill import ACT_CODES, GLU, SCATTER, Epilogue
from optimum_mc.kernels.reference import moe_reference

LIB = cpu.library()
pytestmark = pytest.mark.skipif(LIB is None, reason="C kernels not built")
SPECIAL = [0.0, -0.0, 100.0, -100.0, 1e4, -1e4, 7.5, -7.5, 3e38, -3e38]


def _glu_epi(act: str, h: torch.Tensor, bias: torch.Tensor | None) -> Epilogue:
    inter = h.shape[1]
    b = None if bias is None else bias.data_ptr()
    return Epilogue(GLU, ACT_CODES[act], int(h.dtype == torch.bfloat16), 0, inter, inter, h.data_ptr(), b)


def _glu(y: torch.Tensor, act: str, dtype: torch.dtype, bias=None, threads: int = 2) -> torch.Tensor:
    rows, n = y.shape
    h = torch.empty(rows, n // 2, dtype=dtype)
    epi = _glu_epi(act, h, bias)
    assert LIB.mc_moe_epilogue(ctypes.addressof(epi), y.data_ptr(), n, rows, n, threads) == 0
    return h


def _sums(rows: int, inter: int, seed: int = 0) -> torch.Tensor:
    y = torch.randn(rows, 2 * inter, generator=torch.Generator().manual_seed(seed)) * 4
    y[0, : len(SPECIAL)] = y[0, inter : inter + len(SPECIAL)] = torch.tensor(SPECIAL)
    return y


@pytest.mark.parametrize("act", sorted(GATED))
@pytest.mark.parametrize("bias", [False, True])
def test_glu_epilogue_is_the_torch_activation(act, bias):
    inter = 200  # not a multiple of 16: the masked tail
    y = _sums(37, inter)
    b = torch.randn(2 * inter, generator=torch.Generator().manual_seed(1)) if bias else None
    yb = y + b if bias else y
    want = GATED[act](yb[:, :inter], yb[:, inter:])
    got = _glu(y, act, torch.float32, b)
    if act == "relu":
        assert torch.equal(got, want)
    # a few fp32 ulp, or 1e-6 of the largest value: exp is a ~1 ulp polynomial (torch: Sleef); the gelus' tails
    # (gate below -4) are computed without torch's cancellation in 1 + erf / 1 + tanh
    finite = want.isfinite()
    atol = 1e-6 * want[finite].abs().max().item()
    torch.testing.assert_close(got[finite], want[finite], rtol=2e-6, atol=atol)
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got[~finite], want[~finite])
    # bf16: torch's rounding of those values (nearest even): equal but where two fp32 values a few ulp apart round
    # to neighbouring bf16 values
    got16, want16 = _glu(y, act, torch.bfloat16, b).float(), want.bfloat16().float()
    same = (got16 == want16) | (got16.isnan() & want16.isnan())
    close = (got16 - want16).abs() <= want16.abs() * 2**-7 + atol
    assert (close | same).all()
    assert same.float().mean() > (0.8 if act.startswith("gelu") else 0.995)  # the gelus: tails (see above)


def test_glu_epilogue_propagates_nan_and_threads_agree():
    y = _sums(64, 96)
    y[3, 5] = float("nan")  # gate
    y[4, 96 + 6] = float("nan")  # up
    for act in GATED:
        h = _glu(y, act, torch.float32)
        assert h[3, 5].isnan() and h[4, 6].isnan(), act
        torch.testing.assert_close(h, _glu(y, act, torch.float32, threads=1), rtol=0, atol=0, equal_nan=True)


def test_scatter_epilogue_is_bias_weight_and_index_add():
    g = torch.Generator().manual_seed(0)
    rows, n, tokens = 50, 72, 20
    y, b, w = torch.randn(rows, n, generator=g), torch.randn(n, generator=g), torch.rand(rows, generator=g)
    dst = torch.randint(0, tokens, (rows,), generator=g)  # repeated rows: added in row order
    out = torch.randn(tokens, n, generator=g)
    for bias in (None, b):
        want = out.clone().index_add_(0, dst, ((y if bias is None else y + bias) * w[:, None]))
        got = out.clone()
        epi = Epilogue(SCATTER, 0, 0, 0, 0, n, got.data_ptr(), None if bias is None else bias.data_ptr(),
                       w.data_ptr(), dst.data_ptr())  # fmt: skip
        assert LIB.mc_moe_epilogue(ctypes.addressof(epi), y.data_ptr(), n, rows, n, 2) == 0
        assert torch.equal(got, want)


def test_epilogue_refuses_what_it_does_not_know():
    y = torch.zeros(4, 10)
    bad = Epilogue(GLU, 0, 0, 0, 4, 4, y.data_ptr())  # N != 2 * inter
    assert LIB.mc_moe_epilogue(ctypes.addressof(bad), y.data_ptr(), 10, 4, 10, 1) == -1
    bad = Epilogue(7, 0, 0, 0, 5, 5, y.data_ptr())
    assert LIB.mc_moe_epilogue(ctypes.addressof(bad), y.data_ptr(), 10, 4, 10, 1) == -1


needs_amx = pytest.mark.skipif(LIB is None or not cpu.amx_available(), reason="no AMX on this CPU / build")


def _amx(x, qw, s, z, n, bits, group, epi=None, threads=2, y=None):
    args = (x.data_ptr(), x.shape[0], x.shape[1], qw.data_ptr(), s.data_ptr(), z.data_ptr(), n, bits, group)
    if epi is None:
        return LIB.mc_amx_linear(*args, y.data_ptr(), y.stride(0), threads)
    return LIB.mc_amx_linear_epi(*args, ctypes.addressof(epi), threads)


@needs_amx
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize(("rows", "hidden"), [(7, 128), (70, 128), (300, 2048)])  # 300 x 2048: x past 1 MiB
@pytest.mark.parametrize("threads", [1, 2])
def test_amx_fused_epilogues_equal_the_plain_sums_through_the_epilogue(bits, rows, hidden, threads):
    inter, group, tokens = 96, 32, 40
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(rows, hidden, generator=g).bfloat16()
    qw, s, z = random_packed(2 * inter, hidden, bits, group, seed=bits)
    bias = torch.randn(2 * inter, generator=g)
    y = torch.empty(rows, 2 * inter)
    assert _amx(x, qw, s, z, 2 * inter, bits, group, y=y, threads=threads) == 0
    for act in GATED:
        for dtype in (torch.bfloat16, torch.float32):
            want = _glu(y, act, dtype, bias)
            got = torch.empty(rows, inter, dtype=dtype)
            assert _amx(x, qw, s, z, 2 * inter, bits, group, _glu_epi(act, got, bias), threads) == 0
            assert torch.equal(got, want), (act, dtype)
    # down: N = 200, not a multiple of the 32-row blocks
    qd, sd, zd = random_packed(200, hidden, bits, group, seed=bits + 10)
    w, dst = torch.rand(rows, generator=g), torch.randint(0, tokens, (rows,), generator=g)
    y = torch.empty(rows, 200)
    assert _amx(x, qd, sd, zd, 200, bits, group, y=y, threads=threads) == 0
    out = torch.randn(tokens, 200, generator=g)
    want, got = out.clone(), out.clone()
    epis = [Epilogue(SCATTER, 0, 0, 0, 0, 200, o.data_ptr(), None, w.data_ptr(), dst.data_ptr()) for o in (want, got)]
    assert LIB.mc_moe_epilogue(ctypes.addressof(epis[0]), y.data_ptr(), 200, rows, 200, 1) == 0
    assert _amx(x, qd, sd, zd, 200, bits, group, epis[1], threads) == 0
    assert torch.equal(got, want)


@needs_amx
def test_amx_glu_refuses_an_inter_not_of_whole_tiles():
    x = torch.randn(40, 64).bfloat16()
    qw, s, z = random_packed(2 * 40, 64, 2, 32, seed=0)
    h = torch.empty(40, 40, dtype=torch.bfloat16)
    assert _amx(x, qw, s, z, 80, 2, 32, _glu_epi("silu", h, None)) == -1


@pytest.mark.parametrize("act", sorted(GATED))
def test_bf16_prefill_every_activation_with_biases_matches_reference(act):
    from helpers.moe import BITS, random_experts, random_routing, tolerance

    gate_up, down = random_experts(BITS)
    idx, w = random_routing(70, len(BITS), skew=True)  # expert 0 on the prefill kernel, the others on the GEMV
    g = torch.Generator().manual_seed(5)
    x = torch.randn(70, 128, generator=g).bfloat16()
    biases = torch.randn(len(BITS), 2 * 96, generator=g) * 0.1, torch.randn(len(BITS), 128, generator=g) * 0.1
    ref = moe_reference(x, idx, w, gate_up, down, BITS, act, *biases)
    got = moe(x, idx, w, gate_up, down, BITS, act, gate_up_bias=biases[0], down_bias=biases[1])
    torch.testing.assert_close(got.float(), ref.float(), **tolerance(ref, torch.bfloat16, True))
