"""How much could any 2.5-bit allocation gain? A local search on calibration loss, scored on held-out text.

    python scripts/probe_allocation_headroom.py ../shared/models/mc-ref-mixtral --max-windows 100 --json out.json

Experts are GPTQ-quantized at 1, 2 and 3 bits (uniform runs) and dequantized once; one float model with MC 2.5's
4-bit attention then takes any allocation by copying the experts in at their widths. Starting from MC's
allocation, every within-layer swap of two experts' widths (the budget is kept) is tried and kept when it lowers
the mean NLL on a calibration sample drawn with another seed than the quantization's; sweeps repeat until none
helps. Then MC, the searched and the frequency-only allocation are scored on the dev text with paired per-window
intervals (``bench_quality.paired_table``). A search that wins on calibration text but loses on the dev text says
the allocation is being fitted to the calibration distribution, not that MC leaves quality on the table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path

import torch
from bench_quality import DEFAULT_DATA, DOMAINS, paired_table, window_nll
from transformers import AutoModelForCausalLM, AutoTokenizer

import optimum_mc
from optimum_mc.calibration.data import calibration_batches
from optimum_mc.nn import MCExperts, QuantLinear

RUNS = {
    1: dict(bits=1, candidate_bits=[1]),
    2: dict(bits=2, candidate_bits=[2]),
    3: dict(bits=3, candidate_bits=[3]),
    "mc": dict(bits=2.5),
    "frequency": dict(bits=2.5, allocation="frequency"),
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--max-windows", type=int, default=100)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sweeps", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    common = dict(seed=0, num_samples=32, seq_len=512, show_progress=False)
    experts, bits = {}, {}
    for name, kw in RUNS.items():
        cfg = optimum_mc.MCConfig(**kw, **common)
        q = AutoModelForCausalLM.from_pretrained(args.model, quantization_config=cfg, dtype=torch.float32)
        experts[name] = [m.dequantize() for m in q.modules() if isinstance(m, MCExperts)]
        bits[name] = q.config.quantization_config.expert_bits
        if name == "mc":
            attn = {n: m.dequantize_weight(torch.float32) for n, m in q.named_modules() if isinstance(m, QuantLinear)}
        del q
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    for n, m in model.named_modules():
        if n in attn:
            m.weight.data.copy_(attn[n])
    layers = [m for m in model.modules() if hasattr(m, "gate_up_proj") and hasattr(m, "down_proj")]

    @torch.no_grad()
    def apply(alloc):
        for layer, (mod, row) in enumerate(zip(layers, alloc)):
            for e, b in enumerate(row):
                mod.gate_up_proj[e].copy_(experts[b][layer][0][e])
                mod.down_proj[e].copy_(experts[b][layer][1][e])

    calib = calibration_batches(None, tok, 16, 256, 123)

    @torch.no_grad()
    def calib_nll() -> float:
        losses = [model(input_ids=calib[i : i + 8], labels=calib[i : i + 8]).loss.item() for i in range(0, 16, 8)]
        return sum(losses) / len(losses)

    cur = [list(r) for r in bits["mc"]]
    apply(cur)
    best = calib_nll()
    print(f"calibration NLL: MC {best:.5f}", flush=True)
    t0 = time.time()
    for sweep in range(args.sweeps):
        kept = 0
        for layer, row in enumerate(cur):
            for i, j in itertools.combinations(range(len(row)), 2):
                if cur[layer][i] == cur[layer][j]:
                    continue
                cand = [list(r) for r in cur]
                cand[layer][i], cand[layer][j] = cand[layer][j], cand[layer][i]
                apply(cand)
                v = calib_nll()
                if v < best - 1e-5:
                    best, cur, kept = v, cand, kept + 1
        print(f"sweep {sweep}: {kept} swaps kept, calibration NLL {best:.5f} ({time.time() - t0:.0f}s)", flush=True)
        if not kept:
            break
    windows = {}
    for d in DOMAINS:
        ids = tok((Path(DEFAULT_DATA) / f"dev.{d}.txt").read_text(), return_tensors="pt").input_ids[0]
        n = min(args.max_windows, ids.numel() // 256)
        windows[d] = ids[: n * 256].reshape(n, 256)
    rows = []
    for name, alloc in (("mc", bits["mc"]), ("searched", cur), ("frequency", bits["frequency"])):
        apply(alloc)
        nll = {d: window_nll(model, w) for d, w in windows.items()}
        row = {"variant": name, "window_nll": nll, "expert_bits": alloc}
        row.update({d: math.exp(sum(v) / len(v)) for d, v in nll.items()})
        rows.append(row)
        print(name, {d: round(row[d], 3) for d in DOMAINS}, flush=True)
    print(paired_table(rows, "mc", [("searched", "mc"), ("searched", "frequency"), ("mc", "frequency")]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows))


if __name__ == "__main__":
    main()
