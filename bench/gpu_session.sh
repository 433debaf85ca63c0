#!/usr/bin/env bash
# One lent-GPU session's checks in one command, sized for the device tool's 15-minute window (about 7 minutes on
# an H200), on a copy of this checkout that carries what bench/gpu_bundle.sh built (.whl/ and the extension):
#   1. tests/test_cuda.py (the op on CUDA against float64; CUDA graphs, the gradient over its own logits);
#   2. bench/cuda_compare.py (correctness block, then time and memory of every method; Markdown + JSON);
#   3. bench/memory_model.py (the predicted extra memory, to set against step 2's measured figures);
#   4. bench/cuda_profile.py --cases small (kernels by device time: why recompute there is 1.8x stock) and
#      --host (where a small call's host time goes: device waits, aten ops, Python functions);
#   5. bench/cuda_compare.py at the wide shape (an 8B-class model's 8192 tokens: the shared bf16 gradient buffer).
# Each step has its own time limit and a failing step does not stop the next; outputs go to OUT (default $OUT).
# From the device tool:  bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-/tmp/logitless-gpu-session}}"
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || echo "peers' wheels not installed: their rows are left out"
export PYTHONPATH="/tmp/site:$PWD/python" PYTHONUNBUFFERED=1
step() {  # name, limit in seconds, command...
  local name="$1" limit="$2"
  shift 2
  echo "== $name"
  local start=$SECONDS
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  echo "   exit $? after $((SECONDS - start)) s (log: $name.log)"
  tail -n 3 "$OUT/$name.log"
}
step test_cuda 150 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py
step cuda_compare 300 python3 bench/cuda_compare.py --out-dir "$OUT"
step memory_model 60 python3 bench/memory_model.py --dtypes bf16,f32
step memory_model_aliased 60 python3 bench/memory_model.py --aliased
step cuda_profile_small 90 python3 bench/cuda_profile.py --cases small --ignored 0
step cuda_profile_host 90 python3 bench/cuda_profile.py --host --cases small
step cuda_compare_wide 150 python3 bench/cuda_compare.py --cases wide --dtypes bf16 --out-dir "$OUT/wide"
