"""Build (train) the embedded demo MoE into a folder; ``optimum-mc demo`` does the same on first use.

python scripts/build_demo_model.py [--output DIR] [--seconds 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from optimum_mc.tools.demo import TRAIN_SECONDS, build_demo_model, cache_path

if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(cache_path()))
    p.add_argument("--seconds", type=float, default=TRAIN_SECONDS)
    args = p.parse_args()
    print(build_demo_model(Path(args.output), seconds=args.seconds))
