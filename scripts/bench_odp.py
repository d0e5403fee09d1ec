"""ODP benchmark on real weights: activated expert parameters saved vs perplexity change, and MoE wall time.

    python scripts/bench_odp.py                     # float and MC 2.5-bit models (about 10 min on 2 cores)
    python scripts/bench_odp.py --variants float --max-windows 20

For each model: dev perplexity (256-token windows of ../shared/data/dev.{code,docs,quotes}.txt) without ODP,
with the calibrated median thresholds (with and without token protection) and with fixed thresholds 0.4-0.7, the
share of activated expert parameters saved, and the wall time spent in MoE layers with and without ODP.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DEFAULT_MODEL = HERE.parent.parent / "shared" / "models" / "mc-ref-mixtral"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data"
DOMAINS = ("code", "docs", "quotes")


def moe_timer(model):
    """Forward pre/post hooks accumulating the wall time of every MoE block."""
    from optimum_mc.architectures import moe_blocks

    state = {"t": 0.0, "start": 0.0}
    for b in moe_blocks(model):
        b.block.register_forward_pre_hook(lambda *a: state.__setitem__("start", time.perf_counter()))
        b.block.register_forward_hook(
            lambda *a: state.__setitem__("t", state["t"] + time.perf_counter() - state["start"])
        )
    return state


def measure(model, timer: dict, windows: dict) -> tuple[float, float]:
    """Mean perplexity over the domains and the seconds spent in MoE blocks."""
    from optimum_mc.tools.evaluation import perplexity

    timer["t"] = 0.0
    ppl = {d: perplexity(model, w) for d, w in windows.items()}
    return sum(ppl.values()) / len(ppl), timer["t"]


def main(argv=None) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import optimum_mc
    from optimum_mc.tools.evaluation import token_windows
    from optimum_mc.tools.provenance import provenance

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL))
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--variants", default="float,mc-2.5")
    p.add_argument("--max-windows", type=int, default=40)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    source = provenance()
    tok = AutoTokenizer.from_pretrained(args.model)
    windows = {d: token_windows(tok, (Path(args.data) / f"dev.{d}.txt").read_text(), 256, args.max_windows)
               for d in DOMAINS}  # fmt: skip
    settings = [
        ("median + protection", dict()),
        ("median, no protection", dict(protect_ratio=0.0)),
        ("all layers, median", dict(layers=None, protect_ratio=0.02, all_layers=True)),
        *[(f"fixed {t}", dict(threshold=t)) for t in (0.4, 0.5, 0.6, 0.7)],
    ]
    results = []
    for variant in args.variants.split(","):
        kw = {}
        if variant.startswith("mc-"):
            kw["quantization_config"] = optimum_mc.MCConfig(bits=float(variant[3:]), show_progress=False)
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, **kw).eval()
        timer = moe_timer(model)
        if not variant.startswith("mc-"):
            optimum_mc.calibrate_odp(model)
        n_moe = len(model.config.quantization_config.moe_layers) if kw else model.config.num_hidden_layers

        base, base_moe = measure(model, timer, windows)
        print(f"[{variant}] no ODP: mean ppl {base:.3f}, MoE time {base_moe:.2f}s", flush=True)
        for name, opts in settings:
            opts = dict(opts)
            if opts.pop("all_layers", False):
                opts["layers"] = n_moe
            active = optimum_mc.set_odp(model, True, **opts)
            optimum_mc.reset_odp_stats(model)
            ppl, moe_t = measure(model, timer, windows)
            st = optimum_mc.get_odp_stats(model)["total"]
            saved = st["skipped_fraction"]
            row = {"model": variant, "setting": name, "layers": active, "mean_ppl": ppl,
                   "ppl_change_pct": 100 * (ppl / base - 1), "expert_params_saved_pct": 100 * saved,
                   "active_expert_bytes_per_token": st["active_expert_bytes_per_token"],
                   "moe_time_ratio": moe_t / base_moe}  # fmt: skip
            results.append(row | {"provenance": source})
            print(f"[{variant}] {name:>22}: layers {active} saved {100 * saved:5.1f}% params, ppl {ppl:.3f} "
                  f"({row['ppl_change_pct']:+.2f}%), MoE time x{row['moe_time_ratio']:.2f}", flush=True)  # fmt: skip
            optimum_mc.set_odp(model, False)
        del model
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
