"""Quantizing larger-than-memory models: streamed layers, offload, device maps, resume, typed errors."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from tiny_models import CORPUS, save_tiny
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc.architectures import decoder_layers
from optimum_mc.calibration.layer_source import CheckpointLayers, PendingLayer
from optimum_mc.errors import CheckpointError, MCConfigError
from optimum_mc.pipeline import SequentialPipeline, quantize_model
from optimum_mc.pmq import PMQ

IDS = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11, 64, 128, 31, 8]])


def mc_config(**kw) -> optimum_mc.MCConfig:
    base = dict(bits=2.5, group_size=32, num_samples=8, seq_len=32, dataset=CORPUS, show_progress=False)
    return optimum_mc.MCConfig(**{**base, **kw})


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def saved_digest(model, folder: Path) -> str:
    model.save_pretrained(folder)
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("float"), num_hidden_layers=3)


@pytest.fixture(scope="module")
def streamed(float_dir):
    return AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config())


def test_streamed_equals_resident(float_dir, streamed, tmp_path):
    """Streaming layers from the shards gives exactly what quantizing the resident float model gives."""
    resident = AutoModelForCausalLM.from_pretrained(float_dir)
    cfg = mc_config()
    quantize_model(resident, cfg)
    assert cfg.expert_bits == streamed.config.quantization_config.expert_bits
    assert torch.equal(logits(resident), logits(streamed))
    sd_r, sd_s = resident.state_dict(), streamed.state_dict()
    assert sd_r.keys() == sd_s.keys()
    assert all(torch.equal(sd_r[k], sd_s[k]) for k in sd_r)


def test_layers_are_never_loaded_by_transformers(float_dir, monkeypatch):
    """During quantization only one float layer is materialized at a time; the others wait as placeholders."""
    seen = []
    original = SequentialPipeline.quantize_layer

    def spy(self, idx, layer, batches, known, *rest):
        slots = decoder_layers(self.model)
        float_layers = [i for i, m in enumerate(slots) if not isinstance(m, PendingLayer) and i != idx]
        seen.append((idx, float_layers, all(p.device.type != "meta" for p in layer.parameters())))
        return original(self, idx, layer, batches, known, *rest)

    monkeypatch.setattr(SequentialPipeline, "quantize_layer", spy)
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config())
    assert [s[0] for s in seen] == [0, 1, 2]
    assert all(others == [] and materialized for _, others, materialized in seen)


def test_offloaded_auto_device_map(float_dir, streamed, tmp_path):
    """device_map="auto" with a tiny max_memory and an offload folder works (no meta-tensor crash)."""
    model = AutoModelForCausalLM.from_pretrained(
        float_dir,
        quantization_config=mc_config(offload_folder=str(tmp_path / "mc-offload")),
        device_map="auto",
        max_memory={"cpu": 60_000},
        offload_folder=str(tmp_path / "offload"),
    )
    assert "disk" in set(model.hf_device_map.values())
    assert model.config.quantization_config.expert_bits == streamed.config.quantization_config.expert_bits
    # same packed weights; offloaded experts run expert by expert (accelerate loads each QuantLinear as it runs),
    # the resident ones in the fused op: equal up to the float summation order
    torch.testing.assert_close(logits(model), logits(streamed), rtol=1e-5, atol=1e-5)


def test_explicit_disk_map(float_dir, streamed, tmp_path):
    device_map = {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }
    model = AutoModelForCausalLM.from_pretrained(
        float_dir,
        quantization_config=mc_config(offload_folder=str(tmp_path / "mc-offload")),
        device_map=device_map,
        offload_folder=str(tmp_path / "offload"),
    )
    assert model.hf_device_map["model.layers.1"] == "disk"
    assert model.config.quantization_config.expert_bits == streamed.config.quantization_config.expert_bits
    torch.testing.assert_close(logits(model), logits(streamed), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "allocation,granularity,metadata",
    [
        ("layer", "expert", "fp16"),
        ("global", "expert", "fp16"),
        ("layer", "projection", "fp16"),
        ("layer", "expert", "q8"),
    ],
)
def test_resume_after_interruption_gives_the_same_bytes(
    float_dir, tmp_path, monkeypatch, allocation, granularity, metadata
):
    """Staged layers keep their widths ([gate_up, down] ones too) and factors: the resumed run writes the bytes of
    a clean run (compact q8 metadata: staged layers expand it as they load)."""
    cfg = dict(allocation=allocation, allocation_granularity=granularity)
    if metadata == "q8":
        cfg.update(metadata="q8", zero_point="int")
    clean = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(**cfg))
    expected = saved_digest(clean, tmp_path / "clean")

    resume = tmp_path / "resume"
    original = SequentialPipeline.quantize_layer
    calls = []

    def interrupted(self, idx, layer, batches, known, *rest):
        calls.append(idx)
        if idx == 2:
            raise KeyboardInterrupt
        return original(self, idx, layer, batches, known, *rest)

    monkeypatch.setattr(SequentialPipeline, "quantize_layer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(**cfg, resume_dir=str(resume)))
    assert (resume / "progress.json").exists()
    calls.clear()
    monkeypatch.setattr(SequentialPipeline, "quantize_layer", original)
    counted = []

    def counting(self, idx, layer, batches, known, *rest):
        counted.append(idx)
        return original(self, idx, layer, batches, known, *rest)

    monkeypatch.setattr(SequentialPipeline, "quantize_layer", counting)
    resumed = AutoModelForCausalLM.from_pretrained(
        float_dir, quantization_config=mc_config(**cfg, resume_dir=str(resume))
    )
    if granularity == "projection":
        assert any(isinstance(b, list) for row in resumed.config.quantization_config.expert_bits for b in row)
    assert counted == [2]  # layers 0 and 1 came from the resume folder
    assert saved_digest(resumed, tmp_path / "resumed") == expected


def test_resume_dir_of_another_config_is_refused(float_dir, tmp_path):
    resume = tmp_path / "resume"
    AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(resume_dir=str(resume)))
    with pytest.raises(MCConfigError, match="another model"):
        AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=mc_config(bits=2.0, resume_dir=str(resume))
        )


def test_resume_dir_errors(float_dir, tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(MCConfigError, match="resume_dir"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(resume_dir=str(a_file)))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(MCConfigError, match="not empty"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(resume_dir=str(busy)))
    assert (busy / "notes.txt").read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_before_loading(float_dir, monkeypatch):
    called = []
    monkeypatch.setattr(CheckpointLayers, "fetch", lambda *a, **k: called.append(1))
    with pytest.raises(MCConfigError, match="no cuda device"):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(device="cuda"))
    assert not called


def test_bad_device_strings():
    with pytest.raises(MCConfigError, match="not a torch device"):
        mc_config(device="gpu-please")
    with pytest.raises(MCConfigError, match="meta"):
        from optimum_mc.placement import resolve_device

        resolve_device("meta")


def test_incomplete_checkpoint_is_refused_before_work(tmp_path):
    from safetensors.torch import load_file, save_file

    path = Path(save_tiny("mixtral", tmp_path / "m"))
    sd = load_file(path / "model.safetensors")
    save_file({k: v for k, v in sd.items() if ".layers.1." not in k}, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="decoder layer 1"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config=mc_config())


def test_memory_model_packed_size_matches_a_real_run(streamed):
    """The memory model's packed-size term agrees with the bytes of a quantized model (within 10%)."""
    from optimum_mc.memory_model import estimate

    cfg = streamed.config
    est = estimate(cfg, bits=2.5, group_size=32, num_samples=8, seq_len=32)
    layers = decoder_layers(streamed)
    actual = sum(t.numel() * t.element_size() for layer in layers for t in layer.state_dict().values())
    assert 0.9 * actual <= est.packed_model <= 1.1 * actual
    assert est.host_peak > est.packed_model + est.outside_layers


def test_unwritable_offload_folder_is_refused_before_work(float_dir, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    called = []
    monkeypatch.setattr(CheckpointLayers, "fetch", lambda *a, **k: called.append(1))
    with pytest.raises(MCConfigError, match="offload_folder"):
        AutoModelForCausalLM.from_pretrained(
            float_dir, quantization_config=mc_config(offload_folder=str(blocker / "sub")), device_map="auto"
        )
    assert not called


def test_qkv_share_one_hessian():
    """q/k/v see the same input tensor: one Hessian is accumulated and shared (not computed three times)."""
    from torch import nn

    from optimum_mc.calibration.capture import LinearInputs

    q, k, v, o = nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(32, 16), nn.Linear(32, 32)
    cap = LinearInputs({"q": q, "k": k, "v": v, "o": o})
    calls = []
    original = type(cap.hessians["q"]).add
    x = torch.randn(5, 32)
    try:
        type(cap.hessians["q"]).add = lambda self, t: (calls.append(id(self)), original(self, t))
        for _ in range(2):
            q(x), k(x), v(x), o(torch.randn(5, 32))
    finally:
        type(cap.hessians["q"]).add = original
        cap.remove()
    assert cap.hessians["k"] is cap.hessians["q"] is cap.hessians["v"]
    assert cap.hessians["o"] is not cap.hessians["q"]
    assert len(calls) == 4  # (q, o) per batch
    ref = 2 / 10 * (2 * x.t() @ x)  # H = 2/n sum x x^T over the 10 rows of two identical batches
    assert torch.allclose(cap.hessians["q"].hessian, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "deepseek_v3", "phimoe"])
def test_streamed_experts_are_fused_in_place_exactly(family, tmp_path):
    """A streamed layer's per-expert checkpoint tensors are fused by copying into place (no stack / concatenate
    copies), giving exactly the parameters transformers' own loading gives, for every family."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping

    from optimum_mc.calibration.layer_source import fuse_experts_in_place

    path = save_tiny(family, tmp_path / family, num_hidden_layers=2)
    reference = AutoModelForCausalLM.from_pretrained(path)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(reference.config)
    files = sorted(Path(path).glob("*.safetensors"))
    with safe_open(str(files[0]), framework="pt") as f:
        state = {k: f.get_slice(k) for k in f.keys() if ".layers.1." in k}
        per_expert = [k for k in state if ".experts.0." in k]
        fused = fuse_experts_in_place(meta, state, get_model_conversion_mapping(meta, None, None), "cpu")
    expected = dict(reference.named_parameters())
    new = {k: v for k, v in fused.items() if k not in state}
    if per_expert:  # a per-expert checkpoint layout: every expert tensor went into a fused parameter
        assert new and not any(".experts.0." in k for k in fused)
    for name, tensor in new.items():
        assert torch.equal(tensor, expected[name]), name


def test_interrupted_first_layer_restarts_cleanly(float_dir, streamed, tmp_path, monkeypatch):
    """A run stopped inside layer 0 (inputs held on disk, embeddings parked, nothing committed) leaves only
    optimum-mc's own files: the rerun in the same resume_dir starts over and writes the bytes of a clean run."""
    expected = saved_digest(streamed, tmp_path / "clean")
    resume = tmp_path / "resume"

    def stop(self, *args, **kwargs):
        assert (resume / "held-inputs.safetensors").exists()  # the layer's inputs wait on disk meanwhile
        raise KeyboardInterrupt

    monkeypatch.setattr(PMQ, "quantize_batch", stop)
    with pytest.raises(KeyboardInterrupt):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(resume_dir=str(resume)))
    assert not (resume / "progress.json").exists() and any(resume.iterdir())
    monkeypatch.undo()
    resumed = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(resume_dir=str(resume)))
    assert not (resume / "held-inputs.safetensors").exists()
    assert saved_digest(resumed, tmp_path / "resumed") == expected


def test_deterministic_kernels_are_scoped_to_accelerator_runs():
    from optimum_mc.placement import deterministic_kernels

    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_kernels(torch.device("cpu")):
        assert torch.are_deterministic_algorithms_enabled() == before  # CPU kernels are deterministic already
    with deterministic_kernels(torch.device("meta")):  # any non-CPU device: deterministic for the duration
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


def test_resume_after_the_last_layer_redoes_nothing(float_dir, streamed, tmp_path, monkeypatch):
    """Interrupted after the last layer's commit (here in ODP calibration): the resumed run quantizes no layer and
    writes the clean run's bytes (the last layer's outputs are neither computed nor staged)."""
    import optimum_mc.pruning as pruning

    expected = saved_digest(streamed, tmp_path / "clean")
    resume = tmp_path / "resume"

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pruning, "calibrate_odp", interrupted)
    with pytest.raises(KeyboardInterrupt):
        AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(resume_dir=str(resume)))
    monkeypatch.undo()
    counted = []
    original = SequentialPipeline.quantize_layer

    def counting(self, idx, *rest):
        counted.append(idx)
        return original(self, idx, *rest)

    monkeypatch.setattr(SequentialPipeline, "quantize_layer", counting)
    resumed = AutoModelForCausalLM.from_pretrained(float_dir, quantization_config=mc_config(resume_dir=str(resume)))
    assert counted == []
    assert saved_digest(resumed, tmp_path / "resumed") == expected
