"""``optimum-cli mc ...`` (optimum's command registry) and the ``optimum-mc`` alias, run as subprocesses; the loading
flags (--dtype, --device-map, --revision, --trust-remote-code, --token) reach from_pretrained."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import CORPUS, save_tiny

from optimum_mc.tools import cli

ROOT = Path(__file__).resolve().parents[2]


def _command(name: str, module: str) -> list[str]:
    """The installed console script, or the same entry point through ``python -m`` when it is not on PATH."""
    exe = shutil.which(name)
    return [exe] if exe else [sys.executable, "-m", module]


OPTIMUM_CLI = _command("optimum-cli", "optimum.commands.optimum_cli")
OPTIMUM_MC = _command("optimum-mc", "optimum_mc")


def run(argv: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    # this checkout first on the path: its optimum_mc and its optimum/commands/register portion are the ones found
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> str:
    assert res.returncode == 0, f"exit {res.returncode}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res.stdout


def test_optimum_cli_lists_and_documents_mc(tmp_path):
    top = ok(run([*OPTIMUM_CLI, "--help"], tmp_path))
    assert "mc" in top.split("positional arguments:")[1] and "(optimum-mc)" in top
    mc = ok(run([*OPTIMUM_CLI, "mc", "--help"], tmp_path))
    assert "usage: optimum-cli mc" in mc
    for sub in ("quantize", "eval", "inspect", "bench", "demo"):
        assert sub in mc
    quantize_help = ok(run([*OPTIMUM_CLI, "mc", "quantize", "--help"], tmp_path))
    alias_help = ok(run([*OPTIMUM_MC, "quantize", "--help"], tmp_path))
    # one argparse definition: the same options under both programs
    assert quantize_help.replace("optimum-cli mc", "P").split() == alias_help.replace("optimum-mc", "P").split()
    for flag in ("--dtype", "--device-map", "--revision", "--trust-remote-code", "--token", "--text-column"):
        assert flag in quantize_help


def test_registration_is_light(tmp_path):
    """optimum-cli imports every register module at start-up: ours must not pull in torch / transformers."""
    code = ("import sys, optimum.commands.register.register_mc as r; "
            "print(r.REGISTER_COMMANDS[0].COMMAND.name, sorted(m for m in ('torch', 'transformers', 'optimum_mc') "
            "if m in sys.modules))")  # fmt: skip
    assert ok(run([sys.executable, "-c", code], tmp_path)).split() == ["mc", "[]"]


def test_optimum_cli_user_error_is_one_line(tmp_path):
    res = run([*OPTIMUM_CLI, "mc", "inspect", str(tmp_path / "nothing")], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [f"optimum-cli mc: error: {tmp_path / 'nothing'} is not a model folder "
                                               "(no config.json)"]  # fmt: skip
    res = run([*OPTIMUM_CLI, "mc"], tmp_path)  # no subcommand: argparse's usage error
    assert res.returncode == 2 and "required" in res.stderr


def test_quantize_through_optimum_cli_inspect_through_both(tmp_path):
    src = save_tiny("mixtral", tmp_path / "float")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(CORPUS * 3), encoding="utf-8")
    out = tmp_path / "q"
    argv = [*OPTIMUM_CLI, "mc", "--quiet", "quantize", src, "--group-size", "32", "--num-samples", "8",
            "--seq-len", "32", "--dataset", str(calib), "--eval-text", str(calib), "--output", str(out)]  # fmt: skip
    ok(run(argv, tmp_path))
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "mc" and qc["format_version"] >= 1
    readme = (out / "README.md").read_text()
    assert "| calib.txt | perplexity |" in readme  # --eval-text measured after quantizing, into the card
    assert f'from_pretrained("{out}"' in readme and ".mc-tmp-" not in readme  # names --output
    a = ok(run([*OPTIMUM_CLI, "mc", "inspect", str(out)], tmp_path))
    b = ok(run([*OPTIMUM_MC, "inspect", str(out)], tmp_path))
    assert a == b and "overall average expert bits: 2.500" in a


# ------------------------------------------------------------------------------------------ loading flags


class _Stop(Exception):
    pass


@pytest.fixture
def captured(monkeypatch):
    """Record what from_pretrained gets (model and tokenizer) and stop before any loading."""
    calls = {}

    def fake(kind):
        def from_pretrained(path, **kw):
            calls[kind] = (path, kw)
            if kind == "model":
                raise _Stop
            return object()

        return from_pretrained

    import transformers

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model"))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer"))
    return calls


def _load_with(argv: list[str], tmp_path) -> None:
    args = cli.build_parser().parse_args(["eval", str(tmp_path), *argv])
    with pytest.raises(_Stop):
        cli._load(args.model, args)


def test_dtype_defaults_to_the_checkpoint_own(captured, tmp_path):
    _load_with([], tmp_path)
    path, kw = captured["model"]
    assert path == str(tmp_path) and kw == {"dtype": "auto"}  # no more forced float32
    assert captured["tokenizer"] == (str(tmp_path), {})


def test_loading_flags_reach_model_and_tokenizer(captured, tmp_path):
    import torch

    argv = ["--dtype", "bfloat16", "--device-map", "auto", "--revision", "v2", "--trust-remote-code",
            "--token", "hf_x"]  # fmt: skip
    _load_with(argv, tmp_path)
    hub = {"revision": "v2", "token": "hf_x", "trust_remote_code": True}
    assert captured["model"][1] == {"dtype": torch.bfloat16, "device_map": "auto", **hub}
    assert captured["tokenizer"][1] == hub


def test_device_map_json_and_bad_values(captured, tmp_path, capsys):
    _load_with(["--device-map", '{"": "cpu"}'], tmp_path)
    assert captured["model"][1]["device_map"] == {"": "cpu"}
    for bad in (["--device-map", "{nope"], ["--device-map", " "], ["--dtype", "int8"]):
        with pytest.raises(SystemExit) as exc:
            cli.build_parser().parse_args(["eval", str(tmp_path), *bad])
        assert exc.value.code == 2
    assert "JSON object" in capsys.readouterr().err


def test_quantize_passes_dataset_options_and_tokenizer(monkeypatch, tmp_path):
    seen = {}

    def fake_load(path, args, cfg=None, tok=None):
        seen["cfg"], seen["tok"] = cfg, tok
        raise _Stop

    monkeypatch.setattr(cli, "_load_tokenizer", lambda path, args: "TOKENIZER")
    monkeypatch.setattr(cli, "_load", fake_load)
    monkeypatch.setattr("optimum_mc.config_checks._check_types", lambda cfg: None)  # a str stands for the tok
    argv = ["quantize", str(tmp_path), "--output", str(tmp_path / "o"), "--dataset", "me/corpus",
            "--dataset-config", "v1", "--dataset-split", "validation", "--text-column", "body"]  # fmt: skip
    with pytest.raises(_Stop):
        cli.run(cli.build_parser().parse_args(argv))
    cfg = seen["cfg"]
    assert cfg.dataset_options() == {"dataset_config": "v1", "dataset_split": "validation", "text_column": "body"}
    assert cfg.tokenizer == "TOKENIZER" and seen["tok"] == "TOKENIZER"  # calibration uses the CLI's tokenizer


def test_quantize_checks_options_before_loading(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_load_tokenizer", lambda *a: pytest.fail("loaded before the options were checked"))
    argv = ["quantize", str(tmp_path), "--output", str(tmp_path / "o"), "--text-column", "body"]
    assert cli.run(cli.build_parser().parse_args(argv)) == 2
    assert "only apply to a `datasets` source" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ packaging


def test_setup_cfg_ships_the_namespace_portions():
    import configparser

    from setuptools import find_namespace_packages

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    assert cfg["options"]["packages"].strip() == "find_namespace:"
    find = cfg["options.packages.find"]
    found = find_namespace_packages(
        str(ROOT), include=find["include"].split(), exclude=find.get("exclude", "").split()
    )
    assert {"optimum.commands", "optimum.commands.register", "optimum_mc", "optimum_mc.tools"} <= set(found)
    assert not any(p.startswith(("tests", "scripts", "docs")) or p.endswith("__pycache__") for p in found)
    # PEP 420: optimum's own files must not be shadowed by an __init__.py of ours
    assert not list((ROOT / "optimum").rglob("__init__.py"))


def test_two_copies_on_the_path_register_mc_once(tmp_path):
    """optimum-cli imports register_mc once per path entry holding it (a checkout beside an install)."""
    shutil.copytree(ROOT / "optimum", tmp_path / "copy" / "optimum", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "copy"), str(ROOT)]))
    res = subprocess.run([*OPTIMUM_CLI, "mc", "inspect", "--help"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert ok(res).startswith("usage: optimum-cli mc inspect")
