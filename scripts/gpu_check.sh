#!/usr/bin/env bash
# Everything that needs a CUDA GPU, in one run of at most ~6 minutes (a lent GPU machine's time is short): the CUDA
# tests (with the vLLM MoE method's forward, which imports no vLLM: vLLM cannot be installed there; the fused MoE
# kernels are the CUDA default) and the layer benchmark (scripts/bench_gpu_layer.py: the Mixtral-shaped layer under
# CUDA graphs vs bf16 grouped-mm and dense, GB/s per width, registers / spills, launches per layer; then a tile
# sweep of the fused kernels), whose JSON files are copied to $OUT. FULL=1 adds the older kernel benchmark, Triton
# tile sweeps and the scale benchmark (~7 more minutes). Logs go to $OUT (default ./gpu-out). Python packages missing
# on the machine can be given as wheels in ./.whl. MC_COMMIT names the commit measured where the work tree has no
# .git.
#
#     MC_COMMIT=<sha> bash scripts/gpu_check.sh          # ~6 minutes at most
#     MC_COMMIT=<sha> STEPS="sweep" bash scripts/gpu_check.sh   # one step again
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mc-site .whl/*.whl \
        && export PYTHONPATH=/tmp/mc-site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"

STEPS=${STEPS:-layer sweep pytest}  # e.g. STEPS=sweep to rerun one step; FULL=1 adds the older ones
step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log, keep going on failure
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) [ "${FULL:-0}" = 1 ] || { echo "== $name: skipped"; return; } ;; esac
    echo "== $name"
    local t0=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - t0)) s"
}

step layer 150 python3 scripts/bench_gpu_layer.py
grep -sE "^\{|wrote" "$OUT/layer.log" | cut -c1-400
step sweep 100 python3 scripts/bench_gpu_layer.py --sweep
grep -sE "wrote|error" "$OUT/sweep.log" | cut -c1-200
cp docs/results/gpu-layer-*.json docs/results/gpu-sweep-*.json "$OUT"/ 2>/dev/null
step pytest 110 python3 -m pytest -q -s -p no:cacheprovider -rs tests/kernels/test_cuda.py tests/integrations/test_vllm_apply.py
grep -sE "error vs float|passed|failed|^E  |Error" "$OUT/pytest.log" | head -n 30
[ "${FULL:-0}" = 1 ] || exit 0
step bench_kernels 70 python3 scripts/bench_kernels.py --quick
grep -A12 "fused MoE layer" "$OUT/bench_kernels.log"
step tune 120 python3 scripts/tune_triton_moe.py --dtypes float16 --tokens 1 256 1024
grep -E "default|dequantize|^\|" "$OUT/tune.log"
step dequant 90 python3 scripts/tune_triton_moe.py --dequant --dtypes bfloat16 --tokens 8 16 32 256 1024
grep -E "^\|" "$OUT/dequant.log"
step scale 120 python3 scripts/bench_scale.py --layers 4 --device cuda --threads 8 --trace --uniform-check 4 \
    --out "$OUT/scale_cuda.json"
grep -E "layers=|RSS|CUDA" "$OUT/scale.log"
