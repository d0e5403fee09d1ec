"""The paired per-window statistics of scripts/bench_quality.py (what "strictly better" means in docs/results.md)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_quality  # noqa: E402


def _row(name: str, nll: dict[str, list[float]]) -> dict:
    return {"variant": name, "window_nll": nll}


def test_paired_mean_and_standard_error_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    b = {d: (2.0 + torch.rand(7, generator=g)).tolist() for d in bench_quality.DOMAINS}
    a = {d: [x - 0.01 + 0.002 * i for i, x in enumerate(v)] for d, v in b.items()}
    res = bench_quality.paired(_row("a", a), _row("b", b))
    diffs = torch.tensor([-0.01 + 0.002 * i for i in range(7)], dtype=torch.float64)
    for d in bench_quality.DOMAINS:
        m, se, n = res[d]
        assert n == 7 and m == pytest.approx(float(diffs.mean()), abs=1e-12)
        assert se == pytest.approx(float(diffs.std(unbiased=True)) / math.sqrt(7), rel=1e-9)
    assert res["all"][2] == 21 and res["all"][0] == pytest.approx(float(diffs.mean()), abs=1e-12)


def test_paired_table_counts_only_domains_whose_interval_excludes_zero():
    base = {d: [3.0, 3.1, 2.9, 3.05] for d in bench_quality.DOMAINS}
    clear = {d: [x + 0.05 for x in v] for d, v in base.items()}  # b worse by a constant: SE 0
    noisy = {d: [x + s for x, s in zip(v, (0.05, -0.05, 0.04, -0.04))] for d, v in base.items()}
    rows = [_row("mc", base), _row("clear", clear), _row("noisy", noisy)]
    table = bench_quality.paired_table(rows, "mc")
    lines = {ln.split(" vs ")[1].split(" ")[0]: ln for ln in table.splitlines() if ln.startswith("| mc vs")}
    assert lines["clear"].rstrip().endswith("| 3 / 0 of 3 |")
    assert lines["noisy"].rstrip().endswith("| 0 / 0 of 3 |")
    assert f"{100 * (math.exp(-0.05) - 1):+.3f}%" in lines["clear"]


def test_seed_suffix_sets_the_seed_only_for_that_variant():
    pytest.importorskip("optimum_mc")
    assert bench_quality.variant_config("mc-2.5@3", 0, 4, 64).seed == 3
    cfg = bench_quality.variant_config("frequency-2.5", 0, 4, 64)
    assert cfg.seed == 0 and cfg.allocation == "frequency"
