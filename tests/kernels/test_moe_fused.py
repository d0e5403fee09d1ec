"""The fused MoE kernels over the GPU layout (kernels/moe_fused.py) under Triton's CPU interpreter
(TRITON_INTERPRET=1) against the pure-torch reference op: mixed widths, dropped slots, zero-weight slots, fp32 /
fp16 / bf16, the per-pair decode kernels and the tiled ones, every fused activation, and the CUDA dispatch
(``cuda_moe``) with its fallbacks. In a fresh subprocess: the interpreter is chosen when Triton JIT functions are
created."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="Triton is an optional extra (pip install 'optimum-mc[triton]')")

CHECK = r"""
import torch
from helpers.moe import random_experts
from optimum_mc.kernels.gpu_layout import build_layout
from optimum_mc.kernels.moe_fused import DECODE_MAX_PAIRS, FUSED_ACTIVATIONS, cuda_moe, fused_moe
from optimum_mc.kernels.reference import moe_reference
import optimum_mc.kernels.moe_fused as mf

def rel(got, ref):
    return ((got.float() - ref.float()).norm() / ref.float().norm()).item()

# tolerances: fp32 exact dots (accumulation order only); half tiles round the weights to the input dtype, as a dense
# layer in that dtype does (fp16 ~5e-4 measured here; bf16 ~1.2e-2: the interpreter truncates fp32 -> bf16 where a
# GPU rounds); the per-pair decode kernels multiply in fp32 (the result's rounding only)
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2.5e-2}
g = torch.Generator().manual_seed(0)
gu_bits, dn_bits = [1, 2, 3, 4, 8, 3], [3, 4, 1, 2, 3, 2]
E, H, I = len(gu_bits), 64, 96
for bits in (gu_bits, gu_bits + dn_bits):  # one width per expert; per-projection widths
    gu, _ = random_experts(bits[:E], hidden=H, inter=I, group=32, seed=1)
    _, dn = random_experts(bits[-E:], hidden=H, inter=I, group=32, seed=2)
    layout = build_layout(gu, dn, bits)
    # 1 and 5 tokens: the per-pair kernels; 5 forced tiled; 13 tokens (26 pairs): tiled, small tiles; 13 with
    # tiles whose BLOCK_K (64) does not divide K=96 nor lie inside one group of 32 (scales per element)
    cases = ((1, None, None), (5, None, None), (5, False, None), (13, None, None), (13, None, (16, 32, 64, 4)))
    if len(bits) == 2 * E:  # per-projection widths: one decode and one tiled case
        cases = cases[1:2] + cases[3:4]
    for tokens, decode, tiles in cases:
        assert (tokens * 2 <= DECODE_MAX_PAIRS) == (tokens < 13)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
            idx[0, 1] = E  # dropped by ODP: contributes nothing
            w = torch.rand(tokens, 2, generator=g)
            if tokens > 1:
                w[1, 0] = 0.0  # a kept slot of weight 0
            x = torch.randn(tokens, H, generator=g).to(dtype)
            acts = FUSED_ACTIVATIONS if (tokens, dtype, tiles) == (13, torch.float32, None) else ["silu"]
            for act in acts:
                ref = moe_reference(x, idx, w, gu, dn, bits, act)
                got = fused_moe(x, idx, w, layout, act, decode=decode, tiles=tiles)
                assert got.dtype == dtype and torch.isfinite(got).all()
                assert rel(got, ref) <= TOL[dtype], (bits, tokens, decode, tiles, dtype, act, rel(got, ref))
    # the gather form of the unpacking (each code's word loaded; EXPAND=False), on the tiled and per-pair kernels
    mf.EXPAND = False
    for tokens in (5, 13) if len(bits) == E else ():
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(tokens)])
        w, x = torch.rand(tokens, 2, generator=g), torch.randn(tokens, H, generator=g)
        ref = moe_reference(x, idx, w, gu, dn, bits, "silu")
        assert rel(fused_moe(x, idx, w, layout, "silu"), ref) <= TOL[torch.float32]
    mf.EXPAND = True
    # the per-pair down kernel without split-K, and split finer than the K steps (clamped to them)
    for split in (1, 64) if len(bits) == E else ():
        mf.DOWN_SPLIT_K = split
        idx = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(3)])
        w, x = torch.rand(3, 2, generator=g), torch.randn(3, H, generator=g)
        ref = moe_reference(x, idx, w, gu, dn, bits, "silu")
        assert rel(fused_moe(x, idx, w, layout, "silu", tiles=(32, 32, 4)), ref) <= TOL[torch.float32], split
    mf.DOWN_SPLIT_K = 4
    # a token whose slots are all dropped gets exactly 0
    idx = torch.tensor([[E, E], [0, 2]])
    out = fused_moe(torch.randn(2, H, generator=g), idx, torch.rand(2, 2, generator=g), layout, "silu")
    assert torch.equal(out[0], torch.zeros(H)) and out[1].abs().sum() > 0

# the CUDA op's dispatch: fused by default, the tiled kernels for expert biases, each selectable by name
calls = []
import optimum_mc.kernels.moe_triton as mt
real_fused, real_tiled = mf.fused_moe, mt.triton_moe
mf.fused_moe = lambda *a, **k: calls.append("fused") or real_fused(*a, **k)
mt.triton_moe = lambda *a, **k: calls.append("tiled") or real_tiled(*a, **k)
gu, dn = random_experts([2, 3, 1, 4], hidden=H, inter=I, group=32, seed=3)
lists = [[m[j] for m in ms] for ms in (gu, dn) for j in range(3)]
idx = torch.tensor([[0, 3], [2, 4], [1, 2]])
w, x = torch.rand(3, 2, generator=g), torch.randn(3, H, generator=g)
bias = (torch.randn(4, 2 * I, generator=g) * 0.1, torch.randn(4, H, generator=g) * 0.1)
for env, biases, expect in (("fused", (None, None), "fused"), ("fused", bias, "tiled"), ("tiled", (None, None),
                            "tiled"), ("reference", (None, None), None)):  # fmt: skip
    import os
    os.environ["OPTIMUM_MC_CUDA_MOE"] = env
    calls.clear()
    got = cuda_moe(x, idx, w, *lists, [2, 3, 1, 4], "silu", "float", *biases)
    assert calls == ([expect] if expect else []), (env, calls)
    ref = moe_reference(x, idx, w, gu, dn, [2, 3, 1, 4], "silu", *biases)
    assert rel(got, ref) <= 1e-5, (env, rel(got, ref))
os.environ["OPTIMUM_MC_CUDA_MOE"] = "fast"
try:
    cuda_moe(x, idx, w, *lists, [2, 3, 1, 4], "silu")
    raise AssertionError("an unknown kernel name was accepted")
except ValueError as err:
    assert "fused" in str(err)
print("fused-ok")
"""


def test_fused_moe_matches_reference_under_interpreter():
    tests = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get(
        "PYTHONPATH", "")])}  # fmt: skip
    env.pop("OPTIMUM_MC_CUDA_MOE", None)
    done = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("fused-ok")
