"""ODP and transformers' switches: the model's public implementation setters (and their restoration), and ODP
options passed at load time of an MC checkpoint."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CORPUS, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc import MCConfig
from optimum_mc.errors import AlreadyQuantizedError
from optimum_mc.pruning.importance import attention_name

QUICK = dict(group_size=32, num_samples=4, seq_len=16, dataset=CORPUS, show_progress=False)
IDS = torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))


def _spy(model, name, calls):
    original = getattr(model, name)

    def spy(value, *args, **kwargs):
        calls.append((name, value))
        return original(value, *args, **kwargs)

    setattr(model, name, spy)


def test_set_odp_uses_and_restores_public_setters():
    model = tiny_model("mixtral")
    model.set_experts_implementation("grouped_mm")
    attn = model.config._attn_implementation
    calls = []
    _spy(model, "set_experts_implementation", calls)
    _spy(model, "set_attn_implementation", calls)
    optimum_mc.set_odp(model, True, threshold=0.9, layers=2)
    assert calls == [("set_attn_implementation", attention_name(attn)), ("set_experts_implementation", "eager")]
    assert model.config._attn_implementation == attention_name(attn)
    assert model.config._experts_implementation == "eager"
    with torch.no_grad():
        model(input_ids=IDS)
    assert optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"] > 0
    calls.clear()
    optimum_mc.set_odp(model, False)
    assert calls == [("set_attn_implementation", attn), ("set_experts_implementation", "grouped_mm")]
    assert model.config._attn_implementation == attn and model.config._experts_implementation == "grouped_mm"


def test_set_odp_off_keeps_an_implementation_the_user_chose_meanwhile():
    model = tiny_model("mixtral")
    optimum_mc.set_odp(model, True, threshold=0.9)
    model.set_attn_implementation("eager")
    optimum_mc.set_odp(model, False)
    assert model.config._attn_implementation == "eager"
    optimum_mc.set_odp(model, True, threshold=0.9)  # and ODP goes back on over the new choice
    assert model.config._attn_implementation == attention_name("eager")
    optimum_mc.set_odp(model, False)
    assert model.config._attn_implementation == "eager"


def test_odp_on_one_model_leaves_another_models_attention_alone():
    """Each model's ODP attention uses its own original's mask function, whichever model enabled ODP last."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    a, b = tiny_model("mixtral"), tiny_model("mixtral")
    b.set_attn_implementation("eager")
    with torch.no_grad():
        before = a(input_ids=IDS).logits
        optimum_mc.set_odp(a, True, threshold=1e-6)  # a tiny threshold skips nothing: outputs must not move
        optimum_mc.set_odp(b, True, threshold=1e-6)
        after = a(input_ids=IDS).logits
    sdpa_name, eager_name = attention_name("sdpa"), attention_name("eager")
    assert (a.config._attn_implementation, b.config._attn_implementation) == (sdpa_name, eager_name)
    assert ALL_MASK_ATTENTION_FUNCTIONS[sdpa_name] is ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
    assert ALL_MASK_ATTENTION_FUNCTIONS[eager_name] is ALL_MASK_ATTENTION_FUNCTIONS["eager"]
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("odp_load")
    path = save_tiny("mixtral", root / "f")
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=MCConfig(bits=2.5, **QUICK))
    model.save_pretrained(root / "q")
    return root / "q", model.config.quantization_config.expert_bits


def test_odp_passed_at_load_is_applied(checkpoint):
    path, expert_bits = checkpoint
    plain = AutoModelForCausalLM.from_pretrained(path)
    assert optimum_mc.get_odp_stats(plain)["layers"] == {}  # quantized without ODP
    with pytest.raises(AlreadyQuantizedError, match="bits=3.0"):  # issue 20: no longer silently ignored
        AutoModelForCausalLM.from_pretrained(path, quantization_config=MCConfig(bits=3.0, odp=True))
    passed = MCConfig(odp=True, odp_threshold=0.9, odp_layers=[1], odp_protect_ratio=0.0)
    with pytest.warns(UserWarning, match="loading attributes"):
        model = AutoModelForCausalLM.from_pretrained(path, quantization_config=passed)
    qc = model.config.quantization_config
    assert qc.odp and qc.odp_threshold == 0.9 and qc.odp_layers == [1] and qc.odp_protect_ratio == 0.0
    assert qc.bits == 2.5 and qc.expert_bits == expert_bits  # everything else comes from the checkpoint
    layers = optimum_mc.get_odp_stats(model)["layers"]
    assert {i: s["enabled"] for i, s in layers.items()} == {0: False, 1: True}
    optimum_mc.set_odp(plain, True, threshold=0.9, layers=[1], protect_ratio=0.0)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, plain(input_ids=IDS).logits)
    assert optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"] > 0


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`:UserWarning")
def test_odp_off_at_load_overrides_a_checkpoint_saved_with_odp(checkpoint, tmp_path):
    path, _ = checkpoint
    on = AutoModelForCausalLM.from_pretrained(path, quantization_config=MCConfig(odp=True, odp_threshold=0.9))
    on.save_pretrained(tmp_path / "odp")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "odp")
    assert again.config.quantization_config.odp
    assert any(s["enabled"] for s in optimum_mc.get_odp_stats(again)["layers"].values())
    off = AutoModelForCausalLM.from_pretrained(tmp_path / "odp", quantization_config=MCConfig(odp=False))
    assert not off.config.quantization_config.odp
    assert not any(s["enabled"] for s in optimum_mc.get_odp_stats(off)["layers"].values())


def test_model_that_cannot_switch_attention_gets_odp_without_protection(monkeypatch, caplog):
    model = tiny_model("mixtral")
    attn = model.config._attn_implementation
    monkeypatch.setattr(type(model), "_can_set_attn_implementation", classmethod(lambda cls: False))
    with caplog.at_level("WARNING", logger="optimum_mc"):
        optimum_mc.set_odp(model, True, threshold=0.9, layers=2)
    assert "without token protection" in caplog.text
    assert model.config._attn_implementation == attn
    with torch.no_grad():
        model(input_ids=IDS)
    assert optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"] > 0
    optimum_mc.set_odp(model, False)
    assert model.config._attn_implementation == attn
