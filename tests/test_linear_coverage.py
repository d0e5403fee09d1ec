"""Which linears are packed is recorded once (``linear_bits``) and the same at save and reload: linears that
calibration never reaches stay float with a logged reason, and a checkpoint saved under transformers' checkpoint
names (renamed by its conversion mapping) is checked under the model's names."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc.checkpoint import key_renamer
from optimum_mc.nn import QuantLinear
from optimum_mc.pipeline import quantize_model
from optimum_mc.tools.families import CORPUS, tiny_model, tiny_tokenizer

QUICK = dict(bits=2.5, group_size=32, num_samples=4, seq_len=16, dataset=CORPUS, show_progress=False, seed=0)


def test_linear_calibration_never_reaches_stays_float(caplog):
    model = tiny_model("mixtral")
    attn = model.model.layers[0].self_attn
    attn.unused_proj = nn.Linear(64, 64, bias=False)  # registered, never called by the attention's forward
    cfg = optimum_mc.MCConfig(**QUICK)
    with caplog.at_level("WARNING", logger="optimum_mc.calibration.linear_gptq"):
        quantize_model(model, cfg, tokenizer=tiny_tokenizer())
    assert type(attn.unused_proj) is nn.Linear
    assert "model.layers.0.self_attn.unused_proj" not in cfg.linear_bits
    assert "keeping model.layers.0.self_attn.unused_proj in float: calibration never reached it" in caplog.text
    assert isinstance(attn.q_proj, QuantLinear) and "model.layers.0.self_attn.q_proj" in cfg.linear_bits


def test_checkpoint_names_map_to_model_names(tmp_path):
    """laguna saves ``mlp.shared_experts.*`` as ``mlp.shared_expert.*``; the renamer maps them back."""
    model = tiny_model("laguna")
    model.save_pretrained(tmp_path)
    meta = AutoModelForCausalLM.from_config(model.config).to("meta")
    rename = key_renamer(meta)
    saved = "model.layers.1.mlp.shared_expert.down_proj.qweight"
    assert rename(saved) == (["model.layers.1.mlp.shared_experts.down_proj.qweight"], False)
    assert rename("model.layers.0.self_attn.q_proj.weight") == (["model.layers.0.self_attn.q_proj.weight"], False)
    assert torch.is_tensor(model.model.layers[1].mlp.shared_experts.down_proj.weight)


def test_a_key_the_model_has_is_not_renamed():
    """deepseek_v4's mapping renames ``.norm.`` to ``.kv_norm.`` (its attention's norm); the final ``model.norm``
    is the model's own key and, as transformers loads it, keeps its name."""
    model = tiny_model("deepseek_v4")
    rename = key_renamer(model)
    assert rename("model.norm.weight") == (["model.norm.weight"], False)
    assert rename("model.layers.0.attn_norm.weight") == (["model.layers.0.input_layernorm.weight"], False)
    assert rename("model.layers.0.self_attn.norm.weight") == (["model.layers.0.self_attn.kv_norm.weight"], False)
