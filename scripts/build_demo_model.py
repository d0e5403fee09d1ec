"""Build (train) the embedded demo MoE into a folder; ``optimum-mc demo`` does the same on first use.

python scripts/build_demo_model.py [--output DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from optimum_mc.tools.demo import RECIPE, build_demo_model, cache_path

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(cache_path()))
    args = p.parse_args()
    t = time.perf_counter()
    print(build_demo_model(Path(args.output)), f"({RECIPE.steps} steps, {time.perf_counter() - t:.0f}s)")
