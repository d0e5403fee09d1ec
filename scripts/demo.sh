#!/usr/bin/env bash
# Install what the demo needs (CPU torch first, then the package) and run the offline demo.
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # both OpenMP runtimes (torch's, the kernels'): see optimum_mc/kernels/cpu.py _open
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[plots]"
python -m optimum_mc demo "$@"
