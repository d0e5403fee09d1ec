"""ODP's rule per routing function: softmax top-2, softmax top-4 renormalized, sigmoid without renormalization
(DeepSeek-V3 / GLM-4.5 style, with a routed scaling factor), and softmax over all experts without renormalization.

For each: thresholds calibrated by ``calibrate_odp`` (the median ratio of a selected weight to the token's top-1
weight) make ODP skip a nonzero share; the top-1 expert of every token is kept; a dropped slot is exactly one whose
ratio is below the threshold; kept weights are rescaled to the original sum for a normalized router and untouched
for an un-normalized one; protected tokens keep all their experts.
"""

from __future__ import annotations

import pytest
import torch

import optimum_mc
from optimum_mc.architectures import moe_blocks
from optimum_mc.pruning.routing import routing_is_normalized
from optimum_mc.pruning.rule import slot_ratios
from optimum_mc.tools.families import tiny_model

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))

ROUTINGS = {
    "softmax-top2": ("mixtral", {}, True),
    "softmax-top4-normalized": ("qwen3_moe", dict(num_experts_per_tok=4, norm_topk_prob=True), True),
    "softmax-top4-unnormalized": ("qwen2_moe", dict(num_experts_per_tok=4, norm_topk_prob=False), False),
    "sigmoid-unnormalized-scaled": (
        "deepseek_v3",
        dict(norm_topk_prob=False, routed_scaling_factor=2.5, n_group=1, topk_group=1),
        False,
    ),
    "sigmoid-normalized": ("glm4_moe", dict(norm_topk_prob=True, n_group=1, topk_group=1), True),
}


def _routed(model, protect_ratio: float):
    """Per MoE layer: the router's own (weights, index) and the ones ODP hands to the experts."""
    blocks = list(moe_blocks(model))
    raw = {b.layer_idx: [] for b in blocks}
    seen = {b.layer_idx: [] for b in blocks}
    handles = [
        b.router.register_forward_hook(lambda m, a, o, i=b.layer_idx: raw[i].append((o[1].clone(), o[2].clone())))
        for b in blocks
    ]  # registered before ODP's hook: the router's own output
    optimum_mc.set_odp(model, True, protect_ratio=protect_ratio, layers=len(blocks))
    handles += [
        b.router.register_forward_hook(lambda m, a, o, i=b.layer_idx: seen[i].append((o[1].clone(), o[2].clone())))
        for b in blocks
    ]  # after ODP's: what the experts receive
    optimum_mc.reset_odp_stats(model)
    with torch.no_grad():
        model(input_ids=IDS)
    for h in handles:
        h.remove()
    return blocks, raw, seen


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_rule_per_routing_function(routing):
    family, overrides, normalized = ROUTINGS[routing]
    model = tiny_model(family, **overrides)
    blocks = list(moe_blocks(model))
    assert all(b.top_k >= 2 for b in blocks)
    assert [routing_is_normalized(b.router) for b in blocks] == [normalized] * len(blocks)
    thresholds, _ = optimum_mc.calibrate_odp(model, input_ids=IDS)
    blocks, raw, seen = _routed(model, protect_ratio=0.0)
    skipped = optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"]
    assert skipped > 0.05, f"{routing}: ODP skipped {skipped:.3f} of the slots"
    for b, thr in zip(blocks, thresholds):
        (w, idx), (w2, idx2) = raw[b.layer_idx][0], seen[b.layer_idx][0]
        w, idx = w.reshape(-1, w.shape[-1]).float(), idx.reshape(-1, idx.shape[-1])
        w2, idx2 = w2.reshape(w.shape).float(), idx2.reshape(idx.shape)
        ratio, is_top = slot_ratios(w)
        dropped = idx2 == b.num_experts
        assert not (dropped & is_top).any()  # the top-1 expert is always kept
        assert torch.equal(dropped, (ratio < thr) & ~is_top)  # exactly the slots below the threshold
        assert torch.equal(idx2[~dropped], idx[~dropped]) and (w2[dropped] == 0).all()
        if normalized:  # rescaled to the router's fixed sum
            torch.testing.assert_close(w2.sum(-1), w.sum(-1), rtol=1e-5, atol=1e-6)
        else:  # each kept expert keeps the weight the router gave it
            assert torch.equal(w2[~dropped], w[~dropped])


@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_protected_tokens_are_never_pruned(routing):
    family, overrides, _ = ROUTINGS[routing]
    model = tiny_model(family, **overrides)
    optimum_mc.calibrate_odp(model, input_ids=IDS)
    blocks, raw, seen = _routed(model, protect_ratio=1.0)  # every token protected: nothing dropped
    assert optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"] == 0.0
    for b in blocks:
        (w, idx), (w2, idx2) = raw[b.layer_idx][0], seen[b.layer_idx][0]
        assert torch.equal(idx2, idx) and torch.equal(w2, w)
    blocks, raw, seen = _routed(model, protect_ratio=0.25)  # a quarter of each sequence keeps all its experts
    for b in blocks:
        idx2 = seen[b.layer_idx][0][1].reshape(IDS.numel(), -1)
        pruned_tokens = int((idx2 == b.num_experts).any(-1).sum())
        assert pruned_tokens <= IDS.numel() - IDS.shape[0] * round(0.25 * IDS.shape[1])
