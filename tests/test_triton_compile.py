"""The Triton kernels compile for real GPUs (sm_80, sm_90), checked on a machine without one.

tests/test_triton.py runs the kernels through Triton's interpreter, which executes the Python semantics in numpy and
never meets the compiler: a kernel could pass there and fail to lower on a GPU (then ``impl="triton"`` falls back to
the torch row pass with a warning, and the speed is gone). Here every specialisation of both kernels goes through
Triton's full pipeline and its bundled ``ptxas`` to a cubin, in a child process (the interpreter is fixed for this one
when Triton decorates), and must use no local-memory spills.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

CAPABILITIES = (80, 90)  # A100, H100/H200: the GPUs the goals are stated on


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton-cache"))  # compile for real, not from a cache
    script = Path(__file__).with_name("_triton_aot.py")
    run = subprocess.run(
        [sys.executable, str(script), *map(str, CAPABILITIES)], capture_output=True, text=True, env=env, timeout=600
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout)["rows"]


def test_every_specialisation_compiles_to_a_cubin(compiled: list[dict]) -> None:
    # 16 row-kernel flag sets (the 8 with a gradient also storing bf16 and f16, into a buffer or over the logits;
    # 4 shard-statistics ones) + 4 slab-kernel ones storing f32, or bf16 / f16 into a buffer or over the logits;
    # the split rows' 4 statistics, 1 combining and 4 x 3 gradient kernels; the scaling kernel for 3 dtypes; the
    # rows kernel sorting or not, unweighted, mean or weighted by f32 / bf16 / f16; aligned and not, per target.
    assert len(compiled) == len(CAPABILITIES) * (16 + 8 * 2 * 2 + 4 + 4 * 5 + 4 + 1 + 4 * 3 + 3 + 2 * 5) * 2
    failed = [row for row in compiled if not row["ok"]]
    assert not failed, f"{len(failed)} failed; first: {failed[0]}"
    assert all(row["cubin_bytes"] > 0 for row in compiled)


def test_no_register_spills(compiled: list[dict]) -> None:
    spilled = [row for row in compiled if row["spill_bytes"] != 0 or row["registers"] <= 0]
    assert not spilled, spilled
    # One program per row at 4 warps: staying well under 128 registers keeps several rows resident per SM.
    assert max(row["registers"] for row in compiled) <= 96


def test_aligned_launches_read_the_logits_with_vector_loads(compiled: list[dict]) -> None:
    # Bandwidth-bound kernels: on 16-byte aligned rows (any vocabulary that is a multiple of 16) each thread must load
    # its share of a block in 128-bit vectors, not one float at a time.
    # (The split rows' combining kernel reads a few per-part statistics, the rows kernel the targets: not logits.)
    logits_readers = [row for row in compiled if row["kernel"] != "split-combine" and row["kernel"][:4] != "rows"]
    scalar = [row for row in logits_readers if row["aligned"] and row["vector_loads"] == 0]
    assert not scalar, scalar
