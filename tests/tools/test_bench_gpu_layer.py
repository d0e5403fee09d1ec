"""scripts/bench_gpu_layer.py end to end in its dry run (CPU, Triton interpreter, tiny shapes): it writes the JSON
the GPU check commits, with the keys anyone comparing runs reads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is an optional extra (pip install 'optimum-mc[triton]')")

ROOT = Path(__file__).resolve().parents[2]


def test_dry_run_writes_the_layer_json(tmp_path):
    out = tmp_path / "gpu-layer-test.json"
    env = {**os.environ, "MC_COMMIT": "0123abc", "OMP_NUM_THREADS": "1"}
    env.pop("OPTIMUM_MC_CUDA_MOE", None)
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_gpu_layer.py"), "--dry-run", "--out",
                           str(out)], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["commit"] == "0123abc" and result["device"] == "cpu-interpreter" and result["dry_run"] is True
    assert result["complete"] is True
    assert [r["tokens"] for r in result["layer"]] == [1, 12]
    for row in result["layer"]:
        for key in ("mc_us", "bf16_grouped_mm_us", "dense_eager_us", "mc_tiled_us"):
            assert row[key] > 0, (row, key)
        # the fused and the previous kernels compute the same layer (bf16 rounding of the intermediate aside)
        assert row["rel_diff_fused_vs_tiled"] <= 2.5e-2, row
    assert "mc_dequant_grouped_us" in result["layer"][-1]
    assert {(r["bits"], r["shape"]) for r in result["bandwidth"]} == {(b, s) for b in (1, 2, 3, 4)
                                                                      for s in ("gate_up", "down")}  # fmt: skip
    names = {(k["kernel"], k["bits"]) for k in result["kernels"]}
    assert names == {(n, b) for n in ("gate_up_decode", "down_decode", "gate_up_tiled", "down_tiled") for b in (2, 3)}
    assert all({"n_regs", "n_spills", "tiles"} <= set(k) for k in result["kernels"])
    assert set(result["launches"]) == {"1", "12"}


def test_dry_run_sweep_writes_tile_rows(tmp_path):
    out = tmp_path / "gpu-sweep-test.json"
    env = {**os.environ, "MC_COMMIT": "0123abc", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "scripts" / "bench_gpu_layer.py"), "--dry-run", "--sweep", "--out", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())["sweep"]
    assert {len(r["tiles"]) for r in rows if r["tiles"] != "default"} == {3, 4}  # per-pair and tiled candidates
    assert {r["tokens"] for r in rows if not r["expand"]} == {1, 12}  # the gather unpacking at the defaults
    assert {r["down_split_k"] for r in rows if r["tokens"] == 1} > {4}  # split-K candidates at decode
    assert all(r["us"] > 0 and r["rel_diff"] <= 2.5e-2 for r in rows), rows
