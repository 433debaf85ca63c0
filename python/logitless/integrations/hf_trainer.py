"""HF Trainer: its label smoothing and its loss-only evaluation, fused.

Label smoothing (``TrainingArguments(label_smoothing_factor=ε)``): the Trainer pops the labels, calls the model
without them and smooths the loss of the logits it returns (``LabelSmoother``: ``(1-ε)·nll + ε·mean_j(-log p_j)``,
summed over the targets and divided by ``num_items_in_batch`` or their count; the logits shifted when the class is
a causal LM). The model's own fused loss never runs, so the logits (and their log-softmax) are formed as without
logitless. Under ``logitless.install()``, ``Trainer.compute_loss`` is wrapped: when the model runs a rewritten
forward that reads its labels for nothing but the loss (the rewriter's ``labels_elsewhere``; for encoder-decoders,
the decoder inputs the batch already carries), the labels are handed to that forward (a forward pre-hook for this
one call) and its ``hf_loss`` computes the Trainer's smoothed loss, summed, with the Trainer's labels and shift;
the Trainer's own ``compute_loss`` then runs unchanged, with a label smoother that divides that sum exactly as
``LabelSmoother`` does. Anything else (eval mode, a custom ``compute_loss_func`` or label smoother, a class that
reads the labels elsewhere, a compiled model) keeps the stock path, and a forward that took its stock path after
all is smoothed from its materialised logits by the Trainer's own smoother (counted ``materialised``).

TRL's ``SFTTrainer.compute_loss`` is wrapped the same way: with label smoothing it calls the model without labels
and its own label smoother itself, always shifted (its fused head then only feeds the metrics).

Evaluation: a model in eval mode keeps its stock forward (``compute_metrics`` reads the logits), except inside
``Trainer.prediction_step`` with ``prediction_loss_only`` (``Trainer.evaluate`` without ``compute_metrics``), which
keeps the loss and drops the logits, and inside ``Seq2SeqTrainer.prediction_step`` with ``predict_with_generate``
(the predictions are generated tokens; the labelled forward only gives the loss, smoothed from its logits when
there is a label smoother): those steps run under ``_state.loss_only()`` and are fused.
"""
from __future__ import annotations

import functools
import inspect
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

from logitless import _registry, _state
from logitless._hook import ModelingImportHook
from logitless.integrations import _model_forward

if TYPE_CHECKING:
    import torch

__all__ = ["CALLS", "STOCK", "install", "report", "uninstall"]

# The modules defining the trainers wrapped here: transformers' Trainer and Seq2SeqTrainer, TRL's SFTTrainer.
TRAINER_MODULE = re.compile(r"^(?:transformers\.trainer|transformers\.trainer_seq2seq|trl\.trainer\.sft_trainer)$")
# compute_loss calls with a label smoother that logitless took over, by how the loss was formed.
CALLS = {"fused": 0, "materialised": 0}
# Those it left on the stock path (label smoothing on, the call not fusable), by reason.
STOCK: dict[str, int] = {}

_LOCK = threading.RLock()
_hook: ModelingImportHook | None = None
# Trainer class -> its compute_loss and prediction_step before logitless wrapped them.
_originals: dict[type, dict[str, Callable[..., Any]]] = {}


def install() -> None:
    """Wrap ``Trainer.compute_loss`` / ``prediction_step``, ``Seq2SeqTrainer.prediction_step`` and TRL's
    ``SFTTrainer.compute_loss``, now for the modules already imported and later for the others."""
    global _hook
    with _LOCK:
        if _hook is not None:
            return
        _hook = ModelingImportHook(_on_loaded, TRAINER_MODULE)
        _hook.insert()
        for name in ("transformers.trainer", "transformers.trainer_seq2seq", "trl.trainer.sft_trainer"):
            module = sys.modules.get(name)
            if module is not None:
                _wrap(module)


def uninstall() -> None:
    global _hook
    with _LOCK:
        if _hook is not None:
            _hook.remove()
            _hook = None
        for cls, methods in _originals.items():
            for name, original in methods.items():
                current = cls.__dict__.get(name)
                if getattr(current, "__wrapped__", None) is original:  # someone else's since: left alone
                    setattr(cls, name, original)
        _originals.clear()
        CALLS.update(fused=0, materialised=0)
        STOCK.clear()


def report() -> dict[str, Any]:
    with _LOCK:
        return {"patched": bool(_originals), "calls": dict(CALLS), "stock": dict(STOCK)}


def _on_loaded(module: ModuleType) -> None:
    with _LOCK:
        if _hook is not None:
            _wrap(module)


def _wrap(module: ModuleType) -> None:
    name = module.__name__
    if name == "transformers.trainer":
        trainer = getattr(module, "Trainer", None)
        _replace(trainer, "compute_loss", lambda f: _smoothing_compute_loss(f, _trainer_shifts))
        _replace(trainer, "prediction_step", lambda f: _loss_only_step(f, trainer))
    elif name == "transformers.trainer_seq2seq":
        _replace(getattr(module, "Seq2SeqTrainer", None), "prediction_step", _generating_step)
    elif name == "trl.trainer.sft_trainer":
        if "add_fused_lm_head" in module.__dict__:
            _replace(getattr(module, "SFTTrainer", None), "compute_loss", _sft_compute_loss)
        else:
            # Before TRL 1.15 SFTTrainer smooths through Trainer.compute_loss, then reads the logits for metrics.
            from logitless.integrations.trl_legacy import legacy_compute_loss

            _replace(getattr(module, "SFTTrainer", None), "compute_loss", legacy_compute_loss)


def _replace(cls: Any, name: str, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
    """``cls.<name> = wrap(cls.<name>)``, once, remembering the original for ``uninstall``."""
    original = getattr(cls, "__dict__", {}).get(name)
    if not isinstance(cls, type) or original is None or name in _originals.get(cls, {}):
        return
    setattr(cls, name, wrap(original))
    _originals.setdefault(cls, {})[name] = original


def _sft_compute_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    """TRL >= 1.15 ``SFTTrainer.compute_loss``: its label smoothing fused as the Trainer's; and its ``nll`` loss, the
    mean of the fused head's ``-log_probs``, declared uniform in the tokens (``_state.expecting_uniform_grad``), so
    the per-token op forms its gradient in the forward pass (checked in backward)."""
    smoothing = _smoothing_compute_loss(original, _sft_shifts)

    @functools.wraps(original)
    def compute_loss(self: Any, *args: Any, **kwargs: Any) -> Any:
        options = getattr(self, "args", None)
        mean_nll = (getattr(options, "loss_type", None) == "nll" and getattr(self, "label_smoother", None) is None
                    and getattr(self, "compute_loss_func", None) is None)  # fmt: skip
        if not mean_nll:
            return smoothing(self, *args, **kwargs)
        with _state.expecting_uniform_grad():
            return smoothing(self, *args, **kwargs)

    return compute_loss


def _sft_shifts(trainer: Any, unwrapped: Any, peft: Any) -> bool | None:
    """SFTTrainer smooths the logits of a forward without labels itself, always shifted, for ``loss_type="nll"``."""
    return True if getattr(getattr(trainer, "args", None), "loss_type", None) == "nll" else None


def _smoothing_compute_loss(original: Callable[..., Any], shifts: Callable[..., bool | None]) -> Callable[..., Any]:
    """``compute_loss`` fused where its label smoother would smooth the logits of a forward without labels:
    ``shifts(trainer, unwrapped, peft)`` is the shift it passes to that smoother, or None where it does not smooth
    as ``LabelSmoother`` does."""
    signature = inspect.signature(original)

    @functools.wraps(original)
    def compute_loss(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError:
            return original(self, *args, **kwargs)  # raises as stock does
        plan = _plan(self, bound.arguments.get("model"), bound.arguments.get("inputs"), shifts)
        if not isinstance(plan, _Plan):
            if plan is not None:
                with _LOCK:
                    STOCK[plan] = STOCK.get(plan, 0) + 1
            return original(self, *args, **kwargs)
        return _fused_call(self, plan, lambda: original(self, *args, **kwargs))

    return compute_loss


def _loss_only_step(predict: Callable[..., Any], trainer: type) -> Callable[..., Any]:
    """``Trainer.prediction_step`` run under ``_state.loss_only()`` when ``prediction_loss_only``
    (``Trainer.evaluate`` without ``compute_metrics``): the step keeps the loss and drops the logits. Only when the
    trainer computes its loss with ``trainer``'s own ``compute_loss``: an override may read the logits in eval."""
    signature = inspect.signature(predict)

    @functools.wraps(predict)
    def prediction_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            loss_only = bool(signature.bind(self, *args, **kwargs).arguments.get("prediction_loss_only"))
        except TypeError:
            return predict(self, *args, **kwargs)  # raises as stock does
        if not loss_only or getattr(type(self), "compute_loss", None) is not trainer.__dict__.get("compute_loss"):
            return predict(self, *args, **kwargs)
        with _state.loss_only():
            return predict(self, *args, **kwargs)

    return prediction_step


def _generating_step(predict: Callable[..., Any]) -> Callable[..., Any]:
    """``Seq2SeqTrainer.prediction_step`` with ``predict_with_generate`` (not loss-only): its predictions are
    generated tokens, and the labelled forward it then makes only gives the loss, which its label smoother (if any)
    computes from that forward's logits. That forward is fused (``_state.loss_only()``), with the smoothed loss
    when there is a smoother (the labels the step passes, unshifted, divided by their count). ``generate`` passes no
    labels to the forwards it makes: they keep the stock path. Loss-only steps go to ``Trainer.prediction_step``."""
    signature = inspect.signature(predict)

    @functools.wraps(predict)
    def prediction_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            bound = signature.bind(self, *args, **kwargs).arguments
        except TypeError:
            return predict(self, *args, **kwargs)  # raises as stock does
        generating = getattr(getattr(self, "args", None), "predict_with_generate", False)
        if not generating or bound.get("prediction_loss_only"):
            return predict(self, *args, **kwargs)
        if getattr(self, "label_smoother", None) is None:
            with _state.loss_only():
                return predict(self, *args, **kwargs)
        plan = _eval_smoothing_plan(self, bound.get("model"))
        if plan is None:
            return predict(self, *args, **kwargs)
        with _state.loss_only():
            return _fused_call(self, plan, lambda: predict(self, *args, **kwargs))

    return prediction_step


def _eval_smoothing_plan(trainer: Any, model: Any) -> _Plan | None:
    """The smoothed loss of Seq2SeqTrainer's labelled evaluation forward: the step passes the labels itself (they
    are captured from that call) and smooths unshifted, over the count of targets."""
    from transformers.trainer_pt_utils import LabelSmoother

    smoother = trainer.label_smoother
    if type(smoother) is not LabelSmoother or not _state.enabled() or _state.current_smoothing() is not None:
        return None
    if _state.current_capture() is not None or _compiled(model):
        return None
    unwrapped = trainer.accelerator.unwrap_model(model)
    if _peft_base(unwrapped) is False:
        return None  # a PEFT wrapper that adds to the labels (prompt learning)
    state = _state.Smoothing(labels=None, epsilon=float(smoother.epsilon),
                               ignore_index=int(smoother.ignore_index), shift=False)  # fmt: skip
    return _Plan(unwrapped, state, {})


@dataclass
class _Plan:
    module: torch.nn.Module  # the model the Trainer unwraps: a hook on its call hands it the labels (or reads them)
    state: _state.Smoothing
    extra: dict[str, Any]  # the keyword arguments handed to it


def _plan(trainer: Any, model: Any, inputs: Any, shifts: Callable[..., bool | None]) -> _Plan | str | None:
    """What this compute_loss call needs to be fused; the reason it keeps the stock path while label smoothing is
    on (counted in ``STOCK``); ``None`` where the call does not smooth as ``LabelSmoother`` does at all."""
    import torch  # not at import: install() runs in processes that never import torch (``audit``)

    if not _model_forward.installed_and_idle():
        return None
    smoother = getattr(trainer, "label_smoother", None)
    from transformers.trainer_pt_utils import LabelSmoother

    if not isinstance(smoother, LabelSmoother):
        return None
    if type(smoother) is not LabelSmoother:
        return "custom-smoother"  # a subclass may smooth otherwise
    if getattr(trainer, "compute_loss_func", None) is not None:
        return "compute-loss-func"  # it sees the logits
    # A Mapping, not only a dict: the Trainer passes on what the collator made, often a BatchEncoding (UserDict).
    labels = inputs.get("labels") if isinstance(inputs, Mapping) else None
    if not isinstance(labels, torch.Tensor) or not isinstance(model, torch.nn.Module):
        return "no-labels"
    if _compiled(model) or getattr(getattr(trainer, "args", None), "torch_compile", False):
        return "compiled"  # the pre-hook and the run-time checks would run under dynamo
    unwrapped = trainer.accelerator.unwrap_model(model)
    peft = _peft_base(unwrapped)
    if peft is False:
        return "peft-prompt-learning"  # the wrapper adds to the labels
    lm = peft if peft is not None else unwrapped
    mode = _state.mode_reason(lm)
    if mode is not None:
        return mode  # eval mode: Trainer.evaluate / predict read the logits
    owner = next((cls for cls in type(lm).__mro__ if "forward" in cls.__dict__), None)
    if owner is None or not _registry.rewritten(owner):
        return "not-rewritten"
    elsewhere = _registry.labels_elsewhere(owner)
    if elsewhere is None:
        return "labels-read-elsewhere"
    if elsewhere["decoder_inputs"] and inputs.get("decoder_input_ids") is None:
        return "no-decoder-inputs"  # with labels, the forward would build its decoder inputs from them
    shift = shifts(trainer, unwrapped, peft)
    if shift is None:
        return None
    state = _state.Smoothing(
        labels=labels, epsilon=float(smoother.epsilon), ignore_index=int(smoother.ignore_index), shift=shift
    )
    extra: dict[str, Any] = {"labels": labels}
    if elsewhere["disables_cache"] and "use_cache" not in inputs:
        extra["use_cache"] = False  # what the forward does given labels, without its warning
    return _Plan(unwrapped, state, extra)


def _compiled(model: torch.nn.Module) -> bool:
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    return dynamo is not None and isinstance(model, dynamo.OptimizedModule)


def _peft_base(model: torch.nn.Module) -> torch.nn.Module | bool | None:
    """The model under a PEFT wrapper (``peft.PeftModel``), which passes the labels through unchanged unless it
    prompt-learns (``False``: it prepends to them); ``None`` for a model that is not such a wrapper."""
    import torch

    config = getattr(model, "active_peft_config", None)
    get_base_model = getattr(model, "get_base_model", None)
    if config is None or not callable(get_base_model):
        return None
    base = get_base_model()
    if getattr(config, "is_prompt_learning", True) or not isinstance(base, torch.nn.Module):
        return False
    return base


def _trainer_shifts(trainer: Any, unwrapped: torch.nn.Module, peft: torch.nn.Module | bool | None) -> bool | None:
    """``shift_labels`` as ``Trainer.compute_loss`` passes it to its label smoother: whether the model's class name
    is a causal LM's. ``None`` when this transformers has no such mapping."""
    import torch

    module = sys.modules.get("transformers.trainer")
    names = getattr(module, "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", None)
    if names is None:
        return None
    name = (peft if isinstance(peft, torch.nn.Module) else unwrapped)._get_name()
    return name in names.values()


def _fused_call(trainer: Any, plan: _Plan, call: Callable[[], Any]) -> Any:
    def add_labels(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        for key, value in plan.extra.items():
            if kwargs.get(key) is None:
                kwargs[key] = value
        if plan.state.labels is None and kwargs.get("labels") is not None:
            plan.state.labels = kwargs["labels"]  # a caller that passes the labels itself (Seq2SeqTrainer's eval)
        return args, kwargs

    from logitless.integrations._summed_smoother import SummedSmoother

    stock = trainer.label_smoother
    handle = plan.module.register_forward_pre_hook(add_labels, with_kwargs=True)
    trainer.label_smoother = SummedSmoother(stock, plan.state, CALLS)
    try:
        with _state.smoothing(plan.state):
            return call()
    finally:
        handle.remove()
        trainer.label_smoother = stock
