"""Experts activations read from the experts module's forward when it has no ``act_fn`` (hy_v4, minimax_m3_vl)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from optimum_mc.architectures import discover
from optimum_mc.errors import UnsupportedArchitectureError
from optimum_mc.expert_activation import GatedActivation, experts_act_fn, gated
from optimum_mc.tools.families import tiny_model


def _module_forward(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    """The experts module's own output for tokens ``x`` all routed to expert ``e`` with weight 1."""
    idx = torch.full((x.shape[0], 1), e, dtype=torch.long)
    return experts(x, idx, torch.ones(x.shape[0], 1))


def _ours(experts: nn.Module, x: torch.Tensor, e: int) -> torch.Tensor:
    gate, up = (x @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
    return gated(experts_act_fn(experts))(gate, up) @ experts.down_proj[e].t()


@pytest.mark.parametrize("model_type", ["hy_v4", "minimax_m3_vl_text"])
def test_gated_activation_is_the_modules_own(model_type):
    """The probed ``glu(gate, up)`` reproduces the module's forward, clamps included (inputs scaled so the
    swiglu limit is reached)."""
    model = tiny_model(model_type)
    blk = next(b for b in model.model.layers if hasattr(b.mlp, "experts")).mlp
    experts = blk.experts
    assert not hasattr(experts, "act_fn")
    act = experts_act_fn(experts)
    assert isinstance(act, GatedActivation)
    x = torch.randn(16, experts.gate_up_proj.shape[2], generator=torch.Generator().manual_seed(0)) * 40
    with torch.no_grad():
        for e in (0, 3):
            want, got = _module_forward(experts, x, e), _ours(experts, x, e)
            gate = x @ experts.gate_up_proj[e].t()
            assert gate.abs().max() > experts.swiglu_limit  # the clamp is exercised
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            silu = (F.silu(gate.chunk(2, -1)[0]) * gate.chunk(2, -1)[1]) @ experts.down_proj[e].t()
            assert not torch.allclose(silu, want, rtol=1e-3, atol=1e-3)  # a plain SwiGLU would be wrong here
    with pytest.raises(TypeError, match="gated activation of \\(gate, up\\)"):
        act(torch.zeros(3))


class _NamelessExperts(nn.Module):
    """Experts computing ``silu(gate) * up`` with the activation under another name than ``act_fn``."""

    def __init__(self, e: int = 4, h: int = 32, i: int = 16) -> None:
        super().__init__()
        self.num_experts = e
        self.gate_up_proj = nn.Parameter(torch.randn(e, 2 * i, h))
        self.down_proj = nn.Parameter(torch.randn(e, h, i))
        self.nonlinearity = nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for k, e in enumerate(top_k_index[t].tolist()):
                g, u = F.linear(hidden_states[t], self.gate_up_proj[e]).chunk(2, dim=-1)
                out[t] += top_k_weights[t, k] * F.linear(self.nonlinearity(g) * u, self.down_proj[e])
        return out


def test_plain_activation_is_recognised_without_act_fn():
    """An experts module computing ``silu(gate) * up`` without an ``act_fn`` attribute gets ``F.silu`` (the fused
    op's activation), read from its forward."""
    assert experts_act_fn(_NamelessExperts()) is F.silu


def test_forward_that_mixes_features_is_refused():
    """A forward that is not elementwise in (gate, up) pairs (here: normalised over features) is named."""
    model = tiny_model("hy_v4")
    experts = model.model.layers[1].mlp.experts
    orig = experts._apply_gate
    experts._apply_gate = lambda gate_up: orig(gate_up) / (1 + gate_up.abs().sum(-1, keepdim=True))
    with pytest.raises(UnsupportedArchitectureError, match=r"layers\.1\.mlp\.experts.*check: experts activation"):
        discover(model)


def test_gated_activation_is_differentiable():
    """Adapters train through the per-expert path: gradients reach gate and up as through the module's code."""
    experts = tiny_model("hy_v4").model.layers[1].mlp.experts
    glu = gated(experts_act_fn(experts))
    lim = experts.swiglu_limit
    g = torch.Generator().manual_seed(0)
    gate = (torch.randn(5, 16, generator=g) * 2 * lim).requires_grad_()
    up = (torch.randn(5, 16, generator=g) * 2 * lim).requires_grad_()
    glu(gate, up).square().sum().backward()
    gate2, up2 = gate.detach().clone().requires_grad_(), up.detach().clone().requires_grad_()
    (F.silu(gate2.clamp(max=lim)) * up2.clamp(-lim, lim)).square().sum().backward()  # hy_v4's _apply_gate
    torch.testing.assert_close(gate.grad, gate2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(up.grad, up2.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("model_type", ["hy_v4", "minimax_m3_vl_text", "deepseek_v4"])
def test_layout_falls_back_to_the_forward_probe_for_a_gate_it_cannot_name(model_type):
    """expert_layout names act_fn(gate) * up and the clamped SwiGLU; a gate it cannot name (these families'
    ``_apply_gate``) is the forward probe's GatedActivation, kept on the module as it is (no conversion)."""
    from optimum_mc.expert_layout import canonical_experts, expert_act, experts_layout

    model = tiny_model(model_type)
    experts = next(m for m in model.modules() if hasattr(m, "_apply_gate") and hasattr(m, "gate_up_proj"))
    layout = experts_layout(experts)
    assert isinstance(layout.act_fn, GatedActivation)
    assert layout.canonical and not layout.bias
    assert canonical_experts(experts) is experts
    assert expert_act(experts, 0) is layout.act_fn  # cached on the module: one probe
