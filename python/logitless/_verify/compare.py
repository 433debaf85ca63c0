"""One class, stock against installed, on identical weights and inputs.

Runs in a worker process (torch and transformers imported there). The same model instance is used for both sides:
stock results are taken first, then logitless patches the class, the gradients are zeroed and everything is run
again. Three runs per side: labels with ignored positions (mean loss), the same with ``num_items_in_batch``
(sum / count, gradient-accumulation semantics), and a forward without labels (logits, which must be bit-identical).
"""

from __future__ import annotations

import importlib
import inspect
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from logitless._heads import resolve_head
from logitless._verify import distill, gkd, odds
from logitless._verify import inputs as inputs_mod
from logitless._verify import tiny
from logitless._verify.installer import Installer
from logitless._verify.overrides import OVERRIDES, Override

VERIFIED = "verified"
REFUSED = "refused"
NOT_BUILT = "not-built"
MISMATCH = "MISMATCH"
UNFUSED = "unfused"

LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-5  # of the largest stock gradient entry of the whole model


@dataclass
class Side:
    loss: float | None = None
    loss_n: float | None = None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)
    grads_n: dict[str, torch.Tensor] = field(default_factory=dict)
    logits: torch.Tensor | None = None
    fused: bool | None = None
    errors: dict[str, str] = field(default_factory=dict)


def _short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:300]


class NotBuilt(Exception):
    """The tiny model or its inputs could not be made; carries the reason."""


def build(module_name: str, cls_name: str) -> tuple[torch.nn.Module, Any, Override]:
    module = importlib.import_module(module_name)
    model_cls = getattr(module, cls_name)
    override = OVERRIDES.get(cls_name, Override())
    if override.skip:
        raise NotBuilt(override.skip)
    config_cls = getattr(model_cls, "config_class", None)
    if config_cls is None:
        raise NotBuilt("class has no config_class (not a model)")
    try:
        d = override.base() if override.base is not None else config_cls().to_dict()
    except Exception as exc:  # noqa: BLE001 - any failure is reported per class
        raise NotBuilt(f"default config: {_short(exc)}") from exc
    d = tiny.remap_special_tokens(tiny.shrink_dict(d))
    if override.config:
        override.config(d)
    try:
        config = config_cls.from_dict(d)
    except Exception as exc:  # noqa: BLE001
        raise NotBuilt(f"tiny config: {_short(exc)}") from exc
    tiny.fix_mrope(config, force="mrope_section" in inspect.getsource(module))
    if override.post:
        override.post(config)
    torch.manual_seed(0)
    try:
        model = model_cls(config)
    except Exception as exc:  # noqa: BLE001
        raise NotBuilt(f"model init: {_short(exc)}") from exc
    model = model.to(torch.float32)
    # Initialisers leave some parameters at exact zeros/ones (biases, norms); gradients of those can hide a
    # wrong formula, so every parameter gets a small random perturbation from a fixed seed.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)
        # Per-vocabulary buffers added to the logits (BART's final_logits_bias) start at zero: a fused path that
        # dropped them would match. Give them values that move the loss well past the tolerance.
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        vocab = getattr(head, "out_features", None)
        for b in model.buffers():
            if vocab and b.is_floating_point() and b.ndim >= 1 and b.shape[-1] == vocab:
                b.add_(torch.randn(b.shape, generator=gen, dtype=b.dtype) * 0.5)
    model.train()
    return model, config, override


def _run(model: torch.nn.Module, feed: dict[str, Any]) -> Any:
    torch.manual_seed(1234)
    return model(**feed)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _side(model: torch.nn.Module, feeds: inputs_mod.Feeds, need: Side | None) -> Side:
    """Run the three cases. ``need`` (the stock side) says which cases worked stock, so only those are required."""
    side = Side()
    cases: list[tuple[str, Callable[[], None]]] = []

    def with_labels(extra: dict[str, Any], tag: str) -> None:
        model.zero_grad(set_to_none=True)
        out = _run(model, {**feeds.base, "labels": feeds.labels, **extra})
        loss = out.loss if hasattr(out, "loss") else out[0]
        if loss is None:
            raise RuntimeError("forward with labels returned no loss")
        loss.backward()
        logits = getattr(out, "logits", None)
        if tag == "mean":
            side.loss, side.grads = float(loss.detach()), _grads(model)
            side.fused = logits is not None and logits.numel() == 0
        else:
            side.loss_n, side.grads_n = float(loss.detach()), _grads(model)

    def no_labels() -> None:
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            out = _run(model, dict(feeds.base))
        side.logits = out.logits.detach().clone()

    cases.append(("mean", lambda: with_labels({}, "mean")))
    cases.append(("num_items", lambda: with_labels({"num_items_in_batch": feeds.num_items}, "num_items")))
    cases.append(("logits", no_labels))
    for name, fn in cases:
        if need is not None and name in need.errors:
            continue
        try:
            fn()
        except Exception as exc:  # noqa: BLE001
            side.errors[name] = _short(exc)
    model.zero_grad(set_to_none=True)
    return side


def _grad_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float, list[str]]:
    """(max abs diff, that divided by the largest stock gradient entry, problems).

    Tolerance: every entry within ``GRAD_RTOL`` times the largest stock gradient entry of the model (an ``atol``
    on the gradient's own scale). A per-parameter relative bound would flag float32 noise: parameters with tiny
    gradients behind chaotic ops (DiffLlama's lambdas, linear-attention decays) amplify the ~1e-7 rounding
    difference of the fused head into a ~1e-5 relative one; a real bug is off by O(1), far above either.
    """
    problems: list[str] = []
    if set(a) != set(b):
        missing = sorted(set(a) ^ set(b))
        problems.append(f"gradient sets differ: {missing[:3]}")
    common = sorted(set(a) & set(b))
    scale = max((float(a[n].abs().max()) for n in common if a[n].numel()), default=0.0)
    max_abs = 0.0
    for name in common:
        ga, gb = a[name], b[name]
        if ga.shape != gb.shape:
            problems.append(f"{name}: shape {tuple(gb.shape)} != {tuple(ga.shape)}")
            continue
        if not ga.numel():
            continue
        if not torch.isfinite(gb).all() and torch.isfinite(ga).all():
            problems.append(f"{name}: non-finite gradient")
            continue
        diff = float((ga - gb).abs().max())
        max_abs = max(max_abs, diff)
        if diff > GRAD_RTOL * scale:
            problems.append(f"{name}: grad diff {diff:.3g} (largest stock grad entry {scale:.3g})")
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel, problems


def _loss_diff(a: float, b: float) -> tuple[float, float, bool]:
    diff = abs(a - b)
    rel = diff / abs(a) if a != 0 else diff
    ok = diff <= LOSS_RTOL * max(abs(a), 1e-6)
    return diff, rel, ok


def compare(stock: Side, patched: Side) -> tuple[dict[str, Any], list[str]]:
    numbers: dict[str, Any] = {}
    problems: list[str] = []
    for case in patched.errors.keys() - stock.errors.keys():
        problems.append(f"{case}: fails only with logitless: {patched.errors[case]}")
    for tag, la, lb, ga, gb in (
        ("mean", stock.loss, patched.loss, stock.grads, patched.grads),
        ("num_items", stock.loss_n, patched.loss_n, stock.grads_n, patched.grads_n),
    ):
        if la is None or lb is None:
            continue
        diff, rel, ok = _loss_diff(la, lb)
        numbers[f"loss_{tag}"] = la
        numbers[f"loss_{tag}_abs"] = diff
        numbers[f"loss_{tag}_rel"] = rel
        if not ok:
            problems.append(f"{tag}: loss {lb!r} != stock {la!r} (rel {rel:.3g})")
        gabs, grel, gprob = _grad_diff(ga, gb)
        numbers[f"grad_{tag}_abs"] = gabs
        numbers[f"grad_{tag}_rel"] = grel
        numbers[f"grad_{tag}_count"] = len(ga)
        problems += [f"{tag}: {p}" for p in gprob[:5]]
    if stock.logits is not None and patched.logits is not None:
        same = stock.logits.shape == patched.logits.shape and torch.equal(stock.logits, patched.logits)
        numbers["logits_identical"] = bool(same)
        if not same:
            if stock.logits.shape == patched.logits.shape:
                numbers["logits_abs"] = float((stock.logits - patched.logits).abs().max())
            problems.append("logits without labels are not bit-identical")
    return numbers, problems


def _why_unfused(model: torch.nn.Module, audit: dict[str, Any]) -> str:
    """What made ``__logitless__.fusable`` say no (design.md: the head must be exactly nn.Linear, or a composite head
    ending in one, and the loss the stock causal-LM loss)."""
    head_name = str(audit.get("head") or "")
    head: Any = model
    for part in head_name.split(".") if head_name else []:
        head = getattr(head, part, None)
    if head_name and resolve_head(head) is None:
        return f"`{head_name}` is a {type(head).__name__}, neither an nn.Linear nor a composite head ending in one"
    loss = getattr(model, "loss_function", None)
    return f"loss_function is {getattr(loss, '__name__', loss)!s}, not the stock ForCausalLMLoss"


TRL_FUSED = "fused"
TRL_FALLBACK = "exact-fallback"
TRL_NOT_CAUSAL = "not-causal"


def _trl_check(model: torch.nn.Module, feeds: inputs_mod.Feeds, stock: Side) -> dict[str, Any]:
    """logitless's drop-in for TRL's fused head on this class (installed): its loss and gradients against the
    model's own stock loss (TRL's contract: at temperature 1 the loss is the model's)."""
    from logitless.integrations import trl as drop_in

    if stock.loss is None or stock.logits is None:
        return {"status": "n/a", "reason": "no stock loss or logits"}
    from transformers.loss.loss_utils import ForCausalLMLoss

    # TRL's contract: at temperature 1 the loss is the causal cross-entropy of the model's logits. Where the
    # model's own loss is that, the drop-in is held to it (loss and every gradient); where it is something else
    # (a masked-LM loss, a loss on slices), the drop-in's loss is held to that contract computed from the stock
    # logits instead.
    try:
        contract = float(ForCausalLMLoss(stock.logits.float(), feeds.labels.to(stock.logits.device),
                                         stock.logits.shape[-1]))  # fmt: skip
    except (ValueError, RuntimeError) as exc:
        # E.g. logits over image positions the labels do not cover: TRL's head has no meaning there either.
        return {"status": "n/a", "reason": f"the logits do not line up with the labels: {_short(exc)}"}
    own_loss_is_causal = _loss_diff(stock.loss, contract)[2]
    before = dict(drop_in.CALLS)
    had_forward = "forward" in model.__dict__
    saved = model.__dict__.get("forward")
    try:
        drop_in.add_fused_lm_head(model)
        model.zero_grad(set_to_none=True)
        out = _run(model, {**feeds.base, "labels": feeds.labels, "fused_lm_head": True})
        out.loss.backward()
        grads = _grads(model)
    except Exception as exc:  # noqa: BLE001 - reported per class
        return {"status": MISMATCH, "reason": f"drop-in failed where stock ran: {_short(exc)}"}
    finally:
        model.zero_grad(set_to_none=True)
        if had_forward:
            model.forward = saved
        else:
            model.__dict__.pop("forward", None)
    how = TRL_FUSED if drop_in.CALLS["fused"] > before["fused"] else TRL_FALLBACK
    got = float(out.loss.detach())
    _, rel, ok = _loss_diff(stock.loss, got)
    _, grel, gprob = _grad_diff(stock.grads, grads)
    if ok and not gprob:
        return {"status": how, "loss_rel": rel, "grad_rel": grel, "reason": ""}
    if not own_loss_is_causal:
        _, crel, cok = _loss_diff(contract, got)
        if cok:
            return {"status": TRL_NOT_CAUSAL, "loss_rel": crel,
                    "reason": f"the model's own loss ({stock.loss:.6g}) is not the causal CE of its logits "
                              f"({contract:.6g}); the drop-in's {how} loss equals the latter"}  # fmt: skip
    problems = ([] if ok else [f"loss {got!r} != stock {stock.loss!r}"]) + gprob[:3]
    return {"status": MISMATCH, "loss_rel": rel, "grad_rel": grel, "reason": "; ".join(problems)[:500]}


def run_case(module_name: str, cls_name: str, kind: str, installer: Installer) -> dict[str, Any]:
    started = time.perf_counter()
    result: dict[str, Any] = {"class": cls_name, "module": module_name, "kind": kind}
    try:
        result.update(_run_case(module_name, cls_name, installer))
    except NotBuilt as exc:
        result.update(status=NOT_BUILT, reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - one broken class never stops the run
        result.update(status=NOT_BUILT, reason=f"harness: {_short(exc)}", trace=traceback.format_exc()[-2000:])
    finally:
        installer.restore()
    result["seconds"] = round(time.perf_counter() - started, 2)
    return result


def _run_case(module_name: str, cls_name: str, installer: Installer) -> dict[str, Any]:
    model, config, override = build(module_name, cls_name)
    try:
        feeds = inputs_mod.make_feeds(model, config, override.inputs)
    except NotImplementedError as exc:
        raise NotBuilt(f"inputs: {exc}") from exc
    stock = _side(model, feeds, None)
    if "mean" in stock.errors:
        raise NotBuilt(f"stock forward failed: {stock.errors['mean']}")
    if stock.fused:
        # A previous class's patch survived its uninstall: the "stock" numbers would be logitless' own.
        raise RuntimeError("the stock forward returned empty logits: logitless is still installed")
    params = sum(p.numel() for p in model.parameters())
    out: dict[str, Any] = {"inputs": feeds.description, "params": params}
    # From here on stock has run, so an exception is logitless's own failure: a MISMATCH, never "not-built" (on
    # torch 2.4 every class read not-built). The patched forwards' own errors are caught by _side and compared.
    stage = "patching"
    try:
        audit = out["audit"] = installer.apply(model)
        stage = "comparing"
        patched = _side(model, feeds, stock)
        numbers, problems = compare(stock, patched)
        out["numbers"] = numbers
        if installer.mode == "install":
            stage = "the TRL drop-in"
            out["trl"] = _trl_check(model, feeds, stock)
            stage = "the DistillationTrainer drop-in"
            out["distill"] = distill.check(model, dict(feeds.base), lambda: build(module_name, cls_name)[0])
            stage = "the GKDTrainer step"
            out["gkd"] = gkd.check(model, dict(feeds.base), feeds.labels, lambda: build(module_name, cls_name)[0])
            stage = "the ORPOTrainer / CPOTrainer calls"
            out["odds"] = odds.check(model, dict(feeds.base))
    except Exception as exc:  # noqa: BLE001 - reported per class
        return {"status": MISMATCH, "reason": f"{stage} failed where stock ran: {_short(exc)}",
                "trace": traceback.format_exc()[-2000:]}  # fmt: skip
    out["stock_errors"] = stock.errors
    if problems:
        out.update(status=MISMATCH, reason="; ".join(problems)[:1000])
    elif audit.get("status") == "failed":
        # The installer tried and could not use its rewrite; the stock forward stayed (and matched, above).
        out.update(status=REFUSED, reason=f"install failed ({audit.get('code')}): {audit.get('error')}")
    elif audit.get("status") != "patched":
        out.update(status=REFUSED, reason=audit.get("reason") or audit.get("status", "not patched"))
    elif not patched.fused:
        why = _why_unfused(model, audit)
        out.update(status=UNFUSED, reason=f"patched, but the forward with labels returned real logits: {why}")
    else:
        out.update(status=VERIFIED, reason="")
    return out
