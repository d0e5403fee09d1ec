"""Study (no kernel): does incoherence processing (a seeded randomized Hadamard rotation of the experts' input
dimension before GPTQ) and the 1-bit candidate help MC at ~1.5-2.25 bits? Writes docs/low-bit-study.json.

    python scripts/study_incoherence.py --max-windows 16 --num-samples 32 --seq-len 256

Method, per reference model (mc-ref-mixtral, mc-ref-qwen3moe):
- Calibration: the library's builtin text (``calibration_batches``, seed fixed); every MoE layer's routed tokens
  are captured from the *float* model in one forward (not layer-sequential), so all variants see the same tokens.
- Bit allocation: uniform, or the allocation the library's MC pipeline chooses (``from_pretrained`` with
  ``MCConfig(bits=B, attn_bits=None)``: experts only, attention stays float); the rotated variant reuses that
  allocation (it is not re-solved on rotated losses).
- Quantization of each expert: the library's GPTQ (``calibration.factors.quantize_expert``: act-order, damp 0.01,
  group 128, float zero point; calibration-free below 16 tokens). Rotated: ``W' = W R`` for gate/up (R over H) and
  down (R over I), Hessians ``R^T H R`` (the library's ``input_hessian`` / ``mid_hessian``), GPTQ on ``W'``,
  evaluated as the fake-quant dense weight ``dequant(W') R^T`` (exact: R is orthogonal).
- R = diag(random signs) * P * blockdiag(H_b, ..., H_b) / sqrt(b): b the largest power of two dividing n (n = b*m),
  P a seeded random permutation (so each block mixes a random subset of columns when m > 1); for powers of two it
  is the usual randomized Hadamard transform (both reference models have power-of-two H and I).
- Perplexity: ``bench_quality``'s windows (256 tokens, the first --max-windows per domain of dev.{code,docs,quotes})
  and per-window NLL; the same token ids for every variant; the relative change vs float per domain and the mean.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_quality as bq  # noqa: E402  (windows, per-window NLL and paired statistics)
from lowbit_common import (  # noqa: E402
    MODELS,
    library_allocation,
    paired_row,
    quantize_plain,
    quantize_rotated,
    random_hadamard,
    routed_inputs,
    summarize,
)
from lowbit_common import markdown as lowbit_markdown  # noqa: E402


# ---------------------------------------------------------------------------------------------- quantization
@torch.no_grad()
def fake_quantize(model, float_experts, inputs, allocation, rotate: bool, opts, seed: int) -> None:
    """Set every expert of ``model`` to its fake-quantized weights (widths ``allocation[layer][expert]``)."""
    from optimum_mc.architectures import moe_blocks
    from optimum_mc.bitwidths import split
    from optimum_mc.expert_layout import expert_act

    for li, blk in enumerate(moe_blocks(model)):
        ex = blk.experts
        gu_all, dn_all = float_experts[li]
        h, i = gu_all.shape[2], dn_all.shape[2]
        r_h, r_i = (random_hadamard(h, seed), random_hadamard(i, seed)) if rotate else (None, None)
        for e in range(ex.num_experts):
            b_gu, b_dn = split(allocation[li][e])
            if b_gu != b_dn:
                raise SystemExit("per-projection widths are not studied here")
            x = inputs[li].get(e, torch.zeros(0, h))
            args = (gu_all[e], dn_all[e], x, expert_act(ex, e), b_gu, opts)
            gu, dn = quantize_rotated(*args, r_h, r_i) if rotate else quantize_plain(*args)
            ex.gate_up_proj[e].copy_(gu)
            ex.down_proj[e].copy_(dn)


# ---------------------------------------------------------------------------------------------- driver
def run_model(name: str, args, windows_cache: dict) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from optimum_mc.architectures import moe_blocks
    from optimum_mc.calibration.data import calibration_batches
    from optimum_mc.calibration.factors import GPTQOptions
    from optimum_mc.expert_layout import experts_layout
    from optimum_mc.tools.evaluation import token_windows

    path = str(MODELS / name)
    tok = AutoTokenizer.from_pretrained(path)
    data = Path(args.data)
    windows = {
        d: token_windows(tok, (data / f"dev.{d}.txt").read_text(encoding="utf-8"), 256, args.max_windows)
        for d in bq.DOMAINS
    }
    windows_cache[name] = {d: w.shape[0] for d, w in windows.items()}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    blocks = list(moe_blocks(model))
    for blk in blocks:
        lay = experts_layout(blk.experts)
        if lay.transposed or lay.interleaved:
            raise SystemExit(f"{name}: expected transformers' (E, 2I, H) / (E, H, I) expert layout")
    float_experts = [(b.experts.gate_up_proj.detach().clone(), b.experts.down_proj.detach().clone()) for b in blocks]
    calib = calibration_batches(None, tok, args.num_samples, args.seq_len, args.seed)
    t0 = time.perf_counter()
    inputs = routed_inputs(model, calib)
    print(f"[{name}] routed inputs captured in {time.perf_counter() - t0:.1f}s", flush=True)
    opts = GPTQOptions(group_size=128)
    h, i = float_experts[0][0].shape[2], float_experts[0][1].shape[2]
    from optimum_mc.bitwidths import metadata_bits, stored_bits

    meta = metadata_bits(h, i, 128)
    rows = []

    def evaluate(variant: str, m, allocation, rotate, extra=None) -> None:
        t = time.perf_counter()
        nll = {d: bq.window_nll(m, w) for d, w in windows.items()}
        ppl = {d: math.exp(sum(v) / len(v)) for d, v in nll.items()}
        flat = [b for row in allocation for b in row] if allocation else []
        code = sum(stored_bits(b, h, i, 128) - meta for b in flat) / len(flat) if flat else None
        row = {
            "model": name,
            "variant": variant,
            "rotate": rotate,
            "code_bits": code,
            "stored_bits": None if code is None else code + meta,
            **{d: ppl[d] for d in bq.DOMAINS},
            "mean": sum(ppl.values()) / len(ppl),
            "window_nll": nll,
            **(extra or {}),
        }
        rows.append(row)
        print(
            f"[{name}] {variant:>22} rot={int(rotate)} code={code} mean ppl {row['mean']:.3f} "
            f"({time.perf_counter() - t:.1f}s eval)",
            flush=True,
        )

    evaluate("float", model, None, False)
    # sanity: the rotation is orthogonal, also for a non-power-of-two size (128 * 3)
    for n in (h, i, 384):
        r = random_hadamard(n, args.seed)
        assert torch.allclose(r @ r.t(), torch.eye(n, dtype=torch.float64), atol=1e-10)

    plans = [("uniform-2", [[2] * b.experts.num_experts for b in blocks], None)]
    for code_bits, cands in args.mc:
        t = time.perf_counter()
        alloc, lib_model = library_allocation(path, code_bits, cands, args)
        label = f"mc{''.join(map(str, cands))}-{code_bits:g}"
        print(f"[{name}] library {label} quantized in {time.perf_counter() - t:.1f}s", flush=True)
        evaluate(label + " (library, packed)", lib_model, alloc, False, {"library": True})
        del lib_model
        plans.append((label, alloc, None))
    for label, alloc, _ in plans:
        for rotate in (False, True):
            t = time.perf_counter()
            fake_quantize(model, float_experts, inputs, alloc, rotate, opts, args.seed)
            print(f"[{name}] {label} rot={int(rotate)} quantized in {time.perf_counter() - t:.1f}s", flush=True)
            evaluate(label, model, alloc, rotate)
    return rows


def pairs(rows: list[dict]) -> list[dict]:
    """Paired per-window comparisons (same tokens): each rotated variant vs its plain one, and each MC allocation vs
    uniform 2-bit (the 1-bit candidate against dropping to 2 bits everywhere) at the same rotation."""
    by = {(r["model"], r["variant"], r["rotate"]): r for r in rows}
    out = []
    for (model, variant, rotate), r in by.items():
        todo = []
        if rotate and (model, variant, False) in by:
            todo.append((f"{variant} rotated vs plain", by[(model, variant, False)]))
        if variant.startswith("mc") and "library" not in variant and (model, "uniform-2", rotate) in by:
            todo.append(
                (f"{variant} vs uniform-2 ({'rotated' if rotate else 'plain'})", by[(model, "uniform-2", rotate)])
            )
        for what, base in todo:
            out.append(paired_row(model, what, r, base))
    return out


def markdown(summary: list[dict], paired: list[dict]) -> str:
    return lowbit_markdown(
        summary, paired, "Δppl vs float (mean of domains)", 2, "paired comparison (a vs b, same windows)"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="mc-ref-mixtral,mc-ref-qwen3moe")
    p.add_argument("--data", default=str(bq.DEFAULT_DATA))
    p.add_argument("--max-windows", type=int, default=16)
    p.add_argument("--num-samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--mc",
        default="2.0:123,1.75:123,1.5:123",
        help="MC allocations: code-bits:candidates, comma-separated (e.g. 2.25:23)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=str(HERE.parent / "docs" / "low-bit-study.json"))
    p.add_argument("--report", action="store_true", help="only recompute the tables from the saved --json")
    args = p.parse_args(argv)
    if args.report:
        saved = json.loads(Path(args.json).read_text())
        saved["summary"], saved["paired"] = summarize(saved["rows"]), pairs(saved["rows"])
        Path(args.json).write_text(json.dumps(saved, indent=1))
        print(markdown(saved["summary"], saved["paired"]))
        return 0
    args.mc = [(float(b), [int(c) for c in cs]) for b, cs in (s.split(":") for s in args.mc.split(","))]
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rows, windows = [], {}
    for name in args.models.split(","):
        rows += run_model(name, args, windows)
        _write(args, rows, windows, t0)
    for s in summarize(rows):
        rot = "rot" if s["rotate"] else "   "
        print(
            f"{s['model']:>16} {s['variant']:>26} {rot} stored={s['stored_bits'] or 0:.3f} "
            f"dppl(mean)={s['dppl_mean_pct']:+.2f}% pooled={s['dppl_pooled_pct']:+.2f}% "
            f"[{s['dppl_pooled_ci95_pct'][0]:+.2f}, {s['dppl_pooled_ci95_pct'][1]:+.2f}]"
        )
    return 0


def _write(args, rows, windows, t0) -> None:
    out = {
        "settings": {
            "max_windows_per_domain": args.max_windows,
            "windows": windows,
            "window_tokens": 256,
            "calibration": f"builtin text, {args.num_samples} x {args.seq_len} tokens, seed {args.seed}",
            "group_size": 128,
            "seed": args.seed,
            "threads": args.threads,
            "seconds": round(time.perf_counter() - t0, 1),
        },
        "summary": summarize(rows),
        "paired": pairs(rows),
        "rows": rows,
    }
    Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
