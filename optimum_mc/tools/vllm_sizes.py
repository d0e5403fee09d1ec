"""Tiny configs vLLM builds the families' models from: sizes its CPU kernels take (:data:`VLLM_SIZES`) and the
config.json fields a family's published checkpoints carry that vLLM reads (:data:`VLLM_CONFIG_EXTRAS`, and
:func:`derived_fields` for fields that follow from the tiny config itself). :func:`vllm_sizes` is what
:func:`optimum_mc.tools.families.tiny_model` takes to build a family's vLLM-sized tiny model.
"""

from __future__ import annotations

# sizes vLLM's CPU build takes on top of _SIZES (its attention kernels take head sizes 32, 64, 80, ...; group 32)
VLLM_SIZES = dict(
    hidden_size=128,
    head_dim=32,
    intermediate_size=128,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=64,
    # multi-head latent attention: vLLM's CPU MLA backends (AMX_MLA, CPU_MLA) take only a latent cache of
    # kv_lora_rank + qk_rope_head_dim = 576 wide (DeepSeek-V2/V3's 512 + 64: "Head dimension 96 is not supported")
    qk_rope_head_dim=64,
    qk_nope_head_dim=32,
    qk_head_dim=96,
    v_head_dim=32,
    kv_lora_rank=512,
    q_lora_rank=64,
    # vLLM's CPU gated delta-net kernel (chunk_gated_delta_rule_cpu) takes Qwen3-Next's head dims, 128 ("Unexpected
    # head dim size, 32")
    linear_key_head_dim=128,
    linear_value_head_dim=128,
    # sparse-attention indexers (DeepSeek-V3.2, GLM-5, Hy-V4) rotate the first or last qk_rope_head_dim of their
    # index_head_dim-wide heads: the head must hold that part (deepseek-ai/DeepSeek-V3.2: 128 wide, 64 rotated)
    index_head_dim=128,
)
# config.json fields real checkpoints of a family carry that transformers' config class does not default to (or
# defaults otherwise), and that vLLM reads to build the model: without them vLLM builds another model than the one
# transformers runs (DeepSeek-V3 without topk_method "noaux_tc" has no e_score_correction_bias and routes by
# softmax; DeepSeek-V2 with transformers' default topk_method "greedy" is routed by vLLM with grouped top-k anyway).
# Values from deepseek-ai/DeepSeek-V3 and deepseek-ai/DeepSeek-V2 config.json (group counts scaled to 8 experts).
VLLM_CONFIG_EXTRAS = {
    "deepseek_v2": dict(
        topk_method="group_limited_greedy", scoring_func="softmax", n_group=2, topk_group=1, routed_scaling_factor=16.0
    ),
    "deepseek_v3": dict(
        topk_method="noaux_tc",
        scoring_func="sigmoid",
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    # arcee-ai/Trinity-Mini config.json: the routing transformers' AfmoeTokenChoiceRouter hard-codes (sigmoid scores,
    # renormalized top-k, no expert groups), which vLLM reads from these fields
    "afmoe": dict(score_func="sigmoid", route_norm=True, n_group=1, topk_group=1),
    # tencent Hy3 config.json: vLLM reads the expert width as expert_hidden_dim (transformers: moe_intermediate_size),
    # and q/k norms and renormalized top-k, which transformers' HYV3 always applies, from qk_norm / route_norm
    "hy_v3": dict(expert_hidden_dim=VLLM_SIZES["moe_intermediate_size"], qk_norm=True, route_norm=True),
    # MiniMaxAI/MiniMax-M2 config.json: sigmoid routing with a correction bias (transformers' MiniMaxM2 router always
    # does both); rotary_dim is the rotated part of a head (the whole head at transformers' partial_rotary_factor 1)
    "minimax_m2": dict(scoring_func="sigmoid", use_routing_bias=True, rotary_dim=VLLM_SIZES["head_dim"]),
    # moonshotai/Kimi-Linear-48B-A3B config.json: its MLA layers rotate nothing (transformers' Kimi-Linear applies no
    # rope), which vLLM reads from mla_use_nope (and asserts)
    "kimi_linear": dict(mla_use_nope=True),
}


def _mimo_v2_flash(cfg) -> dict:
    """XiaomiMiMo/MiMo-V2-Flash config.json spells its layer kinds as vLLM reads them (transformers derives
    layer_types / mlp_layer_types from these at conversion): 1 = sliding-window attention in hybrid_layer_pattern,
    1 = MoE in moe_layer_freq; the sliding layers' own head counts and sizes (twice the key/value heads of the full
    layers, with attention sinks), their window, the two rope bases and the rotated share of a head, and the norm
    epsilon under its config.json name."""
    rope = cfg.rope_parameters
    full, swa = rope["full_attention"], rope["sliding_attention"]
    return dict(
        hybrid_layer_pattern=[int(t == "sliding_attention") for t in cfg.layer_types],
        moe_layer_freq=[int(t == "sparse") for t in cfg.mlp_layer_types],
        swa_num_attention_heads=cfg.num_attention_heads,
        swa_num_key_value_heads=2 * cfg.num_key_value_heads,
        swa_head_dim=cfg.head_dim,
        swa_v_head_dim=cfg.v_head_dim,
        sliding_window_size=cfg.sliding_window,
        add_swa_attention_sink_bias=True,
        add_full_attention_sink_bias=False,
        rope_theta=full["rope_theta"],
        swa_rope_theta=swa["rope_theta"],
        partial_rotary_factor=full.get("partial_rotary_factor", 1.0),
        layernorm_epsilon=cfg.rms_norm_eps,
    )


# config.json fields that follow from the tiny config (layer kinds, head counts), per family
_DERIVED = {"mimo_v2_flash": _mimo_v2_flash}


def derived_fields(model_type: str, cfg) -> dict:
    """The config.json fields of ``model_type``'s published checkpoints that vLLM reads and transformers' config
    class derives into others (so a transformers-built tiny config lacks them), computed from the tiny ``cfg``."""
    fn = _DERIVED.get(model_type)
    return fn(cfg) if fn else {}


def vllm_sizes(model_type: str) -> dict:
    """:data:`VLLM_SIZES` restricted to the attributes ``model_type``'s config has, and the family's
    :data:`VLLM_CONFIG_EXTRAS` and :func:`derived_fields`."""
    from transformers import AutoConfig

    from optimum_mc.tools.families import tiny_config

    base = AutoConfig.for_model(model_type)
    # head_dim always: vLLM reads it from the config where an older transformers' config class does not define it
    sizes = {k: v for k, v in VLLM_SIZES.items() if k == "head_dim" or hasattr(base, k)}
    if "kv_lora_rank" in sizes and "qk_rope_head_dim" in sizes:  # MLA: transformers' rotary head is the rope part
        sizes["head_dim"] = sizes["qk_rope_head_dim"]
    # the family's own tie_word_embeddings (what its published checkpoints set): some vLLM models tie the head to the
    # embedding whatever the config says (Cohere2-MoE, LFM2-MoE), so an untied tiny model would be another model there
    if "tie_word_embeddings" in base.to_dict():
        sizes["tie_word_embeddings"] = bool(base.tie_word_embeddings)
    out = {**sizes, **VLLM_CONFIG_EXTRAS.get(model_type, {})}
    if "first_k_dense_replace" not in out and not hasattr(base, "first_k_dense_replace"):
        # a config class that lists per-layer MLP kinds (mlp_layer_types) where the published config.json still
        # carries DeepSeek's first_k_dense_replace, which vLLM reads: the tiny model's count of leading dense layers
        kinds = getattr(tiny_config(model_type, **out), "mlp_layer_types", None)
        if isinstance(kinds, list) and kinds and "dense" in kinds:
            out["first_k_dense_replace"] = next((i for i, k in enumerate(kinds) if k != "dense"), len(kinds))
    if model_type in _DERIVED:
        out.update(derived_fields(model_type, tiny_config(model_type, **out)))
    return out
