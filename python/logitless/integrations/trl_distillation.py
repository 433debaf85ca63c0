"""TRL's ``DistillationTrainer`` (TRL >= 1.14) with its divergence on ``logitless.linear_divergence``.

The trainer runs each model's backbone, then ``trl.trainer.distillation_trainer._chunked_divergence_loss(student
hidden, teacher hidden, both heads' weights, mask, beta, ..., each model's logit scale and softcap)``, which TRL
guesses from config attribute names (``logit_scale``, ``lm_head_multiplier``, ``logits_scaling``,
``final_logit_softcapping``, ...). Under ``logitless.install()`` that name is ``chunked_divergence_loss`` below
(``chunked_divergence_loss_with_chunk_size`` for TRL 1.14's signature): same signature and return value (the loss, the student's entropy summed, the count of kept positions), computed by
the fused op. Each model's epilogue is the one logitless's rewriter found in its class's forward when the trainer's
``_compute_loss`` (wrapped to say which models it runs) passes that model's own head and every step of it
resolves to a value on the instance (``class_epilogue``); otherwise TRL's guess, as TRL would compute it. Where the
two differ (RecurrentGemma's ``logits_soft_cap``, a padded vocabulary cut by the forward), the class's own is used
and ``audit()`` says so.
"""

from __future__ import annotations

import ast
import contextlib
import contextvars
import functools
import inspect
import textwrap
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch

from logitless import _registry
from logitless.divergence import linear_divergence
from logitless.hf import _vocab_vector

__all__ = ["CALLS", "CORRECTED", "UNCHECKED", "chunked_divergence_loss", "chunked_divergence_loss_with_chunk_size",
           "class_epilogue", "report", "reset", "wrap_compute_loss"]  # fmt: skip

# Calls by where each model's epilogue came from: its class's forward, or TRL's config guess (one count per model).
CALLS = {"class_epilogue": 0, "trl_epilogue": 0}
# "module.Class" -> the epilogue its forward applies where TRL's guess differs from it (used instead of the guess).
CORRECTED: dict[str, dict[str, Any]] = {}
# "module.Class" -> why its epilogue could not be read (TRL's guess used, unchecked; warned once).
UNCHECKED: dict[str, str] = {}

_KEYWORDS = {
    "logits_bias": "logits_bias",
    "multiply": "logit_scale_multiply",
    "divide": "logit_scale_divide",
    "softcap": "logit_softcapping",
}
_models: contextvars.ContextVar[tuple[Any, Any] | None] = contextvars.ContextVar("logitless_distill", default=None)


def reset() -> None:
    CALLS.update(class_epilogue=0, trl_epilogue=0)
    CORRECTED.clear()
    UNCHECKED.clear()


def report() -> dict[str, Any]:
    return {"calls": dict(CALLS), "corrected": {k: dict(v) for k, v in CORRECTED.items()},
            "unchecked": dict(UNCHECKED)}  # fmt: skip


@contextlib.contextmanager
def _running(student: Any, teacher: Any) -> Iterator[None]:
    token = _models.set((student, teacher))
    try:
        yield
    finally:
        _models.reset(token)


def wrap_compute_loss(original: Callable[..., Any]) -> Callable[..., Any]:
    """``DistillationTrainer._compute_loss``, telling ``chunked_divergence_loss`` which student and teacher run."""

    @functools.wraps(original)
    def _compute_loss(self: Any, unwrapped_student: Any, inputs: Any, num_items_in_batch: Any) -> Any:
        teacher = getattr(self, "teacher_model", None)
        if teacher is not None and getattr(self, "accelerator", None) is not None:
            teacher = self.accelerator.unwrap_model(teacher)
        with _running(unwrapped_student, teacher):
            return original(self, unwrapped_student, inputs, num_items_in_batch)

    _compute_loss.__logitless_wrapped__ = original  # type: ignore[attr-defined]
    return _compute_loss


def chunked_divergence_loss(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL's ``_chunked_divergence_loss``, fused: ``(loss, entropy_sum, n_valid)``, the loss the divergence summed
    over the kept positions and divided by their count (at least 1) or by ``num_items_in_batch``."""
    models = _models.get() or (None, None)
    student = _side(models[0], student_lm_head_weight, student_lm_head_bias, student_logit_scale,
                    student_final_logit_softcapping, student_hidden_states)  # fmt: skip
    teacher = _side(models[1], teacher_lm_head_weight, teacher_lm_head_bias, teacher_logit_scale,
                    teacher_final_logit_softcapping, teacher_hidden_states, frozen=True)  # fmt: skip
    valid = completion_mask != 0
    device_type = student_hidden_states.device.type
    with _gathered(student.params + teacher.params), torch.autocast(device_type, enabled=False):
        weight_s, bias_s = student.head()
        weight_t, bias_t = teacher.head()
        loss, entropy = linear_divergence(
            student.hidden(), weight_s, teacher.hidden(), weight_t, beta=beta, temperature=temperature,
            bias=bias_s, teacher_bias=bias_t, epilogue=student.epilogue, teacher_epilogue=teacher.epilogue,
            mask=valid, num_items_in_batch=num_items_in_batch, return_entropy=True,
        )  # fmt: skip
    return loss, entropy.sum(), valid.sum()


def chunked_divergence_loss_with_chunk_size(
    student_hidden_states: torch.Tensor,
    teacher_hidden_states: torch.Tensor,
    student_lm_head_weight: torch.Tensor,
    teacher_lm_head_weight: torch.Tensor,
    completion_mask: torch.Tensor,
    beta: float,
    chunk_size: int,
    num_items_in_batch: torch.Tensor | int | None = None,
    student_lm_head_bias: torch.Tensor | None = None,
    teacher_lm_head_bias: torch.Tensor | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    student_final_logit_softcapping: float | None = None,
    teacher_final_logit_softcapping: float | None = None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TRL 1.14's signature (a chunk size, TRL's own chunking's), otherwise ``chunked_divergence_loss``: logitless
    sizes its chunks itself. Spelled out, not derived: the installer picks a drop-in by comparing its parameters
    with TRL's function's."""
    del chunk_size
    return chunked_divergence_loss(
        student_hidden_states, teacher_hidden_states, student_lm_head_weight, teacher_lm_head_weight, completion_mask,
        beta, num_items_in_batch, student_lm_head_bias, teacher_lm_head_bias, student_logit_scale,
        teacher_logit_scale, student_final_logit_softcapping, teacher_final_logit_softcapping, temperature,
    )  # fmt: skip


class _Side:
    """One model's inputs to the op: its hidden states and head in the dtype TRL computes in, and its epilogue."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 epilogue: dict[str, Any], end: int | None, frozen: bool) -> None:  # fmt: skip
        self.params = (weight, bias)
        # The teacher's tensors enter as constants: TRL's divergence gives them no gradient either.
        self._frozen = frozen
        self.epilogue = epilogue
        self._hidden, self._end = hidden, end
        # Under autocast TRL projects in the autocast dtype; the casts are differentiable, as its are.
        device_type = hidden.device.type
        self.dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype

    def hidden(self) -> torch.Tensor:
        hidden = self._hidden.to(self.dtype)
        return hidden.detach() if self._frozen else hidden

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        weight, bias = self.params
        if _is_dtensor(weight):
            weight = _whole(weight)
            bias = _whole(bias) if _is_dtensor(bias) else bias
        weight = weight.to(self.dtype)
        if self._end is not None:
            weight, bias = weight[: self._end], bias[: self._end] if bias is not None else None
        if self._frozen:
            return weight.detach(), bias.detach() if bias is not None else None
        return weight, bias


def _whole(value: Any) -> torch.Tensor:
    """A sharded head (a DTensor: FSDP2 outside its unit's forward, tensor parallel) gathered once, its gradient
    averaged over the ranks and scattered back to the shards. ``full_tensor()``, which TRL's kernel calls, does not
    reduce: its backward takes the replicated gradient to be equal on every rank and keeps each rank's own rows, and
    FSDP2 reduce-scatters only the units whose forward ran, so each shard would train on its own rank's tokens alone.
    The average is FSDP2's own reduction (tensor-parallel ranks hold equal gradients, which it leaves as they are)."""
    from torch.distributed.tensor import Partial, Replicate

    ndim = value.device_mesh.ndim
    return value.redistribute(placements=[Replicate()] * ndim).to_local(grad_placements=[Partial("avg")] * ndim)


def _is_dtensor(value: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(value, DTensor)


def _side(model: Any, weight: torch.Tensor, bias: torch.Tensor | None, scale: float, softcap: float | None,
          hidden: torch.Tensor, frozen: bool = False) -> _Side:  # fmt: skip
    guess = {"logit_scale_multiply": None if scale == 1.0 else scale, "logit_softcapping": softcap}
    if model is None:
        # Called outside DistillationTrainer._compute_loss: nothing says which model this is.
        CALLS["trl_epilogue"] += 1
        return _Side(hidden, weight, bias, guess, None, frozen)
    found = class_epilogue(model) if _head_weight(model) is weight else "head-not-output-embeddings"
    if isinstance(found, str):
        CALLS["trl_epilogue"] += 1
        _unchecked(model, found, guess)
        return _Side(hidden, weight, bias, guess, None, frozen)
    CALLS["class_epilogue"] += 1
    end = found.pop("vocab_slice_end", None)
    if end is not None and end >= weight.shape[0]:
        end = None
    if end is not None or _differs(found, guess):
        used = {"vocab_slice_end": end, **found} if end is not None else found
        CORRECTED[_class_name(_base(model))] = described(used)
    return _Side(hidden, weight, bias, found, end, frozen)


def described(epilogue: dict[str, Any]) -> dict[str, Any]:
    """An epilogue as audit() reports it (JSON-safe): a tensor value by its shape."""
    return {k: f"tensor{list(v.shape)}" if isinstance(v, torch.Tensor) else v for k, v in epilogue.items()}


def _unchecked(model: Any, reason: str, guess: dict[str, Any]) -> None:
    """A model whose epilogue logitless could not read: TRL's guess is used, as TRL would, and said so once."""
    name = _class_name(_base(model))
    if name in UNCHECKED:
        return
    UNCHECKED[name] = reason
    warnings.warn(
        f"logitless: what {name}'s forward does between its backbone and its logits could not be read ({reason}); "
        f"the distillation divergence uses TRL's reading (the head's weight, {guess} from the config), as TRL's "
        "own kernel would, and it may differ from the model's own logits",
        RuntimeWarning, stacklevel=4,
    )  # fmt: skip


def _differs(found: dict[str, Any], guess: dict[str, Any]) -> bool:
    """Whether the two epilogues give different logits (a divisor and its reciprocal multiplier are the same)."""

    def effective(epilogue: dict[str, Any]) -> tuple[float, float | None, bool]:
        multiply, divide = epilogue.get("logit_scale_multiply"), epilogue.get("logit_scale_divide")
        softcap = epilogue.get("logit_softcapping")
        scale = (float(multiply) if multiply else 1.0) / (float(divide) if divide else 1.0)
        return scale, float(softcap) if softcap else None, epilogue.get("logits_bias") is not None

    return effective(found) != effective(guess)


def _base(model: Any) -> Any:
    """The transformers model under a PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _head_weight(model: Any) -> Any:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return getattr(head, "weight", None)


def _class_name(model: Any) -> str:
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


@contextlib.contextmanager
def _gathered(params: tuple[Any, ...]) -> Iterator[None]:
    """ZeRO-3's partitioned heads gathered for the op, through TRL's own helper (it computes its gradients in its
    forward, so nothing is gathered again in backward)."""
    try:
        from trl.trainer.utils import maybe_gather_lm_head_ctx
    except ImportError:  # pragma: no cover - only reachable with TRL, which has it
        yield
        return
    with maybe_gather_lm_head_ctx(*params):
        yield


# ---------------------------------------------------------------------------------------------------------------
# Each model's own epilogue, from the rewriter's record of its forward
# ---------------------------------------------------------------------------------------------------------------


class _Unresolved(Exception):
    pass


def class_epilogue(model: Any) -> dict[str, Any] | str:
    """The op keywords of the epilogue ``model``'s forward applies to its head's logits (plus ``vocab_slice_end``
    where it cuts a padded vocabulary), read off the instance; or why they are not known (a short code): the class
    does not run logitless's rewrite of its forward, or a step's value is not an attribute chain of ``self`` (or a
    local variable assigned one once)."""
    model = _base(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, torch.nn.Linear) or type(head).forward is not torch.nn.Linear.forward:
        # TRL reads the head's weight; a head with its own forward (Dory's learned per-token scale) computes more.
        return "head-not-plain-linear"
    owner = _forward_owner(type(model))
    if owner is None:
        return "class-not-rewritten"
    record = _registry.records.get(f"{owner.__module__}.{owner.__qualname__}", {})
    patch = _registry.patched.get(owner)
    if record.get("status") != "patched" or patch is None:
        return "class-not-rewritten"
    # TRL hands the head its backbone's output, not what the forward hands it: the forward's epilogue holds only
    # where the two are the same up to a scaling, folded in below (MiniCPM3 and Inkling divide the hidden states
    # before their heads).
    if _attribute_path(model, record.get("head")) is not head:
        # A composite head (BERT's ``cls``: a transform, then the decoder): TRL reads only the last linear's weight.
        return "head-not-output-embeddings"
    scales = _backbone_scales(patch.original, record.get("head"), getattr(model, "base_model_prefix", None))
    if scales is None:
        return "head-input-not-backbone-output"
    keywords: dict[str, Any] = {}
    for step in record.get("epilogue", []):
        try:
            value = _resolve(step["expr"], model, patch.original)
        except (_Unresolved, AttributeError, SyntaxError):
            return "epilogue-unresolved"
        if step["kind"] == "vocab_slice":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                return "epilogue-unresolved"
            keywords["vocab_slice_end"] = value
        elif step["kind"] == "module":
            from logitless._epilogue_modules import epilogue_keywords

            found = epilogue_keywords(value)
            if isinstance(found, str):
                return found
            keywords.update(found)
        elif step["kind"] in _KEYWORDS:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                return "epilogue-parameter"
            if step["kind"] == "logits_bias":
                value = _vocab_vector(value)
            keywords[_KEYWORDS[step["kind"]]] = value
        else:
            return "epilogue-unresolved"
    return _with_scales(keywords, scales, model, patch.original, head)


def _with_scales(keywords: dict[str, Any], scales: list[tuple[str, ast.AST]], model: Any, forward: Any,
                 head: torch.nn.Linear) -> dict[str, Any] | str:  # fmt: skip
    """The hidden states' scalings before the head folded into the logits' (``W·(x/c) = (W·x)/c``): exact only with
    no head bias and no logits bias added before the logits' own scaling."""
    if not scales:
        return keywords
    if head.bias is not None or keywords.get("logits_bias") is not None:
        return "head-input-scaled-beside-a-bias"
    for kind, node in scales:
        try:
            value = _value(node, model, forward)
        except (_Unresolved, AttributeError):
            return "epilogue-unresolved"
        if isinstance(value, torch.Tensor):
            if value.requires_grad or value.numel() != 1:
                return "epilogue-parameter"
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "epilogue-unresolved"
        key = "logit_scale_divide" if kind == "divide" else "logit_scale_multiply"
        keywords[key] = (keywords.get(key) or 1.0) * value
    return keywords


def _attribute_path(model: Any, path: Any) -> Any:
    value = model
    for name in path.split(".") if isinstance(path, str) and path else [None]:
        value = getattr(value, name, None) if name is not None else None
    return value


def _forward_owner(cls: type) -> type | None:
    """The class whose forward ``cls`` runs, when that is logitless's rewrite (or a registered canonical one)."""
    for klass in cls.__mro__:
        if "forward" in klass.__dict__:
            return klass if _registry.rewritten(klass) or _registry.runs_canonical(klass) else None
    return None


def _resolve(expr: str, model: Any, forward: Any) -> Any:
    return _value(ast.parse(expr, mode="eval").body, model, forward)


def _value(node: ast.AST, model: Any, forward: Any) -> Any:
    if isinstance(node, ast.NamedExpr):
        return _value(node.value, model, forward)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        if node.id == "self":
            return model
        if forward is None:
            raise _Unresolved(node.id)
        # A local the forward assigned once (``cap = self.config.logits_soft_cap``): that value, with no further
        # locals behind it.
        return _value(_assigned_once(forward, node.id), model, None)
    if isinstance(node, ast.Attribute):
        return getattr(_value(node.value, model, forward), node.attr)
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get_text_config"
        and not node.args and not node.keywords
    ):  # fmt: skip
        return _value(node.func.value, model, forward).get_text_config()
    if (
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr"
        and len(node.args) in (2, 3) and not node.keywords and isinstance(node.args[1], ast.Constant)
        and isinstance(node.args[1].value, str) and all(isinstance(a, ast.Constant) for a in node.args[2:])
    ):  # fmt: skip
        # getattr(config, "final_logit_softcapping", None), PaliGemma's form
        owner = _value(node.args[0], model, forward)
        return getattr(owner, node.args[1].value, *(a.value for a in node.args[2:]))  # type: ignore[attr-defined]
    raise _Unresolved(ast.dump(node))


@functools.lru_cache(maxsize=256)
def _function_tree(forward: Any) -> ast.AST:
    return ast.parse(textwrap.dedent(inspect.getsource(forward)))


def _assigned_once(forward: Any, name: str) -> ast.AST:
    """The value of the one binding of ``name`` in ``forward``: a plain ``name = value`` or ``(name := value)``, and
    no other binding of it anywhere in the function (arguments, loops, other assignments)."""
    try:
        values = _bindings(_function_tree(forward)).get(name, [])
    except (OSError, TypeError, SyntaxError) as e:
        raise _Unresolved(name) from e
    if len(values) != 1 or isinstance(values[0], ast.Pass):
        raise _Unresolved(name)
    return values[0]


def _backbone_scales(forward: Any, head: Any, prefix: Any) -> list[tuple[str, ast.AST]] | None:
    """How ``forward``'s one call of ``self.<head>(x)`` gets ``x`` from the backbone's last hidden state (what TRL's
    ``_get_last_hidden_state`` takes from ``model.base_model``): the ``("multiply" | "divide", expression)`` scalings
    on the way (none: the same tensor), or None when ``x`` is anything else. ``x`` is, up to subscripts and
    ``slice_logits_to_keep``, ``outputs.last_hidden_state`` or ``outputs[0]`` of ``outputs = self.<prefix>(...)``,
    directly or through one local bound to it once and otherwise only re-bound to slices of itself; a scaling by
    ``*`` or ``/`` is taken only in a binding that is a statement of the function's own body (never conditional)."""
    if not isinstance(head, str) or not isinstance(prefix, str) or not prefix:
        return None
    try:
        tree = _function_tree(forward)
    except (OSError, TypeError, SyntaxError):
        return None
    function = tree.body[0] if tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)) \
        else None  # fmt: skip
    calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _is_self_attr(n.func, head)]
    if function is None or len(calls) != 1 or len(calls[0].args) != 1 or calls[0].keywords:
        return None
    bindings = _bindings(tree)
    unconditional = {id(stmt.value) for stmt in function.body if isinstance(stmt, (ast.Assign, ast.AnnAssign))}

    def is_backbone_output(node: ast.AST) -> bool:
        if isinstance(node, ast.Attribute) and node.attr == "last_hidden_state":
            outputs = node.value
        elif isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == 0:
            outputs = node.value
        else:
            return False
        values = bindings.get(outputs.id, []) if isinstance(outputs, ast.Name) else []
        return len(values) == 1 and isinstance(values[0], ast.Call) and _is_self_attr(values[0].func, prefix)

    def peel(node: ast.AST, name: str | None) -> tuple[str | None, list[tuple[str, ast.AST]]]:
        scales = []
        node = _unsliced(node)
        while isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            scales.append(("divide" if isinstance(node.op, ast.Div) else "multiply", node.right))
            node = _unsliced(node.left)
        if is_backbone_output(node):
            return "backbone", scales
        if isinstance(node, ast.Name) and node.id == name:
            return "self", scales
        return None, scales

    kind, scales = peel(calls[0].args[0], None)
    if kind == "backbone" or scales:
        return scales if kind == "backbone" and not scales else None
    base = _unsliced(calls[0].args[0])
    if not isinstance(base, ast.Name):
        return None
    found: list[tuple[str, ast.AST]] = []
    sources = 0
    for value in bindings.get(base.id, []):
        kind, scales = peel(value, base.id)
        if kind is None or (scales and id(value) not in unconditional):
            return None
        if any(isinstance(n, ast.Name) and n.id == base.id for _, e in scales for n in ast.walk(e)):
            return None  # scaled by something of itself: not a constant
        sources += kind == "backbone"
        found += scales
    return found if sources == 1 else None


def _unsliced(node: ast.AST) -> Any:
    """``node`` without subscripts and ``slice_logits_to_keep(·, ...)``."""
    while True:
        if isinstance(node, ast.Subscript) and not (isinstance(node.slice, ast.Constant) and node.slice.value == 0):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "slice_logits_to_keep" \
                and node.args:  # fmt: skip
            node = node.args[0]
        else:
            return node


def _is_self_attr(node: ast.AST, attr: str) -> bool:
    return isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name) \
        and node.value.id == "self"  # fmt: skip


def _bindings(tree: ast.AST) -> dict[str, list[ast.AST]]:
    """Every name's bound values in the function: plain and annotated assignments of one name; a name bound any
    other way (loops, tuples, augmented assignment, ``with``) maps to a sentinel that matches nothing."""
    out: dict[str, list[ast.AST]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out.setdefault(target.id, []).append(node.value)
                else:
                    for n in ast.walk(target):
                        if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                            out.setdefault(n.id, []).append(ast.Pass())
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            out.setdefault(node.target.id, []).append(node.value)
        elif isinstance(node, ast.NamedExpr):
            out.setdefault(node.target.id, []).append(node.value)
        elif isinstance(node, (ast.AugAssign, ast.For, ast.With, ast.comprehension, ast.arg)):
            targets = [ast.Name(id=node.arg, ctx=ast.Store())] if isinstance(node, ast.arg) else _targets(node)
            for target in targets:
                for n in ast.walk(target):
                    if isinstance(n, ast.Name):
                        out.setdefault(n.id, []).append(ast.Pass())
    return out


def _targets(node: ast.AST) -> list[ast.AST]:
    if isinstance(node, ast.With):
        return [item.optional_vars for item in node.items if item.optional_vars is not None]
    return [node.target]  # type: ignore[attr-defined]
