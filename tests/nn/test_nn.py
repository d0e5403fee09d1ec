"""QuantLinear / MCExperts / NF4Linear against float modules built from their dequantized weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from tiny_models import FAMILIES, tiny_model

from optimum_mc.architectures import moe_blocks
from optimum_mc.errors import CheckpointError, ShapeError, UnsupportedArchitectureError, UnsupportedBitsError
from optimum_mc.kernels.reference import dequantize_reference
from optimum_mc.nn import MCExperts, NF4Linear, QuantLinear
from optimum_mc.packing import ideal_nbytes

G = torch.Generator().manual_seed(0)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantlinear_matches_float_linear_of_its_weights(bits):
    lin = torch.nn.Linear(128, 48, bias=True)
    q = QuantLinear.from_linear(lin, bits, group_size=64)
    assert q.dequantize_weight(torch.float32).shape == (48, 128)
    assert torch.equal(q.dequantize_weight(torch.float32), dequantize_reference(q.qweight, q.scales, q.zeros, bits,
                                                                                 torch.float32))  # fmt: skip
    ref = q.to_linear()
    x = torch.randn(5, 128, generator=G)
    # tolerance: fp32 accumulation order only (kernel vs BLAS), relative to |x| |W|
    tol = 1e-5 * (x.abs() @ ref.weight.abs().t()).max().item()
    assert (q(x) - ref(x)).abs().max().item() <= tol + 1e-6
    assert q.nbytes() <= 1.02 * ideal_nbytes(48, 128, bits, 64)


def test_quantlinear_state_dict_round_trip_and_checks():
    q = QuantLinear.from_linear(torch.nn.Linear(64, 32), 3, group_size=32)
    fresh = QuantLinear(64, 32, 3, 32, bias=True, dtype=torch.float32)
    fresh.load_state_dict(q.state_dict())
    for name, t in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t)
    x = torch.randn(2, 64, generator=G)
    assert torch.equal(fresh(x), q(x))
    wrong = QuantLinear(64, 32, 2, 32, bias=True, dtype=torch.float32)
    with pytest.raises(CheckpointError, match="qweight"):
        wrong.load_state_dict(q.state_dict())
    meta = QuantLinear(64, 32, 3, 32, device="meta")
    assert meta.qweight.device.type == "meta"
    with pytest.raises(UnsupportedBitsError):
        QuantLinear(64, 32, 5, 32)
    with pytest.raises(ShapeError):
        QuantLinear(100, 32, 2, 32)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_mcexperts_match_float_experts_with_dequantized_weights(family):
    model = tiny_model(family)
    blk = next(moe_blocks(model))
    experts = blk.experts
    e = experts.num_experts
    bits = [(1, 2, 3, 4)[i % 4] for i in range(e)]
    packed = MCExperts.from_float(experts, bits, group_size=32)
    gate_up, down = packed.dequantize()
    with torch.no_grad():
        experts.gate_up_proj.copy_(gate_up)
        experts.down_proj.copy_(down)
    model.config._experts_implementation = "eager"
    t, k = 10, blk.top_k
    hidden = torch.randn(t, experts.gate_up_proj.shape[2], generator=G)
    index = torch.stack([torch.randperm(e, generator=G)[:k] for _ in range(t)])
    index[0, -1] = e  # a dropped slot (ODP) is skipped by both
    weights = torch.rand(t, k, generator=G)
    with torch.no_grad():
        expected = experts(hidden, index, weights)
        got = packed(hidden, index, weights)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    fresh = MCExperts(e, packed.hidden_dim, packed.intermediate_dim, bits, 32, experts.act_fn, torch.float32)
    fresh.load_state_dict(packed.state_dict())
    assert torch.equal(fresh(hidden, index, weights), got)


def test_experts_whose_forward_their_layout_does_not_reproduce_are_refused():
    """gpt-oss's experts are converted into MC's layout (tests/test_gpt_oss.py); a module whose forward differs from
    what its layout says is refused by the conversion's check instead of being quantized into wrong numbers."""
    cfg = transformers.GptOssConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                    num_experts_per_tok=2, head_dim=32)  # fmt: skip
    ex = transformers.GptOssForCausalLM(cfg).model.layers[0].mlp.experts
    with torch.no_grad():
        for p in ex.parameters():
            p.normal_(0, 0.1, generator=G)
    assert MCExperts.from_float(ex, [4] * 4, 32).has_bias == (True, True)
    real = ex.forward
    ex.forward = lambda h, i, w: real(h, i, w) * 2
    with pytest.raises(UnsupportedArchitectureError, match=r"GptOssExperts.*does not reproduce its forward"):
        MCExperts.from_float(ex, [2] * 4, 32)


def test_nf4_linear_uses_bitsandbytes_and_round_trips():
    lin = torch.nn.Linear(128, 64, bias=True)
    n = NF4Linear.from_linear(lin)
    x = torch.randn(3, 128, generator=G)
    ref = n.to_linear()
    torch.testing.assert_close(n(x), ref(x), rtol=1e-5, atol=1e-5)
    rel_mse = (n.dequantize_weight(torch.float32) - lin.weight).pow(2).mean() / lin.weight.pow(2).mean()
    assert rel_mse < 0.02  # 4-bit NF4 on uniform weights: a few per cent relative error
    fresh = NF4Linear(128, 64, bias=True, dtype=torch.float32)
    fresh.load_state_dict(n.state_dict())
    assert torch.equal(fresh(x), n(x))
