"""Llama 4's MoE block (dense-score router, experts on inputs scaled by the scores, shared expert) as MC's
router / experts pair (optimum_mc/input_scaled.py): the adapter against transformers' own block, a structure the
adapter cannot read refused by name, and quantize -> save -> reload -> generate (+ ODP) on a tiny random model,
with the quantized model's logits against an independent reference: transformers' own (unadapted) Llama 4 holding
the dequantized weights."""

from __future__ import annotations

import pytest
import torch
from helpers.dequantized import assert_matches_reference, dequantized_reference
from helpers.reload import reload_identical
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module
from torch import nn

from optimum_mc.architectures import discover, moe_blocks
from optimum_mc.errors import UnsupportedArchitectureError
from optimum_mc.input_scaled import InputScaledMoE, RoutedExperts, TopKRouter, adapt_input_scaled_blocks
from optimum_mc.tools.families import IDS, quick_config, save_tiny, tiny_model

FAMILY = "llama4_text"


def _x(tokens=12, hidden=64, seed=1):
    return torch.randn(1, tokens, hidden, generator=torch.Generator().manual_seed(seed))


def test_adapter_reproduces_the_block():
    model = tiny_model(FAMILY)
    original = model.model.layers[0].feed_forward
    x = _x()
    with torch.no_grad():
        want_out, want_logits = original(x)
    assert adapt_input_scaled_blocks(model.model.layers) == 1  # layer 1 is dense
    block = model.model.layers[0].feed_forward
    assert isinstance(block, InputScaledMoE) and isinstance(block.router, TopKRouter)
    assert isinstance(block.experts, RoutedExperts) and block.router.kind == "sigmoid_topk"
    assert block.router.weight is original.router.weight  # same parameters, same checkpoint names
    assert set(block.state_dict()) == set(original.state_dict())
    with torch.no_grad():
        got_out, got_logits = block(x)
    assert got_out.shape == want_out.shape and torch.equal(got_logits, want_logits)
    assert (got_out - want_out).abs().max() <= 1e-5 * want_out.abs().max()
    block.check_original()  # no error; the replaced block is dropped
    assert "_mc_original" not in block.__dict__
    arch = discover(model)
    assert (arch.block_attr, arch.router_attr, arch.experts_attr) == ("feed_forward", "router", "experts")
    assert arch.shared_expert_attrs == ("shared_expert",) and arch.score_fn == "sigmoid"


def test_adapter_that_differs_from_the_block_is_refused():
    model = tiny_model(FAMILY)
    adapt_input_scaled_blocks(model.model.layers)
    block = model.model.layers[0].feed_forward
    block.router.kind = "softmax_topk"  # a wrong reading of the router
    with pytest.raises(UnsupportedArchitectureError, match=r"Llama4TextMoe.*check: input-scaled experts"):
        block.check_original()


def test_inputs_are_scaled_not_outputs():
    """f(w x) != w f(x): the routed part must equal the original, and differ from output weighting."""
    model = tiny_model(FAMILY)
    adapt_input_scaled_blocks(model.model.layers)
    block = model.model.layers[0].feed_forward
    x = _x().reshape(-1, 64)
    with torch.no_grad():
        _, w, idx = block.router(x)
        routed = block.routed(x, idx, w)
        output_weighted = block.experts(x, idx, w)
    assert (routed - output_weighted).abs().max() > 1e-3 * routed.abs().max()


def test_dropped_slot_is_skipped():
    """A slot marked dropped (index E, weight 0, as ODP marks it) contributes nothing: the same as the original
    block with that expert's score set to 0."""
    model = tiny_model(FAMILY)
    original = model.model.layers[0].feed_forward
    adapt_input_scaled_blocks(model.model.layers)
    block = model.model.layers[0].feed_forward
    x = _x().reshape(-1, 64)
    with torch.no_grad():
        _, w, idx = block.router(x)
        idx2, w2 = idx.clone(), w.clone()
        idx2[:, 1], w2[:, 1] = 8, 0.0
        got = block.routed(x, idx2, w2)
        # original experts on the original's dense layout: score of the second slot set to 0
        scores = torch.zeros(x.shape[0], 8).scatter(1, idx[:, :1], w[:, :1])
        rows = (x.repeat(8, 1) * scores.t().reshape(-1, 1)).reshape(8 * x.shape[0], 64)
        want = original.experts(rows).reshape(8, x.shape[0], 64).sum(0)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()


class _TanhRouter(nn.Linear):
    """Dense scores that are no top-k score function of the logits."""

    def __init__(self, hidden, experts):
        super().__init__(hidden, experts, bias=False)
        self.top_k = 2

    def forward(self, hidden_states):
        logits = super().forward(hidden_states)
        top, index = torch.topk(logits, self.top_k, dim=1)
        return torch.zeros_like(logits).scatter(1, index, torch.tanh(top)), logits


def test_unreadable_router_is_named():
    model = tiny_model(FAMILY)
    model.model.layers[0].feed_forward.router = _TanhRouter(64, 8)
    with pytest.raises(UnsupportedArchitectureError, match=r"layers\.0\.feed_forward\.router.*check: router"):
        discover(model)


def test_quantize_save_reload_generate_against_reference(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    import optimum_mc
    from optimum_mc.nn import MCExperts

    src, dst = save_tiny(FAMILY, str(tmp_path / "float")), str(tmp_path / "mc")
    qc = quick_config()
    compared, check = [], InputScaledMoE.check_original

    def recording_check(self):
        real = "_mc_original" in self.__dict__ and not self.experts.gate_up_proj.is_meta
        check(self)
        compared.append(real and "_mc_original" not in self.__dict__)

    monkeypatch.setattr(InputScaledMoE, "check_original", recording_check)
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc)
    block = q.model.layers[0].feed_forward
    assert isinstance(block, InputScaledMoE) and isinstance(block.experts, MCExperts)
    assert compared == [True]  # the adapter was compared with transformers' block on the real weights
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = q(input_ids=ids).logits

    # save -> reload: every tensor bit-identical, logits equal
    again = reload_identical(q, dst)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, logits)

    # against transformers' own block on the dequantized weights (fp32; kernels vs reference matmuls)
    ref = dequantized_reference(again, src)
    assert type(ref.model.layers[0].feed_forward).__name__ == "Llama4TextMoe"  # transformers' own block
    assert_matches_reference(again, logits, ref, ids)

    # ODP at the calibrated threshold: equal to the reference with the same slots' scores zeroed (sigmoid scores are
    # not renormalized: the kept weights stay as they are)
    assert optimum_mc.set_odp(again, True, layers=1) == [0]
    thr = again.config.quantization_config.odp_thresholds[0]

    def drop_hook(mod, args, out):
        scores, router_logits = out
        top1 = scores.max(-1, keepdim=True).values
        return scores.masked_fill(scores < thr * top1, 0.0), router_logits

    handle = ref.model.layers[0].feed_forward.router.register_forward_hook(drop_hook)
    with torch.no_grad():
        pruned, want_pruned = again(input_ids=ids).logits, ref(input_ids=ids).logits
    handle.remove()
    stats = optimum_mc.get_odp_stats(again)["total"]
    assert 0 < stats["skipped_fraction"] < 0.5
    assert not torch.equal(pruned, logits)
    err = float((pruned - want_pruned).abs().max())
    assert err <= 1e-4 * float(want_pruned.abs().max()), err
    assert [b.layer_idx for b in moe_blocks(again)] == [0]

    # model.dequantize(): float experts behind the same adapter block, the same logits
    optimum_mc.set_odp(again, False)
    again.dequantize()
    assert not isinstance(again.model.layers[0].feed_forward.experts, MCExperts)
    with torch.no_grad():
        err = float((again(input_ids=ids).logits - logits).abs().max())
    assert err <= 1e-4 * float(logits.abs().max()), err
