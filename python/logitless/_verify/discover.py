"""Which transformers classes verify checks: every causal-LM head (``*ForCausalLM``, ``GPT2LMHeadModel``, ...) and
every conditional generator (``*ForConditionalGeneration``, ``MarianMTModel``, ...) whose forward calls
``self.loss_function`` on lm_head logits or a ``CrossEntropyLoss`` (encoder-decoders). Names are judged by the
installer's own rule, ``_core.class_kind``.

Found by parsing the installed transformers' modeling files (no import), so the list is exactly what is on disk and
the parent process stays free of torch.
"""

from __future__ import annotations

import importlib.util
import pathlib
import re
from dataclasses import asdict, dataclass

from logitless._core import class_kind

CAUSAL = "causal-lm"
CONDITIONAL = "conditional-generation"


@dataclass(frozen=True)
class Candidate:
    cls: str
    module: str  # dotted module path, e.g. transformers.models.llama.modeling_llama
    kind: str  # CAUSAL or CONDITIONAL

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def models_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("transformers")
    if spec is None or spec.origin is None:
        raise RuntimeError("transformers is not installed")
    return pathlib.Path(spec.origin).parent / "models"


_CLASS = re.compile(r"^class (\w+)\b", re.MULTILINE)
_METHOD = re.compile(r"^    (?:@|def |async def )", re.MULTILINE)


def _forward_source(class_body: str) -> str | None:
    """The text of a class's own ``forward`` (up to the next method or decorator at class level)."""
    start = class_body.find("\n    def forward(")
    if start < 0:
        return None
    nxt = _METHOD.search(class_body, start + 5)
    return class_body[start : nxt.start() if nxt else len(class_body)]


def discover(root: pathlib.Path | None = None) -> list[Candidate]:
    # Plain text scanning, not ast: parsing transformers' ~500 modeling files costs tens of seconds on a busy
    # machine, and class and method boundaries at fixed indentation are all that is needed here.
    root = root or models_dir()
    found: list[Candidate] = []
    for path in sorted(root.glob("*/modeling_*.py")):
        if path.stem.startswith(("modeling_tf_", "modeling_flax_")):
            # transformers 4.x still ships TensorFlow/Flax ports; logitless patches PyTorch models only.
            continue
        if path.parent.name == "auto":
            # AutoModelForCausalLM and the like are factories, not model classes (the audit skips them too).
            continue
        source = path.read_text(encoding="utf-8")
        module = f"transformers.models.{path.parent.name}.{path.stem}"
        classes = list(_CLASS.finditer(source))
        for i, match in enumerate(classes):
            name = match.group(1)
            kind = class_kind(name)
            if kind == CAUSAL:
                found.append(Candidate(name, module, CAUSAL))
            elif kind == CONDITIONAL:
                end = classes[i + 1].start() if i + 1 < len(classes) else len(source)
                forward = _forward_source(source[match.start() : end])
                # The classes whose loss is a cross-entropy of the head's logits: the causal-LM loss_function (of
                # its own head's logits, or of a language model's it holds, Llama 4's), or an encoder-decoder's
                # CrossEntropyLoss on its decoder labels (the installer rewrites those too).
                causal = "self.loss_function(" in forward if forward else False
                if forward and ((causal and ("lm_head" in forward or "self.language_model(" in forward))
                                or "CrossEntropyLoss(" in forward):
                    found.append(Candidate(name, module, CONDITIONAL))
    return found
