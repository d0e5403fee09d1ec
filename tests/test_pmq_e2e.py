"""PMQ options end to end on a tiny Mixtral: loss methods, Hessian baseline, integer zeros, router-weighted GPTQ,
exponent tuning; each quantizes, keeps the exact bit budget and round-trips through save / load."""

from __future__ import annotations

import pytest
import torch
from test_quantize_e2e import logits, quantize
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from optimum_mc.nn import MCExperts, QuantLinear


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("mixtral-pmq"))


@pytest.mark.parametrize(
    "options",
    [
        {"loss_method": "heldout"},
        {"loss_method": "insample"},
        {"allocation": "hessian"},
        {"expert_hessian": "router-weighted"},
        {"allocation_solver": "dp"},
    ],
)
def test_pmq_options_keep_the_budget(mixtral_dir, options):
    model = quantize(mixtral_dir, **options)
    qc = model.config.quantization_config
    assert all(sum(b) == 10 for b in qc.expert_bits)
    assert all(torch.isfinite(torch.tensor(f["loss"])).all() for f in qc.expert_factors)


def test_integer_zero_points_round_trip_exactly(mixtral_dir, tmp_path):
    model = quantize(mixtral_dir, zero_point="int")
    mods = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert mods and any(m.bits > 1 for m in mods)
    for m in mods:
        if m.bits > 1:
            z = m.zeros.float()
            assert torch.equal(z, z.round()) and z.min() >= 0 and z.max() <= (1 << m.bits) - 1
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert again.config.quantization_config.zero_point == "int"
    sd, sd2 = model.state_dict(), again.state_dict()
    assert all(torch.equal(sd[k], sd2[k]) for k in sd if k.endswith((".zeros", ".scales", ".qweight")))
    assert torch.equal(logits(again), logits(model))


def test_tuned_exponents_are_stored_and_deterministic(mixtral_dir):
    a = quantize(mixtral_dir, tune_exponents=True).config.quantization_config
    b = quantize(mixtral_dir, tune_exponents=True).config.quantization_config
    assert len(a.tuned_exponents) == len(a.moe_layers)
    assert a.tuned_exponents == b.tuned_exponents and a.expert_bits == b.expert_bits


def test_router_weighted_hessians_use_every_expert(mixtral_dir):
    model = quantize(mixtral_dir, expert_hessian="router-weighted")
    methods = [m for f in model.config.quantization_config.expert_factors for m in f["method"]]
    assert set(methods) == {"gptq"}
    assert any(isinstance(m, MCExperts) for m in model.modules())


def test_residual_normalizer_rescales_each_layer_and_keeps_layer_allocation(mixtral_dir):
    """eps relative to the decoder layer's output differs from the block-relative eps by one factor per layer
    (the ratio of the two energies), so the per-layer allocation is unchanged."""
    block = quantize(mixtral_dir).config.quantization_config
    resid = quantize(mixtral_dir, loss_normalizer="residual").config.quantization_config
    assert resid.expert_bits == block.expert_bits
    for fb, fr in zip(block.expert_factors, resid.expert_factors):
        lb, lr = torch.tensor(fb["loss"], dtype=torch.float64), torch.tensor(fr["loss"], dtype=torch.float64)
        ratio = lr[lb > 0] / lb[lb > 0]
        assert ratio.numel() and torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
        assert 0 < ratio[0] < 1  # the residual stream carries more energy than the MoE block's output alone
