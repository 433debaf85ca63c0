#!/usr/bin/env bash
# Kernel throughput on this machine, in one run: the fused forward+backward (GFLOP/s of 6·N·H·V), the same
# dtype's GEMM rate on our engine and its ratio, peak extra memory, and torch.matmul's rate for the same shapes; for
# bf16 also the WeightGrad::Recompute call (and, on an AMX CPU, the AVX512-BF16 engine's call).
# THROUGHPUT_BUDGET_MB sets the chunk budget (default: the kernel's, 60 MiB).
# Usage: bench/kernel.sh [--small]   (--small skips N=8192 H=2048 V=128256, which takes minutes on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}"
cargo build --release -q -p logitless-kernel --example throughput
BIN="$CARGO_TARGET_DIR/release/examples/throughput"
PY="${PYTHON:-.venv/bin/python}"
shapes=("2048 1024 32000")
[[ "${1:-}" == "--small" ]] || shapes+=("8192 2048 128256")
for shape in "${shapes[@]}"; do
    for dtype in bf16 f32; do
        # One repetition for the big shape (about a minute each on 2 cores), best of two otherwise.
        reps=2; [[ "$shape" == 8192* ]] && reps=1
        # shellcheck disable=SC2086
        "$BIN" $shape "$dtype" "$reps"
        if [[ "$dtype" == bf16 ]]; then
            # The same call without the V×H f32 weight-gradient accumulator (a slab pass, four GEMMs' worth).
            # shellcheck disable=SC2086
            THROUGHPUT_WEIGHT_GRAD=recompute "$BIN" $shape "$dtype" "$reps" fused-only
            if grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null; then
                # On an AMX CPU, the AVX512-BF16 engine it would use otherwise, for the ratio between the two.
                # shellcheck disable=SC2086
                THROUGHPUT_ISA=avx512bf16 "$BIN" $shape "$dtype" "$reps"
            fi
        fi
        if [[ -x "$PY" ]]; then
            # shellcheck disable=SC2086
            "$PY" bench/torch_matmul.py $shape "$dtype" "$reps"
        fi
    done
done
