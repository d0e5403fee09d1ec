"""Allocation solver benchmark: time and optimality of the exact DP and of CP-SAT at 8 / 64 / 128 / 256 experts per
layer. CP-SAT variants: "cpsat_hinted" = the solver of record (hinted with the DP optimum), "cpsat_unhinted" (the
previous setup).

    python scripts/bench_allocation.py --json docs/results/allocation.json

Factors are synthetic (seeded): heavy-tailed frequencies and routing masses, losses falling with the bit-width with
per-expert noise; candidate widths 1/2/3, 2.5 average bits, the paper's constraints and objective. "layer" solves
one program per layer for all layers; "global" one program over all layers.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from optimum_mc.allocation import (
    ExpertFactors,
    layer_budget,
    max_total_bits,
    objective_costs,
    solve_dp,
)
from optimum_mc.allocation.solve import _cpsat

CB = [1, 2, 3]


def synthetic_factors(num_experts: int, seed: int) -> ExpertFactors:
    """Seeded factors of one layer (heavy-tailed frequency / mass; loss ~ 2^-b with noise, un-squared)."""
    gen = torch.Generator().manual_seed(seed)
    freq = torch.rand(num_experts, generator=gen).pow(3) + 1e-3
    mass = freq * (0.5 + torch.rand(num_experts, generator=gen))
    base = torch.exp(torch.randn(num_experts, 1, generator=gen))
    cb = torch.tensor(CB, dtype=torch.float32)
    loss = base * 2.0 ** (-cb) * (0.8 + 0.4 * torch.rand(num_experts, len(CB), generator=gen))
    return ExpertFactors(freq, mass, loss)


def objective(costs: list[np.ndarray], bits: list[list[int]]) -> float:
    return float(sum(c[np.arange(len(b)), [CB.index(x) for x in b]].sum() for c, b in zip(costs, bits)))


def run_case(num_experts: int, layers: int, mode: str, cpsat_limit: float) -> dict:
    costs = [objective_costs(synthetic_factors(num_experts, s), 1.0, 1.5, 1.0) for s in range(layers)]
    programs = [costs] if mode == "global" else [[c] for c in costs]
    out = {"experts": num_experts, "layers": layers, "mode": mode}
    t0 = time.perf_counter()
    dp = []
    for prog in programs:
        sizes = [c.shape[0] for c in prog]
        total = max_total_bits(sizes, CB, layer_budget(sum(sizes), 2.5), True)
        dp.append((prog, total, solve_dp(prog, CB, total, True)))
    out["dp_seconds"] = time.perf_counter() - t0
    for name, hinted in (("cpsat_hinted", True), ("cpsat_unhinted", False)):
        t0, statuses, gap = time.perf_counter(), [], 0.0
        for prog, total, sol in dp:
            bits, status = _cpsat(prog, CB, total, True, sol if hinted else None, cpsat_limit)
            statuses.append(status)
            gap = max(gap, objective(prog, bits) / objective(prog, sol) - 1) if bits else float("inf")
        out[f"{name}_seconds"] = time.perf_counter() - t0
        out[f"{name}_status"] = sorted(set(statuses))
        out[f"{name}_max_rel_gap_to_dp"] = gap
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpsat-limit", type=float, default=20.0, help="CP-SAT seconds per program")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for experts, layers in ((8, 32), (64, 48), (128, 48), (256, 58)):
        for mode in ("layer", "global"):
            rows.append(run_case(experts, layers, mode, args.cpsat_limit))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
