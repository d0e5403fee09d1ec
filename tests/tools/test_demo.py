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

pytestmark = pytest.mark.slow  # `pytest -m "not slow"` leaves it out of a quick run

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


# What the README promises of the demo on any CPU (its numbers differ between CPUs: training rounds differently).
# Measured: Xeon (Sapphire Rapids) float 103.71 / MC 2.5 104.54 / uniform 2 105.34 / MC 1.5 146.85 / uniform 1 167.72;
# AMD EPYC (issue 20) float 103.88 / MC 1.5 131.14 / uniform 1 186.27.
FLOAT_PPL_BELOW = 125.0  # the recipe trains: far from the untrained model's ~4096
MC25_OVER_FLOAT = 1.02  # MC 2.5-bit within 2% of float
ODP_OVER_MC25 = 1.06  # ODP costs at most 6% perplexity
ODP_SKIPS_AT_LEAST = 0.05


@pytest.fixture(scope="module")
def full_demo(tmp_path_factory):
    """The real demo, model trained afresh (not a cached copy), report captured."""
    cache = tmp_path_factory.mktemp("full-demo")
    import contextlib
    import io
    import os

    old = os.environ.get("OPTIMUM_MC_CACHE")
    os.environ["OPTIMUM_MC_CACHE"] = str(cache)
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            results = demo_run.measure_demo(quiet=False, plot_path=cache / "alloc.png")
    finally:
        if old is None:
            del os.environ["OPTIMUM_MC_CACHE"]
        else:
            os.environ["OPTIMUM_MC_CACHE"] = old
    return results, out.getvalue(), cache


def test_full_demo_holds_what_the_readme_promises_on_any_cpu(full_demo):
    """Issue 20: the README's numbers are this CPU's; these relations are what it says hold everywhere."""
    results, _, _ = full_demo
    ppl = results["perplexity"]
    flt, mc25, u2, mc15, u1 = (ppl[k] for k in ("float (fp32)", "MC 2.5-bit", "uniform 2-bit (GPTQ)", "MC 1.5-bit",
                                                 "uniform 1-bit (GPTQ)"))  # fmt: skip
    assert flt < FLOAT_PPL_BELOW, ppl
    assert mc25 < flt * MC25_OVER_FLOAT, ppl
    assert mc25 < u2, ppl  # more bits, placed by MC: better than uniform 2-bit
    assert mc15 < u1, ppl  # below 2 bits the allocation matters most
    assert u2 < mc15, ppl  # and 2 bits everywhere beat 1.5 on average
    assert results["odp_skipped"] >= ODP_SKIPS_AT_LEAST and results["odp_perplexity"] < mc25 * ODP_OVER_MC25


def test_demo_report_shows_the_comparisons(full_demo):
    _, out, cache = full_demo
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
        assert (cache / "alloc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_quiet_demo_prints_its_results_table_and_nothing_else(small_demo, monkeypatch, tmp_path, capsys):
    """Issue 20: `optimum-mc demo --quiet` printed nothing at all."""
    monkeypatch.setenv("OPTIMUM_MC_CACHE", str(small_demo.parent))
    monkeypatch.setattr(demo_run, "CALIBRATION", dict(group_size=64, num_samples=8, seq_len=64))
    assert demo_run.run_demo(quiet=True, plot_path=tmp_path / "alloc.png") == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[0] == "| model | expert bits | size (MB) | expert weights (MB) | held-out perplexity |"
    assert len(lines) == 2 + 1 + len(demo_run.VARIANTS) + 1 and all(line.startswith("|") for line in lines)


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
