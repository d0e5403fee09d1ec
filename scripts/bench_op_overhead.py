"""Per-call time of the packed modules at decode size on CPU: one ``MCExperts`` step (8 experts at 2/3 bits, hidden
256, intermediate 512, 1 token, top-2) and one 4-bit ``QuantLinear`` row (256 x 256), fp32 and bf16, float
activations. At this size a call is mostly per-call overhead (dispatch, checks), which is what this measures.

    OMP_NUM_THREADS=1 python scripts/bench_op_overhead.py --json out.json

Times are this process's CPU time per call in µs, the median of ``--rounds`` rounds. To compare two versions, run
the script with each version on ``PYTHONPATH``, alternating, on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time

import torch

from optimum_mc.nn import MCExperts, QuantLinear


def per_call(fn, calls: int, rounds: int) -> float:
    for _ in range(calls // 10):
        fn()
    times = []
    for _ in range(rounds):
        start = time.process_time()
        for _ in range(calls):
            fn()
        times.append((time.process_time() - start) / calls * 1e6)
    return statistics.median(times)


def experts(dtype: torch.dtype, num: int = 8, hidden: int = 256, inter: int = 512, group: int = 128) -> MCExperts:
    g = torch.Generator().manual_seed(0)
    m = MCExperts(num, hidden, inter, [(2, 3)[e % 2] for e in range(num)], group, torch.nn.SiLU(), dtype=dtype)

    def triple(bits, rows, cols):
        codes = torch.randint(0, 2**bits, (rows, cols), dtype=torch.uint8, generator=g)
        return codes, torch.rand(rows, cols // group, generator=g).half(), torch.rand(rows, cols // group).half()

    for e, b in enumerate(m.bits):
        m.set_expert(e, triple(b, 2 * inter, hidden), triple(b, hidden, inter))
    m.decode_activations = "float"
    return m


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        m = experts(dtype)
        x = torch.randn(1, m.hidden_dim, dtype=dtype)
        idx, w = torch.tensor([[1, 4]]), torch.tensor([[0.6, 0.4]])
        lin = QuantLinear.from_linear(torch.nn.Linear(256, 256).to(dtype), 4, 128)
        lin.decode_activations = "float"
        name = str(dtype).removeprefix("torch.")
        with torch.no_grad():
            out[f"MCExperts {name} us"] = per_call(lambda: m(x, idx, w), args.calls, args.rounds)  # noqa: B023
            out[f"QuantLinear {name} us"] = per_call(lambda: lin(x), 3 * args.calls, args.rounds)  # noqa: B023
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out["threads"], out["commit"] = torch.get_num_threads(), commit
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
