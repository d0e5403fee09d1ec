"""Structures some families add to the shared MoE interface, read from the modules: a decoder layer that is its
own MoE block (gemma4: router and experts next to the dense MLP), a router without ``top_k`` (its output tells),
per-layer arguments of the model's layer loop (gemma4's per-layer input embeddings, passed positionally), and a
multimodal wrapper whose vision / audio towers stay float (the decoder layers are found through
``get_decoder()``; the towers' layer lists never feed a decoder layer). The end-to-end check of every family is
tests/test_families.py."""

from __future__ import annotations

import torch
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module
from torch import nn

from optimum_mc.architectures import decoder_layers, discover, moe_blocks, router_top_k
from optimum_mc.calibration.layer_source import _other_layer_lists
from optimum_mc.calibration.sequential import capture_layer_inputs, run_layer
from optimum_mc.tools.families import IDS, tiny_config, tiny_model


def test_decoder_layer_as_its_own_moe_block():
    model = tiny_model("gemma4_text")
    arch = discover(model)
    assert (arch.block_attr, arch.router_attr, arch.experts_attr) == ("", "router", "experts")
    assert arch.shared_expert_attrs == ("mlp",)  # the dense MLP beside the experts; never the attention
    blocks = list(moe_blocks(model))
    assert [b.layer_idx for b in blocks] == [0, 1] and blocks[0].block is model.model.layers[0]
    assert not hasattr(blocks[0].router, "top_k") and blocks[0].top_k == 2  # read from the router's output


def test_router_top_k_is_probed_on_the_meta_device():
    with torch.device("meta"):
        model = type(tiny_model("gemma4_text"))(tiny_config("gemma4_text"))
    assert router_top_k(model.model.layers[0].router) == 2
    assert router_top_k(nn.Linear(64, 8)) is None  # logits only


def test_per_layer_arguments_are_captured():
    model = tiny_model("gemma4_text")
    ids = torch.tensor(IDS)
    (batch,) = capture_layer_inputs(model, ids, batch_size=1)
    assert batch.args and batch.per_layer and 1 in batch.per_layer  # per_layer_inputs[:, :, i], positional
    a0, a1 = batch.inputs(0)[0][0], batch.inputs(1)[0][0]
    assert a0.shape == a1.shape and not torch.equal(a0, a1)
    # layer by layer equals the model's own loop
    h = [batch]
    for i, layer in enumerate(decoder_layers(model)):
        h = run_layer(layer, h, idx=i)
    with torch.no_grad():
        want = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(model.model.norm(h[0].hidden), want, rtol=1e-5, atol=1e-5)


def test_same_arguments_for_every_layer_are_kept_once():
    (batch,) = capture_layer_inputs(tiny_model("mixtral"), torch.tensor(IDS), batch_size=1)
    assert batch.per_layer is None and batch.args == ()


def test_multimodal_wrapper_towers_stay_float(tmp_path):
    from transformers import AutoModelForCausalLM

    from optimum_mc.nn import MCExperts, QuantLinear
    from optimum_mc.tools.families import quick_config, save_tiny

    src = save_tiny("gemma4", str(tmp_path / "float"))
    float_model = AutoModelForCausalLM.from_pretrained(src)
    assert decoder_layers(float_model) is float_model.model.language_model.layers
    assert _other_layer_lists(float_model, decoder_layers(float_model)) == ["audio_tower.layers.", "encoder.layers."]
    q = AutoModelForCausalLM.from_pretrained(src, quantization_config=quick_config())
    towers = [n for n, _ in q.model.named_children() if n != "language_model"]
    assert {"vision_tower", "audio_tower"} <= set(towers)
    for name in towers:
        packed = [n for n, m in getattr(q.model, name).named_modules() if isinstance(m, (QuantLinear, MCExperts))]
        assert not packed, (name, packed)
        fsd, qsd = getattr(float_model.model, name).state_dict(), getattr(q.model, name).state_dict()
        assert fsd.keys() == qsd.keys() and all(torch.equal(fsd[k], qsd[k]) for k in fsd)
    assert any(isinstance(m, MCExperts) for m in q.model.language_model.modules())


def test_layer_tensors_stored_outside_the_layer_prefix_are_streamed():
    """inkling2's checkpoint stores layer i's ``mlp_input.query`` as ``attn_res.mlp_queries.<i>``: transformers'
    conversion mapping names its layer, so the layer streamer reads it with layer i."""
    from transformers.conversion_mapping import get_model_conversion_mapping

    from optimum_mc.calibration.layer_source import _key_renamer, _merged_transforms

    model = tiny_model("inkling2_text")
    rename = _key_renamer(get_model_conversion_mapping(model, None, None))
    assert rename("model.llm.attn_res.mlp_queries.1") == "model.layers.1.mlp_input.query"
    assert rename("model.llm.norm.weight") == "model.norm.weight"
    mapping = get_model_conversion_mapping(model, None, None)
    again = get_model_conversion_mapping(model, None, None)  # equal transforms from another copy: kept once
    assert len(_merged_transforms(mapping[:3], again[:5])) == 5


def test_tiny_configs_keep_what_the_family_validates():
    """Sizes derived for the tiny configs keep the relations the families' configs validate: a per-layer head_dim
    that is qk_nope_head_dim + qk_rope_head_dim at full size is their tiny sum (dots3_note's sliding layers), a
    per-layer list of layer indices follows the kept layers (kolibri1_1's kv_source_layers: layer 4 of the full
    config, read by layers 9 and 14 there, is the tiny model's layer 1), and a config split into parts is sized part
    by part (dbrx's ffn_config / attn_config)."""
    full = tiny_config("dots3_note_text").__class__()
    sliding = full.layer_types.index("sliding_attention")
    fl = full.per_layer_config[sliding]
    assert fl.head_dim == fl.qk_nope_head_dim + fl.qk_rope_head_dim
    g = full.to_dict()  # (global sizes: not a rule of the family)
    assert g["head_dim"] != g["qk_nope_head_dim"] + g["qk_rope_head_dim"]
    tiny = tiny_config("dots3_note_text")
    tl = tiny.per_layer_config[tiny.layer_types.index("sliding_attention")]
    assert tl.head_dim == tl.qk_nope_head_dim + tl.qk_rope_head_dim and tl.head_dim < 64

    kol = tiny_config("kolibri1_1")
    assert kol.layer_types == ["sliding_attention", "indexed_attention"] and kol.kv_source_layers == [0, 1]

    dbrx = tiny_config("dbrx")
    assert (dbrx.d_model, dbrx.n_layers, dbrx.ffn_config.hidden_size) == (64, 2, 64)
    assert (dbrx.ffn_config.moe_num_experts, dbrx.ffn_config.moe_top_k, dbrx.attn_config.kv_n_heads) == (8, 2, 2)


def test_layer_loop_unpacking_more_than_the_hidden_states_is_captured():
    """kolibri1_1's layers return ``(hidden, index_pool)``: the capture's stand-ins return a tuple for it, so each
    layer gets its own attention type's mask (its indexed layer needs an explicit one), and layer by layer equals
    the model's own loop."""
    model = tiny_model("kolibri1_1")
    ids = torch.tensor(IDS)
    (batch,) = capture_layer_inputs(model, ids, batch_size=1)
    assert batch.per_layer and 1 in batch.per_layer
    assert batch.inputs(0)[1]["attention_mask"] is None and batch.inputs(1)[1]["attention_mask"].dim() == 4
    h = [batch]
    for i, layer in enumerate(decoder_layers(model)):
        h = run_layer(layer, h, idx=i)
    with torch.no_grad():
        want = model.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(model.model.norm(h[0].hidden), want, rtol=1e-5, atol=1e-5)
