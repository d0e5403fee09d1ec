"""Routers that score more experts than the experts module holds: longcat_flash's zero-computation (identity)
experts (indices ``[E, E + Z)`` the block computes as ``w * x`` itself) and inkling's shared experts scored with the
routed ones. Found by the router weight's shape (``(R, H)``, ``R > E``); MC quantizes the ``E`` real experts, leaves
the others to the block, and ODP marks a dropped slot outside both ranges. Checked on tiny random models against an
independent reference: transformers' own float model holding the dequantized weights."""

from __future__ import annotations

import torch
from helpers.dequantized import dequantized_reference
from helpers.reload import reload_identical
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module

from optimum_mc.architectures import discover, moe_blocks
from optimum_mc.calibration.capture import RoutingCapture
from optimum_mc.tools.families import IDS, quick_config, save_tiny, tiny_model

REL_TOL = 1e-4  # packed kernels vs float matmuls on the same (dequantized) weights, fp32


def test_zero_experts_are_read_from_the_router():
    model = tiny_model("longcat_flash")
    cfg = model.config
    arch = discover(model)
    (blk,) = [b for b in moe_blocks(model) if b.layer_idx == 0]
    assert (arch.router_attr, arch.experts_attr) == ("router", "experts")
    assert blk.num_experts == cfg.n_routed_experts == 8
    assert blk.router_classes == cfg.n_routed_experts + cfg.zero_expert_num == 10


def test_capture_skips_zero_experts():
    """Calibration counts only real experts; a slot the block sends to a real expert with weight 0 (longcat's
    identity slots) is no calibration token of that expert."""
    model = tiny_model("longcat_flash")
    arch = discover(model)
    blk = next(iter(moe_blocks(model)))
    cap = RoutingCapture(arch, blk.router, blk.experts)
    x = torch.randn(1, 40, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, w, idx = blk.router.forward(x)  # (not __call__: only the block's own call is captured)
        blk.block(x)
    cap.remove()
    real = idx < 8
    assert (~real).any() and real.any()  # both kinds occur
    assert cap.counts.sum() == real.sum()
    assert sum(len(t.ids()) for t in cap.experts) == int(real.sum())


def _quantize(family, tmp_path):
    from transformers import AutoModelForCausalLM

    src, dst = save_tiny(family, str(tmp_path / "float")), str(tmp_path / "mc")
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=quick_config())
    return reload_identical(q, dst), src


def _close(got, want):
    err = float((got - want).abs().max())
    assert err <= REL_TOL * float(want.abs().max()), err
    return err


def test_longcat_quantized_against_reference_with_odp(tmp_path):
    import optimum_mc

    q, src = _quantize("longcat_flash", tmp_path)
    ref = dequantized_reference(q, src)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        _close(q(input_ids=ids).logits, ref(input_ids=ids).logits)
    assert torch.equal(
        q.generate(ids[:, :5], max_new_tokens=4, do_sample=False),
        ref.generate(ids[:, :5], max_new_tokens=4, do_sample=False),
    )

    # ODP: the reference drops the same slots by zeroing their weights (softmax scores times a scaling factor are
    # not renormalized: the kept weights stay); its router output also gives the expected statistics
    layers = [b.layer_idx for b in moe_blocks(q)]
    optimum_mc.set_odp(q, True, layers=len(layers))
    thr = dict(zip(layers, q.config.quantization_config.odp_thresholds))
    seen = {"real": 0, "kept": 0}

    def drop_hook(idx):
        def hook(mod, args, out):
            logits, w, index = out
            top1 = w.max(-1, keepdim=True).values
            drop = (w < thr[idx] * top1) & (w < top1)
            real = index < q.config.n_routed_experts
            seen["real"] += int(real.sum())
            seen["kept"] += int((real & ~drop).sum())
            return logits, w.masked_fill(drop, 0.0), index

        return hook

    handles = [ref.model.layers[i].mlp.router.register_forward_hook(drop_hook(i)) for i in layers]
    with torch.no_grad():
        pruned, want = q(input_ids=ids).logits, ref(input_ids=ids).logits
    for h in handles:
        h.remove()
    _close(pruned, want)
    stats = optimum_mc.get_odp_stats(q)["total"]
    assert stats["expert_evaluations"] == seen["kept"] < seen["real"]  # identity slots are no expert slots
    assert abs(stats["skipped_fraction"] - (1 - seen["kept"] / seen["real"])) < 1e-9


def test_inkling_router_scoring_shared_experts(tmp_path):
    """inkling's router weight has a row per shared expert after the routed ones; its outputs cover the routed
    experts only. The model quantizes, reloads bit-exactly and matches the dequantized reference."""
    q, src = _quantize("inkling_text", tmp_path)
    blk = next(iter(moe_blocks(q)))
    assert blk.router_classes == blk.num_experts + q.config.n_shared_experts
    ref = dequantized_reference(q, src)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        _close(q(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_zaya_router_mlp_with_a_skip_expert(tmp_path):
    """zaya's router is an MLP (hidden -> router width -> E + 1 classes, the last a skip expert it hands to the
    experts as expert 0 with weight 0): found as the block's child with ``top_k`` scoring >= E classes. Skip slots
    are no calibration tokens of expert 0; the quantized model reloads bit-exactly and matches the reference."""
    model = tiny_model("zaya")
    arch = discover(model)
    blk = next(iter(moe_blocks(model)))
    assert arch.router_attr == "gate" and blk.router_classes == blk.num_experts + 1
    with torch.no_grad():
        blk.router.balancing_biases[-1] = 0.2  # the skip expert chosen often
    cap = RoutingCapture(arch, blk.router, blk.experts)
    skipped = []
    handle = blk.router.register_forward_hook(lambda m, a, out: skipped.append(int((out[1] == 0).sum())))
    with torch.no_grad():
        model(input_ids=torch.tensor(IDS))
    cap.remove()
    handle.remove()
    routed = sum(len(t.ids()) for t in cap.experts)
    assert 0 < skipped[0] < cap.tokens
    assert routed == cap.counts.sum() == cap.tokens - skipped[0]  # top-1: one slot per token
    q, src = _quantize("zaya", tmp_path)
    ref = dequantized_reference(q, src)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        _close(q(input_ids=ids).logits, ref(input_ids=ids).logits)


def test_two_argument_gate_is_read_from_the_forward():
    """inkling2's experts call ``act_fn(gate, up)`` (a softcapped SwiGLU module), not ``act_fn(gate) * up``: the
    gate is read from the module's forward and the converted experts reproduce the original."""
    from optimum_mc.expert_activation import GatedActivation
    from optimum_mc.expert_layout import experts_layout

    ex = tiny_model("inkling2_text").model.layers[0].mlp.experts
    layout = experts_layout(ex)
    assert isinstance(layout.act_fn, GatedActivation) and layout.canonical
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, generator=g) * 8
    idx = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(6)])
    w = torch.rand(6, 2, generator=g)
    gate, up = (x @ ex.gate_up_proj[idx[0, 0]].t()).chunk(2, dim=-1)
    assert torch.allclose(layout.act_fn.glu(gate, up), ex.act_fn(gate, up), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert ex(x, idx, w).shape == x.shape


def test_pending_layer_keeps_the_layers_plain_attributes():
    """A parked layer's placeholder answers what a model's layer loop reads before calling it (inkling2 picks
    each layer's mask by the class attribute ``attention_type``)."""
    from optimum_mc.calibration.layer_source import PendingLayer

    layer = tiny_model("inkling2_text").model.layers[0]
    pending = PendingLayer(0, layer)
    assert pending.attention_type == type(layer).attention_type and pending.index == 0
    assert not list(pending.parameters())
