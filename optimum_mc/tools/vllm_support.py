"""Whether vLLM serves a MoE family's MC checkpoints as transformers runs them (tests, scripts/vllm_support.py).

Per family a tiny random model (vLLM-friendly sizes, :data:`~optimum_mc.tools.families.VLLM_SIZES`) is quantized
with MC; vLLM (each engine in its own process) and transformers then run the float and the MC model on the same
prompts. A family passes when the MC model's prompt logprobs agree within ``TOL`` and the greedy tokens are equal
(fp32). Multi-head latent attention (DeepSeek-V2/V3) runs fp32 on vLLM's reference CPU MLA backend (``CPU_MLA``; the
AMX one vLLM picks by default takes only bf16). Families whose vLLM CPU kernels take only bf16 (gated delta-net
attention: Qwen3-Next) run in bf16 and are judged against how close the two engines get on the float model
(:func:`bf16_pass`). Statuses say whose side a failure is on: "vLLM cannot run the float model" and "vLLM and
transformers differ on the float model" are not MC's to fix; "fail" is. Imports vLLM only in :func:`candidates`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

TOL = 1e-4  # fp32 |logprob| difference between the engines (measured ~2e-6 on the families that pass)
# bf16 (both engines round every layer's output, differently): the float model's own vLLM-vs-transformers difference
# is the yardstick. It must stay below BF16_FLOAT_MAX (transformers' own bf16-vs-fp32 difference is ~0.03 on these
# models; a wrong vLLM model is 0.3-1.0 off); the MC model passes with a difference at most BF16_FACTOR times the
# float model's plus BF16_FLOOR, and at least as many greedy completions in agreement as the float model has, where a
# completion that leaves transformers' at a near tie (transformers' logprob of vLLM's token within BF16_TIE of its
# best: bf16 rounding flips those) agrees.
BF16_FLOAT_MAX, BF16_FACTOR, BF16_FLOOR, BF16_TIE = 0.1, 2.0, 0.02, 0.05
# Why vLLM (this CPU build) does not run a family's float model as transformers does, where that is vLLM's side and
# not the tiny config's (checked against vLLM's source): the support table's notes column.
ENGINE_NOTES = {
    "ernie4_5_moe": "vLLM's CPU router drops the correction bias of ungrouped softmax routing (fused_moe/router/"
    "cpu_router.py `_softmax_topk`; its GPU kernel topk_softmax takes it): transformers picks experts by softmax + "
    "moe_statics bias, vLLM on CPU by softmax alone, so tokens where the bias changes the choice differ",
    "laguna": "vLLM's CPU router takes sigmoid scoring only through grouped top-k (cpu_router.py asserts softmax "
    "otherwise) and vLLM's Laguna routes by ungrouped sigmoid top-k with a correction bias",
    "minimax_m2": "vLLM's CPU router takes sigmoid scoring only through grouped top-k (cpu_router.py asserts softmax "
    "otherwise) and vLLM's MiniMax-M2 routes by ungrouped sigmoid top-k with a correction bias",
    "axk1": "vLLM's AXK1 builds post_mlp_layernorm on every decoder layer and requires it in the checkpoint; "
    "transformers' A.X-K1 has it only in MoE layers, so a transformers-saved checkpoint with a dense first layer "
    "(A.X-K1's first_k_dense_replace 1) lacks it for that layer",
    "kimi_linear": "vLLM's CPU platform turns prefix caching off for MLA without AMX (platforms/cpu.py) after the "
    "hybrid (KDA + MLA) model hook has set mamba_block_size to the block size for prefix caching (models/config.py "
    "MambaModelConfig), so VllmConfig's validate_mamba_block_size refuses it. Past that "
    "(enable_prefix_caching=False): vLLM 0.32 has only NVIDIA / AMD Kimi-Linear code (vllm/models/kimi_k3): it "
    "imports cutlass unless VLLM_KIMI_K3_GEMM_AR=0, names the dense first layer's MLP `mlp` where transformers "
    "saves it as `block_sparse_moe` (KeyError at load), and runs its KDA layers on flash-linear-attention Triton "
    "kernels, which this CPU build has no backend for",
    "nemotron_h": "its MoE experts are not gated (up and down projections, ReLU²): vLLM 0.32 builds a non-gated fused "
    "MoE layer (is_act_and_mul=False) only on CUDA, XPU and ROCm; FusedMoEConfig raises NotImplementedError on CPU "
    "when the layer is built, before a quantization method is chosen, so neither the float nor the MC model loads. "
    "The plugin's MoE method serves them (a per-expert loop); with that one refusal lifted the tiny MC model matches "
    "transformers' (5.1e-5, 3/3: tests/integrations/test_vllm_ungated.py)",
    "qwen3_5_moe_text": "vLLM's Qwen3.5 model imports Qwen3-VL, whose transformers image processor needs torchvision "
    "(removed from this venv: the registry's torchvision is a CUDA build that breaks next to torch+cpu)",
}
PROMPTS = [[1, 42, 275, 78, 81, 273, 263, 78, 70], [1, 284, 223, 69, 286], list(range(3, 40))]
ENGINE = r"""
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    model, dtype, out, prompts, extra = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4]), sys.argv[5]
    llm = LLM(model=model, dtype=dtype, max_model_len=256, gpu_memory_utilization=0.25, enforce_eager=True,
              **json.loads(extra))
    # ignore_eos: transformers' reference generates its 6 tokens past EOS too (eos_token_id=None)
    params = SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=0, logprobs=0, ignore_eos=True)
    rows = []
    for p, r in zip(prompts, llm.generate([{"prompt_token_ids": p} for p in prompts], params)):
        lp = [d[t].logprob for t, d in zip(p[1:], r.prompt_logprobs[1:])]
        rows.append({"tokens": list(r.outputs[0].token_ids), "prompt_logprobs": lp})
    json.dump(rows, open(out, "w"))
"""


def candidates() -> list[tuple[str, str]]:
    """(model type, architecture) of every MoE family of transformers whose architecture vLLM registers."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    from vllm.model_executor.models.registry import ModelRegistry

    from optimum_mc.tools.families import moe_model_types

    have = set(ModelRegistry.get_supported_archs())
    return [(mt, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[mt]) for mt in moe_model_types()
            if MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[mt] in have]  # fmt: skip


def reference(folder: str, dtype, prompts: list[list[int]] = PROMPTS) -> list[dict]:
    """transformers: 6 greedy tokens and the prompt tokens' logprobs (from the second token on) per prompt."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    rows = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)
            gen = model.generate(ids, max_new_tokens=6, do_sample=False, min_new_tokens=6, eos_token_id=None)
            rows.append({"tokens": gen[0, len(p):].tolist(),
                         "prompt_logprobs": [lp[i - 1, p[i]].item() for i in range(1, len(p))]})  # fmt: skip
    return rows


def engine(folder: str, dtype: str, timeout: int, extra: dict | None = None) -> tuple[list[dict] | None, str]:
    """vLLM's rows for ``folder`` in a subprocess (``extra``: more ``LLM`` arguments), or None and the last error
    line."""
    with tempfile.TemporaryDirectory() as tmp:
        script, out = os.path.join(tmp, "engine.py"), os.path.join(tmp, "out.json")
        with open(script, "w", encoding="utf-8") as f:
            f.write(ENGINE)
        argv = [sys.executable, script, folder, dtype, out, json.dumps(PROMPTS), json.dumps(extra or {})]
        try:
            # checking a family the plugin may not list yet; the float references get the same rope fix (cpu_rope)
            env = dict(os.environ, OPTIMUM_MC_VLLM_UNVERIFIED="1", OPTIMUM_MC_VLLM_CPU_ROPE_FIX="1")
            p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, cwd=tmp, env=env)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout}s"
        if p.returncode == 0:
            with open(out, encoding="utf-8") as f:
                return json.load(f), ""
        lines = [ln for ln in (p.stdout + p.stderr).splitlines() if "Error" in ln and "Traceback" not in ln]
        causes = [ln for ln in lines if "Engine core initialization failed" not in ln and "WorkerProc" not in ln]
        return None, ((causes or lines or ["exit " + str(p.returncode)])[0].split("] ")[-1]).strip()[:300]


def compare(got: list[dict], want: list[dict]) -> dict:
    diff = max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g["prompt_logprobs"], w["prompt_logprobs"]))
    same = sum(g["tokens"] == w["tokens"] for g, w in zip(got, want))
    return {"max_logprob_diff": diff, "greedy_equal": f"{same}/{len(want)}"}


def near_ties(folder: str, dtype, got: list[dict], want: list[dict], prompts: list[list[int]] = PROMPTS) -> int:
    """How many completions that differ leave transformers' at a near tie: at the first differing step, transformers'
    logprob of vLLM's token is within ``BF16_TIE`` of its own token's."""
    import torch
    from transformers import AutoModelForCausalLM

    model, ties = None, 0
    for p, g, w in zip(prompts, got, want):
        if g["tokens"] == w["tokens"]:
            continue
        d = next(i for i, (a, b) in enumerate(zip(g["tokens"], w["tokens"])) if a != b)
        if model is None:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
        with torch.no_grad():
            lp = torch.log_softmax(model(torch.tensor([p + w["tokens"][:d]])).logits[0, -1].float(), -1)
        ties += bool(lp[w["tokens"][d]] - lp[g["tokens"][d]] <= BF16_TIE)
    return ties


def bf16_pass(float_row: dict | None, mc_row: dict) -> bool:
    """The bf16 criterion (see ``BF16_*``; rows of :func:`compare` with ``near_ties`` added); without the float
    model's row, ``mc_row`` against the floors alone."""
    agree = lambda row: int(row["greedy_equal"].split("/")[0]) + row.get("near_ties", 0)  # noqa: E731
    if float_row is None:
        return mc_row["max_logprob_diff"] <= BF16_FLOAT_MAX and agree(mc_row) == len(PROMPTS)
    bound = BF16_FACTOR * float_row["max_logprob_diff"] + BF16_FLOOR
    return mc_row["max_logprob_diff"] <= bound and agree(mc_row) >= agree(float_row)


def engine_options(folder: str) -> list[tuple[str, dict]]:
    """(dtype, extra ``LLM`` arguments) to try in order: fp32 (multi-head latent attention: on the reference CPU MLA
    backend, as the AMX one takes only bf16); bf16 (gated delta-net attention takes only bf16)."""
    with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    if cfg.get("kv_lora_rank"):  # where the CPU has no AMX, vLLM picks CPU_MLA by itself
        return [("float32", {"attention_config": {"backend": "CPU_MLA"}}), ("bfloat16", {})]
    return [("float32", {}), ("bfloat16", {})]


def check(model_type: str, work: str, timeout: int = 400, baseline: bool = True, parallel: dict | None = None,
          mc_options: dict | None = None) -> dict:  # fmt: skip
    """Quantize a tiny ``model_type`` under ``work`` and compare the engines (``baseline``: the float model too;
    ``parallel``: more ``LLM`` arguments for vLLM, e.g. tensor / expert parallelism, against transformers' one
    process; ``mc_options``: MCConfig arguments replacing the quick ones, e.g. compact metadata); a family vLLM does
    not run as transformers does carries :data:`ENGINE_NOTES`' reason as ``note``."""
    res = _check(model_type, work, timeout, baseline, parallel, mc_options or {})
    if res["status"] not in ("pass", "fail") and model_type in ENGINE_NOTES:
        res["note"] = ENGINE_NOTES[model_type]
    return res


def _check(model_type: str, work: str, timeout: int, baseline: bool, parallel: dict | None, mc_options: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_mc.tools.families import quick_config, tiny_model, tiny_tokenizer, vllm_sizes

    src, dst = os.path.join(work, "float"), os.path.join(work, "mc")
    tok = tiny_tokenizer()
    try:
        model = tiny_model(model_type, **vllm_sizes(model_type))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # a correction bias that steers the choice (zeros at init: then it would not count)
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(torch.randn(buf.shape, generator=g) * 0.05)
        model.save_pretrained(src)
        tok.save_pretrained(src)
        qc = quick_config(**{"seq_len": 32, **mc_options})
        AutoModelForCausalLM.from_pretrained(src, quantization_config=qc, dtype=torch.float32).save_pretrained(dst)
        tok.save_pretrained(dst)
    except Exception as exc:  # noqa: BLE001 - reported: MC's own support matrix says why (docs/support.md)
        status = "its tiny vLLM-sized model does not build or quantize (see docs/support.md)"
        return {"status": status, "error": f"{type(exc).__name__}: {exc}"}
    res: dict = {}
    errors = []
    for dtype, extra in engine_options(src):
        extra = {**extra, **(parallel or {})}
        got, err = engine(src if baseline else dst, dtype, timeout, extra)
        if got is not None:
            break
        errors.append(err)
    if got is None:
        dtype, extra, err = "float32", {}, errors[0]
    res["dtype"] = dtype
    if extra:
        res["engine"] = extra
    tdt = getattr(torch, dtype)
    if baseline:
        if got is None:
            return {**res, "status": "vLLM cannot run the float model", "error": err}
        want = reference(src, tdt)
        res["float"] = compare(got, want)
        if dtype != "float32":
            res["float"]["near_ties"] = near_ties(src, tdt, got, want)
        got, err = engine(dst, dtype, timeout, extra)
    if got is None:
        return {**res, "status": "fail", "error": err}
    want = reference(dst, tdt)
    res["mc"] = compare(got, want)
    if dtype != "float32":
        res["mc"]["near_ties"] = near_ties(dst, tdt, got, want)
    full = f"{len(PROMPTS)}/{len(PROMPTS)}"
    if dtype == "float32":
        float_ok = not baseline or (res["float"]["max_logprob_diff"] <= TOL and res["float"]["greedy_equal"] == full)
        mc_ok = res["mc"]["max_logprob_diff"] <= TOL and res["mc"]["greedy_equal"] == full
    else:
        float_ok = not baseline or res["float"]["max_logprob_diff"] <= BF16_FLOAT_MAX
        mc_ok = bf16_pass(res.get("float"), res["mc"])
    if not float_ok:
        res["status"] = "vLLM and transformers differ on the float model"
    else:
        res["status"] = "pass" if mc_ok else "fail"
    return res
