"""Per-rank peak memory of one training step under FSDP2, FSDP1, tensor parallelism (2 gloo ranks) and FSDP2 over
tensor parallelism (2-D, 4 gloo ranks), stock vs logitless.

```
python bench/distributed_memory.py                     # N=4096 tokens per rank, H=1024, V=128256, bf16
python bench/distributed_memory.py --tokens 1024 --vocab 32000 --hidden 256   # a quick look
python bench/distributed_memory.py --engines 2d --tokens 2048    # 4 ranks: data parallel 2 x tensor parallel 2
```

Each (engine, mode) runs as its own pair of processes. A rank builds a one-layer Llama (bf16) with the given
vocabulary, wraps it (FSDP2: layers, then norm + head grouped as transformers' FSDP plan does, then the root;
FSDP1: the layers and the head as units, as a size-based auto-wrap policy makes them; TP: the head colwise over
the vocabulary with gathered output, transformers' ``colwise_gather_output``; 2-D: that head on the tensor-parallel
dimension, then FSDP2 as above on the data-parallel one), takes one warm-up step on a short
batch, then resets the kernel's high-water mark (``/proc/self/clear_refs``) and takes one timed step (forward,
backward, SGD) on ``tokens`` tokens. Reported per rank: the high-water RSS of that step, and how far above the RSS
just before the step it went ("extra": activations, logits and their gradients, scratch).
FSDP gives each rank its own batch; TP gives both the same one; 2-D gives each tensor-parallel pair its own.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _colwise_head(model: Any, mesh: Any) -> None:
    """The head split over the vocabulary on ``mesh`` with gathered output (transformers' ``colwise_gather_output``)."""
    from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES, apply_tensor_parallelism

    ALL_PARALLEL_STYLES["colwise_gather_output"].shard_param(model.lm_head, "weight", mesh)
    apply_tensor_parallelism(model, mesh, {"lm_head": "colwise_gather_output"})


def _rank(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    import transformers
    from torch.distributed.device_mesh import init_device_mesh

    import logitless

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    if args.mode == "logitless":
        logitless.install()
    config = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_hidden_layers=1,
        num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=args.seq,
    )  # fmt: skip
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    model = transformers.LlamaForCausalLM(config)
    torch.set_default_dtype(previous)
    if args.engine == "2d":
        mesh2 = init_device_mesh("cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("dp", "tp"))
        _colwise_head(model, mesh2["tp"])
        mesh = mesh2["dp"]
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    if args.engine in ("fsdp2", "2d"):
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard([model.model.norm, model.lm_head], mesh=mesh, reshard_after_forward=False)
        fully_shard(model, mesh=mesh)
    elif args.engine == "fsdp1":
        import functools

        from torch.distributed.fsdp import FullyShardedDataParallel
        from torch.distributed.fsdp.wrap import lambda_auto_wrap_policy

        # The layers as units, and the head in its own (what a size-based policy does with a 128k-row head).
        layer, head = type(model.model.layers[0]), model.lm_head
        units = functools.partial(lambda_auto_wrap_policy, lambda_fn=lambda m: isinstance(m, layer) or m is head)
        model = FullyShardedDataParallel(model, auto_wrap_policy=units, use_orig_params=True,
                                         device_id=torch.device("cpu"))  # fmt: skip
    else:
        _colwise_head(model, mesh)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    data_rank = {"tp": 0, "2d": rank // 2}.get(args.engine, rank)
    g = torch.Generator().manual_seed(100 + data_rank)

    def step(batch: int, seq: int) -> float:
        ids = torch.randint(0, args.vocab, (batch, seq), generator=g)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    step(1, 32)  # lazy initialisation (FSDP's, the kernel's thread pool) is not measured
    dist.barrier()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _status_kib("VmRSS")
    t0 = time.perf_counter()
    loss = step(args.tokens // args.seq, args.seq)
    seconds = time.perf_counter() - t0
    peak = _status_kib("VmHWM")
    row = {
        "rank": rank,
        "loss": loss,
        "seconds": seconds,
        "peak_mib": peak / 1024,
        "extra_mib": (peak - before) / 1024,
        "runtime": logitless.audit()["runtime"] if args.mode == "logitless" else None,
    }
    print("RESULT " + json.dumps(row), flush=True)
    dist.destroy_process_group()


def _pair(args: argparse.Namespace, engine: str, mode: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, __file__, "--child", "--engine", engine, "--mode", mode, "--tokens", str(args.tokens),
           "--seq", str(args.seq), "--hidden", str(args.hidden), "--vocab", str(args.vocab),
           "--threads", str(args.threads)]  # fmt: skip
    world = 4 if engine == "2d" else 2
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    procs = [
        subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for r in range(world)
    ]
    rows = []
    for p in procs:
        out = p.communicate()[0]
        if p.returncode != 0:
            raise SystemExit(f"{engine}/{mode} failed:\n{out[-3000:]}")
        rows += [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per rank per step")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--engines", default="fsdp2,fsdp1,tp")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="fsdp2", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="stock", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _rank(args)
        return
    results = {}
    print(f"N={args.tokens} tokens per rank, H={args.hidden}, V={args.vocab}, bf16, 2 gloo ranks (2-D: 4), "
          f"{args.threads} thread(s) each\n")  # fmt: skip
    print("| engine | method | rank | step (s) | peak RSS (MiB) | extra (MiB) | loss |")
    print("|---|---|---|---|---|---|---|")
    for engine in args.engines.split(","):
        for mode in ("stock", "logitless"):
            rows = _pair(args, engine, mode)
            results[f"{engine}/{mode}"] = rows
            for r in rows:
                print(f"| {engine} | {mode} | {r['rank']} | {r['seconds']:.2f} | {r['peak_mib']:.0f} | "
                      f"{r['extra_mib']:.0f} | {r['loss']:.4f} |", flush=True)  # fmt: skip
    for engine in args.engines.split(","):
        stock = max(r["extra_mib"] for r in results[f"{engine}/stock"])
        ours = max(r["extra_mib"] for r in results[f"{engine}/logitless"])
        print(f"\n{engine}: per-rank extra {stock:.0f} MiB stock vs {ours:.0f} MiB logitless ({stock / ours:.1f}x less)")
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
