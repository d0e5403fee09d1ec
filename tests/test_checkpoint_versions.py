"""Versioned checkpoints: format / package version in config.json and shard metadata, errors naming the version a
newer checkpoint needs, calibration texts kept out of config.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import CORPUS, save_tiny
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc.config import texts_record
from optimum_mc.errors import CalibrationError, CheckpointVersionError, MCConfigError
from optimum_mc.version import FORMAT_VERSION, __version__

IDS = torch.tensor([[5, 17, 42, 99, 7, 3]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    src = save_tiny("mixtral", tmp_path_factory.mktemp("float"))
    cfg = optimum_mc.MCConfig(bits=2.5, group_size=32, num_samples=8, seq_len=32, dataset=CORPUS, show_progress=False)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=cfg)
    out = tmp_path_factory.mktemp("mc") / "q"
    model.save_pretrained(out)
    with torch.no_grad():
        return out, model(input_ids=IDS).logits


def _copy(saved_dir, tmp_path, edit_config=None, metadata=None):
    """A copy of the saved checkpoint with its quantization_config edited and/or its shard metadata replaced."""
    out = tmp_path / "copy"
    out.mkdir()
    for f in saved_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    if edit_config is not None:
        cfg = json.loads((out / "config.json").read_text())
        edit_config(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    if metadata is not None:
        shard = out / "model.safetensors"
        save_file(load_file(shard), shard, metadata=metadata)
    return out


def test_config_and_shards_carry_the_versions(saved):
    path, _ = saved
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    # one width per expert: written as format 1, the oldest that describes it (older optimum-mc versions read it)
    assert FORMAT_VERSION >= 2 and qc["format_version"] == 1 and qc["optimum_mc_version"] == __version__
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["mc_format_version"] == "1" and meta["optimum_mc_version"] == __version__
    assert meta["format"] == "pt"  # transformers' own entry is kept


def test_calibration_texts_are_a_record_not_the_texts(saved):
    path, _ = saved
    raw = (path / "config.json").read_text()
    qc = json.loads(raw)["quantization_config"]
    assert qc["dataset"] == texts_record(CORPUS) and qc["dataset"]["texts"] == len(CORPUS)
    assert "quick brown fox" not in raw
    assert texts_record(["ab", "c"]) != texts_record(["a", "bc"])  # boundaries count, not only the characters
    # a config holding only the record loads (pre-quantized) but cannot calibrate again
    again = optimum_mc.MCConfig.from_dict(qc)
    from optimum_mc.calibration.data import load_documents

    with pytest.raises(CalibrationError, match="record"):
        load_documents(again.dataset)
    with pytest.raises(MCConfigError, match="record of calibration texts"):
        optimum_mc.MCConfig(dataset={"texts": 1})


def test_checkpoint_without_versions_still_loads(saved, tmp_path):
    path, logits = saved

    def drop(qc):
        qc.pop("format_version")
        qc.pop("optimum_mc_version")

    old = _copy(path, tmp_path, drop, metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(old)
    with torch.no_grad():
        assert torch.equal(model(input_ids=IDS).logits, logits)


def test_newer_format_in_config_asks_for_an_upgrade(saved, tmp_path):
    edit = {"format_version": FORMAT_VERSION + 1, "optimum_mc_version": "9.1"}
    newer = _copy(saved[0], tmp_path, lambda qc: qc.update(edit))
    with pytest.raises(CheckpointVersionError, match=r"needs optimum-mc >= 9\.1; upgrade optimum-mc"):
        AutoModelForCausalLM.from_pretrained(newer)


def test_unknown_option_from_a_newer_version_asks_for_an_upgrade(saved, tmp_path):
    newer = _copy(saved[0], tmp_path, lambda qc: qc.update(optimum_mc_version="9.2.0", new_option=True))
    with pytest.raises(CheckpointVersionError, match=r"needs optimum-mc >= 9\.2\.0.*new_option"):
        AutoModelForCausalLM.from_pretrained(newer)


def test_unknown_option_from_this_version_is_a_typo():
    d = optimum_mc.MCConfig().to_dict()
    with pytest.raises(MCConfigError, match="unknown MCConfig option") as exc:
        optimum_mc.MCConfig.from_dict({**d, "bitz": 3})
    assert not isinstance(exc.value, CheckpointVersionError)
    with pytest.raises(MCConfigError, match="format_version must be a positive integer"):
        optimum_mc.MCConfig.from_dict({**d, "format_version": "2"})


def test_newer_format_in_shard_metadata_asks_for_an_upgrade(saved, tmp_path):
    meta = {"format": "pt", "mc_format_version": str(FORMAT_VERSION + 1), "optimum_mc_version": "9.3"}
    newer = _copy(saved[0], tmp_path, metadata=meta)
    with pytest.raises(CheckpointVersionError, match=r"needs optimum-mc >= 9\.3; upgrade optimum-mc"):
        AutoModelForCausalLM.from_pretrained(newer)


def test_shard_metadata_is_written_in_one_order(tmp_path):
    """safetensors writes metadata in hash order; saves sort it so equal models give equal bytes."""
    from optimum_mc.checkpoint import read_safetensors_metadata, sort_shard_metadata

    tensors = {"a": torch.arange(6, dtype=torch.int32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16)}
    meta = {f"k{i}": str(i) for i in (5, 1, 4, 2, 3, 0)}
    files = []
    for i in range(4):  # several files: the hash order differs between them
        f = tmp_path / f"s{i}.safetensors"
        save_file(tensors, f, metadata=meta)
        size = f.stat().st_size
        sort_shard_metadata(f)
        assert f.stat().st_size == size and list(read_safetensors_metadata(str(f))) == sorted(meta)
        assert all(torch.equal(load_file(f)[k], v) for k, v in tensors.items())
        files.append(f.read_bytes())
    assert len(set(files)) == 1


def test_two_saves_of_one_model_are_byte_identical(saved, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(saved[0])
    digests = set()
    for i in range(3):
        model.save_pretrained(tmp_path / f"s{i}")
        digests.add((tmp_path / f"s{i}" / "model.safetensors").read_bytes())
    assert len(digests) == 1 and digests == {(saved[0] / "model.safetensors").read_bytes()}


def test_options_newer_than_format_1_are_left_out_at_their_defaults(saved):
    """An expert-granularity checkpoint names none of the later options, so optimum-mc versions that predate them
    read it; set to anything else they are written (and such a reader then asks for an upgrade)."""
    path, _ = saved
    qc = json.loads((path / "config.json").read_text())["quantization_config"]
    later = ("allocation_granularity", "clip_search", "decode_activations")
    assert not set(later) & set(qc)
    cfg = optimum_mc.MCConfig(allocation_granularity="projection", clip_search=True, decode_activations="float")
    d = cfg.to_dict()
    assert (d["allocation_granularity"], d["clip_search"], d["decode_activations"]) == ("projection", True, "float")
    again = optimum_mc.MCConfig.from_dict(d)
    assert (again.allocation_granularity, again.clip_search, again.decode_activations) == ("projection", True, "float")
    assert optimum_mc.MCConfig.from_dict(optimum_mc.MCConfig().to_dict()).decode_activations == "auto"
