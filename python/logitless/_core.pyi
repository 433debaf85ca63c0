"""Type stubs for the Rust extension ``logitless._core`` (kept in step with crates/logitless-py)."""

from typing import Any

__version__: str

class LogitlessError(ValueError): ...
class LogitlessTypeError(TypeError): ...

# --- kernel (crates/logitless-py/src/kernel.rs) -------------------------------------------------------------------
# A tensor crosses as (data_ptr, shape, strides in elements, dtype name without "torch."), taken from a live
# torch.Tensor the caller keeps alive for the call. Matrices: unit column stride, any row stride >= row length.
# Outputs: contiguous, caller-allocated, overlapping nothing else; written in place.
TensorView = tuple[int, tuple[int, ...], tuple[int, ...], str]

def fused_linear_cross_entropy(
    hidden: TensorView,
    weight: TensorView,
    bias: TensorView | None,
    targets: TensorView,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    logits_bias: TensorView | None = None,
    scale_multiply: float | None = None,
    scale_divide: float | None = None,
    softcap: float | None = None,
    temperature: float | None = None,
    grad_scale: float | None = None,
    row_scale: TensorView | None = None,
    per_row_loss: TensorView | None = None,
    token_stats: TensorView | None = None,
    d_hidden: TensorView | None = None,
    d_weight: TensorView | None = None,
    d_bias: TensorView | None = None,
    chunk_budget_bytes: int | None = None,
    weight_grad: str = "accumulate",
    num_threads: int = 1,
    kernel_isa: str | None = None,
    profile: bool = False,
    low_a: TensorView | None = None,
    low_b: TensorView | None = None,
    d_low_a: TensorView | None = None,
    d_low_b: TensorView | None = None,
) -> tuple[float, int]:
    """Fused linear + cross-entropy on CPU: (sum of per-row losses, non-ignored rows), gradients written in place.

    hidden [N, H], weight [V, H], bias [V] (same float dtype: float32/bfloat16/float16/float64), targets int64 [N],
    logits_bias float32 [V], row_scale float32 [N], per_row_loss float64 [N], token_stats float64 [N, 4] (entropy,
    mean logit, log sum p^2, target is argmax; written in the same pass), d_* like their inputs. Gradients are
    those of sum_i s_i * loss_i with s_i = row_scale[i], else grad_scale (default 1). Epilogue values of None or 0
    are not applied. Runs with the GIL released on a pool of num_threads threads (1: the calling thread only),
    owned by this process (a fork()ed child builds its own). kernel_isa caps the instruction set (portable, avx2,
    avx512, avx512bf16, amx; process-wide, None: the best detected); profile prints seconds per phase to stderr.
    low_a float32 [N, r] and low_b float32 [V, r] add low_a @ low_b.T to the logits before the epilogue (a LoRA
    adapter on a frozen head: no d_weight then; not for float64 inputs); d_low_a [N, r] / d_low_b [V, r] float32
    receive their gradients.
    Raises LogitlessError (ValueError) / LogitlessTypeError (TypeError) on bad input, RuntimeError on a bug.
    """

# --- rewriter (crates/logitless-py/src/rewrite.rs) ----------------------------------------------------------------
def rewrite_forward(source: str) -> dict[str, Any]:
    """Rewrite one dedented ``def forward`` (decorators included); docs/design.md "Rewrite contract".

    ``{"status": "patched", "source", "head", "hidden", "logits", "loss", "labels", "vocab", "epilogue":
    [{"kind", "expr"}], "extra_loss_kwargs", "kwargs", "loss_form", "ce_class", "fused_guards", "delegate_target",
    "labels_elsewhere", "line"}`` or
    ``{"status": "refused", "code", "reason", "line"}``. Never raises for bad source (it is refused).
    """

def class_kind(name: str) -> str | None:
    """``"causal-lm"`` / ``"conditional-generation"`` when a class of this name is a language-model head logitless
    patches (``*ForCausalLM``, ``*ForConditionalGeneration`` and the older names of transformers' LM auto mappings:
    ``GPT2LMHeadModel``, ``MarianMTModel``, the encoder-decoder wrappers, ...), else None. The one rule of the
    installer, audit and verify.
    """

def audit_tree(models_dir: str) -> list[dict[str, Any]]:
    """One dict per language-model head (``class_kind``; a conditional one only when its loss is a cross-entropy)
    under a transformers ``models/`` directory: ``{"class", "module", "kind", "status", "head", "head_is_linear", "head_path",
    "epilogue", "code", "reason", "line", "loss_form", "forward_from"}``; ``head_path`` is the sub-module path from a
    composite head to the ``nn.Linear`` the loss is fused on (empty for a plain head). Raises LogitlessError if the
    directory cannot be read.
    """

def split_head_forward(source: str) -> dict[str, Any]:
    """Split a composite head's dedented ``def forward`` into its statements up to one final sub-module call.

    ``{"status": "split", "final", "prefix_source", "line"}``: ``prefix_source`` defines the same function
    returning the final call's argument instead of calling ``self.<final>``; or ``{"status": "refused", "code",
    "reason", "line"}``. Never raises for bad source.
    """

def analyse_epilogue_module(source: str) -> dict[str, Any]:
    """The epilogue an epilogue module's dedented ``def forward(self, x)`` applies to ``x``.

    ``{"status": "understood", "steps": [{"kind", "attribute" | "number"}]}`` in the order the fused op applies
    them (``kind`` one of ``"logits_bias"``, ``"multiply"``, ``"divide"``, ``"softcap"``; ``attribute`` a path of
    names under ``self``); or ``{"status": "refused", "code", "reason", "line"}``. Never raises for bad source.
    """
