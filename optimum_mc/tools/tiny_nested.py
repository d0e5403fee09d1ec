"""Tiny configs of the families whose config nests sub-configs (see :func:`tiny_nested`): a multimodal wrapper's
text model and towers, or a config split into parts (dbrx's ``attn_config`` / ``ffn_config``). Part of
:func:`~optimum_mc.tools.families.tiny_config`."""

from __future__ import annotations

from .families import _EXCEPTIONS, _SIZES, _TOKEN_IDS, _get, _has, tiny_config

# sizes of a multimodal wrapper's non-text towers (vision, audio): small, and projecting into the text model's width
_TOWER_SIZES = dict(
    hidden_size=64,
    num_hidden_layers=1,
    depth=1,
    num_heads=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=16,
    intermediate_size=64,
    vision_output_dim=64,
    projector_input_dim=64,
    projector_output_dim=64,
    num_position_embeddings=64,
)


def _tiny_tower(values: dict, text_hidden: int, full_text_hidden: int | None) -> dict:
    """:data:`_TOWER_SIZES` for a tower's config ``values``, projecting into the tiny text width; its other widths
    that equal its own hidden size or the full-size text hidden size follow them (dots3_note's adapter_in_dim /
    adapter_out_dim: its configs validate both); per-layer lists and overrides cut to the first layers kept."""
    sizes = {k: v for k, v in _TOWER_SIZES.items() if k in values}
    for k in ("out_hidden_size", "output_size", "text_hidden_size"):
        if isinstance(values.get(k), int):
            sizes[k] = text_hidden
    hidden = values.get("hidden_size")
    for k, v in values.items():
        if k in sizes or not isinstance(v, int) or isinstance(v, bool) or not ("dim" in k or "size" in k):
            continue
        if v == hidden and "hidden_size" in sizes:
            sizes[k] = sizes["hidden_size"]
        elif full_text_hidden and v == full_text_hidden:
            sizes[k] = text_hidden
    layers0 = next((values[k] for k in ("num_hidden_layers", "depth") if isinstance(values.get(k), int)), None)
    n = next((sizes[k] for k in ("num_hidden_layers", "depth") if k in sizes), layers0)
    if layers0 and n != layers0:
        for k, v in values.items():
            if isinstance(v, list) and len(v) == layers0:
                sizes[k] = v[:n]
        if isinstance(values.get("per_layer_config"), dict):
            sizes["per_layer_config"] = {i: o for i, o in values["per_layer_config"].items() if int(i) < n}
    return sizes


def tiny_nested(model_type: str, base, overrides: dict):
    """A tiny config of a family whose config nests sub-configs: a multimodal wrapper (its ``text_config`` is the
    tiny config of the text model type, its other towers get :data:`_TOWER_SIZES` and project into the text
    width; only the text model's MoE is quantized) or a config split into parts (dbrx's ``attn_config`` /
    ``ffn_config``: the size rules applied to each part and to the top level through its attribute aliases)."""
    from transformers import AutoConfig

    subs = dict(base.sub_configs)
    kw: dict = {}
    if "text_config" in subs:
        text = getattr(base, "text_config", None)
        text_type = getattr(text, "model_type", None) or getattr(subs["text_config"], "model_type", None)
        text = tiny_config(text_type, **overrides).to_dict()
        kw["text_config"] = text
        for name, cls in subs.items():
            if name == "text_config":
                continue
            tower = getattr(base, name, None)
            try:  # a tower the default config leaves out (gemma4's vision and audio) is built too: it must stay float
                values = (tower if tower is not None else cls()).to_dict()
            except Exception:
                continue
            full_text_hidden = _get(base.get_text_config(), "hidden_size")
            kw[name] = {**values, **_tiny_tower(values, text["hidden_size"], full_text_hidden)}
        for k in _TOKEN_IDS:  # the wrapper's own token ids (text ones are in text_config)
            if isinstance(getattr(base, k, None), int):
                kw[k] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}[k]
        return AutoConfig.for_model(model_type, **kw)
    # a config split into parts: the size rules on each part (its own fields) and on the top level (its fields and
    # the generic names its attribute_map aliases: dbrx's d_model is hidden_size)
    for name, cls in subs.items():
        part = getattr(base, name, None)
        values = (part if part is not None else cls()).to_dict()
        kw[name] = {**values, **{k: v for k, v in _SIZES.items() if k in values}}
    alias = getattr(base, "attribute_map", None) or {}  # (by the class's own names: its __post_init__ reads them)
    kw.update({alias.get(k, k): v for k, v in _SIZES.items() if k not in kw and _has(base, k)})
    for k in _TOKEN_IDS:
        if _has(base, k):
            kw[k] = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}[k]
    for k, v in _EXCEPTIONS.get(model_type, {}).items():  # (a part's fields merged into it)
        kw[k] = {**kw[k], **v} if isinstance(v, dict) and isinstance(kw.get(k), dict) else v
    kw.update(overrides)
    return AutoConfig.for_model(model_type, **kw)
