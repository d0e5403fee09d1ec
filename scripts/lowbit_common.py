"""Shared pieces of the low-bit studies (scripts/study_incoherence.py, scripts/study_grids.py): the seeded
randomized Hadamard rotation, the capture of each expert's routed calibration tokens from the float model, the
library-GPTQ fake-quant of one expert (plain or rotated) and the Δppl-vs-float summary with paired 95% intervals."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_quality as bq  # noqa: E402  (windows, per-window NLL and paired statistics)

MODELS = HERE.parent.parent / "shared" / "models"


# ---------------------------------------------------------------------------------------------- rotation
def hadamard(n: int) -> torch.Tensor:
    """Sylvester Hadamard matrix of a power-of-two size (entries +-1)."""
    if n & (n - 1):
        raise ValueError(f"{n} is not a power of two")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """Orthogonal ``(n, n)`` randomized (block) Hadamard transform, float64 (see the module docstring)."""
    b = n & -n  # largest power of two dividing n
    g = torch.Generator().manual_seed(seed * 1_000_003 + n)
    signs = torch.randint(0, 2, (n,), generator=g, dtype=torch.float64) * 2 - 1
    perm = torch.randperm(n, generator=g) if b < n else torch.arange(n)
    block = torch.block_diag(*[hadamard(b)] * (n // b)) / math.sqrt(b)
    return signs[:, None] * block[perm]


# ---------------------------------------------------------------------------------------------- capture
@torch.no_grad()
def routed_inputs(model, input_ids: torch.Tensor) -> list[dict[int, torch.Tensor]]:
    """Per MoE layer, per expert: the float model's hidden states routed to it (fp32 ``(n, H)``)."""
    from optimum_mc.architectures import moe_blocks

    blocks = list(moe_blocks(model))
    out: list[dict[int, list[torch.Tensor]]] = [{} for _ in blocks]
    handles = []
    for li, blk in enumerate(blocks):

        def hook(mod, args, kwargs, li=li):
            hs = args[0] if args else kwargs["hidden_states"]
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hs = hs.reshape(-1, hs.shape[-1]).float()
            idx = idx.reshape(hs.shape[0], -1)
            for e in range(mod.num_experts):
                rows = (idx == e).any(-1)
                if rows.any():
                    out[li].setdefault(e, []).append(hs[rows])

        handles.append(blk.experts.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        for s in range(0, input_ids.shape[0], 8):
            model(input_ids=input_ids[s : s + 8], use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return [{e: torch.cat(v) for e, v in layer.items()} for layer in out]


# ---------------------------------------------------------------------------------------------- quantization
def quantize_rotated(w_gu, w_dn, x, act_fn, bits: int, opts, r_h, r_i):
    """Fake-quant ``(gate_up, down)`` of one expert after rotating their input dims by ``r_h`` / ``r_i``."""
    from optimum_mc.calibration.hessians import input_hessian, mid_hessian
    from optimum_mc.gptq import calibration_free_quantize, gptq_quantize
    from optimum_mc.group_quant import dequantize_matrix

    r_h, r_i = r_h.float(), r_i.float()
    wr_gu, wr_dn = w_gu @ r_h, w_dn @ r_i
    if x.shape[0] < max(opts.min_tokens, 1):
        gu = calibration_free_quantize(wr_gu, bits, opts.group_size, zero_point=opts.zero_point)
        dn = calibration_free_quantize(wr_dn, bits, opts.group_size, zero_point=opts.zero_point)
    else:
        kw = dict(damp_percent=opts.damp_percent, block_size=opts.block_size, act_order=opts.act_order)
        kw.update(zero_point=opts.zero_point, clip_search=opts.clip_search)
        h_gu = r_h.t() @ input_hessian(x) @ r_h
        h_dn = r_i.t() @ mid_hessian(w_gu, x, act_fn) @ r_i
        gu = gptq_quantize(wr_gu, h_gu, bits, opts.group_size, **kw)
        dn = gptq_quantize(wr_dn, h_dn, bits, opts.group_size, **kw)
    return dequantize_matrix(*gu, opts.group_size) @ r_h.t(), dequantize_matrix(*dn, opts.group_size) @ r_i.t()


def quantize_plain(w_gu, w_dn, x, act_fn, bits: int, opts):
    """Fake-quant ``(gate_up, down)`` by the library's ``quantize_expert`` (no rotation)."""
    from optimum_mc.calibration.factors import quantize_expert

    return quantize_expert(w_gu, w_dn, x, act_fn, [bits], opts)[bits].dequantized(opts.group_size)


def library_allocation(path: str, bits: float, candidates: list[int], args) -> tuple[list, dict]:
    """The MC pipeline's allocation (and its own packed model's per-window NLL) at ``bits`` code bits."""
    from transformers import AutoModelForCausalLM

    import optimum_mc

    cfg = optimum_mc.MCConfig(
        bits=bits,
        candidate_bits=candidates,
        attn_bits=None,
        num_samples=args.num_samples,
        seq_len=args.seq_len,
        seed=args.seed,
        show_progress=False,
    )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, quantization_config=cfg).eval()
    return model.config.quantization_config.expert_bits, model


# ---------------------------------------------------------------------------------------------- summary
def summarize(rows: list[dict]) -> list[dict]:
    """Relative perplexity change vs the model's float row (mean over domains of per-domain ppl) + paired CI."""
    floats = {r["model"]: r for r in rows if r["variant"] == "float"}
    out = []
    for r in rows:
        f = floats[r["model"]]
        res = bq.paired(r, f)
        m, se, n = res["all"]
        out.append(
            {
                "model": r["model"],
                "variant": r["variant"],
                "rotate": r["rotate"],
                "code_bits": r["code_bits"],
                "stored_bits": r["stored_bits"],
                "mean_ppl": r["mean"],
                "dppl_mean_pct": 100 * (r["mean"] / f["mean"] - 1),
                "dppl_pooled_pct": 100 * (math.exp(m) - 1),
                "dppl_pooled_ci95_pct": [100 * (math.exp(m - 1.96 * se) - 1), 100 * (math.exp(m + 1.96 * se) - 1)],
                **{f"dppl_{d}_pct": 100 * (r[d] / f[d] - 1) for d in bq.DOMAINS},
            }
        )
    return out


def paired_row(model: str, what: str, r: dict, base: dict) -> dict:
    """A paired comparison of two runs' per-window NLL (same windows): Δppl of ``r`` vs ``base`` with its 95% CI."""
    m, se, n = bq.paired(r, base)["all"]
    ci = [100 * (math.exp(m - 1.96 * se) - 1), 100 * (math.exp(m + 1.96 * se) - 1)]
    return {"model": model, "pair": what, "dppl_pct": 100 * (math.exp(m) - 1), "ci95_pct": ci, "n": n}


def markdown(summary: list[dict], paired: list[dict], mean_header: str, stored_digits: int, pair_header: str) -> str:
    """The studies' two tables: one row per (model, variant, rotation), then the paired comparisons."""
    lines = [
        f"| model | variant | rotation | code bits | stored bits | {mean_header} | Δppl pooled [95% CI] "
        "| code | docs | quotes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        cb = "-" if s["code_bits"] is None else f"{s['code_bits']:.2f}"
        sb = "-" if s["stored_bits"] is None else f"{s['stored_bits']:.{stored_digits}f}"
        lo, hi = s["dppl_pooled_ci95_pct"]
        lines.append(
            f"| {s['model'].replace('mc-ref-', '')} | {s['variant']} | {'yes' if s['rotate'] else 'no'} | {cb} | {sb} "
            f"| {s['dppl_mean_pct']:+.2f}% | {s['dppl_pooled_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}] | "
            + " | ".join(f"{s[f'dppl_{d}_pct']:+.2f}%" for d in bq.DOMAINS)
            + " |"
        )
    lines += ["", f"| model | {pair_header} | Δppl of a [95% CI] | windows |", "|---|---|---|---|"]
    for p in paired:
        lo, hi = p["ci95_pct"]
        lines.append(
            f"| {p['model'].replace('mc-ref-', '')} | {p['pair']} | {p['dppl_pct']:+.2f}% [{lo:+.2f}, {hi:+.2f}] "
            f"| {p['n']} |"
        )
    return "\n".join(lines)
