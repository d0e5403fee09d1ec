"""DBRX's MoE block, read by structure: experts stored as three stacked 2-D ``(E * I, H)`` matrices (which one is the
gate, the up and the down matrix read from the module's forward, optimum_mc/expert_layout.py) and a router that
returns logits only, the top-k done in the block (optimum_mc/topk_block.py). The adapter against transformers' own
block, readings it cannot make refused by name, and quantize -> save -> reload -> generate (+ ODP) on a tiny random
model, with the quantized model's logits against an independent reference: transformers' own DBRX holding the
dequantized weights (written into w1 / v1 / w2 by DBRX's documented layout, not by MC's reading)."""

from __future__ import annotations

import pytest
import torch
from helpers.dequantized import assert_matches_reference
from helpers.reload import reload_identical
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module
from torch import nn

from optimum_mc.architectures import decoder_layers, discover, layer_list_name, moe_blocks
from optimum_mc.errors import UnsupportedArchitectureError
from optimum_mc.expert_layout import CanonicalExperts, canonical_experts, experts_layout
from optimum_mc.stacked_experts import stacked_roles
from optimum_mc.tools.families import IDS, quick_config, save_tiny, tiny_config, tiny_model
from optimum_mc.topk_block import LogitsTopKRouter, TopKBlock, adapt_topk_blocks

FAMILY = "dbrx"


def _routing(tokens=16, experts=8, k=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, 64, generator=g)
    idx = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    return x, idx, torch.rand(tokens, k, generator=g)


class _Stacked(nn.Module):
    """Stacked experts under other names and in another order than DBRX's: ``a`` is the down matrix (stored
    (I, H) per expert), ``b`` the up and ``c`` the gate one; GELU between."""

    def __init__(self, e=4, i=16, h=64):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.num_experts, self.i, self.h = e, i, h
        self.a, self.b, self.c = (nn.Parameter(torch.randn(e * i, h, generator=g) * 0.1) for _ in range(3))
        self.act = nn.GELU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for s in range(top_k_index.shape[1]):
                e = int(top_k_index[t, s])
                d, u, gw = (p.view(self.num_experts, self.i, self.h)[e] for p in (self.a, self.b, self.c))
                x = hidden_states[t]
                out[t] += top_k_weights[t, s] * ((self.act(gw @ x) * (u @ x)) @ d)
        return out


def test_stacked_experts_are_read_from_the_module():
    ex = tiny_model(FAMILY).transformer.blocks[0].ffn.experts
    lay = experts_layout(ex)
    assert lay.stacked and not lay.canonical and (lay.num_experts, lay.hidden, lay.inter) == (8, 64, 64)
    assert stacked_roles(ex, lay.inter, lay.act_fn) == ("mlp.w1", "mlp.v1", "mlp.w2")  # DBRX's gate, up, down
    new = canonical_experts(ex)
    assert isinstance(new, CanonicalExperts) and tuple(new.gate_up_proj.shape) == (8, 128, 64)
    x, idx, w = _routing()
    with torch.no_grad():
        want, got = ex(x, idx, w).reshape(16, 64), new(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))

    other = _Stacked()  # other names, other order: read by what the forward computes
    lay = experts_layout(other)
    assert lay.stacked and (lay.num_experts, lay.hidden, lay.inter) == (4, 64, 16)
    assert stacked_roles(other, lay.inter, lay.act_fn) == ("c", "b", "a")
    x, idx, w = _routing(experts=4)
    with torch.no_grad():
        want, got = other(x, idx, w), canonical_experts(other)(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max()))


def test_adapter_reproduces_the_block():
    model = tiny_model(FAMILY)
    original = model.transformer.blocks[0].ffn
    x = torch.randn(1, 12, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, want_logits = original(x), original.router(x)
    assert adapt_topk_blocks(model.transformer.blocks) == 2
    block = model.transformer.blocks[0].ffn
    assert isinstance(block, TopKBlock) and isinstance(block.router, LogitsTopKRouter)
    assert block.router.kind == "softmax_topk" and block.router.top_k == 2  # softmax, top-k, / L1 norm
    assert block.router.layer.weight is original.router.layer.weight  # same tensors, same checkpoint names
    assert (
        set(block.state_dict())
        == set(original.state_dict())
        == {
            "router.layer.weight",
            "experts.mlp.w1",
            "experts.mlp.v1",
            "experts.mlp.w2",
        }
    )
    with torch.no_grad():
        logits, weights, index = block.router(x)
        got = block(x)
    assert torch.equal(logits, want_logits)
    torch.testing.assert_close(weights.sum(-1), torch.ones(12))
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-5 * want.abs().max()
    block.check_original()  # no error; the replaced block is dropped
    assert "_mc_original" not in block.__dict__
    arch = discover(model)
    assert (arch.block_attr, arch.router_attr, arch.experts_attr, arch.score_fn) == (
        "ffn",
        "router",
        "experts",
        "softmax",
    )
    assert decoder_layers(model) is model.transformer.blocks and layer_list_name(model) == "blocks"


def test_block_top_k_readings():
    """Without normalization the weights are the softmax over all experts; a p-norm of 2 is no score function the
    adapter has: refused by name."""
    ffn = tiny_config(FAMILY).ffn_config.to_dict()
    model = tiny_model(FAMILY, ffn_config={**ffn, "moe_normalize_expert_weights": None})
    adapt_topk_blocks(model.transformer.blocks)
    assert model.transformer.blocks[0].ffn.router.kind == "softmax_all"
    model = tiny_model(FAMILY, ffn_config={**ffn, "moe_normalize_expert_weights": 2.0})
    with pytest.raises(UnsupportedArchitectureError, match=r"DbrxFFN.*no score function.*check: block top-k"):
        adapt_topk_blocks(model.transformer.blocks)


def test_adapter_that_differs_from_the_block_is_refused():
    model = tiny_model(FAMILY)
    adapt_topk_blocks(model.transformer.blocks)
    block = model.transformer.blocks[0].ffn
    block.router.kind = "softmax_all"  # a wrong reading of the block's top-k
    with pytest.raises(UnsupportedArchitectureError, match=r"DbrxFFN.*check: block top-k"):
        block.check_original()


def _reference(q, src):
    """transformers' own DBRX from ``src`` with every packed weight of ``q`` dequantized into it (experts by DBRX's
    layout: w1 the gate rows, v1 the up rows, w2 the down matrix transposed, each (E * I, H))."""
    from transformers import AutoModelForCausalLM

    from optimum_mc.nn import MCExperts, QuantLinear

    ref = AutoModelForCausalLM.from_pretrained(src).eval()
    done = 0
    with torch.no_grad():
        for name, m in q.named_modules():
            if isinstance(m, MCExperts):
                gu, dn = m.dequantize()  # (E, 2I, H) / (E, H, I)
                glu = ref.get_submodule(name).mlp
                e, i = gu.shape[0], gu.shape[1] // 2
                glu.w1.copy_(gu[:, :i].reshape(e * i, -1))
                glu.v1.copy_(gu[:, i:].reshape(e * i, -1))
                glu.w2.copy_(dn.transpose(1, 2).reshape(e * i, -1))
                done += 1
            elif isinstance(m, QuantLinear) and ".packed." not in name:
                ref.get_submodule(name).weight.copy_(m.dequantize_weight())
    assert done == 2
    return ref


def test_quantize_save_reload_generate_against_reference(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import optimum_mc
    from optimum_mc.nn import MCExperts

    src, dst = save_tiny(FAMILY, str(tmp_path / "float")), str(tmp_path / "mc")
    compared, check = [], TopKBlock.check_original

    def recording_check(self):
        real = "_mc_original" in self.__dict__ and not self.router.layer.weight.is_meta
        check(self)
        compared.append(real and "_mc_original" not in self.__dict__)

    monkeypatch.setattr(TopKBlock, "check_original", recording_check)
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=quick_config())
    block = q.transformer.blocks[0].ffn
    assert isinstance(block, TopKBlock) and isinstance(block.experts, MCExperts)
    assert compared == [True, True]  # each adapter compared with transformers' block on the real weights
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = q(input_ids=ids).logits

    again = reload_identical(q, dst)  # every tensor bit-identical
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)

    ref = _reference(again, src)
    assert type(ref.transformer.blocks[0].ffn).__name__ == "DbrxFFN"  # transformers' own block
    assert_matches_reference(again, logits, ref, ids)

    # ODP at the calibrated thresholds, no token protection: the reference's block with the same slots dropped and
    # the kept weights renormalized (its weights sum to 1)
    assert optimum_mc.set_odp(again, True, layers=2, protect_ratio=0.0) == [0, 1]
    thresholds = again.config.quantization_config.odp_thresholds
    for blk, thr in zip(ref.transformer.blocks, thresholds):
        route = blk.ffn.route_tokens_to_experts

        def dropped(logits, route=route, thr=thr):
            w, i = route(logits)
            w = w.masked_fill(w < thr * w.max(-1, keepdim=True).values, 0.0)
            return w / w.sum(-1, keepdim=True), i

        blk.ffn.route_tokens_to_experts = dropped
    with torch.no_grad():
        pruned, want_pruned = again(input_ids=ids).logits, ref(input_ids=ids).logits
    assert 0 < optimum_mc.get_odp_stats(again)["total"]["skipped_fraction"] < 0.6
    assert not torch.equal(pruned, logits)
    err = float((pruned - want_pruned).abs().max())
    assert err <= 1e-4 * float(want_pruned.abs().max()), err
    assert [b.layer_idx for b in moe_blocks(again)] == [0, 1]

    # model.dequantize(): float experts (MC's layout) behind the same adapter blocks, the same logits
    optimum_mc.set_odp(again, False)
    again.dequantize()
    assert isinstance(again.transformer.blocks[0].ffn.experts, CanonicalExperts)
    with torch.no_grad():
        err = float((again(input_ids=ids).logits - logits).abs().max())
    assert err <= 1e-4 * float(logits.abs().max()), err
