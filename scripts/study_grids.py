"""Study (fake-quant, no kernel): do non-uniform or vector 2-bit grids inside GPTQ beat MC's scalar uniform 2-bit
at the same (or fewer) stored bits? Writes docs/results/low-bit-grids-<model>.json.

    python scripts/study_grids.py --model mc-ref-mixtral --max-windows 32 --num-samples 16 --seq-len 256

Every routed expert of the model is quantized at 2 code bits (attention, routers, embeddings stay float), from the
float model's routed calibration tokens (scripts/lowbit_common.py: one capture, the same Hessians for every
variant), plain or after the seeded randomized Hadamard rotation of the input dimension (as study_incoherence):
- ``uniform-2``: the library's GPTQ (act-order, group 128, fp16 scale + zero from min/max): the baseline, what
  MC ships (2.25 stored bits); ``uniform-2-noact``: the same without act-order (natural column order, each
  group's min/max taken when GPTQ reaches it).
- ``uniform-2-ls``: the same 4 uniform levels, but fitted per group by least squares (scripts/grid_quant.py) and
  quantized by our own GPTQ loop (natural column order): separates the grid from the fitting and the loop;
  ``uniform-2-ls-act``: the same fit with the library's act-order and static groups (fitted on the original weights).
- ``lloydmax-2``: 4 non-uniform levels (the gaussian Lloyd-Max quantizer) with the same fp16 scale + offset per
  group, same loop (2.25 stored bits).
- ``e8p-2``: the E8P vector codebook (16-bit code per 8 consecutive input columns), one fp16 scale per group of
  128 (2.125 stored bits), block-LDLQ; ``e8p-2-g64``: a scale per 64 columns (2.25 stored bits).
- ``d4-2`` / ``d4-2.25`` / ``d4-2.5``: 4-dim codebooks of 256 / 512 / 1024 points of a D4 coset (8-10-bit code per
  4 columns), one fp16 scale per group of 128 (2.125 / 2.375 / 2.625 stored bits), block-LDLQ.
- ``mc23-2.25``: the library's MC allocation at 2.25 code bits, candidates {2, 3} (2.50 stored bits; its own packed
  model, same calibration settings): the scalar comparator above 2 bits; ``mc23-2.25-ls``: the same allocation with
  every expert on least-squares-fitted uniform levels at its width (our loop, as ``uniform-2-ls``).
Perplexity: bench_quality's 256-token windows (first --max-windows per domain), per-window NLL, paired intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import grid_quant as gq
import torch
from lowbit_common import (
    HERE,
    MODELS,
    bq,
    library_allocation,
    paired_row,
    quantize_plain,
    quantize_rotated,
    random_hadamard,
    routed_inputs,
    summarize,
)
from lowbit_common import markdown as lowbit_markdown

GROUP = 128
VARIANTS = {  # name -> (grid factory or None for the library's GPTQ, group size)
    "uniform-2": (None, GROUP),
    "uniform-2-noact": (None, GROUP),
    "uniform-2-ls": (lambda: gq.ScalarGrid(gq.UNIFORM_2BIT, "uniform"), GROUP),
    "uniform-2-ls-act": (lambda: gq.ScalarGrid(gq.UNIFORM_2BIT, "uniform"), GROUP),
    "lloydmax-2": (lambda: gq.ScalarGrid(gq.LLOYD_MAX_2BIT, "lloyd-max"), GROUP),
    "e8p-2": (lambda: gq.E8PGrid(), GROUP),
    "e8p-2-g64": (lambda: gq.E8PGrid(), 64),
    "d4-2": (lambda: gq.D4Grid(8), GROUP),
    "d4-2.25": (lambda: gq.D4Grid(9), GROUP),
    "d4-2.5": (lambda: gq.D4Grid(10), GROUP),
}
LIBRARY_GPTQ = {"uniform-2": {}, "uniform-2-noact": {"act_order": False}}  # library GPTQ option overrides
LIBRARY_MC = {"mc23-2.25": (2.25, [2, 3])}  # the library's MC allocation, its own packed model (2.50 stored bits)
# the same allocation, every expert on least-squares-fitted uniform levels at its width (our loop, natural order)
MC_LS = {"mc23-2.25-ls": "mc23-2.25"}
UNIFORM_LEVELS = {2: gq.UNIFORM_2BIT, 3: tuple(k + 0.5 for k in range(-4, 4))}


def stored_bits(variant: str) -> tuple[float, float]:
    """(code bits, stored bits) per expert weight: codes + fp16 metadata; the codebooks are fixed (no bytes).
    For the library's MC allocation, its nominal budget (the allocation meets it exactly on both models)."""
    if variant in LIBRARY_MC or variant in MC_LS:
        bits = LIBRARY_MC[MC_LS.get(variant, variant)][0]
        return bits, bits + 32 / GROUP
    factory, group = VARIANTS[variant]
    if factory is None:
        return 2.0, 2.0 + 32 / group
    grid = factory()
    return grid.code_bits, grid.code_bits + grid.metadata_bits(group)


def quantize_grid(w, h, grid, group, r, act_order: bool = False):
    """Fake-quant ``w`` on ``grid`` by block-LDLQ (or act-order GPTQ), optionally in the rotated basis ``r``."""
    quant = gq.act_order_ldlq if act_order else gq.block_ldlq
    if r is None:
        return quant(w, h, grid, group)
    r = r.float()
    return quant(w @ r, r.t() @ h @ r, grid, group) @ r.t()


@torch.no_grad()
def fake_quantize(model, float_experts, inputs, hessians, variant: str, rotate: bool, seed: int, alloc=None) -> None:
    """Every expert of ``model`` set to its fake-quantized weights; ``alloc`` (per layer, per expert code bits) for the
    MC_LS variants (least-squares uniform levels at each expert's width)."""
    from optimum_mc.architectures import moe_blocks
    from optimum_mc.bitwidths import split
    from optimum_mc.calibration.factors import GPTQOptions
    from optimum_mc.expert_layout import expert_act

    factory, group = VARIANTS[variant] if variant not in MC_LS else (None, GROUP)
    opts = GPTQOptions(group_size=group, **LIBRARY_GPTQ.get(variant, {}))
    for li, blk in enumerate(moe_blocks(model)):
        ex = blk.experts
        gu_all, dn_all = float_experts[li]
        h, i = gu_all.shape[2], dn_all.shape[2]
        r_h, r_i = (random_hadamard(h, seed), random_hadamard(i, seed)) if rotate else (None, None)
        for e in range(ex.num_experts):
            x = inputs[li].get(e, torch.zeros(0, h))
            if variant in MC_LS:
                b_gu, b_dn = split(alloc[li][e])
                h_gu, h_dn = hessians[li][e]
                grid_gu = gq.ScalarGrid(UNIFORM_LEVELS[b_gu], f"uniform-{b_gu}")
                grid_dn = gq.ScalarGrid(UNIFORM_LEVELS[b_dn], f"uniform-{b_dn}")
                gu = quantize_grid(gu_all[e].float(), h_gu, grid_gu, group, r_h)
                dn = quantize_grid(dn_all[e].float(), h_dn, grid_dn, group, r_i)
            elif factory is None:
                args = (gu_all[e], dn_all[e], x, expert_act(ex, e), 2, opts)
                gu, dn = quantize_rotated(*args, r_h, r_i) if rotate else quantize_plain(*args)
            else:
                h_gu, h_dn = hessians[li][e]
                act = variant.endswith("-act")
                gu = quantize_grid(gu_all[e].float(), h_gu, factory(), group, r_h, act)
                dn = quantize_grid(dn_all[e].float(), h_dn, factory(), group, r_i, act)
            ex.gate_up_proj[e].copy_(gu)
            ex.down_proj[e].copy_(dn)


def expert_hessians(float_experts, inputs, model, min_tokens: int = 16):
    """Per layer, per expert: (gate/up input Hessian, down input Hessian) from the float weights; identity (=
    nearest rounding, the calibration-free case) below ``min_tokens`` routed tokens."""
    from optimum_mc.architectures import moe_blocks
    from optimum_mc.calibration.hessians import input_hessian, mid_hessian
    from optimum_mc.expert_layout import expert_act

    out = []
    for li, blk in enumerate(moe_blocks(model)):
        gu_all, dn_all = float_experts[li]
        h, i = gu_all.shape[2], dn_all.shape[2]
        layer = {}
        for e in range(blk.experts.num_experts):
            x = inputs[li].get(e, torch.zeros(0, h))
            if x.shape[0] < min_tokens:
                layer[e] = (torch.eye(h), torch.eye(i))
            else:
                layer[e] = (input_hessian(x), mid_hessian(gu_all[e].float(), x, expert_act(blk.experts, e)))
        out.append(layer)
    return out


def run_model(name: str, args) -> tuple[list[dict], dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_mc.architectures import moe_blocks
    from optimum_mc.calibration.data import calibration_batches
    from optimum_mc.tools.evaluation import token_windows

    path = str(MODELS / name)
    tok = AutoTokenizer.from_pretrained(path)
    data = Path(args.data)
    windows = {
        d: token_windows(tok, (data / f"dev.{d}.txt").read_text(encoding="utf-8"), 256, args.max_windows)
        for d in bq.DOMAINS
    }
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = list(moe_blocks(model))
    float_experts = [(b.experts.gate_up_proj.detach().clone(), b.experts.down_proj.detach().clone()) for b in blocks]
    calib = calibration_batches(None, tok, args.num_samples, args.seq_len, args.seed)
    inputs = routed_inputs(model, calib)
    hessians = expert_hessians(float_experts, inputs, model)
    rows = []

    def evaluate(variant: str, rotate: bool, seconds: float | None) -> None:
        t = time.perf_counter()
        nll = {d: bq.window_nll(model, w) for d, w in windows.items()}
        ppl = {d: math.exp(sum(v) / len(v)) for d, v in nll.items()}
        code, stored = stored_bits(variant) if variant != "float" else (None, None)
        rows.append(
            {
                "model": name,
                "variant": variant,
                "rotate": rotate,
                "code_bits": code,
                "stored_bits": stored,
                **ppl,
                "mean": sum(ppl.values()) / len(ppl),
                "quantize_seconds": seconds,
                "window_nll": nll,
            }
        )
        print(
            f"[{name}] {variant:>14} rot={int(rotate)} mean ppl {rows[-1]['mean']:.3f} "
            f"(quantize {seconds}s, eval {time.perf_counter() - t:.0f}s)",
            flush=True,
        )

    if args.append:
        rows += json.loads(Path(args.json).read_text())["rows"]
    else:
        evaluate("float", False, None)
    for spec in args.variants.split(","):
        variant, _, rot = spec.partition(":")
        if variant in LIBRARY_MC:
            t = time.perf_counter()
            bits, cands = LIBRARY_MC[variant]
            _, lib_model = library_allocation(path, bits, cands, args)
            model, lib_model = lib_model, model  # evaluate() reads `model`
            evaluate(variant, False, round(time.perf_counter() - t, 1))
            model, lib_model = lib_model, None
            _write(args, rows, {d: w.shape[0] for d, w in windows.items()})
            continue
        alloc = None
        if variant in MC_LS:
            bits, cands = LIBRARY_MC[MC_LS[variant]]
            alloc, lib_model = library_allocation(path, bits, cands, args)
            del lib_model
        for rotate in {"plain": (False,), "rot": (True,), "": (False, True)}[rot]:
            t = time.perf_counter()
            fake_quantize(model, float_experts, inputs, hessians, variant, rotate, args.seed, alloc)
            evaluate(variant, rotate, round(time.perf_counter() - t, 1))
            _write(args, rows, {d: w.shape[0] for d, w in windows.items()})
    return rows


def pairs(rows: list[dict]) -> list[dict]:
    """Paired per-window comparisons: every grid vs the library's uniform 2-bit at the same rotation, each rotated
    variant vs its plain one, Lloyd-Max vs uniform levels with the same fit, E8P vs Lloyd-Max."""
    by = {(r["variant"], r["rotate"]): r for r in rows}
    todo = []
    for (variant, rotate), r in by.items():
        tag = "rotated" if rotate else "plain"
        if variant not in ("float", "uniform-2", "uniform-2-noact") and ("uniform-2", rotate) in by:
            todo.append((f"{variant} vs uniform-2 ({tag})", r, by[("uniform-2", rotate)]))
        if rotate and (variant, False) in by:
            todo.append((f"{variant} rotated vs plain", r, by[(variant, False)]))
    explicit = [("lloydmax-2", "uniform-2-ls"), ("e8p-2", "lloydmax-2"), ("e8p-2-g64", "e8p-2"), ("e8p-2", "d4-2")]
    explicit += [("uniform-2-ls", "uniform-2-noact"), ("uniform-2-noact", "uniform-2")]
    explicit += [("uniform-2-ls-act", "uniform-2-ls"), ("e8p-2", "uniform-2-ls-act"), ("d4-2", "uniform-2-ls-act")]
    explicit += [("mc23-2.25-ls", "mc23-2.25"), ("d4-2.25", "mc23-2.25-ls"), ("d4-2.5", "mc23-2.25-ls")]
    explicit += [("d4-2.25", "mc23-2.25"), ("d4-2.5", "mc23-2.25"), ("e8p-2", "uniform-2-ls")]
    for a, b in explicit:
        for rotate in (False, True):
            rb = rotate if (b, rotate) in by else False  # the library MC row exists unrotated only
            if (a, rotate) in by and (b, rb) in by:
                tags = ["rotated" if x else "plain" for x in (rotate, rb)]
                tag = tags[0] if rotate == rb else f"{tags[0]} vs {tags[1]}"
                todo.append((f"{a} vs {b} ({tag})", by[(a, rotate)], by[(b, rb)]))
    out = []
    for what, r, base in todo:
        out.append(paired_row(r["model"], what, r, base))
    return out


def markdown(summary: list[dict], paired: list[dict]) -> str:
    return lowbit_markdown(summary, paired, "Δppl mean of domains", 3, "paired (a vs b, same windows)")


def _write(args, rows, windows) -> None:
    out = {
        "settings": {
            "commands": args.prior_commands + ["python scripts/study_grids.py " + " ".join(args.argv)],
            "windows": windows,
            "window_tokens": 256,
            "calibration": f"builtin text, {args.num_samples} x {args.seq_len} tokens, seed {args.seed}",
            "e8p_gaussian_scale": gq.E8P_GAUSSIAN_SCALE,
            "threads": args.threads,
            "seconds": args.prior_seconds + round(time.perf_counter() - args.t0, 1),
        },
        "summary": summarize(rows),
        "paired": pairs(rows),
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(out, indent=1))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mc-ref-mixtral")
    p.add_argument("--data", default=str(bq.DEFAULT_DATA))
    p.add_argument("--max-windows", type=int, default=32)
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--variants",
        default="uniform-2,uniform-2-ls,lloydmax-2,e8p-2,e8p-2-g64:rot",
        help="comma-separated, each optionally :plain or :rot (default both)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="default docs/results/low-bit-grids-<model without mc-ref->.json")
    p.add_argument("--append", action="store_true", help="add rows to the saved --json (float row not re-run)")
    p.add_argument("--report", action="store_true", help="only recompute the tables from the saved --json")
    args = p.parse_args(argv)
    args.argv = list(argv if argv is not None else __import__("sys").argv[1:])
    short = args.model.replace("mc-ref-", "")
    args.json = args.json or str(HERE.parent / "docs" / "results" / f"low-bit-grids-{short}.json")
    if args.report:
        saved = json.loads(Path(args.json).read_text())
        saved["summary"], saved["paired"] = summarize(saved["rows"]), pairs(saved["rows"])
        Path(args.json).write_text(json.dumps(saved, indent=1))
        print(markdown(saved["summary"], saved["paired"]))
        return 0
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.t0 = time.perf_counter()
    args.prior_commands, args.prior_seconds = [], 0.0
    if args.append:
        prior = json.loads(Path(args.json).read_text())["settings"]
        args.prior_commands, args.prior_seconds = prior.get("commands", []), prior.get("seconds", 0.0)
    rows = run_model(args.model, args)
    print(markdown(summarize(rows), pairs(rows)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
