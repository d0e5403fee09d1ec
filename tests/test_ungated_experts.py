"""Non-gated experts (Nemotron-H's: ``up_proj (E, I, H)``, ``down_proj (E, H, I)``, ``down(relu2(up(x)))``): the
layout read from the module, the exact conversion into MC's layout (a gate/up projection of the ``I`` up rows and
an :class:`~optimum_mc.kernels.activations.Ungated` gate), MCExperts against the float module, and
``dequantize()`` back into the family's own experts class. The end-to-end check is tests/test_families.py."""

from __future__ import annotations

import pytest
import torch
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module
from torch import nn

from optimum_mc.architectures import discover, is_experts
from optimum_mc.errors import UnsupportedArchitectureError
from optimum_mc.expert_layout import CanonicalExperts, canonical_experts, canonical_tensors, experts_layout
from optimum_mc.kernels.activations import BiasedGLU, Ungated, activation_name, intermediate, is_gated
from optimum_mc.nn import MCExperts
from optimum_mc.tools.families import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model("nemotron_h")


def _experts(model):
    return next(layer.mixer.experts for layer in model.model.layers if hasattr(layer.mixer, "experts"))


def _routed(e: int, hidden: int, tokens: int = 24, k: int = 2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g) * 4
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    return x, idx, torch.rand(tokens, k, generator=g).softmax(-1)


def test_ungated_gate_is_act_of_the_whole_projection():
    act = Ungated(lambda t: torch.relu(t) ** 2)
    h = torch.linspace(-3, 3, 12).reshape(2, 6)
    assert torch.equal(intermediate(act, h), torch.relu(h) ** 2)  # all columns, no halves
    assert not is_gated(act) and activation_name(act) is None  # the fused op has no non-gated mode
    b = torch.full((6,), 0.5)
    assert torch.equal(intermediate(BiasedGLU(act, b), h), torch.relu(h + b) ** 2)
    assert not callable(act) and not hasattr(act, "glu")  # code splitting halves cannot take it by mistake


def test_layout_is_read_from_the_module(model):
    ex = _experts(model)
    assert is_experts(ex)
    lay = experts_layout(ex)
    assert (lay.num_experts, lay.hidden, lay.inter, lay.rows) == (8, 64, 32, 32)
    assert not lay.gated and not lay.canonical and not lay.bias and isinstance(lay.act_fn, Ungated)
    arch = discover(model)
    assert (arch.block_attr, arch.router_attr, arch.experts_attr) == ("mixer", "gate", "experts")
    assert arch.score_fn == "sigmoid" and arch.shared_expert_attrs == ("shared_experts",)


def test_conversion_is_exact_and_reproduces_the_forward(model):
    ex = _experts(model)
    t = canonical_tensors(ex, experts_layout(ex))
    assert torch.equal(t["gate_up_proj"], ex.up_proj) and torch.equal(t["down_proj"], ex.down_proj)
    new = canonical_experts(ex)
    assert isinstance(new, CanonicalExperts) and experts_layout(new).rows == 32  # read back as non-gated
    x, idx, w = _routed(8, 64)
    with torch.no_grad():
        torch.testing.assert_close(new(x, idx, w), ex(x, idx, w), rtol=1e-5, atol=1e-6)


def test_mc_experts_track_the_float_module(model):
    ex = _experts(model)
    mc = MCExperts.from_float(ex, [8] * 8, group_size=32)
    assert mc.activation is None and mc.packed[0].gate_up.out_features == 32  # I up rows, per-expert loop
    x, idx, w = _routed(8, 64)
    with torch.no_grad():
        want, got = ex(x, idx, w), mc(x, idx, w)
    assert ((got - want).norm() / want.norm()).item() < 0.02


def test_dequantize_restores_the_family_class(model):
    import copy

    from optimum_mc.quantizer import dequantize_model

    m = copy.deepcopy(model)
    layer = next(layer for layer in m.model.layers if hasattr(layer.mixer, "experts"))
    float_ex = layer.mixer.experts
    layer.mixer.experts = MCExperts.from_float(float_ex, [8] * 8, group_size=32)
    m.__dict__.pop("_mc_architecture", None)
    dequantize_model(m)
    back = layer.mixer.experts
    assert type(back) is type(float_ex) and back.up_proj.shape == float_ex.up_proj.shape
    assert (back.up_proj - float_ex.up_proj).abs().max() < 0.01 and type(back.act_fn) is type(float_ex.act_fn)


def test_mismatched_up_and_down_shapes_are_named(model):
    ex = _experts(model)
    bad = type(ex).__new__(type(ex))
    nn.Module.__init__(bad)
    bad.num_experts, bad.act_fn = 8, ex.act_fn
    bad.up_proj = nn.Parameter(torch.zeros(8, 32, 64))
    bad.down_proj = nn.Parameter(torch.zeros(8, 64, 16))
    with pytest.raises(UnsupportedArchitectureError, match=r"not the non-gated \(E, I, H\) / \(E, H, I\) layout"):
        experts_layout(bad)


def test_transposed_non_gated_experts_are_read_and_a_changed_forward_is_refused():
    """ergo's experts: up_proj (E, H, I) / down_proj (E, I, H), declared is_transposed, plus a per-expert RMSNorm
    after the down projection that packed experts would drop: the conversion check names it."""
    ex = tiny_model("ergo").model.layers[1].mlp.experts
    lay = experts_layout(ex)
    assert lay.transposed and not lay.gated and (lay.hidden, lay.inter) == (64, 32)
    assert experts_layout(ex, hidden=64).transposed
    with pytest.raises(
        UnsupportedArchitectureError,
        match=r"post_expert_norm.weight \(8, 64\) \(ErgoExpertNorm\).*does not reproduce its forward after conversion",
    ):
        canonical_experts(ex)
