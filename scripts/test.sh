#!/usr/bin/env bash
# Install what the tests need (CPU torch first, then the package with its test extra) and run them: the main suite,
# then the vLLM plugin's tests in their own environment (scripts/test_vllm.sh; OPTIMUM_MC_SKIP_VLLM=1 skips them).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"  # both OpenMP runtimes (torch's, the kernels'): see optimum_mc/kernels/cpu.py _open
python -m pip install -q torch==2.13.0
python -m pip install -q -e ".[test]"
ruff check optimum_mc tests scripts
python -m pytest -n 2 -q --durations=20 "$@"
if [ "${OPTIMUM_MC_SKIP_VLLM:-0}" != 1 ]; then
    bash scripts/test_vllm.sh
fi
