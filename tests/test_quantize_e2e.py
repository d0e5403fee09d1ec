"""MC quantization through from_pretrained on tiny models: allocation, modules, round trips, determinism, errors."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import CORPUS, FAMILIES, save_tiny
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import optimum_mc
from optimum_mc.errors import (
    CalibrationError,
    CheckpointError,
    MCConfigError,
    NonFiniteWeightError,
    UnsupportedArchitectureError,
)
from optimum_mc.nn import MCExperts, QuantLinear


def mc_config(**kw) -> optimum_mc.MCConfig:
    base = dict(bits=2.5, group_size=32, num_samples=8, seq_len=32, dataset=CORPUS, show_progress=False)
    return optimum_mc.MCConfig(**{**base, **kw})


def quantize(path, **kw):
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=mc_config(**kw))


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("mixtral"))


@pytest.fixture(scope="module")
def quantized(mixtral_dir):
    return quantize(mixtral_dir)


IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 31, 8]])


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_allocation_and_modules(quantized, mixtral_dir):
    cfg = quantized.config.quantization_config
    assert cfg.moe_layers == [0, 1]
    for bits in cfg.expert_bits:
        assert sum(bits) == int(2.5 * len(bits)) and 3 in bits and 2 in bits  # budget used; constraints hold
    layer = quantized.model.layers[0]
    assert isinstance(layer.mlp.experts, MCExperts) and layer.mlp.experts.bits == cfg.expert_bits[0]
    assert isinstance(layer.self_attn.q_proj, QuantLinear) and layer.self_attn.q_proj.bits == 4
    assert type(layer.mlp.gate).__name__ == "MixtralTopKRouter" and isinstance(quantized.lm_head, torch.nn.Linear)
    f = cfg.expert_factors[0]
    assert len(f["frequency"]) == 4 and abs(sum(f["frequency"]) - 2.0) < 1e-4  # top-2: two slots per token
    assert all(len(row) == len(cfg.candidate_bits) for row in f["loss"])
    # more bits never hurt the measured block loss of an expert
    for row in f["loss"]:
        assert all(a >= b for a, b in zip(row, row[1:])) and row[-1] >= 0
    ref = AutoModelForCausalLM.from_pretrained(mixtral_dir)
    a, b = logits(ref), logits(quantized)
    assert torch.isfinite(b).all()
    assert _cos(a, b) > 0.75


def _cos(a, b):
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def test_more_bits_track_float_closer(mixtral_dir, quantized):
    ref = logits(AutoModelForCausalLM.from_pretrained(mixtral_dir))
    one = _cos(ref, logits(quantize(mixtral_dir, bits=1, candidate_bits=[1])))
    four = _cos(ref, logits(quantize(mixtral_dir, bits=4, candidate_bits=[4], attn_bits=8)))
    assert one < _cos(ref, logits(quantized)) < four


@pytest.mark.parametrize("original_format", [True, False])
def test_save_reload_exact(quantized, tmp_path, original_format):
    quantized.save_pretrained(tmp_path, save_original_format=original_format)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert again.config.quantization_config.expert_bits == quantized.config.quantization_config.expert_bits
    assert torch.equal(logits(again), logits(quantized))
    names = set(load_file(os.path.join(tmp_path, "model.safetensors")))
    assert any("experts.packed.0.gate_up.qweight" in n for n in names)
    assert not any(n.endswith("gate_up_proj") or n.endswith("w1.weight") for n in names)


def test_same_seed_same_bytes(mixtral_dir, tmp_path):
    digests = []
    for i in range(2):
        model = quantize(mixtral_dir)
        model.save_pretrained(tmp_path / str(i))
        digests.append(hashlib.sha256((tmp_path / str(i) / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]


def test_generate_and_pipeline(quantized, mixtral_dir, tmp_path):
    ids = IDS[:, :5]
    with_cache = quantized.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    no_cache = quantized.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, no_cache) and with_cache.shape[1] == 11
    tok = AutoTokenizer.from_pretrained(mixtral_dir)
    quantized.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    out_obj = pipeline("text-generation", model=quantized, tokenizer=tok)("def add", max_new_tokens=5, do_sample=False)
    out_dir = pipeline("text-generation", model=str(tmp_path))("def add", max_new_tokens=5, do_sample=False)
    assert out_obj[0]["generated_text"] == out_dir[0]["generated_text"]
    kw = {"quantization_config": mc_config()}
    out_kw = pipeline("text-generation", model=mixtral_dir, model_kwargs=kw)(
        "def add", max_new_tokens=5, do_sample=False
    )
    assert out_kw[0]["generated_text"] == out_obj[0]["generated_text"]


def test_dequantize(mixtral_dir):
    model = quantize(mixtral_dir)
    before = logits(model)
    model.dequantize()
    assert not any(isinstance(m, (MCExperts, QuantLinear)) for m in model.modules())
    assert type(model.model.layers[0].mlp.experts).__name__ == "MixtralExperts"
    torch.testing.assert_close(logits(model), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"mixtral"}))
def test_every_family_quantizes_and_round_trips(family, tmp_path):
    path = save_tiny(family, tmp_path / "float")
    model = quantize(path)
    cfg = model.config.quantization_config
    assert cfg.expert_bits and all(
        isinstance(m, MCExperts)
        for m in model.modules()
        if type(m).__name__.endswith("Experts") or isinstance(m, MCExperts)
    )
    model.save_pretrained(tmp_path / "q")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert torch.equal(logits(again), logits(model))


@pytest.mark.parametrize("mode", ["global", "random", "frequency"])
def test_other_allocation_modes(mixtral_dir, mode):
    model = quantize(mixtral_dir, allocation=mode)
    bits = model.config.quantization_config.expert_bits
    if mode == "global":
        assert sum(map(sum, bits)) == int(2.5 * 8)
    else:
        assert all(sum(b) == 10 for b in bits)


def test_uniform(mixtral_dir):
    model = quantize(mixtral_dir, bits=2, candidate_bits=[2])
    assert model.config.quantization_config.expert_bits == [[2] * 4, [2] * 4]


# ---------------------------------------------------------------- bad input


def test_not_moe_model_errors_before_loading(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match="mixtral"):
        quantize(tmp_path)


def test_infeasible_bits_error(mixtral_dir):
    with pytest.raises(MCConfigError, match="infeasible"):
        quantize(mixtral_dir, bits=1.2)


def test_empty_calibration_error(mixtral_dir):
    with pytest.raises(CalibrationError):
        quantize(mixtral_dir, dataset=["  "])
    with pytest.raises(CalibrationError, match="need at least"):
        quantize(mixtral_dir, dataset=["tiny"], seq_len=512)


def test_nan_weights_error(tmp_path):
    path = save_tiny("mixtral", tmp_path)
    sd = load_file(os.path.join(path, "model.safetensors"))
    key = next(k for k in sd if "experts" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeightError, match="NaN"):
        quantize(path)


def _tamper(src, dst, edit):
    dst.mkdir()
    for f in os.listdir(src):
        (dst / f).write_bytes((src / f).read_bytes())
    edit(dst)
    return dst


def test_checkpoint_mismatch_errors(quantized, tmp_path):
    src = tmp_path / "ok"
    quantized.save_pretrained(src)
    st = "model.safetensors"

    def drop_tensor(d):
        sd = load_file(d / st)
        del sd[next(k for k in sd if k.endswith("packed.1.down.qweight"))]
        save_file(sd, d / st, metadata={"format": "pt"})

    def truncate(d):
        data = (d / st).read_bytes()
        (d / st).write_bytes(data[: len(data) - 1000])

    def wrong_bits(d):
        import json

        c = json.loads((d / "config.json").read_text())
        bits = c["quantization_config"]["expert_bits"][0]
        c["quantization_config"]["expert_bits"][0] = [4 if b != 4 else 3 for b in bits]
        (d / "config.json").write_text(json.dumps(c))

    for name, edit, match in [
        ("missing", drop_tensor, "missing"),
        ("truncated", truncate, "truncated"),
        ("bits", wrong_bits, "expected int32"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            AutoModelForCausalLM.from_pretrained(_tamper(src, tmp_path / name, edit))


def test_loads_without_importing_plugin(quantized, tmp_path):
    quantized.save_pretrained(tmp_path)
    expected = logits(quantized)
    torch.save(expected, tmp_path / "expected.pt")  # test-only artifact, read back by the subprocess
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM\n"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r})\n"
        "assert 'optimum_mc' in sys.modules\n"
        f"ids = torch.tensor({IDS.tolist()})\n"
        f"exp = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "assert torch.equal(m(input_ids=ids).logits, exp), 'logits differ'\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]
