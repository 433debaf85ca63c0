"""Turn the rewriter's source into a working ``forward``, or explain why not.

Everything here is about safety: the generated function must see exactly the globals and closure the original saw
(plus ``__logitless__``), every global it loads must resolve now rather than at the first training step, and it must
look like the original to ``inspect`` (signature, qualname, docstring) because Trainer and PEFT inspect
``model.forward``. Anything that does not hold is raised as ``PatchError`` and the class keeps its stock forward.
"""

from __future__ import annotations

import builtins
import dis
import inspect
import itertools
import linecache
import textwrap
from collections.abc import Callable, Iterator
from types import CodeType, FunctionType
from typing import Any

from logitless import _runtime
from logitless._source import FUTURE_FLAGS

__all__ = ["RUNTIME_NAME", "PatchError", "build_forward", "forget_source"]

RUNTIME_NAME = "__logitless__"
# What generated code may call on __logitless__ (docs/design.md); anything else is a rewriter bug caught here.
_RUNTIME_API = frozenset({"delegable", "fusable", "hf_loss", "mask_shifted_labels", "no_logits", "return_logits"})
_FACTORY = "__logitless_factory__"
_serial = itertools.count(1)


class PatchError(Exception):
    """A rewrite that cannot be used as is; ``code`` is a stable short tag for audit()."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def forget_source(filename: str) -> None:
    linecache.cache.pop(filename, None)


def _code_objects(code: CodeType) -> Iterator[CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, CodeType):
            yield from _code_objects(const)


def _loaded_globals(top: CodeType) -> tuple[set[str], set[str]]:
    """Names the code reads from globals (or, at top level, from its namespace), and attributes it reads from
    ``__logitless__``. Walks nested code objects: the body of ``forward`` is one."""
    stored_at_top = {ins.argval for ins in dis.get_instructions(top) if ins.opname == "STORE_NAME"}
    names: set[str] = set()
    runtime_attrs: set[str] = set()
    for code in _code_objects(top):
        previous_was_runtime = False
        for ins in dis.get_instructions(code):
            if previous_was_runtime and ins.opname in {"LOAD_ATTR", "LOAD_METHOD"}:
                runtime_attrs.add(ins.argval)
            previous_was_runtime = False
            if ins.opname == "LOAD_GLOBAL" or (ins.opname == "LOAD_NAME" and ins.argval not in stored_at_top):
                names.add(ins.argval)
                previous_was_runtime = ins.argval == RUNTIME_NAME
    return names, runtime_attrs


def _supply_missing(names: set[str], namespace: dict[str, Any]) -> dict[str, Any]:
    """Resolve names the module lacks from transformers' output classes; raise for anything else."""
    missing = sorted(n for n in names if n not in namespace and not hasattr(builtins, n) and n != RUNTIME_NAME)
    if not missing:
        return {}
    try:
        from transformers import modeling_outputs
    except ImportError:  # pragma: no cover - patching only runs inside transformers
        modeling_outputs = None
    supplied = {n: getattr(modeling_outputs, n) for n in missing if hasattr(modeling_outputs, n)}
    unresolved = [n for n in missing if n not in supplied]
    if unresolved:
        raise PatchError("unresolved-global", f"rewritten forward loads undefined global(s): {', '.join(unresolved)}")
    return supplied


def _closure_values(inner: FunctionType) -> list[Any]:
    values = []
    for name, cell in zip(inner.__code__.co_freevars, inner.__closure__ or (), strict=True):
        try:
            values.append(cell.cell_contents)
        except ValueError:
            raise PatchError("closure", f"free variable {name!r} of the original forward is unbound") from None
    return values


def _wrap_in_factory(source: str, params: tuple[str, ...], name: str) -> str:
    """Nest the def in a function whose parameters are the original's free variables (``__class__`` for
    zero-argument ``super()``), so the compiler turns them into the same closure cells, plus the doc-only decorators
    that are replaced (``_doc_only_overrides``)."""
    body = textwrap.indent(source, "    ")
    return f"def {_FACTORY}({', '.join(params)}):\n{body}    return {name}\n"


def _passthrough_decorator(obj: Any = None, **_options: Any) -> Any:
    return obj if obj is not None else (lambda target: target)


def _doc_only_overrides(namespace: dict[str, Any]) -> dict[str, Any]:
    """Decorators that only compute ``__doc__``, replaced by a pass-through while the rewrite executes.

    transformers' ``auto_docstring`` derives the model name from ``inspect.getsourcefile`` and fails on a
    pseudo-file; what it computes is copied from the original forward afterwards anyway (``_copy_identity``).
    Only the genuine transformers function is replaced, never a user's decorator of the same name.
    """
    decorator = namespace.get("auto_docstring")
    if getattr(decorator, "__module__", None) == "transformers.utils.auto_docstring":
        return {"auto_docstring": _passthrough_decorator}
    return {}


def _layers(func: Any) -> Iterator[Any]:
    seen: set[int] = set()
    while func is not None and id(func) not in seen:
        seen.add(id(func))
        yield func
        func = getattr(func, "__wrapped__", None)


def build_forward(cls: type, original: Callable[..., Any], source: str) -> tuple[Callable[..., Any], str, list[str]]:
    """Compile ``source`` (one ``def``, decorators included) into a replacement for ``cls.forward``.

    Returns ``(forward, pseudo_filename, names_added_to_globals)``. The caller owns the returned filename's
    linecache entry and the added globals (both are undone by ``uninstall``).
    """
    inner = inspect.unwrap(original)
    if not isinstance(inner, FunctionType):
        raise PatchError("not-a-function", f"{cls.__qualname__}.forward is not a Python function")
    namespace = inner.__globals__
    name = inner.__name__
    freevars = inner.__code__.co_freevars
    overrides = _doc_only_overrides(namespace)
    # Always compiled inside a factory: it supplies the closure and the overrides as the factory's parameters.
    text = _wrap_in_factory(source, (*freevars, *overrides), name)
    filename = f"<logitless-rewrite:{cls.__module__}.{cls.__qualname__}.forward#{next(_serial)}>"
    flags = inner.__code__.co_flags & FUTURE_FLAGS
    try:
        code = compile(text, filename, "exec", flags=flags, dont_inherit=True)
    except SyntaxError as exc:
        raise PatchError("compile-error", f"rewritten source does not compile: {exc}") from None

    names, runtime_attrs = _loaded_globals(code)
    unknown_api = sorted(runtime_attrs - _RUNTIME_API)
    if unknown_api:
        raise PatchError(
            "unresolved-global", f"rewritten forward uses unknown {RUNTIME_NAME} attribute(s): {unknown_api}"
        )
    supplied = _supply_missing(names, namespace)
    existing = namespace.get(RUNTIME_NAME, _runtime)
    if existing is not _runtime:
        raise PatchError("name-collision", f"module already defines {RUNTIME_NAME!r}")
    closure = _closure_values(inner)

    # Registered before executing so that a decorator failing here already shows the generated line.
    linecache.cache[filename] = (len(text), None, text.splitlines(keepends=True), filename)
    added = [n for n in (RUNTIME_NAME, *supplied) if n not in namespace]
    namespace[RUNTIME_NAME] = _runtime
    namespace.update({n: v for n, v in supplied.items() if n not in namespace})
    # A separate locals mapping: the def (or the factory) must not land in the module's namespace.
    local_ns: dict[str, Any] = {}
    try:
        exec(code, namespace, local_ns)
        forward = local_ns[_FACTORY](*closure, *overrides.values())
        if not callable(forward):
            raise PatchError("exec-error", f"rewritten source does not define {name!r}")
        _copy_identity(forward, original)
    except PatchError:
        _undo(filename, added, namespace)
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of generated code means: keep the original
        _undo(filename, added, namespace)
        raise PatchError("exec-error", f"executing the rewritten source failed: {type(exc).__name__}: {exc}") from None
    return forward, filename, added


def _undo(filename: str, added: list[str], namespace: dict[str, Any]) -> None:
    forget_source(filename)
    for n in added:
        namespace.pop(n, None)


def _copy_identity(forward: Any, original: Any) -> None:
    """Make the new forward indistinguishable to ``inspect`` and Trainer: same qualname, module, docstring and
    signature (Trainer's ``_set_signature_columns_if_needed`` and PEFT read ``inspect.signature(model.forward)``)."""
    for layer, original_layer in zip(_layers(forward), _layers(original), strict=False):
        for attr in ("__qualname__", "__module__", "__doc__"):
            if hasattr(original_layer, attr):
                setattr(layer, attr, getattr(original_layer, attr))
    if hasattr(original, "__signature__"):
        forward.__signature__ = original.__signature__
    if str(inspect.signature(forward)) != str(inspect.signature(original)):
        raise PatchError(
            "signature-mismatch",
            f"rewritten signature {inspect.signature(forward)} differs from {inspect.signature(original)}",
        )

