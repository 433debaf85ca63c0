#!/usr/bin/env bash
# What a GPU machine without a Rust toolchain or a package index needs to run bench/cuda_compare.py,
# bench/cuda_profile.py and tests/test_cuda.py from a copy of this checkout, built here:
#   - the extension for that machine's Python (GPU_PYTHON, default python3.12: an x86-64 CPython 3.12 there),
#     stripped, at python/logitless/_core.cpython-3XX-x86_64-linux-gnu.so (ignored by git);
#   - the peers' wheels (Liger-Kernel, cut-cross-entropy; pure Python) in .whl/ (ignored by git).
# There:  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#         PYTHONPATH=/tmp/site:$PWD/python python3 bench/cuda_compare.py --out-dir OUT
# (torch, Triton and transformers are the machine's own.)
set -euo pipefail
cd "$(dirname "$0")/.."
GPU_PYTHON="${GPU_PYTHON:-python3.12}"
VENV_DIR="${GPU_BUNDLE_VENV:-/tmp/logitless-gpu-bundle-venv}"
"$GPU_PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 9)'
[ -x "$VENV_DIR/bin/maturin" ] || { "$GPU_PYTHON" -m venv "$VENV_DIR" && "$VENV_DIR/bin/pip" install -q maturin; }
out="$(mktemp -d)"
"$VENV_DIR/bin/maturin" build --release -i "$VENV_DIR/bin/python" -o "$out" >/dev/null
wheel="$(ls "$out"/logitless-*.whl)"
"$VENV_DIR/bin/python" -m zipfile -e "$wheel" "$out/unpacked"
so="$(cd "$out/unpacked/logitless" && ls _core*.so)"
cp "$out/unpacked/logitless/$so" "python/logitless/$so"
strip "python/logitless/$so" 2>/dev/null || true
mkdir -p .whl
"$VENV_DIR/bin/pip" download -q --no-deps --only-binary=:all: -d .whl liger-kernel cut-cross-entropy
rm -rf "$out"
echo "python/logitless/$so and .whl/ ready: carry both"
