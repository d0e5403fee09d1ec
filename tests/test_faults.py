"""Fault suite (issue 11): bad inputs, damaged checkpoints, interrupted saves, a demanding user's mistakes.

Every case asserts the typed error, a message that names the fix, and that nothing on disk changed: the hashes of
every pre-existing file are the same afterwards and no temporary folder is left behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import CORPUS, save_tiny, tiny_model
from transformers import AutoModelForCausalLM

import optimum_mc
from optimum_mc import MCConfig
from optimum_mc.errors import (
    CheckpointError,
    MCConfigError,
    NonFiniteWeightError,
    OutputPathError,
    PluginNotImportedError,
    SaveError,
)
from optimum_mc.saving import OLD_TAG, TMP_TAG, atomic_directory, clean_stale
from optimum_mc.tools.cli import main

ROOT = Path(__file__).resolve().parents[1]
QUICK = dict(bits=2.5, group_size=32, num_samples=4, seq_len=16, dataset=CORPUS, show_progress=False)


# ------------------------------------------------------------------------------------------ on-disk state


def snapshot(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (relative names)."""
    out = {}
    for root in roots:
        for p in sorted(Path(root).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def temporaries(*roots: Path) -> list[str]:
    return [str(p) for r in roots for p in Path(r).rglob("*") if TMP_TAG in p.name or OLD_TAG in p.name]


def assert_intact(before: dict[str, str], *roots: Path) -> None:
    after = snapshot(*roots)
    changed = [k for k, v in before.items() if after.get(k) != v]
    assert not changed, f"pre-existing files changed or vanished: {changed[:3]}"
    assert not temporaries(*roots), f"temporaries left: {temporaries(*roots)}"


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    """A workspace: float source ``src``, MC checkpoint ``mc`` (with tokenizer), a plain file, a top-1 model."""
    root = tmp_path_factory.mktemp("faults")
    save_tiny("mixtral", root / "src")
    save_tiny("mixtral", root / "top1", num_experts_per_tok=1)
    model = AutoModelForCausalLM.from_pretrained(root / "src", quantization_config=MCConfig(**QUICK))
    model.save_pretrained(root / "mc")
    shutil.copy(root / "src" / "tokenizer.json", root / "mc" / "tokenizer.json")
    shutil.copy(root / "src" / "tokenizer_config.json", root / "mc" / "tokenizer_config.json")
    (root / "a_file.txt").write_text("precious")
    return root


@pytest.fixture(scope="module")
def mc_model(ws):
    return AutoModelForCausalLM.from_pretrained(ws / "mc")


# ------------------------------------------------------------------------------------------ 6: option types

CONFIG_CASES = [
    ("modules_to_not_convert_string", {"modules_to_not_convert": "q_proj"}, "list of module names"),
    ("modules_to_not_convert_empty_name", {"modules_to_not_convert": [""]}, "list of module names"),
    ("modules_to_not_convert_int", {"modules_to_not_convert": [3]}, "list of module names"),
    ("dataset_empty", {"dataset": ""}, "names nothing"),
    ("dataset_blank", {"dataset": "   "}, "names nothing"),
    ("dataset_int", {"dataset": 5}, "dataset must be"),
    ("attn_bits_float", {"attn_bits": 4.0}, "attn_bits"),
    ("attn_bits_bool", {"attn_bits": True}, "attn_bits"),
    ("tokenizer_int", {"tokenizer": 123}, "tokenizer must be"),
    ("tokenizer_empty", {"tokenizer": ""}, "tokenizer=''"),
    ("odp_string", {"odp": "yes"}, "odp must be True or False"),
    ("act_order_string", {"act_order": "false"}, "act_order must be True or False"),
    ("constraints_int", {"allocation_constraints": 1}, "allocation_constraints must be True or False"),
    ("show_progress_none", {"show_progress": None}, "show_progress must be True or False"),
    ("group_size_float", {"group_size": 32.0}, "group_size"),
    ("num_samples_float", {"num_samples": 8.0}, "num_samples"),
    ("seed_float", {"seed": 0.5}, "seed must be an integer"),
    ("odp_threshold_nan", {"odp_threshold": float("nan")}, "odp_threshold"),
    ("odp_layers_float", {"odp_layers": 1.0}, "odp_layers"),
    ("candidate_bits_string", {"candidate_bits": "123"}, "candidate_bits"),
    ("bits_nan", {"bits": float("nan")}, "bits must be a number"),
    ("unknown_option", {"bitz": 3}, "unknown MCConfig option"),
]


@pytest.mark.parametrize("kwargs,match", [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_config_option_types(kwargs, match, ws):
    before = snapshot(ws)
    with pytest.raises(MCConfigError, match=match):
        MCConfig(**kwargs)
    assert_intact(before, ws)


def test_valid_types_still_accepted():
    cfg = MCConfig(modules_to_not_convert=("q_proj",), attn_bits=8, odp=True, dataset=["x y z"], tokenizer="gpt2")
    assert cfg.modules_to_not_convert == ["q_proj"] and cfg.attn_bits == 8


# ------------------------------------------------------------------------------------------ 6, 7, 10: ODP


def test_set_odp_needs_a_bool():
    model = tiny_model("mixtral")
    for bad in ("no", 1, None):
        with pytest.raises(MCConfigError, match="True or False"):
            optimum_mc.set_odp(model, bad, threshold=0.5)
    assert optimum_mc.get_odp_stats(model)["layers"] == {}  # nothing was switched on


def test_top1_calibration_stores_no_nan_thresholds():
    model = tiny_model("mixtral", num_experts_per_tok=1)
    assert optimum_mc.calibrate_odp(model, input_ids=torch.randint(3, 300, (2, 16))) == ([], [])
    assert getattr(model, "_mc_odp_thresholds", None) is None


def test_top1_with_odp_refused_before_loading_weights(ws, monkeypatch):
    from optimum_mc.quantizer import MCQuantizer

    def never(*a, **k):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(MCQuantizer, "_process_model_after_weight_loading", never)
    before = snapshot(ws)
    with pytest.raises(MCConfigError, match="top-1.*odp=False"):
        AutoModelForCausalLM.from_pretrained(ws / "top1", quantization_config=MCConfig(**QUICK, odp=True))
    assert_intact(before, ws)


def test_skipped_fraction_is_zero_before_any_token():
    model = tiny_model("mixtral")
    optimum_mc.set_odp(model, True, threshold=0.5)
    assert optimum_mc.get_odp_stats(model)["total"]["skipped_fraction"] == 0.0


def test_inspect_prints_non_finite_thresholds_as_na(ws, tmp_path, capsys):
    d = tmp_path / "mc"
    shutil.copytree(ws / "mc", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["quantization_config"]["odp_thresholds"] = [float("nan"), None]
    (d / "config.json").write_text(json.dumps(cfg))
    assert main(["inspect", str(d)]) == 0
    assert "ODP thresholds per MoE layer: n/a, n/a" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ 8, 10: loading


def _router_key(names):
    return next(
        k for k in names if k.endswith("layers.0.mlp.gate.weight") or k.endswith("0.block_sparse_moe.gate.weight")
    )


def _drop(match):
    def edit(sd):
        key = match(list(sd)) if callable(match) else next(k for k in sd if k.endswith(match))
        del sd[key]

    return edit


def _nan(suffix):
    def edit(sd):
        key = next(k for k in sd if k.endswith(suffix))
        sd[key] = sd[key].clone()
        sd[key].view(-1)[0] = float("nan")

    return edit


def _reshape(suffix):
    def edit(sd):
        key = next(k for k in sd if k.endswith(suffix))
        sd[key] = torch.cat([sd[key], sd[key][:1]])

    return edit


def _config_edit(fn):
    def edit(d: Path):
        cfg = json.loads((d / "config.json").read_text())
        fn(cfg["quantization_config"])
        (d / "config.json").write_text(json.dumps(cfg))

    return edit


def _truncate(d: Path):
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


LOAD_CASES = [
    ("missing_router", _drop(_router_key), None, CheckpointError, "missing .*gate.weight.*re-save"),
    ("missing_embeddings", _drop("embed_tokens.weight"), None, CheckpointError, "missing model.embed_tokens"),
    ("missing_norm", _drop("model.norm.weight"), None, CheckpointError, "missing model.norm.weight"),
    ("missing_lm_head", _drop("lm_head.weight"), None, CheckpointError, "missing lm_head.weight"),
    ("missing_packed_linear", _drop("layers.1.self_attn.o_proj.qweight"), None, CheckpointError, "missing"),
    ("missing_expert_buffer", _drop("experts.packed.3.down.scales"), None, CheckpointError, "re-save"),
    (
        "config_lost_one_linear_bits_entry",
        None,
        _config_edit(lambda q: q["linear_bits"].pop("model.layers.0.self_attn.q_proj")),
        CheckpointError,
        "missing model.layers.0.self_attn.q_proj.weight",
    ),
    ("nan_scales", _nan("layers.0.self_attn.k_proj.scales"), None, CheckpointError, "NaN/Inf.*re-save"),
    ("nan_expert_zeros", _nan("experts.packed.0.gate_up.zeros"), None, CheckpointError, "NaN/Inf"),
    ("nan_router", _nan("gate.weight"), None, CheckpointError, "NaN/Inf"),
    ("wrong_norm_shape", _reshape("model.norm.weight"), None, CheckpointError, "expected shape"),
    ("truncated_file", None, _truncate, CheckpointError, "truncated.*re-download"),
    (
        "quant_method_tampered",
        None,
        _config_edit(lambda q: q.update(quant_method="gptq")),
        PluginNotImportedError,
        'set "quant_method": "mc"',
    ),
    (
        "expert_bits_edited",
        None,
        _config_edit(lambda q: q["expert_bits"].__setitem__(0, [4] * len(q["expert_bits"][0]))),
        CheckpointError,
        "re-save",
    ),
]


@pytest.mark.parametrize(
    "edit_tensors,edit_dir,exc,match", [c[1:] for c in LOAD_CASES], ids=[c[0] for c in LOAD_CASES]
)
def test_damaged_checkpoint_refused(ws, tmp_path, edit_tensors, edit_dir, exc, match):
    d = tmp_path / "mc"
    shutil.copytree(ws / "mc", d)
    if edit_tensors is not None:
        sd = load_file(d / "model.safetensors")
        edit_tensors(sd)
        save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    if edit_dir is not None:
        edit_dir(d)
    before = snapshot(ws, d)
    with pytest.raises(exc, match=match):
        AutoModelForCausalLM.from_pretrained(d)
    assert_intact(before, ws, d)


def test_plugin_not_imported_raises(ws):
    code = (  # "import optimum_mc_autoload" is the line of the installed optimum_mc-autoload.pth
        "import optimum_mc_autoload\nfrom transformers import AutoModelForCausalLM\n"
        f"AutoModelForCausalLM.from_pretrained({str(ws / 'mc')!r})"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT), OPTIMUM_MC_NO_AUTOLOAD="1")
    before = snapshot(ws)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "PluginNotImportedError" in res.stderr and "`import optimum_mc` before from_pretrained" in res.stderr
    assert_intact(before, ws)


def test_nan_weight_refused_before_quantizing(ws, tmp_path, monkeypatch):
    import optimum_mc.pipeline as pipeline

    d = tmp_path / "src"
    shutil.copytree(ws / "src", d)
    sd = load_file(d / "model.safetensors")
    key = next(k for k in sd if k.endswith("gate.weight"))
    sd[key][0, 0] = float("nan")
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(pipeline, "quantize_model", lambda *a, **k: pytest.fail("quantization started"))
    with pytest.raises(NonFiniteWeightError, match="gate.weight.*repair"):
        AutoModelForCausalLM.from_pretrained(d, quantization_config=MCConfig(**QUICK))


# ------------------------------------------------------------------------------------------ 1, 2, 3: saving


def _writer_raising(exc):
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def writer(tensors, filename, metadata=None):  # a half-written shard, then the interruption
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) // 2)
        raise exc

    return writer


SAVE_CASES = [
    ("onto_a_file", lambda ws: ws / "a_file.txt", None, OutputPathError, "is a file"),
    ("under_a_file", lambda ws: ws / "a_file.txt" / "out", None, OutputPathError, "is a file"),
    ("unwritable", lambda ws: Path("/proc/mc-out"), None, OutputPathError, "writable output folder"),
    ("empty_path", lambda ws: "", None, OutputPathError, "empty"),
    ("ctrl_c_over_existing", lambda ws: ws / "mc", KeyboardInterrupt(), KeyboardInterrupt, None),
    ("ctrl_c_fresh", lambda ws: ws / "fresh", KeyboardInterrupt(), KeyboardInterrupt, None),
    ("disk_full_over_existing", lambda ws: ws / "mc", OSError(28, "No space left"), OSError, "No space"),
]


@pytest.mark.parametrize("target,inject,exc,match", [c[1:] for c in SAVE_CASES], ids=[c[0] for c in SAVE_CASES])
def test_failed_save_changes_nothing(ws, mc_model, monkeypatch, target, inject, exc, match):
    import transformers.modeling_utils as mu

    if inject is not None:
        monkeypatch.setattr(mu, "safe_save_file", _writer_raising(inject))
    before = snapshot(ws)
    with pytest.raises(exc, match=match):
        mc_model.save_pretrained(target(ws))
    assert_intact(before, ws)
    assert not (ws / "fresh").exists()


def test_unverifiable_save_changes_nothing(ws, mc_model, monkeypatch):
    import transformers.modeling_utils as mu

    real = mu.safe_save_file

    def truncating(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as f:
            f.truncate(os.path.getsize(filename) - 64)

    monkeypatch.setattr(mu, "safe_save_file", truncating)
    before = snapshot(ws)
    with pytest.raises(SaveError, match="does not verify.*Nothing was replaced"):
        mc_model.save_pretrained(ws / "mc")
    assert_intact(before, ws)


def test_non_finite_scales_never_saved(ws, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(ws / "mc")
    with torch.no_grad():
        model.model.layers[0].self_attn.k_proj.zeros.view(-1)[0] = float("inf")  # e.g. an fp16 zero overflow
    d = tmp_path / "mc"
    shutil.copytree(ws / "mc", d)
    before = snapshot(d)
    with pytest.raises(SaveError, match="NaN/Inf scales or zeros.*k_proj.zeros.*Re-quantize"):
        model.save_pretrained(d)
    assert_intact(before, d)


def test_quantized_model_never_saved_over_its_source(ws, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ws / "src", src)
    model = AutoModelForCausalLM.from_pretrained(src, quantization_config=MCConfig(**QUICK))
    before = snapshot(src)
    with pytest.raises(OutputPathError, match="source model.*another output folder"):
        model.save_pretrained(src)
    assert_intact(before, src)


def test_pickled_and_dequantized_models_save(ws, mc_model, tmp_path):
    import copy
    import pickle

    again = pickle.loads(pickle.dumps(mc_model))
    assert again.save_pretrained.__self__ is again  # still the MC save (atomic, verified, with the card)
    again.save_pretrained(tmp_path / "pickled")
    assert (tmp_path / "pickled" / "README.md").is_file()
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "pickled").config.quantization_config.expert_bits
    plain = copy.deepcopy(mc_model).dequantize()
    plain.save_pretrained(tmp_path / "float")  # a float model now: saved by transformers as usual
    assert (
        getattr(AutoModelForCausalLM.from_pretrained(tmp_path / "float").config, "quantization_config", None) is None
    )
    assert not temporaries(tmp_path)


def test_atomic_save_is_bound_to_mc_models_only(ws, mc_model, tmp_path):
    """No class is patched: a float model in the same process keeps transformers' own save_pretrained / push_to_hub;
    a deep copy of an MC model saves atomically and verified as the original does."""
    import copy

    from transformers import PreTrainedModel

    from optimum_mc.saving import _mc_push_to_hub, _mc_save_pretrained

    assert PreTrainedModel.save_pretrained.__module__.startswith("transformers.")
    assert PreTrainedModel.push_to_hub.__module__.startswith("transformers.")
    plain = AutoModelForCausalLM.from_pretrained(ws / "src")
    assert plain.save_pretrained.__func__ is type(plain).save_pretrained
    assert mc_model.save_pretrained.__func__ is _mc_save_pretrained
    assert mc_model.push_to_hub.__func__ is _mc_push_to_hub
    twin = copy.deepcopy(mc_model)
    assert twin.save_pretrained.__self__ is twin
    twin.save_pretrained(tmp_path / "twin")
    assert (tmp_path / "twin" / "README.md").is_file()  # the MC model card: the MC route ran
    assert not temporaries(tmp_path)


def test_save_over_existing_replaces_weights_keeps_tokenizer(ws, mc_model, tmp_path):
    d = tmp_path / "mc"
    shutil.copytree(ws / "mc", d)
    (d / "model.safetensors").write_bytes(b"stale")  # replaced, not carried over
    (d / "model-00001-of-00002.safetensors").write_bytes(b"stale shard")  # an older sharded save: dropped
    (d / "notes").mkdir()
    (d / "notes" / "run.pt").write_bytes(b"user data")  # not a model file: kept
    mc_model.save_pretrained(d)
    assert (d / "tokenizer.json").read_bytes() == (ws / "mc" / "tokenizer.json").read_bytes()
    assert (d / "notes" / "run.pt").read_bytes() == b"user data"
    assert not (d / "model-00001-of-00002.safetensors").exists()
    assert AutoModelForCausalLM.from_pretrained(d).config.quantization_config.expert_bits
    assert not temporaries(tmp_path)


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores SIGINT)
    import transformers.modeling_utils as mu
    from transformers import AutoModelForCausalLM
    import optimum_mc
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
    real = mu.safe_save_file
    def writer(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        os.kill(os.getpid(), getattr(signal, sys.argv[3]))
    mu.safe_save_file = writer
    model.save_pretrained(sys.argv[2])
    """
)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGINT"])
@pytest.mark.parametrize("existing", [True, False], ids=["over_existing", "fresh"])
def test_killed_save_leaves_previous_checkpoint(ws, tmp_path, sig, existing):
    target = tmp_path / "out"
    if existing:
        shutil.copytree(ws / "mc", target)
    before = snapshot(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run(
        [sys.executable, "-c", KILL_SCRIPT, str(ws / "mc"), str(target), sig],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    after = snapshot(tmp_path)
    assert all(after.get(k) == v for k, v in before.items())  # previous checkpoint byte-identical
    assert target.exists() == existing
    if sig == "SIGINT":
        assert res.returncode != 0 and "KeyboardInterrupt" in res.stderr and not temporaries(tmp_path)
    else:
        assert res.returncode == -signal.SIGKILL
        clean_stale(tmp_path, "out")  # what the next save into this folder does first
        assert not temporaries(tmp_path)
    if existing:
        AutoModelForCausalLM.from_pretrained(target)  # still loads


def test_save_through_a_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(real)
    with atomic_directory(tmp_path / "link") as tmp:
        (tmp / "config.json").write_text("{}")
    assert (tmp_path / "link").is_symlink() and (real / "config.json").exists() and (real / "old.txt").exists()
    assert not temporaries(tmp_path)


def test_killed_between_renames_restores_previous(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    old = tmp_path / f".out{OLD_TAG}{dead.pid}-x"
    old.mkdir()
    (old / "config.json").write_text("{}")
    (tmp_path / f".out{TMP_TAG}{dead.pid}-y").mkdir()
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "config.json").write_text('{"new": 1}')
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {"new": 1}
    assert not temporaries(tmp_path)


# ------------------------------------------------------------------------------------------ 1, 2, 9: CLI


def _no_load(monkeypatch):
    import optimum_mc.tools.cli as cli

    monkeypatch.setattr(cli, "_load", lambda *a, **k: pytest.fail("the model was loaded before the check"))


CLI_CASES = [
    ("output_is_a_file", ["quantize", "{src}", "--output", "{ws}/a_file.txt"], True, 2, "is a file"),
    ("output_under_a_file", ["quantize", "{src}", "--output", "{ws}/a_file.txt/x"], True, 2, "is a file"),
    ("output_is_source", ["quantize", "{src}", "--output", "{src}"], True, 2, "source model"),
    ("output_is_source_slash", ["quantize", "{src}", "--output", "{src}/"], True, 2, "source model"),
    ("output_unwritable", ["quantize", "{src}", "--output", "/proc/mc-out"], True, 2, "writable output folder"),
    ("top1_with_odp", ["quantize", "{ws}/top1", "--odp", "--output", "{ws}/o"], False, 2, "drop --odp"),
    ("eval_window_1", ["eval", "{ws}/mc", "--window", "1"], True, 2, "must be >= 2"),
    ("plot_missing_folder", ["inspect", "{ws}/mc", "--plot", "/no/such/dir/a.png"], True, 2, "cannot write --plot"),
    ("plot_unwritable", ["inspect", "{ws}/mc", "--plot", "/proc/a.png"], True, 2, "cannot write --plot"),
    ("plot_is_folder", ["inspect", "{ws}/mc", "--plot", "{ws}"], True, 2, "cannot write --plot"),
    ("bits_infeasible", ["quantize", "{src}", "--bits", "7", "--output", "{ws}/o"], True, 2, "infeasible"),
]


@pytest.mark.parametrize("argv,no_load,code,match", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_mistakes_before_work(ws, monkeypatch, capsys, argv, no_load, code, match):
    if no_load:
        _no_load(monkeypatch)
    argv = [a.replace("{src}", str(ws / "src")).replace("{ws}", str(ws)) for a in argv]
    before = snapshot(ws)
    try:
        got = main(["--quiet", *argv])
    except SystemExit as exc:  # argparse
        got = exc.code
    err = capsys.readouterr().err
    assert got == code and match in err and "Traceback" not in err
    assert_intact(before, ws)
    assert not (ws / "o").exists()


def test_cli_ctrl_c_exits_130_and_saves_nothing(ws, monkeypatch, capsys):
    from optimum_mc.quantizer import MCQuantizer

    def interrupted(*a, **k):  # Ctrl-C during calibration / solve / GPTQ
        raise KeyboardInterrupt

    monkeypatch.setattr(MCQuantizer, "_process_model_after_weight_loading", interrupted)
    before = snapshot(ws)
    assert main(["--quiet", "quantize", str(ws / "src"), "--output", str(ws / "mc")]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "interrupted" in err[0]
    assert_intact(before, ws)


def test_cli_failed_push_keeps_local_save(ws, tmp_path, monkeypatch, capsys):
    from transformers import PreTrainedModel

    def offline(*a, **k):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(PreTrainedModel, "push_to_hub", offline)
    out = tmp_path / "out"
    argv = ["--quiet", "quantize", str(ws / "src"), "--group-size", "32", "--num-samples", "4", "--seq-len", "16",
            "--output", str(out), "--push-to-hub", "me/model"]  # fmt: skip
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "could not push to 'me/model'" in err and "Traceback" not in err and str(out) in err
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    assert not temporaries(tmp_path)


# ------------------------------------------------------------------------------------------ 4: CP-SAT and Ctrl-C

SOLVE_THEN_SIGINT = textwrap.dedent(
    """
    import os, signal, torch
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a background job ignores SIGINT)
    from optimum_mc.allocation import ExpertFactors, allocate_bits
    f = ExpertFactors(torch.rand(8) + 0.1, torch.rand(8) + 0.1, torch.rand(8, 3) + 0.1)
    allocate_bits([f], [1, 2, 3], 2.5, "layer", 1.0, 1.5, 2.0)
    try:
        os.kill(os.getpid(), signal.SIGINT)
        for _ in range(10**6):
            pass
    except KeyboardInterrupt:
        print("KeyboardInterrupt")
    """
)


def test_ctrl_c_after_a_solve_is_a_keyboard_interrupt():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    res = subprocess.run([sys.executable, "-c", SOLVE_THEN_SIGINT], env=env, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert res.returncode == 0 and "KeyboardInterrupt" in res.stdout, res.stderr


# ------------------------------------------------------------------------------------------ 5: kernel cache


needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler")


@needs_cc
def test_truncated_cached_kernel_is_rebuilt(tmp_path):
    from optimum_mc.kernels import cpu

    env = dict(os.environ, PYTHONPATH=str(ROOT), OPTIMUM_MC_CACHE=str(tmp_path))
    env.pop(cpu.ENV_KERNEL, None)
    code = "from optimum_mc.kernels import cpu; lib = cpu.library(); assert lib is not None; print('ok')"
    first = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    (so,) = (tmp_path / "kernels").glob("*.so")
    so.write_bytes(so.read_bytes()[:4096])  # a crash mid-copy, a full disk
    again = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "ok" in again.stdout, again.stderr  # before: SIGBUS (exit -7)
    assert "damaged" in again.stderr and len(list((tmp_path / "kernels").glob("*.so"))) == 1


@needs_cc
def test_kernel_missing_symbols_falls_back_with_one_warning(tmp_path, monkeypatch, caplog):
    import logging

    from optimum_mc.kernels import cpu

    src = tmp_path / "empty.c"
    src.write_text("int unrelated(void) { return 0; }\n")
    so = tmp_path / "empty.so"
    subprocess.run([shutil.which("cc") or "gcc", "-shared", "-fPIC", str(src), "-o", str(so)], check=True)
    monkeypatch.delenv(cpu.ENV_KERNEL, raising=False)
    monkeypatch.setattr(cpu, "build", lambda cc, flags=cpu.FLAGS, announce=True: so)
    with caplog.at_level(logging.WARNING, logger=cpu.__name__):
        assert cpu.library.__wrapped__() is None
    assert len(caplog.records) == 1 and "lacks the symbols" in caplog.text
