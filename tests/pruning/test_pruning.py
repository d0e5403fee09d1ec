"""Online dynamic pruning: the rule, token protection, importance vs eager attention, statistics, errors."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CORPUS, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc.architectures import decoder_layers, moe_blocks
from optimum_mc.errors import MCConfigError
from optimum_mc.pruning.importance import received_attention
from optimum_mc.pruning.rule import apply_drop, drop_mask, protected_tokens

IDS = torch.randint(3, 300, (2, 24), generator=torch.Generator().manual_seed(0))


def test_rule_matches_hand_computation():
    w = torch.tensor([[0.6, 0.4], [0.9, 0.1], [0.2, 0.8], [0.5, 0.3]])  # unsorted rows allowed
    drop = drop_mask(w, 0.5)
    assert drop.tolist() == [[False, False], [False, True], [True, False], [False, False]]
    idx = torch.tensor([[0, 1], [2, 3], [4, 5], [6, 7]])
    i2, w2 = apply_drop(idx, w, drop, 8)
    assert i2.tolist() == [[0, 1], [2, 8], [8, 5], [6, 7]]
    torch.testing.assert_close(w2.sum(-1), w.sum(-1))
    torch.testing.assert_close(w2[1], torch.tensor([1.0, 0.0]))


def test_protection_picks_top_tokens_per_sequence_and_skips_padding():
    imp = torch.tensor([[5.0, 1.0, 9.0, 3.0], [7.0, 8.0, 1.0, 2.0]])
    valid = torch.tensor([[True, True, True, True], [True, False, True, True]])
    prot = protected_tokens(imp, valid, 0.5)
    assert prot.tolist() == [[True, False, True, False], [True, False, False, True]]
    assert not protected_tokens(imp, valid, 0.0).any()


def _direct_received(q, k, valid_keys=None):
    b, h, lq, d = q.shape
    scores = q @ k.transpose(-1, -2) * d**-0.5
    allowed = torch.ones(lq, lq, dtype=torch.bool).tril().expand(b, 1, lq, lq).clone()
    if valid_keys is not None:
        allowed &= valid_keys[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs.sum(2).mean(1) / allowed[:, 0].sum(1).clamp_min(1)


def test_received_attention_is_column_mean():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 4, 300, 8, generator=g), torch.randn(2, 2, 300, 8, generator=g)
    got, valid = received_attention(q, k, None, None)
    torch.testing.assert_close(got, _direct_received(q, k.repeat_interleave(2, 1)), rtol=1e-5, atol=1e-6)
    assert valid.all()
    # left padding: two padded keys per row 0, boolean mask
    valid_keys = torch.ones(2, 300, dtype=torch.bool)
    valid_keys[0, :2] = False
    mask = torch.ones(300, 300, dtype=torch.bool).tril()[None, None] & valid_keys[:, None, None, :]
    got, valid = received_attention(q, k, mask, None)
    assert valid[0, :2].tolist() == [False, False] and valid[0, 2:].all()
    exp = _direct_received(q, k.repeat_interleave(2, 1), valid_keys)
    torch.testing.assert_close(got[valid], exp[valid], rtol=1e-5, atol=1e-6)


def test_importance_in_model_matches_eager_attention():
    model = tiny_model("mixtral")
    optimum_mc.set_odp(model, True, threshold=0.5, protect_ratio=0.1, layers=[0, 1])
    seen = {}

    def grab(i):
        def hook(mod, args, out):
            seen[i] = mod._mc_odp_state.received.clone()

        return hook

    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.register_forward_hook(grab(i))
    with torch.no_grad():
        model(input_ids=IDS)
    eager = tiny_model("mixtral")
    eager.set_attn_implementation("eager")
    optimum_mc.set_odp(eager, True, threshold=0.5, protect_ratio=0.1, layers=[0, 1])  # same routing changes
    with torch.no_grad():
        att = eager(input_ids=IDS, output_attentions=True).attentions
    n = IDS.shape[1]
    counts = torch.arange(n, 0, -1).float()
    for i in (0, 1):
        expected = att[i].sum(2).mean(1) / counts
        torch.testing.assert_close(seen[i], expected, rtol=1e-4, atol=1e-6)


def test_stats_are_exact_counts():
    model = tiny_model("mixtral")
    blocks = list(moe_blocks(model))
    raw = {b.layer_idx: [] for b in blocks}
    for b in blocks:  # registered before ODP's hook, so it sees the router's own output
        b.router.register_forward_hook(lambda m, a, o, i=b.layer_idx: raw[i].append(o[1].detach().clone()))
    optimum_mc.set_odp(model, True, threshold=0.7, protect_ratio=0.0, layers=[1])
    with torch.no_grad():
        model(input_ids=IDS)
    stats = optimum_mc.get_odp_stats(model)
    tokens = IDS.numel()
    dropped = int(drop_mask(raw[1][0], 0.7).sum())
    assert stats["layers"][0]["skipped_fraction"] == 0.0 and stats["layers"][0]["tokens"] == tokens
    assert stats["layers"][1]["expert_evaluations"] == tokens * 2 - dropped
    per_expert = 3 * 64 * 64
    assert stats["layers"][1]["active_expert_params_per_token"] == pytest.approx(
        (tokens * 2 - dropped) * per_expert / tokens
    )
    assert stats["total"]["skipped_fraction"] == pytest.approx(dropped / (2 * tokens * 2))
    optimum_mc.reset_odp_stats(model)
    assert optimum_mc.get_odp_stats(model)["total"]["tokens"] == 0


def test_odp_changes_only_pruned_tokens_and_disables_cleanly():
    model = tiny_model("mixtral")
    with torch.no_grad():
        base = model(input_ids=IDS).logits
        optimum_mc.set_odp(model, True, threshold=1.0, protect_ratio=0.0, layers=[0, 1])
        pruned = model(input_ids=IDS).logits
        optimum_mc.set_odp(model, False)
        again = model(input_ids=IDS).logits
    assert not torch.allclose(base, pruned) and torch.isfinite(pruned).all()
    torch.testing.assert_close(again, base)


def test_full_protection_is_identity():
    model = tiny_model("mixtral")
    with torch.no_grad():
        base = model(input_ids=IDS).logits
        optimum_mc.set_odp(model, True, threshold=1.0, protect_ratio=1.0, layers=[0, 1])
        torch.testing.assert_close(model(input_ids=IDS).logits, base, rtol=1e-5, atol=1e-5)


def test_topk_four_and_deepseek():
    for family in ("qwen2_moe", "deepseek_v3"):
        model = tiny_model(family)
        optimum_mc.set_odp(model, True, threshold=0.9, protect_ratio=0.0, layers=2)
        with torch.no_grad():
            out = model(input_ids=IDS).logits
        assert torch.isfinite(out).all()
        assert optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"] > 0


def test_generate_with_cache_and_padding():
    model = tiny_model("mixtral")
    optimum_mc.set_odp(model, True, threshold=0.6, protect_ratio=0.1, layers=[0, 1])
    ids = IDS[:, :10].clone()
    mask = torch.ones_like(ids)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (2, 14)
    stats = optimum_mc.get_odp_stats(model)["layers"][0]
    assert stats["tokens"] == int(mask.sum()) + 2 * 3  # prefill without padding + 3 decode steps x 2 rows


def test_float_model_calibrates_itself(tmp_path):
    path = save_tiny("mixtral", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(path)
    thr, scores = optimum_mc.calibrate_odp(model, input_ids=IDS)
    assert len(thr) == 2 and all(0 < t <= 1 for t in thr) and all(s >= 0 for s in scores)
    assert optimum_mc.set_odp(model, True) == [min(range(2), key=lambda i: (scores[i], i))]  # round(0.625*2)=1


def test_odp_from_config_at_load(tmp_path):
    path = save_tiny("mixtral", tmp_path / "f")
    cfg = optimum_mc.MCConfig(
        bits=2.5,
        group_size=32,
        num_samples=8,
        seq_len=32,
        dataset=CORPUS,
        show_progress=False,
        odp=True,
        odp_layers=[0, 1],
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg)
    qc = model.config.quantization_config
    assert len(qc.odp_thresholds) == 2 and len(qc.odp_layer_scores) == 2
    with torch.no_grad():
        model(input_ids=IDS)
    assert optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"] > 0
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(input_ids=IDS).logits, model(input_ids=IDS).logits)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"threshold": 0.0}, r"\(0, 1\]"),
        ({"threshold": 1.5}, r"\(0, 1\]"),
        ({"protect_ratio": -0.1}, r"\[0, 1\]"),
        ({"protect_ratio": 2}, r"\[0, 1\]"),
        ({"threshold": 0.5, "layers": [7]}, "not MoE layers"),
        ({"threshold": [0.5]}, "thresholds for 2"),
    ],
)
def test_bad_input(kwargs, match):
    with pytest.raises(MCConfigError, match=match):
        optimum_mc.set_odp(tiny_model("mixtral"), True, **kwargs)


def test_top1_model_rejected():
    with pytest.raises(MCConfigError, match="top-1"):
        optimum_mc.set_odp(tiny_model("mixtral", num_experts_per_tok=1), True, threshold=0.5)
