"""Compiles logitless's Triton kernels ahead of time for real NVIDIA targets, on a machine with no GPU.

Run by tests/test_triton_compile.py in a child process without TRITON_INTERPRET (the test process has the
interpreter on, and Triton fixes that choice when it decorates). ``triton.compile`` with an explicit ``GPUTarget``
goes through Triton's whole pipeline (TTIR, TTGIR, LLVM IR, PTX) and the bundled ``ptxas`` to a cubin, so a kernel
that the interpreter runs but the compiler rejects fails here, not in a lent-device window. ``ptxas -v`` on the same
PTX reports registers and spills; the PTX itself shows whether the loads of the logits are vectorised. Prints one
JSON object: one row per (target, kernel, specialisation).

Usage: python tests/_triton_aot.py CAPABILITY [CAPABILITY ...]   e.g. 80 90
"""

from __future__ import annotations

import inspect
import itertools
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile

from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nvidia
from triton.compiler import ASTSource, compile as triton_compile

from logitless import triton_path

# Triton releases differ in two calls this script makes; each shim below is the only difference, so the same kernels
# are compiled on every release torch >= 2.6 pins (3.2 to 3.9) when the script is run with that Triton.
_OLD_AST = "constants" in inspect.signature(ASTSource.__init__).parameters  # Triton 3.2: constexprs by name


def _ptxas(capability: int) -> str:
    """The bundled ``ptxas``: ``get_ptxas(arch)`` (3.3, 3.7+), ``get_ptxas()`` (3.4 to 3.6), or none (3.2)."""
    if not hasattr(nvidia, "get_ptxas"):
        return nvidia._path_to_binary("ptxas")[0]
    try:
        tool = nvidia.get_ptxas(capability)
    except TypeError:
        tool = nvidia.get_ptxas()
    return tool[0] if isinstance(tool, tuple) else tool.path

_ROW_ARGS = {
    "y_ptr": "*fp32", "stride": "i64", "t_ptr": "*i64", "s_ptr": "*fp32", "lb_ptr": "*fp32", "loss_ptr": "*fp32",
    "lse_ptr": "*fp32", "stats_ptr": "*fp32", "g_ptr": "*fp32", "g_stride": "i64", "parts_ptr": "*fp32",
    "V": "i32", "k": "fp32", "cap": "fp32", "inv_t": "fp32", "eps": "fp32", "z_loss": "fp32",
}  # fmt: skip
_SLAB_ARGS = {
    "y_ptr": "*fp32", "stride": "i64", "t_ptr": "*i64", "s_ptr": "*fp32", "lse_ptr": "*fp32", "lb_ptr": "*fp32",
    "g_ptr": "*fp32", "g_stride": "i64", "W": "i32", "v_start": "i32", "V": "i32", "k": "fp32", "cap": "fp32",
    "inv_t": "fp32", "eps": "fp32", "z_loss": "fp32",
}  # fmt: skip

_SPLIT_STATS_ARGS = {
    "y_ptr": "*fp32", "stride": "i64", "t_ptr": "*i64", "lb_ptr": "*fp32", "parts_ptr": "*fp32", "V": "i32",
    "span": "i32", "k": "fp32", "cap": "fp32", "inv_t": "fp32",
}  # fmt: skip
_SPLIT_COMBINE_ARGS = {
    "parts_ptr": "*fp32", "loss_ptr": "*fp32", "lse_ptr": "*fp32", "parts": "i32", "V": "i32", "eps": "fp32",
    "z_loss": "fp32",
}  # fmt: skip
_SPLIT_GRAD_ARGS = {
    "y_ptr": "*fp32", "stride": "i64", "t_ptr": "*i64", "s_ptr": "*fp32", "lse_ptr": "*fp32", "lb_ptr": "*fp32",
    "g_ptr": "*fp32", "g_stride": "i64", "V": "i32", "span": "i32", "k": "fp32", "cap": "fp32", "inv_t": "fp32",
    "eps": "fp32", "z_loss": "fp32",
}  # fmt: skip

_ROWS_ARGS = {
    "t_ptr": "*i64", "w_ptr": "*fp32", "w_stride": "i32", "valid_ptr": "*i1", "order_ptr": "*i64",
    "t_out_ptr": "*i64", "s_out_ptr": "*fp32", "count_ptr": "*i64", "ok_ptr": "*i1", "N": "i32", "V": "i32",
    "ignore": "i32",
}  # fmt: skip


def _source(fn: object, args: dict[str, str], flags: dict[str, object], aligned: bool) -> ASTSource:
    names = list(args) + list(flags)
    signature = {**args, **{name: "constexpr" for name in flags}}
    if _OLD_AST:
        # No per-argument attributes there: the aligned variant is compiled unspecialised (a weaker check).
        return ASTSource(fn=fn, signature=signature, constants=dict(flags))
    constexprs = {(names.index(name),): value for name, value in flags.items()}
    # A launch on 16-byte aligned pointers and 16-divisible ints (strides, widths) specialises on that (wider
    # loads): both variants.
    attrs = (
        {(names.index(n),): [["tt.divisibility", 16]] for n, kind in args.items() if kind[0] in "*i"}
        if aligned
        else {}
    )
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def _cases() -> list[tuple[str, object, dict[str, str], dict[str, object]]]:
    cases = []
    for lb, cap, grad, stats in itertools.product((False, True), repeat=4):
        flags = {"HAS_LB": lb, "HAS_CAP": cap, "GRAD": grad, "STATS": stats, "PARTS": False,
                 "BLOCK": triton_path._BLOCK, "ALIASED": False}  # fmt: skip
        cases.append(("row", triton_path._row_kernel, _ROW_ARGS, flags))
        if grad:  # the gradient rounded into the GEMMs' dtype as it is written (CUDA, bf16 / f16 inputs)
            for lp in ("bf16", "fp16"):
                cases.append((f"row-grad-{lp}", triton_path._row_kernel, {**_ROW_ARGS, "g_ptr": f"*{lp}"}, flags))
                # ... over the row's own float32 logits
                cases.append((f"row-grad-{lp}-aliased", triton_path._row_kernel, {**_ROW_ARGS, "g_ptr": f"*{lp}"},
                              {**flags, "ALIASED": True}))  # fmt: skip
        if not grad and not stats:  # a vocabulary shard's statistics (shard_pass)
            cases.append(("row-shard", triton_path._row_kernel, _ROW_ARGS, {**flags, "PARTS": True}))
    for lb, cap in itertools.product((False, True), repeat=2):
        flags = {"HAS_LB": lb, "HAS_CAP": cap, "BLOCK": triton_path._BLOCK}
        for store in ("fp32", "bf16", "fp16"):
            for aliased in (False, True) if store != "fp32" else (False,):
                cases.append((f"slab-{store}" + "-aliased" * aliased, triton_path._slab_kernel,
                              {**_SLAB_ARGS, "g_ptr": f"*{store}"}, {**flags, "ALIASED": aliased}))  # fmt: skip
            # rows split into parts: the gradient per part
            cases.append((f"split-grad-{store}", triton_path._split_grad_kernel,
                          {**_SPLIT_GRAD_ARGS, "g_ptr": f"*{store}"}, flags))  # fmt: skip
        cases.append(("split-stats", triton_path._split_stats_kernel, _SPLIT_STATS_ARGS, flags))
    cases.append(("split-combine", triton_path._split_combine_kernel, _SPLIT_COMBINE_ARGS,
                  {"PARTS": triton_path._MAX_PARTS}))  # fmt: skip
    for weighted, mean in ((False, False), (False, True), (True, False)):  # each row's target and weight (rows)
        for sort in (False, True):
            flags = {"WEIGHTED": weighted, "MEAN": mean, "SORT": sort, "BLOCK": triton_path._ROWS_BLOCK}
            for w in ("fp32", "bf16", "fp16") if weighted else ("fp32",):
                cases.append((f"rows-{w}" if weighted else "rows", triton_path._rows_kernel,
                              {**_ROWS_ARGS, "w_ptr": f"*{w}"}, flags))  # fmt: skip
    for store in ("fp32", "bf16", "fp16"):  # backward's in-place scaling of the saved gradients
        args = {"a_ptr": f"*{store}", "na": "i64", "b_ptr": f"*{store}", "nb": "i64", "c_ptr": f"*{store}", "nc": "i64",
                "s_ptr": "*fp32"}  # fmt: skip
        cases.append((f"scale-{store}", triton_path._scale_kernel, args, {"BLOCK": triton_path._SCALE_BLOCK}))
    return cases


def _ptxas_report(ptx: str, capability: int) -> dict[str, int]:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run(
            [_ptxas(capability), f"-arch=sm_{capability}a" if capability >= 90 else f"-arch=sm_{capability}",
             "-v", f.name, "-o", os.devnull],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    finally:
        os.unlink(f.name)
    registers = re.search(r"Used (\d+) registers", out)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", out)
    return {"registers": int(registers.group(1)) if registers else -1, "spill_bytes": sum(map(int, spills))}


def _compile(job: tuple[int, int, bool]) -> dict[str, object]:
    """One row: case ``index`` of ``_cases()`` for one target, on aligned arguments or not."""
    capability, index, aligned = job
    name, fn, args, flags = _cases()[index]
    row: dict[str, object] = {"capability": capability, "kernel": name, "aligned": aligned,
                              **{k: v for k, v in flags.items() if k != "BLOCK"}}  # fmt: skip
    try:
        options = triton_path._ROWS_COMPILE if fn is triton_path._rows_kernel else triton_path._COMPILE
        target = GPUTarget("cuda", capability, 32)
        compiled = triton_compile(_source(fn, args, flags, aligned), target=target, options=options)
        ptx = compiled.asm["ptx"]
        row.update(
            ok=True, cubin_bytes=len(compiled.asm["cubin"]), **_ptxas_report(ptx, capability),
            vector_loads=len(re.findall(r"ld\.global(?:\.\w+)*\.v[24]\.", ptx)),
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - reported, the test fails on it
        row.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
    return row


def main(capabilities: list[int]) -> None:
    jobs = list(itertools.product(capabilities, range(len(_cases())), (False, True)))
    # Compiling is single-threaded and the test suite runs one test at a time: every core takes a share.
    with multiprocessing.get_context("fork").Pool(os.cpu_count() or 1) as pool:
        rows = pool.map(_compile, jobs)
    json.dump({"rows": rows}, sys.stdout)


if __name__ == "__main__":
    main([int(c) for c in sys.argv[1:]])
