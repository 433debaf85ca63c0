"""Reference GEMM rate of torch on this machine, for the kernel benchmark (bench/kernel.sh).

Times the three products the fused kernel performs (logits = H·Wᵀ, d_hidden = G·W, d_weight = Gᵀ·H) with
torch.matmul for one shape and dtype, and prints GFLOP/s (2·N·H·V flops each).
Usage: python bench/torch_matmul.py N H V {bf16,f32} [reps]
"""

import sys
import time

import torch


def best_seconds(fn, reps: int) -> float:
    fn()  # warm-up: first calls pick kernels and allocate
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    n, h, v = (int(a) for a in sys.argv[1:4])
    dtype = {"bf16": torch.bfloat16, "f32": torch.float32}[sys.argv[4]]
    reps = int(sys.argv[5]) if len(sys.argv) > 5 else 2
    # Materialising N×V for the largest shape would need tens of GB: cap the rows (the rate is per flop).
    n_ref = min(n, 2048)
    hidden = torch.randn(n_ref, h, dtype=dtype)
    weight = torch.randn(v, h, dtype=dtype) * 0.02
    grad = torch.randn(n_ref, v, dtype=dtype)
    flops = 2.0 * n_ref * h * v
    seconds = [
        best_seconds(lambda: torch.matmul(hidden, weight.t()), reps),
        best_seconds(lambda: torch.matmul(grad, weight), reps),
        best_seconds(lambda: torch.matmul(grad.t(), hidden), reps),
    ]
    total = sum(seconds)
    names = ("logits", "d_hidden", "d_weight")
    parts = ", ".join(f"{name} {flops / s / 1e9:.1f}" for name, s in zip(names, seconds))
    print(
        f"torch {torch.__version__} {sys.argv[4]:>4} N={n_ref} H={h} V={v} threads={torch.get_num_threads()}: "
        f"3 matmuls {3 * flops / total / 1e9:.1f} GFLOP/s ({parts})"
    )


if __name__ == "__main__":
    main()
