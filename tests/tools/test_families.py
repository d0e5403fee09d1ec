"""Every MoE text family of the installed transformers, end to end on a tiny random model.

The family list is generated from transformers (``optimum_mc.tools.families.moe_model_types``), so a newer
transformers adds its families here by itself. Per family: quantize with ``MCConfig(bits=2.5)``, save, reload
(logits equal), generate, ODP where top-k >= 2. Families that cannot pass yet are strict xfails with the reason;
none is skipped silently (a family whose tiny config cannot be built is a strict xfail with that error).
``scripts/support_matrix.py`` runs the same check and writes docs/support.md.

Runtime: every family runs the full check (no representative subset). Calibration is already tiny (4 samples of
16 tokens, 3 generated tokens) and the tokenizer is built once per worker; what made the file slow was torch's
intra-op threads spinning on tiny tensors (10-100x on a busy machine), so the module runs on one thread per
worker. Measured per family: 1-20 s on a loaded 2-core machine (docs/support.json, ``seconds``).
"""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers.threads import one_thread  # noqa: F401 - autouse: one torch thread in this module
from torch import nn

from optimum_mc.architectures import discover, moe_blocks
from optimum_mc.errors import UnsupportedArchitectureError
from optimum_mc.tools.families import check_family, moe_model_types, tiny_config, tiny_model

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` leaves it out of a quick run

# why a family does not pass yet (strict: a family that starts passing must be moved out of here)
XFAIL: dict[str, str] = {
    "ergo": "UnsupportedArchitectureError: experts module (ErgoExperts) does not reproduce its forward after conversion: a per-expert RMSNorm of each expert's output (post_expert_norm, after the down projection) is neither foldable into the quantized matrices nor a float norm in front of them",  # noqa: E501
}

FAMILIES = moe_model_types()


def _instantiates(model_type: str) -> str | None:
    try:
        tiny_config(model_type)
    except Exception as exc:  # recorded below as a strict xfail with the reason
        return f"tiny config does not build: {type(exc).__name__}: {exc}"[:300]
    return None


def _params():
    out = []
    for mt in FAMILIES:
        reason = XFAIL.get(mt) or _instantiates(mt)
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(mt, marks=marks, id=mt))
    return out


def test_family_list_is_generated():
    assert len(FAMILIES) >= 30
    for mt in ("mixtral", "qwen3_moe", "deepseek_v3", "glm4_moe", "qwen3_next", "minimax_m2"):
        assert mt in FAMILIES


@pytest.mark.parametrize("model_type", _params())
def test_family_end_to_end(model_type, tmp_path):
    res = check_family(model_type, str(tmp_path))
    assert res["status"] == "pass"


# ---------------------------------------------------------------- structural checks name what failed


def test_dense_model_names_the_check():
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    with pytest.raises(UnsupportedArchitectureError, match=r"no MoE layers.*check: MoE block"):
        discover(model)


def test_discovery_reads_routing():
    arch = discover(tiny_model("glm4_moe"))
    assert (arch.block_attr, arch.router_attr, arch.experts_attr) == ("mlp", "gate", "experts")
    assert arch.shared_expert_attrs == ("shared_experts",) and arch.score_fn == "sigmoid"
    model = tiny_model("qwen2_moe")
    arch = discover(model)
    assert arch.shared_expert_attrs == ("shared_expert",) and arch.score_fn == "softmax"
    assert [b.layer_idx for b in moe_blocks(model)] == [0, 1]


def test_experts_with_bad_shapes_are_named():
    model = tiny_model("mixtral")
    ex = model.model.layers[1].mlp.experts
    ex.down_proj = nn.Parameter(torch.zeros(ex.num_experts, 64, 7))
    with pytest.raises(UnsupportedArchitectureError, match=r"layers\.1\.mlp\.experts.*\(E, 2I, H\)"):
        discover(model)


def test_inconsistent_expert_counts_are_named():
    model = tiny_model("mixtral")
    ex = model.model.layers[1].mlp.experts
    ex.num_experts = ex.gate_up_proj.shape[0] - 1
    with pytest.raises(UnsupportedArchitectureError, match=r"layers\.1\.mlp\.experts.*num_experts=7"):
        discover(model)
    model = tiny_model("mixtral")
    ex = model.model.layers[1].mlp.experts
    ex.gate_up_proj = nn.Parameter(ex.gate_up_proj[:4].clone())
    ex.down_proj = nn.Parameter(ex.down_proj[:4].clone())
    ex.num_experts = 4
    model.model.layers[1].mlp.gate.weight = nn.Parameter(model.model.layers[1].mlp.gate.weight[:4].clone())
    with pytest.raises(UnsupportedArchitectureError, match=r"different expert counts \[4, 8\]"):
        discover(model)


def test_router_that_is_a_plain_linear_is_named():
    model = tiny_model("mixtral")
    for layer in model.model.layers:
        layer.mlp.gate = nn.Linear(64, 8, bias=False)
    with pytest.raises(UnsupportedArchitectureError, match=r"router `layers\.0\.mlp\.gate` \(Linear\)"):
        discover(model)


def test_missing_router_is_named():
    model = tiny_model("mixtral")
    del model.model.layers[0].mlp.gate
    with pytest.raises(UnsupportedArchitectureError, match=r"MoE block `layers\.0\.mlp`.*check: router"):
        discover(model)


def test_linears_a_converter_splits_stay_float(caplog):
    """lara_mini saves ``in_proj_qkv / z / b / a`` merged as one ``in_proj`` (a transformers weight converter):
    packed buffers cannot be merged like that, so those linears stay float, logged; the others are quantized."""
    from optimum_mc import MCConfig
    from optimum_mc.architectures import layer_module_names
    from optimum_mc.calibration.linear_gptq import linear_targets
    from optimum_mc.checkpoint import save_converter

    model = tiny_model("lara_mini")
    arch = discover(model)
    prefix = layer_module_names(model)[0] + "."
    layer = model.model.layers[0]
    cfg = MCConfig(bits=2.5, group_size=32)
    with caplog.at_level("WARNING", logger="optimum_mc.calibration.linear_gptq"):
        got = linear_targets(layer, None, arch, cfg, prefix, save_converter(model))
    names = {n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and ".in_proj_" in "." + n}
    assert names and not names & set(got)
    assert "linear_attn.out_proj" in got
    assert all(f"keeping {prefix}{n} in float" in caplog.text for n in names)
    assert set(linear_targets(layer, None, arch, cfg, prefix)) >= names  # without the converter rule: packed


def test_vllm_sizes_follow_what_published_configs_carry():
    """The tiny vLLM models are the families' models: the family's own tie_word_embeddings (vLLM's Cohere2-MoE and
    LFM2-MoE tie the head whatever the config says), DeepSeek's first_k_dense_replace where the config class lists
    mlp_layer_types instead (vLLM reads the former), and sparse-attention indexer heads wide enough for their rotated
    part."""
    from optimum_mc.tools.families import vllm_sizes

    types = set(moe_model_types())
    for mt, tied in (("cohere2_moe", True), ("lfm2_moe", True), ("mixtral", False)):
        if mt in types:
            assert vllm_sizes(mt)["tie_word_embeddings"] is tied, mt
    if "glm4_moe_lite" in types:
        sizes = vllm_sizes("glm4_moe_lite")
        assert sizes["first_k_dense_replace"] == 1
        assert tiny_config("glm4_moe_lite", **sizes).mlp_layer_types == ["dense", "sparse"]
    if "mimo_v2_flash" in types:  # the SWA fields XiaomiMiMo/MiMo-V2-Flash config.json carries, from the tiny config
        sizes = vllm_sizes("mimo_v2_flash")
        cfg = tiny_config("mimo_v2_flash", **sizes)
        assert cfg.layer_types == ["full_attention", "sliding_attention"]
        assert (sizes["hybrid_layer_pattern"], sizes["moe_layer_freq"]) == ([0, 1], [0, 1])
        assert sizes["swa_num_key_value_heads"] == 2 * cfg.num_key_value_heads
        assert (sizes["rope_theta"], sizes["swa_rope_theta"]) == (5e6, 1e4)
    for mt in sorted(types & {"deepseek_v32", "glm_moe_dsa", "hy_v4"}):
        sizes = vllm_sizes(mt)
        if "index_head_dim" in sizes and "qk_rope_head_dim" in sizes:
            assert sizes["index_head_dim"] > sizes["qk_rope_head_dim"], mt
