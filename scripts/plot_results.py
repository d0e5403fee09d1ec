"""Draw docs/results/*.png from the benchmark JSON files (needs matplotlib: pip install 'optimum-mc[plots]').

python scripts/plot_results.py docs/results/quality.json docs/results/quality2.json [--odp docs/results/odp.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("quality", nargs="+")
    p.add_argument("--odp", default=None)
    p.add_argument("--out", default="docs/results")
    args = p.parse_args(argv)
    rows = [r for f in args.quality for r in json.loads(Path(f).read_text())]
    by = {r["variant"]: r for r in rows}
    fig, ax = plt.subplots(figsize=(6, 4))
    for prefix, label, style in (("uniform-", "uniform GPTQ", "s--"), ("mc-", "MC (layer ILP)", "o-")):
        pts = sorted((r["avg_expert_bits"], r["mean"]) for k, r in by.items() if k.startswith(prefix))
        if pts:
            ax.plot(*zip(*pts), style, label=label)
    for key, marker in (("random-2.5", "x"), ("frequency-2.5", "^"), ("global-2.5", "D")):
        if key in by:
            ax.plot(by[key]["avg_expert_bits"], by[key]["mean"], marker, label=key)
    if "float" in by:
        ax.axhline(by["float"]["mean"], color="gray", lw=1, label="float")
    if "bnb-nf4" in by:
        ax.axhline(by["bnb-nf4"]["mean"], color="gray", lw=1, ls=":", label="bitsandbytes NF4 (all layers)")
    ax.set_xlabel("average expert bits")
    ax.set_ylabel("mean dev perplexity (code, docs, quotes)")
    ax.set_title("mc-ref-mixtral: perplexity vs expert bits")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(args.out) / "perplexity-vs-bits.png", dpi=120)
    if args.odp:
        odp = json.loads(Path(args.odp).read_text())
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in sorted({r["model"] for r in odp}):
            pts = [
                (r["expert_params_saved_pct"], r["ppl_change_pct"], r["setting"]) for r in odp if r["model"] == model
            ]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o", label=model)
            for x, y, s in pts:
                ax.annotate(s, (x, y), fontsize=6)
        ax.axhline(2, color="gray", ls=":", lw=1)
        ax.axvline(15, color="gray", ls=":", lw=1)
        ax.set_xlabel("activated expert parameters saved (%)")
        ax.set_ylabel("perplexity change (%)")
        ax.set_title("ODP trade-off on mc-ref-mixtral")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(Path(args.out) / "odp-tradeoff.png", dpi=120)


if __name__ == "__main__":
    main()
