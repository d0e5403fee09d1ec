"""The fused MoE kernels compile for an H100 / H200 (sm_90) without a GPU (Triton's bundled ptxas), and their
default configurations do not spill (scripts/triton_resources.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton", reason="Triton is an optional extra (pip install 'optimum-mc[triton]')")
ROOT = Path(__file__).resolve().parents[2]
PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_default_configurations_compile_for_sm90_without_spills(tmp_path):
    import json

    out = tmp_path / "res.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, str(ROOT / "scripts" / "triton_resources.py"), "--bits", "2", "3", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert {(r["kernel"], r["bits"]) for r in rows} == {
        (k, b) for k in ("gate_up_decode", "down_decode", "gate_up_tiled", "down_tiled") for b in (2, 3)
    }
    for r in rows:
        assert r["stack_bytes"] == 0 and r["regs"] <= 255, r  # no local-memory spills
        assert r["shared_bytes"] <= 100 * 1024, r  # fits an SM with room for a second program
