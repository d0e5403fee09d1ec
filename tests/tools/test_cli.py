"""The optimum-mc command: quantize / inspect / eval end to end on a tiny model, and user errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from tiny_models import CORPUS, save_tiny

from optimum_mc.tools.cli import main


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny("mixtral", tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("calib") / "calib.txt"
    f.write_text("\n\n".join(CORPUS * 3), encoding="utf-8")
    return f


@pytest.fixture(scope="module")
def quantized_dir(tiny_dir, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("q")
    code = main(["--quiet", "quantize", tiny_dir, "--bits", "2.5", "--group-size", "32", "--num-samples", "8",
                 "--seq-len", "32", "--dataset", str(calib_file), "--output", str(out)])  # fmt: skip
    assert code == 0
    return out


def test_quantize_then_inspect(quantized_dir, tmp_path, capsys):
    assert (quantized_dir / "model.safetensors").exists() and (quantized_dir / "tokenizer.json").exists()
    png = tmp_path / "alloc.png"
    assert main(["inspect", str(quantized_dir), "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "overall average expert bits: 2.500" in out and "experts (packed)" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_reads_text_files(quantized_dir, calib_file, capsys):
    assert main(["--quiet", "eval", str(quantized_dir), "--text", str(calib_file), "--window", "16"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("calib.txt: perplexity ") and float(line.split()[2]) > 1
    n = int(line.split("(")[1].split()[0])  # issue 20: what was scored is said
    assert f"({n} windows of 16 tokens, {n * 15:,} tokens scored)" in line and n > 1


def test_eval_with_odp_reports_the_skipped_share_and_no_length_warning(quantized_dir, calib_file, capfd):
    argv = ["eval", str(quantized_dir), "--text", str(calib_file), "--window", "16", "--max-windows", "4", "--odp"]
    assert main(argv) == 0
    out, err = capfd.readouterr()
    line = out.strip().splitlines()[-1]
    assert "(4 windows of 16 tokens, 60 tokens scored, ODP skipped " in line and "% of expert evaluations)" in line
    assert "Token indices sequence length" not in out + err


def test_every_cli_option_has_help_and_the_allocation_choices_are_the_configs():
    import argparse

    from optimum.commands.mc import ALLOCATION_MODES
    from optimum_mc.config import ALLOCATION_MODES as CONFIG_MODES
    from optimum_mc.tools.cli import build_parser

    assert ALLOCATION_MODES == CONFIG_MODES
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not isinstance(a, argparse._HelpAction) and not (a.help or "").strip()]  # fmt: skip
    assert not missing, missing


def test_inspect_into_a_closed_pipe_ends_quietly(quantized_dir):
    """Issue 20: `optimum-mc inspect OUT | head` ended in a BrokenPipeError traceback."""
    proc = subprocess.Popen([sys.executable, "-m", "optimum_mc", "inspect", str(quantized_dir)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    proc.stdout.close()  # the reader leaves before the command prints (it takes seconds to import)
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize(
    "argv,match",
    [
        (["inspect", "/no/such/dir"], "not a model folder"),
        (["eval", "/no/such/model"], "not found"),
        (["eval", "{model}", "--text", "/no/such/file.txt"], "cannot read text file"),
        (["quantize", "{model}", "--bits", "7", "--output", "{tmp}/x"], "infeasible"),
    ],
)
def test_user_errors_exit_2_without_traceback(argv, match, tiny_dir, tmp_path, capsys):
    argv = [a.replace("{model}", tiny_dir).replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    assert not (tmp_path / "x").exists()  # refused before anything is written
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_number_is_an_argparse_error():
    res = subprocess.run([sys.executable, "-m", "optimum_mc", "quantize", "m", "--bits", "abc", "--output", "o"],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 2 and "is not a number" in res.stderr and "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "optimum-mc quantize: error: argument --bits: 'abc' is not a number (usage: optimum-mc quantize -h)"
    ]  # issue 20: one line, not the 15-line usage first


def test_demo_model_builds_offline_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_mc.tools.demo import build_demo_model

    path = build_demo_model(tmp_path / "demo", seconds=2, quiet=True)
    assert (path / "config.json").exists() and not list(tmp_path.glob(".demo-*"))  # renamed into place
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.model_type == "mixtral" and len(tok) == model.config.vocab_size
    assert build_demo_model(path, seconds=2, quiet=True) == path  # cached: no retraining


def test_bench_reports_four_variants(tiny_dir, calib_file, capsys):
    argv = ["--quiet", "bench", tiny_dir, "--group-size", "32", "--num-samples", "8", "--seq-len", "32",
            "--dataset", str(calib_file), "--prompt-len", "16", "--new-tokens", "4"]  # fmt: skip
    assert main(argv) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "tok/s" not in line]
    names = ["float", "MC, float decode activations", "MC, int8 decode activations", "MC + ODP"]
    assert [r.split("|")[1].strip() for r in rows] == names
    mem = [float(r.split("|")[4]) for r in rows]
    assert mem[1] < mem[0] and mem[2] == mem[1]  # packed experts and linears take less memory than float


def test_bench_takes_an_mc_folder_against_its_dequantized_weights(quantized_dir, capsys):
    """Issue 20: bench on a folder optimum-mc saved crashed (AttributeError: no gate_up_proj)."""
    argv = ["--quiet", "bench", str(quantized_dir), "--prompt-len", "16", "--new-tokens", "4", "--repeats", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "float = this MC model's weights dequantized" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and "tok/s" not in line]
    mem = [float(r.split("|")[4]) for r in rows]
    assert len(rows) == 4 and mem[1] < mem[0]


def test_bench_refuses_quantization_options_for_an_mc_folder(quantized_dir, capsys):
    assert main(["bench", str(quantized_dir), "--bits", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "already MC-quantized" in err and "--bits" in err and len(err.strip().splitlines()) == 1


def test_quantize_refuses_an_already_quantized_folder(quantized_dir, tmp_path, capsys):
    """Issue 20: quantize of an MC folder exited 0 and wrote a copy at the stored bits, ignoring --bits."""
    out = tmp_path / "again"
    assert main(["quantize", str(quantized_dir), "--bits", "1.5", "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already MC-quantized" in err and "float model" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_from_pretrained_refuses_new_quantization_options_for_an_mc_folder(quantized_dir):
    from transformers import AutoModelForCausalLM

    from optimum_mc import MCConfig
    from optimum_mc.errors import AlreadyQuantizedError

    with pytest.raises(AlreadyQuantizedError, match=r"bits=1\.5.*float model"):
        AutoModelForCausalLM.from_pretrained(quantized_dir, quantization_config=MCConfig(bits=1.5))
    # loading options, and options equal to the stored ones, stay allowed
    model = AutoModelForCausalLM.from_pretrained(
        quantized_dir, quantization_config=MCConfig(bits=2.5, group_size=32, odp=True, show_progress=False)
    )
    assert model.config.quantization_config.odp is True
    assert "_requested_quantization" not in model.config.quantization_config.to_dict()
