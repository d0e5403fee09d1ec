"""The demo: its training recipe routes every expert on held-out text; its report shows float vs uniform 2-bit
vs MC 2.5 (perplexity and size), ODP's skipped share, a sample and the allocation heatmap."""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from optimum_mc.tools import demo, demo_run
from optimum_mc.tools.evaluation import token_windows

# the demo's recipe (load-balancing loss weight, schedule, seed, top-2 of 8 experts) on a smaller, faster model
# (one thread: pytest-xdist already runs two workers on the two cores)
SMALL = dataclasses.replace(demo.RECIPE, hidden=64, intermediate=128, layers=2, steps=80, batch=4, threads=1)


def _held_out(tok, n=24):
    return token_windows(tok, "\n\n".join(demo.split_documents()[1]), 128, n)


@pytest.fixture(scope="module")
def small_demo(tmp_path_factory):
    return demo.build_demo_model(tmp_path_factory.mktemp("demo") / demo.CACHE_NAME, quiet=True, recipe=SMALL)


def test_recipe_routes_every_expert_on_held_out_text(small_demo):
    model = AutoModelForCausalLM.from_pretrained(small_demo, dtype=torch.float32)
    usage = demo.expert_usage(model, _held_out(AutoTokenizer.from_pretrained(small_demo)))
    assert usage.shape == (SMALL.layers, SMALL.experts)
    # uniform would be 1/8 = 12.5% each; every expert gets a real share, none is dead
    assert usage.min() > 0.03, usage


def test_the_cached_full_demo_model_routes_every_expert():
    path = demo.cache_path()
    if not (path / "config.json").exists():
        pytest.skip("the full demo model is not built here (optimum-mc demo / scripts/build_demo_model.py)")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    usage = demo.expert_usage(model, _held_out(AutoTokenizer.from_pretrained(path), 64))
    assert usage.shape == (demo.RECIPE.layers, demo.RECIPE.experts) and usage.min() > 0.03, usage


def test_demo_report_shows_the_comparisons(small_demo, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("OPTIMUM_MC_CACHE", str(small_demo.parent))
    monkeypatch.setattr(demo_run, "CALIBRATION", dict(group_size=64, num_samples=8, seq_len=64))
    assert demo_run.run_demo(quiet=False, plot_path=tmp_path / "alloc.png") == 0
    out = capsys.readouterr().out
    rows = ["| float (fp32) | 32 |", "| MC 2.5-bit + ODP ("] + [f"| {n} | {b} |" for n, b, _ in demo_run.VARIANTS]
    assert "| uniform 2-bit (GPTQ) | 2 |" in rows and "| MC 2.5-bit | 2.5 |" in rows
    for row in rows:
        assert row in out, out
    assert "of expert evaluations skipped" in out and "0 never routed" in out
    assert out.count(demo_run.PROMPT) == 2  # a float and an MC sample, each after the prompt
    assert "generated tokens are the float model's" in out
    sizes = {line.split("|")[1].strip(): float(line.split("|")[4]) for line in out.splitlines()
             if line.startswith("| ") and line.split("|")[3].strip()[:1].isdigit()}  # fmt: skip
    assert sizes["uniform 1-bit (GPTQ)"] < sizes["MC 1.5-bit"] < sizes["uniform 2-bit (GPTQ)"] < sizes["MC 2.5-bit"]
    assert sizes["MC 2.5-bit"] < sizes["float (fp32)"] / 8
    if "matplotlib" in sys.modules or _has_matplotlib():
        assert (tmp_path / "alloc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def test_heatmap_is_skipped_without_matplotlib(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib... raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    assert demo_run.plot_allocation([[2, 3], [1, 2]], [0, 1], tmp_path / "a.png") is None
    assert not (tmp_path / "a.png").exists()
