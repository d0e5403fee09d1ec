"""bits_budget="stored": the allocation's budget counts codes + fp16 scales and zeros per expert weight, checked
against the saved checkpoint's bytes counted independently from the safetensors tensors."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open
from tiny_models import CORPUS, save_tiny
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc.bitwidths import metadata_bits, stored_bits
from optimum_mc.checkpoint import expert_stored_bits
from optimum_mc.config import BITS_BUDGETS
from optimum_mc.errors import MCConfigError
from optimum_mc.model_card import build_card
from optimum_mc.tools.inspect_model import load_quant_config, size_breakdown


def mc_config(**kw) -> optimum_mc.MCConfig:
    base = dict(num_samples=8, seq_len=32, dataset=CORPUS, show_progress=False)
    return optimum_mc.MCConfig(**{**base, **kw})


def bytes_per_expert_weight(folder) -> float:
    """Stored bits per routed-expert weight straight from the tensors: every byte of ``packed.*.{qweight,scales,
    zeros}``, over the weights of the experts' float matrices (3 * H * I per expert, from the model config)."""
    cfg = json.loads((folder / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    nbytes, experts = 0, set()
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if ".packed." in key and key.rsplit(".", 1)[1] in ("qweight", "scales", "zeros"):
                    t = st.get_tensor(key)
                    nbytes += t.numel() * t.element_size()
                    experts.add(key.split(".packed.")[0] + "." + key.split(".packed.")[1].split(".")[0])
    return 8 * nbytes / (len(experts) * 3 * h * i)


# ------------------------------------------------------------------------------------------ config


def test_default_counts_codes_and_is_not_written():
    cfg = optimum_mc.MCConfig()
    assert cfg.bits_budget == "codes" and cfg.code_bits(256, 512) == cfg.bits
    assert "bits_budget" not in cfg.to_dict()  # checkpoints without it stay readable by older versions


def test_round_trips_through_config_json(tmp_path):
    cfg = optimum_mc.MCConfig(bits=2.25, bits_budget="stored")
    assert cfg.to_dict()["bits_budget"] == "stored"
    back = optimum_mc.MCConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back.bits_budget == "stored" and back == cfg
    assert back.code_bits(256, 512) == pytest.approx(2.0)
    assert cfg.quantization_options_set() == {"bits": 2.25, "bits_budget": "stored"}


@pytest.mark.parametrize("bad", ["Stored", "bytes", None, 1, True])
def test_bad_values_raise_naming_the_allowed_ones(bad):
    with pytest.raises(MCConfigError, match="bits_budget must be one of") as exc:
        optimum_mc.MCConfig(bits_budget=bad)
    assert all(v in str(exc.value) for v in BITS_BUDGETS)


def test_stored_range_includes_the_metadata():
    cb = [1, 2, 3]
    optimum_mc.MCConfig(bits=1.25, bits_budget="stored", candidate_bits=cb)  # 1-bit codes + 0.25 at group 128
    optimum_mc.MCConfig(bits=3.25, bits_budget="stored", candidate_bits=cb)
    for bits in (1.2, 3.3):
        with pytest.raises(MCConfigError, match=r"stored bits .* \[1.25, 3.25\]"):
            optimum_mc.MCConfig(bits=bits, bits_budget="stored", candidate_bits=cb)
    with pytest.raises(MCConfigError, match=r"\[1.5, 3.5\]"):
        optimum_mc.MCConfig(bits=1.25, bits_budget="stored", group_size=64, candidate_bits=cb)


def test_metadata_bits():
    assert metadata_bits(256, 512, 128) == 0.25 and metadata_bits(4096, 14336, 32) == 1.0
    assert metadata_bits(64, 96, -1) == pytest.approx((2 * 32 / 64 + 32 / 96) / 3)  # per row: shape dependent
    assert stored_bits([2, 3], 256, 128, 128) == pytest.approx((2 * 2 + 3) / 3 + 0.25)


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("mixtral"))


def _quantize_save(path, out, **kw):
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=mc_config(**kw))
    model.save_pretrained(out)
    return model


def test_stored_budget_met_exactly_from_the_checkpoint_bytes(mixtral_dir, tmp_path):
    # group 32: 1 bit of fp16 scale + zero per weight, so 3.5 stored bits leave 2.5 code bits (10 over 4 experts)
    out = tmp_path / "q"
    model = _quantize_save(mixtral_dir, out, bits=3.5, bits_budget="stored", group_size=32)
    cfg = model.config.quantization_config
    for bits in cfg.expert_bits:
        assert sum(bits) == 10 and 3 in bits and 2 in bits
    assert bytes_per_expert_weight(out) == pytest.approx(3.5, abs=1e-12)
    stored, code = expert_stored_bits(out, load_quant_config(out))
    assert stored == pytest.approx(3.5, abs=1e-12) and code == pytest.approx(2.5, abs=1e-12)
    # the same allocation as the code-bits budget 2.5
    same = AutoModelForCausalLM.from_pretrained(mixtral_dir, quantization_config=mc_config(bits=2.5, group_size=32))
    assert same.config.quantization_config.expert_bits == cfg.expert_bits
    # reported by inspect and the model card
    assert "stored bits per expert weight: 3.5000" in size_breakdown(out, load_quant_config(out))
    assert "stored bits per expert weight | 3.500" in str(build_card(model, out))
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config.quantization_config.bits_budget == "stored"


def test_stored_budget_with_row_groups_never_exceeds_it(tmp_path):
    # group_size=-1 with H=64, I=96: 32 bits per row are 0.444 bits per weight, resolved from the experts' shape
    path = save_tiny("mixtral", tmp_path / "m", intermediate_size=96)
    out = tmp_path / "q"
    _quantize_save(path, out, bits=2.5, bits_budget="stored", group_size=-1)
    got = bytes_per_expert_weight(out)
    meta = (2 * 32 / 64 + 32 / 96) / 3
    assert got <= 2.5 + 1e-12 and got == pytest.approx(2.0 + meta, abs=1e-12)  # 8 code bits over 4 experts


def test_infeasible_stored_budget_names_the_conversion(tmp_path):
    path = save_tiny("mixtral", tmp_path / "m", intermediate_size=96)
    with pytest.raises(MCConfigError, match="leaves .* bits for codes after"):
        AutoModelForCausalLM.from_pretrained(
            path, quantization_config=mc_config(bits=1.3, bits_budget="stored", group_size=-1)
        )


def test_global_allocation_counts_stored_bits(mixtral_dir, tmp_path):
    out = tmp_path / "q"
    model = _quantize_save(mixtral_dir, out, bits=3.5, bits_budget="stored", group_size=32, allocation="global")
    assert sum(map(sum, model.config.quantization_config.expert_bits)) == 20  # 2.5 code bits over 2 x 4 experts
    assert bytes_per_expert_weight(out) == pytest.approx(3.5, abs=1e-12)


def test_infeasible_budget_refused_before_any_weight_loads(tmp_path, monkeypatch):
    """The quantizer checks every MoE layer's budget on the empty model (the check once saw no layer at all)."""
    import optimum_mc.pipeline

    def never(*args, **kwargs):
        raise AssertionError("quantization started")

    monkeypatch.setattr(optimum_mc.pipeline, "quantize_model", never)
    path = save_tiny("mixtral", tmp_path / "m", intermediate_size=96)
    with pytest.raises(MCConfigError, match="leaves .* bits for codes after"):
        AutoModelForCausalLM.from_pretrained(
            path, quantization_config=mc_config(bits=1.3, bits_budget="stored", group_size=-1)
        )
