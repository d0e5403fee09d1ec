"""Quality benchmark on real weights: perplexity of float / uniform / MC / ablations / bitsandbytes NF4.

    python scripts/bench_quality.py                       # everything (about 10-20 min on 2 CPU cores)
    python scripts/bench_quality.py --variants float,mc-2.5,uniform-2 --max-windows 40   # a quick subset

Perplexity uses non-overlapping 256-token windows of ../shared/data/dev.{code,docs,quotes}.txt with the model's
tokenizer; the mean is over the three domains. Calibration uses the package's offline builtin text (never the dev
text). Results go to stdout as a markdown table and to --json (with every window's mean next-token NLL).

Paired comparison (is a difference more than the evaluation text's noise?): for two variants, each window gives
``d = NLL_A - NLL_B`` (same tokens); the table reports the mean of ``d`` per domain and over all windows, its
standard error ``sd(d) / sqrt(n)`` and the relative perplexity change ``exp(mean d) - 1``. "A better" means the
upper end of the 95% interval, ``mean + 1.96 SE``, is below 0.

    python scripts/bench_quality.py --compare mc-2.5 --report a.json b.json   # paired table from saved runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from optimum_mc.bitwidths import mean_bits

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent.parent / "shared" / "models" / "mc-ref-mixtral"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
DOMAINS = ("code", "docs", "quotes")


# name prefix -> MCConfig options of the variant (the suffix after the last "-" is the average bit-width)
VARIANT_OPTIONS = {
    "mc": {},
    "global": {"allocation": "global"},
    "random": {"allocation": "random"},
    "frequency": {"allocation": "frequency"},
    "hessian": {"allocation": "hessian"},
    "mcheldout": {"loss_method": "heldout"},
    "mcinsample": {"loss_method": "insample"},
    "mcsq": {"loss_method": "insample", "gamma": 2.0},  # the previous objective: in-sample eps, squared again
    "mcint": {"zero_point": "int"},
    "mcrw": {"expert_hessian": "router-weighted"},
    "mctune": {"tune_exponents": True},
    "mcmse": {"alpha": 0.0, "beta": 0.0, "gamma": 2.0},  # cost = squared block-output error (additive over experts)
    "mcnf4": {"nonexpert_method": "bnb_nf4"},
    # per-projection allocation: gate/up and down matrices of each expert get their own widths
    "mcproj": {"allocation_granularity": "projection"},
    "globalproj": {"allocation": "global", "allocation_granularity": "projection"},
    "mc23": {"candidate_bits": [2, 3]},
    "mc123": {"candidate_bits": [1, 2, 3]},  # the paper's candidates (the default before the low-bit study)
    # the suffix counts stored bits per expert weight (codes + fp16 scales and zeros), as llama.cpp's bpw does
    "mcstored": {"bits_budget": "stored"},
    "mcstored23": {"bits_budget": "stored", "candidate_bits": [2, 3]},
    # stored budget with integer zeros (fp16 metadata), and with compact metadata (issue 23 item 2: 8-bit scale
    # codes x 2^k per 16 rows, integer zeros at the code width: (8.5 + b) / 128 bits per weight instead of 0.25)
    "mcstoredint": {"bits_budget": "stored", "zero_point": "int"},
    "mcstoredq8": {"bits_budget": "stored", "zero_point": "int", "metadata": "q8"},
    # least-squares group grids (issue 23 grid study): fitted when GPTQ reaches the group, natural column order
    "mclsq": {"gptq": {"group_fit": "lsq", "act_order": False}},
    "mclsqact": {"gptq": {"group_fit": "lsq"}},
    "mcclip": {"clip_search": True},  # GPTQ grids by the Hessian-weighted clip search
    "mcnoclip": {"clip_search": False},
    "mcproj23": {"allocation_granularity": "projection", "candidate_bits": [2, 3]},
    # expected block-output error: cost = eps^2 (additive over experts), eps from held-out GPTQ
    "mcmseho": {"loss_method": "heldout", "alpha": 0.0, "beta": 0.0, "gamma": 2.0},
    # global allocation, eps relative to the decoder layer's output (residual stream) so layers compare
    "globalres": {"allocation": "global", "loss_normalizer": "residual"},
    "globalmseres": {"allocation": "global", "loss_normalizer": "residual", "alpha": 0.0, "beta": 0.0, "gamma": 2.0},
    "globalmsehores": {
        "allocation": "global",
        "loss_normalizer": "residual",
        "loss_method": "heldout",
        "alpha": 0.0,
        "beta": 0.0,
        "gamma": 2.0,
    },
}


def variant_config(name: str, seed: int, num_samples: int, seq_len: int):
    """MCConfig of a named variant: "mc-2.5", "uniform-2", "uniformint-2", "random-2.5", "hessian-2.5", ...
    (see VARIANT_OPTIONS); a suffix "@N" sets the seed (calibration sample, random allocation) to N."""
    import optimum_mc

    name, _, at = name.partition("@")
    seed = int(at) if at else seed
    kind, _, value = name.rpartition("-")
    common = dict(seed=seed, num_samples=num_samples, seq_len=seq_len, show_progress=False)
    if kind in ("uniform", "uniformint", "uniformclip", "uniformnoclip", "uniformlsq"):
        b = int(value)
        zp = "int" if kind == "uniformint" else "float"
        clip = {
            "uniformclip": {"clip_search": True},
            "uniformnoclip": {"clip_search": False},
            "uniformlsq": {"gptq": {"group_fit": "lsq", "act_order": False}},
        }.get(kind, {})
        return optimum_mc.MCConfig(bits=b, candidate_bits=[b], zero_point=zp, **clip, **common)
    if kind in VARIANT_OPTIONS:
        return optimum_mc.MCConfig(bits=float(value), **VARIANT_OPTIONS[kind], **common)
    raise SystemExit(f"unknown variant {name!r}")


def effective_expert_bits(model) -> float | None:
    """Stored bits per routed-expert weight: packed codes + scales + zeros as stored (None for float experts)."""
    from optimum_mc.architectures import moe_blocks
    from optimum_mc.nn import MCExperts

    stored, weights = 0, 0
    for blk in moe_blocks(model):
        ex = blk.experts
        if not isinstance(ex, MCExperts):
            return None
        for e in range(ex.num_experts):
            stored += ex.expert_nbytes(e) * 8
        weights += ex.num_experts * 3 * ex.hidden_dim * ex.intermediate_dim
    return stored / weights if weights else None


def load_variant(name: str, model_path: str, args):
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    if name == "float":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    elif name == "bnb-nf4":
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        nf4_everything(model)
    else:
        cfg = variant_config(name, args.seed, args.num_samples, args.seq_len)
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32, quantization_config=cfg)
    return model.eval(), time.perf_counter() - t0


def nf4_everything(model) -> None:
    """The familiar ~4-bit baseline: bitsandbytes NF4 on experts (parametrization) and every linear layer."""
    from bitsandbytes.nn.parametrize import replace_parameter_4bit

    from optimum_mc.architectures import moe_blocks, set_submodule
    from optimum_mc.nn.nf4_linear import NF4Linear

    for blk in moe_blocks(model):
        for p in ("gate_up_proj", "down_proj"):
            replace_parameter_4bit(blk.experts, p, quant_type="nf4", blocksize=64)
    skip = {id(m) for blk in moe_blocks(model) for m in blk.router.modules()}
    for name, m in list(model.named_modules()):
        if type(m) is torch.nn.Linear and id(m) not in skip and name != "lm_head":
            set_submodule(model, name, NF4Linear.from_linear(m))


@torch.no_grad()
def window_nll(model, windows: torch.Tensor, batch_size: int = 8) -> list[float]:
    """Mean next-token negative log-likelihood of each window (scored independently)."""
    out = []
    for s in range(0, windows.shape[0], batch_size):
        ids = windows[s : s + batch_size]
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        out += nll.mean(dim=1).tolist()
    return out


def paired(a: dict, b: dict) -> dict:
    """Paired per-window difference of mean NLL, ``a - b``, per domain and over all windows: (mean, SE, n)."""
    out = {}
    pooled = []
    for d in DOMAINS:
        diff = torch.tensor(a["window_nll"][d], dtype=torch.float64) - torch.tensor(b["window_nll"][d])
        pooled.append(diff)
        out[d] = _mean_se(diff)
    out["all"] = _mean_se(torch.cat(pooled))
    return out


def _mean_se(diff: torch.Tensor) -> tuple[float, float, int]:
    n = diff.numel()
    se = float(diff.std(unbiased=True)) / n**0.5 if n > 1 else float("inf")
    return float(diff.mean()), se, n


def paired_table(rows: list[dict], baseline: str, pairs: list[tuple[str, str]] | None = None) -> str:
    """Markdown, one line per pair ``(a, b)`` (default: ``baseline`` against every other row with per-window NLL):
    relative perplexity change of ``a`` vs ``b`` with its 95% interval (negative = ``a`` better)."""
    by = {r["variant"]: r for r in rows if "window_nll" in r}
    if pairs is None:
        if baseline not in by:
            return f"(no per-window NLL for {baseline!r})"
        pairs = [(baseline, name) for name in by if name != baseline]
    lines = [
        "| a vs b | " + " | ".join(f"{d}: Δppl [95% CI]" for d in (*DOMAINS, "all")) + " | a better / worse on |",
        "|---|" + "---|" * (len(DOMAINS) + 2),
    ]
    for a, b in pairs:
        if a not in by or b not in by:
            lines.append(f"| {a} vs {b} | (missing) |")
            continue
        res = paired(by[a], by[b])
        cells, better, worse = [], 0, 0
        for d in (*DOMAINS, "all"):
            m, se, n = res[d]
            lo, hi = math.exp(m - 1.96 * se) - 1, math.exp(m + 1.96 * se) - 1
            cells.append(f"{100 * (math.exp(m) - 1):+.3f}% [{100 * lo:+.3f}, {100 * hi:+.3f}]")
            if d != "all":
                better += hi < 0
                worse += lo > 0
        lines.append(
            f"| {a} vs {b} (n={res['all'][2]}) | " + " | ".join(cells) + f" | {better} / {worse} of {len(DOMAINS)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument(
        "--variants",
        default="float,bnb-nf4,uniform-2,uniform-3,mc-2.5,random-2.5,frequency-2.5,global-2.5,uniform-4,"
        "mc-2.0,mc-3.0,mc-1.5",
    )
    p.add_argument("--max-windows", type=int, default=None, help="windows per domain (default: all)")
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write results here")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    p.add_argument("--compare", default="mc-2.5", help="baseline of the paired per-window table")
    p.add_argument("--pairs", default=None, help="paired table for these 'A:B' pairs, comma-separated")
    p.add_argument("--report", nargs="+", default=None, help="only print tables from these saved --json files")
    args = p.parse_args(argv)
    if args.report:
        rows = [r for f in args.report for r in json.loads(Path(f).read_text())]
        print(markdown_table(rows))
        print()
        print(paired_table(rows, args.compare, _pairs(args.pairs)))
        return 0
    if not os.path.isdir(args.model):
        print(f"error: model folder {args.model} not found", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads or max(1, os.cpu_count() or 1))
    from transformers import AutoTokenizer

    from optimum_mc.tools.evaluation import token_windows
    from optimum_mc.tools.speed import model_bytes

    tok = AutoTokenizer.from_pretrained(args.model)
    windows = {
        d: token_windows(tok, (Path(args.data) / f"dev.{d}.txt").read_text(encoding="utf-8"), 256, args.max_windows)
        for d in DOMAINS
    }
    from optimum_mc.tools.provenance import provenance

    source = provenance()
    rows = []
    for name in args.variants.split(","):
        model, seconds = load_variant(name, args.model, args)
        nll = {d: window_nll(model, w) for d, w in windows.items()}
        ppl = {d: math.exp(sum(v) / len(v)) for d, v in nll.items()}  # equal windows: the usual perplexity
        ppl["mean"] = sum(ppl[d] for d in DOMAINS) / len(DOMAINS)
        qc = getattr(model.config, "quantization_config", None)
        bits = getattr(qc, "expert_bits", None)
        flat = [mean_bits(b) for row in bits for b in row] if bits else []
        avg = sum(flat) / len(flat) if flat else None
        size = model_bytes(model)
        eff = effective_expert_bits(model)
        rows.append(
            {
                "variant": name,
                "load_seconds": round(seconds, 1),
                "avg_expert_bits": avg,
                "effective_expert_bits": eff,  # the same number as stored_expert_bits (older name)
                "stored_expert_bits": eff,
                "bytes": size,
                **ppl,
                "window_nll": nll,
                "expert_bits": getattr(qc, "expert_bits", None),
                "expert_factors": getattr(qc, "expert_factors", None),
                "provenance": source,
            }
        )
        print(
            f"{name:>14}: " + " ".join(f"{d}={ppl[d]:.2f}" for d in (*DOMAINS, "mean")) + f"  ({seconds:.1f}s)",
            flush=True,
        )
        del model
        if args.json:
            _write_json(args.json, rows)
    print()
    print(markdown_table(rows))
    print()
    print(paired_table(rows, args.compare, _pairs(args.pairs)))
    return 0


def _pairs(spec: str | None) -> list[tuple[str, str]] | None:
    return None if not spec else [tuple(p.split(":", 1)) for p in spec.split(",")]


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| variant | code bits/expert weight | stored bits/expert weight | code | docs | quotes | mean | size (MB) "
        "| load+quantize s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b = "-" if r["avg_expert_bits"] is None else f"{r['avg_expert_bits']:.2f}"
        stored = r.get("stored_expert_bits", r.get("effective_expert_bits"))
        eb = "-" if stored is None else f"{stored:.3f}"
        lines.append(
            f"| {r['variant']} | {b} | {eb} | {r['code']:.3f} | {r['docs']:.3f} | {r['quotes']:.3f} | {r['mean']:.3f} "
            f"| {r['bytes'] / 2**20:.2f} | {r['load_seconds']} |"
        )
    return "\n".join(lines)


def _write_json(path: str, rows: list[dict]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(path)), delete=False) as f:
        json.dump(rows, f, indent=2)
    os.replace(f.name, path)


if __name__ == "__main__":
    raise SystemExit(main())
