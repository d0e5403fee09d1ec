"""gpt-oss (transposed experts, interleaved gate/up columns, expert biases, clamped SwiGLU) and Aria (transposed
experts): the layout read from the modules, the exact conversion into MC's layout, MCExperts with biases against
the float module, and quantize -> save -> reload on tiny random models."""

from __future__ import annotations

import pytest
import torch
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module
from torch import nn

from optimum_mc.architectures import discover, get_architecture, moe_blocks
from optimum_mc.errors import UnsupportedArchitectureError
from optimum_mc.expert_layout import CanonicalExperts, canonical_experts, canonical_tensors, experts_layout
from optimum_mc.kernels.activations import ClampedSwiGLU
from optimum_mc.nn import MCExperts
from optimum_mc.tools.families import IDS, tiny_config, tiny_model


def _routed(experts, tokens=24, k=2, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    e = int(experts.num_experts)
    x = torch.randn(tokens, experts.gate_up_proj.shape[1 if experts_layout(experts).transposed else 2], generator=g)
    idx = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(tokens)])
    w = torch.rand(tokens, k, generator=g).softmax(-1)
    return x * scale, idx, w


def _gpt_oss_experts():
    ex = tiny_model("gpt_oss").model.layers[0].mlp.experts
    with torch.no_grad():  # biases large enough to matter (the tiny model's are N(0, 0.08^2) like its weights)
        ex.gate_up_proj_bias.mul_(10)
        ex.down_proj_bias.mul_(10)
    return ex


def test_layouts_are_read_from_the_modules():
    gpt = experts_layout(tiny_model("gpt_oss").model.layers[0].mlp.experts)
    assert (gpt.num_experts, gpt.hidden, gpt.inter) == (8, 64, 64)
    assert gpt.transposed and gpt.interleaved and gpt.gate_up_bias and gpt.down_bias
    assert isinstance(gpt.act_fn, ClampedSwiGLU) and (gpt.act_fn.alpha, gpt.act_fn.limit) == (1.702, 7.0)
    aria = experts_layout(tiny_model("aria_text").model.layers[0].mlp.experts)
    assert aria.transposed and not aria.interleaved and not aria.bias and not hasattr(aria.act_fn, "glu")
    mix = experts_layout(tiny_model("mixtral").model.layers[0].mlp.experts)
    assert mix.canonical and not mix.bias


def test_discovery_works_on_the_meta_device():
    arch = get_architecture(tiny_config("gpt_oss"))  # built on the meta device: the gate is probed without weights
    assert (arch.block_attr, arch.router_attr, arch.experts_attr) == ("mlp", "router", "experts")
    assert arch.score_fn == "softmax" and arch.shared_expert_attrs == ()


def test_conversion_is_an_exact_permutation():
    ex = _gpt_oss_experts()
    t = canonical_tensors(ex, experts_layout(ex))
    i = ex.intermediate_size
    for e in (0, 5):
        # MC's row r of gate / up is transformers' column 2r / 2r + 1 of the transposed (H, 2I) matrix
        assert torch.equal(t["gate_up_proj"][e, :i], ex.gate_up_proj[e, :, 0::2].t())
        assert torch.equal(t["gate_up_proj"][e, i:], ex.gate_up_proj[e, :, 1::2].t())
        b = ex.gate_up_proj_bias[e]
        assert torch.equal(t["gate_up_proj_bias"][e], torch.cat([b[0::2], b[1::2]]))
        assert torch.equal(t["down_proj"][e], ex.down_proj[e].t())
        assert torch.equal(t["down_proj_bias"][e], ex.down_proj_bias[e])


@pytest.mark.parametrize("family", ["gpt_oss", "aria_text"])
def test_canonical_module_reproduces_the_original(family):
    ex = _gpt_oss_experts() if family == "gpt_oss" else tiny_model(family).model.layers[0].mlp.experts
    new = canonical_experts(ex)
    assert isinstance(new, CanonicalExperts)
    x, idx, w = _routed(ex, scale=20.0)  # large inputs: the clamps of gpt-oss's gate are hit
    with torch.no_grad():
        want, got = ex(x, idx, w), new(x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_a_gate_matching_no_candidate_is_refused():
    ex = tiny_model("gpt_oss").model.layers[0].mlp.experts
    ex._apply_gate = lambda h: h[..., ::2] * torch.tanh(h[..., 1::2])  # an unknown gate: never guessed
    with pytest.raises(UnsupportedArchitectureError, match=r"_apply_gate matches none.*check: experts activation"):
        experts_layout(ex)


def test_wrong_bias_shape_is_named():
    ex = tiny_model("gpt_oss").model.layers[0].mlp.experts
    ex.down_proj_bias = nn.Parameter(torch.zeros(8, 3))
    with pytest.raises(UnsupportedArchitectureError, match=r"down_proj_bias is \(8, 3\), expected \(8, 64\)"):
        experts_layout(ex)


@pytest.mark.parametrize("bits, bound", [(8, 0.01), (4, 0.15)])
def test_mc_experts_track_the_float_module(bits, bound):
    """Round-to-nearest MCExperts (biases kept in float) against GptOssExperts: relative output error."""
    ex = _gpt_oss_experts()
    mc = MCExperts.from_float(ex, [bits] * 8, group_size=32)
    assert mc.has_bias == (True, True) and mc.activation == "clamped_swiglu"  # the fused op, biases included
    x, idx, w = _routed(ex, scale=4.0)
    with torch.no_grad():
        want, got = ex(x, idx, w), mc(x, idx, w)
        # the fused op (C prefill here, C decode for 2 tokens) against the QuantLinear-by-QuantLinear loop
        loop = mc.forward_per_expert(x, idx, w)
        torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-5 * loop.abs().max().item())
        few = mc(x[:2], idx[:2], w[:2])
        torch.testing.assert_close(few, loop[:2], rtol=1e-5, atol=1e-5 * loop.abs().max().item())
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < bound, rel
    gb, db = mc.biases()  # kept exactly, in MC's row order
    t = canonical_tensors(ex, experts_layout(ex))
    assert torch.equal(gb, t["gate_up_proj_bias"]) and torch.equal(db, t["down_proj_bias"])


def _into_gpt_oss_layout(float_model, mc_model) -> None:
    """Write every MCExperts' dequantized weights and biases back into ``float_model``'s GptOssExperts, in
    gpt-oss's own layout (transposed, gate / up columns interleaved)."""
    for fb, qb in zip(moe_blocks(float_model), moe_blocks(mc_model)):
        (gu, dn), (gb, db) = qb.experts.dequantize(), qb.experts.biases()
        ex, i = fb.experts, fb.experts.intermediate_size
        with torch.no_grad():
            ex.gate_up_proj[:, :, 0::2] = gu[:, :i].transpose(1, 2)
            ex.gate_up_proj[:, :, 1::2] = gu[:, i:].transpose(1, 2)
            ex.gate_up_proj_bias[:, 0::2], ex.gate_up_proj_bias[:, 1::2] = gb[:, :i], gb[:, i:]
            ex.down_proj.copy_(dn.transpose(1, 2))
            ex.down_proj_bias.copy_(db)


def test_quantize_save_reload_generate(tmp_path):
    from transformers import AutoModelForCausalLM

    import optimum_mc
    from optimum_mc.tools.families import CORPUS, tiny_tokenizer

    src, dst = tmp_path / "float", tmp_path / "mc"
    model = tiny_model("gpt_oss")
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    qc = optimum_mc.MCConfig(
        bits=4, candidate_bits=[2, 3, 4], attn_bits=None, group_size=32, num_samples=4, seq_len=16, dataset=CORPUS,
        show_progress=False,
    )  # fmt: skip
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=qc)
    experts = [b.experts for b in moe_blocks(q)]
    assert all(isinstance(e, MCExperts) and e.has_bias == (True, True) for e in experts)
    with torch.no_grad():
        got = q(input_ids=ids).logits
    # 4-bit experts track the float model: 0.146 measured (mixtral's tiny model at the same settings: 0.159)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.25, rel
    # and are exactly transformers' gpt-oss forward on the quantized weights: layout, biases and gate all right
    _into_gpt_oss_layout(model, q)
    with torch.no_grad():
        same = model(input_ids=ids).logits
    torch.testing.assert_close(got, same, rtol=1e-4, atol=1e-4 * same.abs().max().item())
    q.save_pretrained(dst)
    again = AutoModelForCausalLM.from_pretrained(dst)
    with torch.no_grad():
        assert torch.equal(again(input_ids=ids).logits, got)
    b0 = [b.experts for b in moe_blocks(again)][0]
    assert torch.equal(b0.biases()[0], experts[0].biases()[0])
    assert again.generate(ids[:, :5], max_new_tokens=3, do_sample=False).shape[1] == 8
    # dequantize: float experts in MC's layout (the gpt-oss class cannot hold them) with the same forward
    again.dequantize()
    deq = [b.experts for b in moe_blocks(again)]
    assert all(isinstance(e, CanonicalExperts) for e in deq)
    with torch.no_grad():
        back = again(input_ids=ids).logits
    torch.testing.assert_close(back, got, rtol=1e-4, atol=1e-4 * got.abs().max().item())
    assert discover(again).experts_attr == "experts"


def test_biased_experts_compile_without_graph_breaks():
    ex = _gpt_oss_experts()
    mc = MCExperts.from_float(ex, [2, 3, 4, 2, 3, 4, 2, 3], group_size=32)
    x, idx, w = _routed(ex, tokens=8)
    explained = torch._dynamo.explain(mc)(x, idx, w)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(mc, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, idx, w), mc(x, idx, w), rtol=0, atol=0)


def test_op_biases_follow_the_bias_buffers():
    ex = _gpt_oss_experts()
    mc = MCExperts.from_float(ex, [4] * 8, group_size=32)
    x, idx, w = _routed(ex, tokens=3)
    with torch.no_grad():
        before = mc(x, idx, w)
        assert mc._op_biases()[0] is mc._op_biases()[0]  # built once
        mc.packed[idx[0, 0].item()].down.bias.add_(1.0)  # changed in place: the fused op sees it
        after = mc(x, idx, w)
    torch.testing.assert_close(after, mc.forward_per_expert(x, idx, w), rtol=1e-5, atol=1e-5)
    assert not torch.equal(before, after)
