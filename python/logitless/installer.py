"""Opt-in patching of transformers' causal LMs (spec §3).

``install()`` puts an import hook on ``sys.meta_path`` and patches the language-model heads (``*ForCausalLM``,
``*ForConditionalGeneration`` and the older names of transformers' LM auto mappings such as ``GPT2LMHeadModel`` and
``MarianMTModel``: ``_core.class_kind``) of every ``transformers.models.*.modeling_*`` module, already imported or
imported later, and of every remote-code module transformers executes (``trust_remote_code=True``: ``_remote``).
For each class's ``forward``:

* tier 1: if the sha256 of its dedented source (see ``canonical_hash``) was registered with ``register_canonical``,
  the registered hand-written forward replaces it;
* tier 2: otherwise the Rust rewriter (``logitless._core.rewrite_forward``) rewrites the source and the result is
  compiled against the original's globals and closure (``logitless._patching``).

A class the rewriter refuses, or whose rewrite cannot be used, keeps its stock forward; ``audit()`` says why.
``uninstall()`` restores every original forward object and removes the hook.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, TypeVar

from logitless import _config, _registry, _state, _versions
from logitless._hook import MODELING_MODULE, TRL_MODULE, ModelingImportHook
from logitless._patching import PatchError, build_forward, forget_source
from logitless._remote import RemoteCodeHook
from logitless._source import forward_hash, forward_source
from logitless.integrations import hf_trainer

__all__ = ["audit", "canonical_hash", "install", "patch", "register_canonical", "uninstall"]

_HASH = re.compile(r"^[0-9a-f]{64}$")

ModelT = TypeVar("ModelT")


@dataclass
class _Canonical:
    forward: Callable[..., Any]
    head: str
    epilogue: list[dict[str, str]]


# The registry's lock (re-entrant) guards the installer's state too: the import hook calls back into
# _patch_module while install() may be patching already-imported modules on another thread.
_hook: ModelingImportHook | None = None
_remote_hook: RemoteCodeHook | None = None
_hashes: dict[type, str] = {}
# Why the last install() or patch() patched nothing (a torch or transformers below the floor), for audit().
_unsupported: str | None = None
_canonical: dict[str, _Canonical] = {}
# The TRL integration: a second hook on trl.* modules, and every (module, name) whose TRL head was replaced, with
# TRL's original to put back.
_trl_hook: ModelingImportHook | None = None
_trl_patched: dict[tuple[str, str], tuple[ModuleType, Any]] = {}
# TRL functions of a drop-in's name whose signature no drop-in takes: left as TRL's (warned once).
_trl_unmatched: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class _TrlHead:
    """A TRL function that gives a model TRL's own LM head, where TRL defines it, and logitless's drop-in."""

    name: str
    origin: str
    ours: str
    our_name: str


_TRL_HEADS = (
    # TRL >= 1.15: every trainer, by the name it imported from trl.trainer.utils.
    _TrlHead("add_fused_lm_head", "trl.trainer.utils", "logitless.integrations.trl", "add_fused_lm_head"),
    # TRL 1.5 to 1.14: SFTTrainer's loss_type="chunked_nll".
    _TrlHead("_patch_chunked_ce_lm_head", "trl.trainer.sft_trainer", "logitless.integrations.trl_legacy",
             "patch_chunked_ce_lm_head"),  # fmt: skip
    # TRL >= 1.15: DistillationTrainer's divergence over both models' heads; before 1.15 it also took a chunk size.
    _TrlHead("_chunked_divergence_loss", "trl.trainer.distillation_trainer", "logitless.integrations.trl_distillation",
             "chunked_divergence_loss"),  # fmt: skip
    _TrlHead("_chunked_divergence_loss", "trl.trainer.distillation_trainer", "logitless.integrations.trl_distillation",
             "chunked_divergence_loss_with_chunk_size"),  # fmt: skip
)


@dataclass(frozen=True)
class _TrlMethod:
    """A TRL trainer method wrapped by ``ours.factory(method)``. ``accepts``: the name in ``ours`` of a check of the
    trainer class, where the wrapper reproduces TRL's code and so holds only for the releases it knows (another
    release's method stays TRL's, with a warning)."""

    origin: str
    class_name: str
    method: str
    ours: str
    factory: str
    accepts: str | None = None


_TRL_METHODS = (
    # Tells the divergence drop-in which models run; the method's body stays TRL's.
    _TrlMethod("trl.trainer.distillation_trainer", "DistillationTrainer", "_compute_loss",
               "logitless.integrations.trl_distillation", "wrap_compute_loss"),  # fmt: skip
    # GKD's step, fused (TRL 1.14 to 1.16; before, GKD was trl.trainer.gkd_trainer, with another compute_loss).
    _TrlMethod("trl.experimental.gkd.gkd_trainer", "GKDTrainer", "compute_loss", "logitless.integrations.trl_gkd",
               "wrap_compute_loss", accepts="known"),  # fmt: skip
    _TrlMethod("trl.trainer.gkd_trainer", "GKDTrainer", "compute_loss", "logitless.integrations.trl_gkd",
               "wrap_compute_loss", accepts="known"),  # fmt: skip
    # ORPO's and CPO's log-probabilities, fused (TRL 0.19 to 0.24 in trl.trainer, 1.5 to 1.16 in trl.experimental).
    *(_TrlMethod(f"{package}.{kind}_trainer", f"{kind.upper()}Trainer", "concatenated_forward",
                 "logitless.integrations.trl_odds", f"wrap_{kind}_forward", accepts="known")
      for kind in ("orpo", "cpo") for package in (f"trl.experimental.{kind}", "trl.trainer")),
    # Online DPO's completion log-probabilities, fused (TRL 0.24 in trl.trainer, 1.5 to 1.16 in trl.experimental).
    *(_TrlMethod(module, "OnlineDPOTrainer", "_forward", "logitless.integrations.trl_online_dpo", "wrap_forward",
                 accepts="known")
      for module in ("trl.experimental.online_dpo.online_dpo_trainer", "trl.trainer.online_dpo_trainer")),
    # TPO's step (log-probabilities, NLL term, metrics), fused (TRL 1.5 to 1.16).
    _TrlMethod("trl.experimental.tpo.tpo_trainer", "TPOTrainer", "_compute_loss", "logitless.integrations.trl_tpo",
               "wrap_compute_loss", accepts="known"),  # fmt: skip
    # A*-PO's sequence log-probabilities (policy and reference), fused (TRL 1.14 to 1.16).
    _TrlMethod("trl.experimental.a2po.a2po_trainer", "A2POTrainer", "_get_sequence_logps",
               "logitless.integrations.trl_a2po", "wrap_sequence_logps", accepts="known"),  # fmt: skip
    # SDPO's and SDFT's completion log-probabilities (loss and rollout), fused (TRL 1.14 to 1.16).
    *(_TrlMethod(f"trl.experimental.{kind}.{kind}_trainer", f"{kind.upper()}Trainer", method,
                 "logitless.integrations.trl_self_distillation", factory, accepts="known")
      for kind in ("sdpo", "sdft")
      for method, factory in (("compute_loss", "wrap_compute_loss"), ("_compute_rollout_logps", "wrap_rollout_logps"))),
)
_trl_wrapped: dict[tuple[str, str], tuple[type, Any]] = {}

canonical_hash = forward_hash


def _supported() -> bool:
    """Whether the installed torch and transformers are ones logitless runs on; if not, says so (a warning, and
    ``audit()["unsupported"]``) and the caller patches nothing: a user's script keeps running stock."""
    global _unsupported
    _unsupported = _versions.unsupported()
    if _unsupported is not None:
        warnings.warn(f"{_unsupported}: nothing is patched", RuntimeWarning, stacklevel=3)
        return False
    return True


def install(return_logits: bool | None = None, fuse_eval: bool | None = None) -> None:
    """Patch transformers' causal LMs now and on import. Idempotent; thread-safe.

    ``return_logits=True`` keeps real logits in the outputs of fused forwards (the loss is still fused).
    ``fuse_eval=True`` fuses the loss in eval mode too (then the logits are empty there as well, unless
    ``return_logits``); by default a model in eval mode runs its stock forward, so ``Trainer.evaluate`` /
    ``predict`` / ``compute_metrics`` see real logits. An argument left ``None`` takes its environment variable
    (``LOGITLESS_RETURN_LOGITS``, ``LOGITLESS_FUSE_EVAL``); an explicit argument wins over the environment. A later
    call updates them.
    """
    global _hook, _remote_hook
    with _registry.LOCK:
        _state.set_return_logits(_config.return_logits() if return_logits is None else return_logits)
        _state.set_fuse_eval(_config.fuse_eval() if fuse_eval is None else fuse_eval)
        if _hook is not None:
            return
        if not _supported():
            return
        _state.set_enabled(True)
        _hook = ModelingImportHook(_on_module_loaded)
        _hook.insert()
        for name, module in list(sys.modules.items()):
            if module is not None and MODELING_MODULE.match(name) and not _initializing(module):
                _patch_module(module)
        _remote_hook = RemoteCodeHook(_on_module_loaded)
        _remote_hook.install()
        _install_trl()
        hf_trainer.install()


def uninstall() -> None:
    """Remove the hook and put every original ``forward`` object back, exactly."""
    global _hook, _remote_hook
    with _registry.LOCK:
        if _hook is not None:
            _hook.remove()
            _hook = None
        if _remote_hook is not None:
            _remote_hook.uninstall()
            _remote_hook = None
        _uninstall_trl()
        hf_trainer.uninstall()
        _state.set_enabled(False)
        for cls, record in _registry.patched.items():
            # Someone may have replaced our forward since; theirs is left alone rather than clobbered.
            if cls.__dict__.get("forward") is record.forward:
                setattr(cls, "forward", record.original)
            if record.filename is not None:
                forget_source(record.filename)
            namespace = getattr(inspect.unwrap(record.original), "__globals__", {})
            for name in record.added_globals:
                namespace.pop(name, None)
        _registry.patched.clear()
        _registry.records.clear()
        _hashes.clear()
        _state.reset_counts()


def patch(model: ModelT) -> ModelT:
    """Patch the class(es) of an already built model (and of its PEFT base model) and return the model.

    The language-model classes of its MRO are patched, and the class whose ``forward`` it runs whatever its name:
    a model passed here explicitly (a user's subclass, research code) is fused when the rewriter understands it.
    So are the language-model classes of its sub-modules (an encoder-decoder wrapper's decoder, which its fused
    loss is handed to).
    """
    with _registry.LOCK:
        if not _supported():
            return model
        _state.set_enabled(True)
        targets: list[Any] = [model]
        get_base_model = getattr(model, "get_base_model", None)
        if callable(get_base_model):
            targets.append(get_base_model())
        for target in targets:
            mro = type(target).__mro__
            runs = next((cls for cls in mro if "forward" in cls.__dict__), None)
            for cls in mro:
                if "forward" in cls.__dict__ and (cls is runs or _lm_class(cls)):
                    _patch_class(cls)
        modules = getattr(model, "modules", None)
        for module in modules() if callable(modules) else ():
            for cls in type(module).__mro__:
                if "forward" in cls.__dict__ and _lm_class(cls):
                    _patch_class(cls)
    return model


def register_canonical(
    hash: str,  # noqa: A002 - the public name in spec §3
    forward: Callable[..., Any],
    *,
    head: str = "lm_head",
    epilogue: list[dict[str, str]] | None = None,
) -> None:
    """Tier 1: use ``forward`` for every class whose stock forward has source hash ``hash``
    (``canonical_hash(cls.forward)``: sha256 hex of the dedented ``inspect.getsource``, decorators included).

    ``head`` and ``epilogue`` only feed ``audit()``. Classes already seen and not yet patched are retried.
    """
    if not isinstance(hash, str) or not _HASH.match(hash):
        raise ValueError(f"hash must be a lowercase sha256 hex digest, got {hash!r}")
    if not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    with _registry.LOCK:
        _canonical[hash] = _Canonical(forward, head, list(epilogue or []))
        for cls, seen_hash in list(_hashes.items()):
            if seen_hash == hash and cls not in _registry.patched:
                _patch_class(cls)


def audit() -> dict[str, Any]:
    """A JSON-safe report (schema in docs/spec.md, "audit"): ``{"installed", "unsupported", "return_logits",
    "fuse_eval", "transformers", "counts", "classes", "runtime", "integrations"}``.

    ``classes`` maps ``"module.Class"`` to ``{"status": "patched", "tier", "head", "epilogue", ...}``,
    ``{"status": "refused", "code", "reason", ...}``, ``{"status": "failed", "code", "error"}`` or
    ``{"status": "inherited", "from"}`` (the class uses a parent's forward). A class whose forwards ran with labels
    also has ``"runtime": {"fused": n, "stock": {reason: n}}``; the top-level ``runtime`` sums them.
    """
    with _registry.LOCK:
        classes = {key: _json_safe(value) for key, value in sorted(_registry.records.items())}
        counts: dict[str, int] = {}
        for record in classes.values():
            counts[record["status"]] = counts.get(record["status"], 0) + 1
        total: dict[str, Any] = {"fused": 0, "stock": {}}
        for key, run in sorted(_state.runtime_counts().items()):
            classes.setdefault(key, {"status": "unseen"})["runtime"] = run
            total["fused"] += run["fused"]
            for reason, n in run["stock"].items():
                total["stock"][reason] = total["stock"].get(reason, 0) + n
        return {
            "installed": _hook is not None,
            "unsupported": _unsupported,
            "return_logits": _state.return_logits(),
            "fuse_eval": _state.fuse_eval(),
            "transformers": _versions.installed("transformers"),
            "counts": counts,
            "classes": classes,
            "runtime": total,
            "integrations": {"trl": _trl_report(), "hf_trainer": hf_trainer.report()},
        }


def _install_trl() -> None:
    """TRL's trainers give models TRL's own LM head through a function they call by name (``_TRL_HEADS``): point
    each such name (in modules imported now or later) at logitless's drop-in. TRL without them is left alone."""
    global _trl_hook
    _trl_hook = ModelingImportHook(_on_trl_module_loaded, TRL_MODULE)
    _trl_hook.insert()
    for name in sorted(sys.modules):  # trl.trainer.utils sorts before the trainers that import from it
        module = sys.modules.get(name)
        if module is not None and TRL_MODULE.match(name) and not _initializing(module):
            _patch_trl_module(module)


def _on_trl_module_loaded(module: ModuleType) -> None:
    with _registry.LOCK:
        if _trl_hook is not None:
            _patch_trl_module(module)


def _patch_trl_module(module: ModuleType) -> None:
    # A name may have several drop-ins (one per TRL signature): the first whose parameters are TRL's function's.
    for head in _TRL_HEADS:
        current = module.__dict__.get(head.name)
        key = (module.__name__, head.name)
        if current is None or key in _trl_patched:
            continue
        ours = getattr(importlib.import_module(head.ours), head.our_name)
        if current is ours:
            # Imported from TRL's module after that was patched: it holds ours already; remember TRL's for uninstall.
            origin = _trl_patched.get((head.origin, head.name))
            original = origin[1] if origin is not None else None
        elif getattr(current, "__module__", None) == head.origin and _parameters(current) == _parameters(ours):
            original = current
        else:
            continue  # somebody else's function of that name, or TRL's with a signature this drop-in does not take
        setattr(module, head.name, ours)
        _trl_patched[key] = (module, original)
    for name, origin in sorted({(head.name, head.origin) for head in _TRL_HEADS}):
        current = module.__dict__.get(name)
        key = (module.__name__, name)
        if key in _trl_patched or key in _trl_unmatched or getattr(current, "__module__", None) != origin:
            continue
        # A TRL release whose function takes other arguments: its own keeps running, said once.
        _trl_unmatched.add(key)
        warnings.warn(f"logitless: {origin}.{name}{inspect.signature(current)} takes arguments no drop-in of this "
                      "logitless takes (another TRL release); TRL's own runs", RuntimeWarning, stacklevel=2)  # fmt: skip
    for entry in _TRL_METHODS:
        cls = module.__dict__.get(entry.class_name) if module.__name__ == entry.origin else None
        original = cls.__dict__.get(entry.method) if isinstance(cls, type) else None
        key = (entry.origin, f"{entry.class_name}.{entry.method}")
        if original is None or key in _trl_wrapped or key in _trl_unmatched:
            continue
        ours = importlib.import_module(entry.ours)
        if entry.accepts is not None and not getattr(ours, entry.accepts)(cls):
            _trl_unmatched.add(key)
            warnings.warn(f"logitless: {entry.origin}.{entry.class_name}.{entry.method} is not the code this "
                          "logitless reproduces (another TRL release); TRL's own runs", RuntimeWarning,
                          stacklevel=2)  # fmt: skip
            continue
        setattr(cls, entry.method, getattr(ours, entry.factory)(original))
        _trl_wrapped[key] = (cls, original)


def _parameters(function: Any) -> list[tuple[str, Any]] | None:
    try:
        return [(p.name, p.kind) for p in inspect.signature(function).parameters.values()]
    except (TypeError, ValueError):
        return None


def _uninstall_trl() -> None:
    global _trl_hook
    if _trl_hook is not None:
        _trl_hook.remove()
        _trl_hook = None
    for (_, name), (module, original) in _trl_patched.items():
        current = module.__dict__.get(name)
        if original is not None and str(getattr(current, "__module__", "")).startswith("logitless.integrations."):
            setattr(module, name, original)
    _trl_patched.clear()
    _trl_unmatched.clear()
    for (_, qualified), (cls, original) in _trl_wrapped.items():
        method = qualified.rsplit(".", 1)[1]
        if getattr(cls.__dict__.get(method), "__logitless_wrapped__", None) is original:
            setattr(cls, method, original)
    _trl_wrapped.clear()
    distillation = sys.modules.get("logitless.integrations.trl_distillation")
    if distillation is not None:
        distillation.reset()
    drop_in = sys.modules.get("logitless.integrations.trl")
    if drop_in is not None:
        drop_in.CALLS.update(fused=0, materialised=0)
    legacy = sys.modules.get("logitless.integrations.trl_legacy")
    if legacy is not None:
        legacy.reset()
    for name in ("trl_gkd", "trl_odds", "trl_online_dpo", "trl_tpo", "trl_a2po", "trl_self_distillation"):
        module = sys.modules.get(f"logitless.integrations.{name}")
        if module is not None:
            module.reset()


def _trl_report() -> dict[str, Any]:
    drop_in = sys.modules.get("logitless.integrations.trl")
    calls = dict(drop_in.CALLS) if drop_in is not None else {"fused": 0, "materialised": 0}
    legacy = sys.modules.get("logitless.integrations.trl_legacy")
    before_1_15 = legacy.report() if legacy is not None else {"chunked": {"fused": 0, "materialised": 0},
                                                              "logits_for_metrics": 0}  # fmt: skip
    distillation = sys.modules.get("logitless.integrations.trl_distillation")
    divergence = distillation.report() if distillation is not None else {
        "calls": {"class_epilogue": 0, "trl_epilogue": 0}, "corrected": {}, "unchecked": {}}  # fmt: skip
    gkd = sys.modules.get("logitless.integrations.trl_gkd")
    odds = sys.modules.get("logitless.integrations.trl_odds")
    trainers = odds.report() if odds is not None else {kind: {"fused": 0, "stock": {}} for kind in ("orpo", "cpo")}
    for kind in ("online_dpo", "tpo", "a2po"):
        wrapper = sys.modules.get(f"logitless.integrations.trl_{kind}")
        trainers[kind] = wrapper.report() if wrapper is not None else {"fused": 0, "stock": {}}
    self_distillation = sys.modules.get("logitless.integrations.trl_self_distillation")
    trainers.update(self_distillation.report() if self_distillation is not None
                    else {kind: {"fused": 0, "stock": {}} for kind in ("sdpo", "sdft")})  # fmt: skip
    return {"patched_modules": sorted({name for name, _ in _trl_patched}), "calls": calls, "legacy": before_1_15,
            "distillation": divergence, "gkd": gkd.report() if gkd is not None else {"fused": 0, "stock": {}},
            **trainers, "left_to_trl": sorted(f"{module}.{name}" for module, name in _trl_unmatched)}  # fmt: skip


def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _lm_class(cls: type) -> bool:
    """Whether ``cls`` is named as a language-model head (the rule the Rust audit applies to the source)."""
    from logitless import _core

    return _core.class_kind(cls.__name__) is not None


def _initializing(module: ModuleType) -> bool:
    # A module another thread is still executing: the hook patches it when it finishes.
    return bool(getattr(getattr(module, "__spec__", None), "_initializing", False))


def _on_module_loaded(module: ModuleType) -> None:
    with _registry.LOCK:
        if _hook is not None:
            _patch_module(module)


def _patch_module(module: ModuleType) -> None:
    for value in list(vars(module).values()):
        if isinstance(value, type) and value.__module__ == module.__name__ and _lm_class(value):
            _patch_class(value)


def _rewrite(source: str) -> dict[str, Any]:
    """The Rust rewriter (docs/design.md, "Rewrite contract"); a seam for tests that simulate a broken rewrite."""
    from logitless import _core

    rewrite_forward = getattr(_core, "rewrite_forward", None)
    if rewrite_forward is None:
        reason = "this build of logitless._core has no rewrite_forward"
        return {"status": "refused", "code": "rewriter-unavailable", "reason": reason, "line": 0}
    try:
        return dict(rewrite_forward(source))
    except RuntimeError as exc:
        # A rewriter bug (a Rust panic, mapped at the boundary): this class keeps its stock forward.
        return {"status": "refused", "code": "rewriter-error", "reason": str(exc), "line": 0}


def _patch_class(cls: type) -> None:
    """Patch one class, recording the outcome. Never raises: a failure here must not break an import."""
    key = f"{cls.__module__}.{cls.__qualname__}"
    if cls in _registry.patched:
        return
    if "forward" not in cls.__dict__:
        owner = next((c for c in cls.__mro__ if "forward" in c.__dict__), None)
        # Auto classes and the like have no causal forward of their own: nothing to report.
        if owner is not None and _lm_class(owner):
            _registry.records[key] = {"status": "inherited", "from": f"{owner.__module__}.{owner.__qualname__}"}
        return
    original = cls.__dict__["forward"]
    try:
        _registry.records[key] = _try_patch(cls, original)
    except PatchError as exc:
        _registry.records[key] = {"status": "failed", "code": exc.code, "error": str(exc)}
    except Exception as exc:  # noqa: BLE001 - recorded for audit(); the stock forward stays
        _registry.records[key] = {"status": "failed", "code": "internal", "error": f"{type(exc).__name__}: {exc}"}


def _try_patch(cls: type, original: Callable[..., Any]) -> dict[str, Any]:
    try:
        digest = forward_hash(original)
    except (OSError, TypeError) as exc:
        return {"status": "refused", "code": "no-source", "reason": f"source unavailable: {exc}"}
    _hashes[cls] = digest
    canonical = _canonical.get(digest)
    if canonical is not None:
        _check_signature(canonical.forward, original)
        setattr(cls, "forward", canonical.forward)
        _registry.patched[cls] = _registry.Patch(original=original, forward=canonical.forward)
        return {"status": "patched", "tier": 1, "head": canonical.head, "epilogue": canonical.epilogue, "hash": digest}

    result = _rewrite(forward_source(original))
    if result.get("status") != "patched":
        return {
            "status": "refused",
            "code": result.get("code", "unknown"),
            "reason": result.get("reason", ""),
            "line": result.get("line"),
        }
    ce_class = result.get("ce_class")
    if ce_class and not _names_torch_cross_entropy(ce_class, original):
        # Remote code (or a module) may bind `CrossEntropyLoss` to a class of its own, whose loss is not ours.
        return {
            "status": "refused",
            "code": "loss-class-not-torch",
            "reason": f"`{ce_class}` does not resolve to torch.nn.CrossEntropyLoss in {cls.__module__}",
            "line": result.get("line"),
        }
    forward, filename, added = build_forward(cls, original, result["source"])
    setattr(cls, "forward", forward)
    _registry.patched[cls] = _registry.Patch(original=original, forward=forward, filename=filename, added_globals=added,
                           labels_elsewhere=result.get("labels_elsewhere"))  # fmt: skip
    return {
        "status": "patched",
        "tier": 2,
        "head": result.get("head"),
        "epilogue": result.get("epilogue", []),
        "loss_form": result.get("loss_form"),
        "delegate_target": result.get("delegate_target"),
        # The vocabulary-size path its causal loss is given (`self.config.vocab_size`): _runtime.delegable reads it.
        "delegate_vocab": result.get("vocab") if result.get("delegate_target") == "causal_lm" else None,
        "source_file": filename,
        "hash": digest,
    }


def _names_torch_cross_entropy(dotted: str, original: Callable[..., Any]) -> bool:
    """Whether ``dotted`` (``CrossEntropyLoss``, ``nn.CrossEntropyLoss``, ...) names torch's class where the forward
    runs (its module's globals, then builtins)."""
    import builtins

    import torch

    missing = object()
    namespace = getattr(inspect.unwrap(original), "__globals__", {})
    first, *rest = dotted.split(".")
    value = namespace.get(first, getattr(builtins, first, missing))
    for part in rest:
        value = getattr(value, part, missing)
    return value is torch.nn.CrossEntropyLoss


def _check_signature(forward: Callable[..., Any], original: Callable[..., Any]) -> None:
    new, old = inspect.signature(forward), inspect.signature(original)
    if [(p.name, p.kind) for p in new.parameters.values()] != [(p.name, p.kind) for p in old.parameters.values()]:
        raise PatchError("signature-mismatch", f"registered forward{new} does not match the stock forward{old}")
