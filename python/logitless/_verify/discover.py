"""Which transformers classes verify checks: every ``*ForCausalLM`` and every ``*ForConditionalGeneration`` whose
forward calls ``self.loss_function`` on lm_head logits.

Found by parsing the installed transformers' modeling files (no import), so the list is exactly what is on disk and
the parent process stays free of torch.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
from dataclasses import asdict, dataclass

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


def _forward_source(source: str, node: ast.ClassDef) -> str | None:
    for item in node.body:
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name == "forward":
            return ast.get_source_segment(source, item)
    return None


def discover(root: pathlib.Path | None = None) -> list[Candidate]:
    root = root or models_dir()
    found: list[Candidate] = []
    for path in sorted(root.glob("*/modeling_*.py")):
        if path.stem.startswith(("modeling_tf_", "modeling_flax_")):
            # transformers 4.x still ships TensorFlow/Flax ports; logitless patches PyTorch models only.
            continue
        source = path.read_text(encoding="utf-8")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        module = f"transformers.models.{path.parent.name}.{path.stem}"
        for node in tree.body:
            if not isinstance(node, ast.ClassDef):
                continue
            if node.name.endswith("ForCausalLM"):
                found.append(Candidate(node.name, module, CAUSAL))
            elif node.name.endswith("ForConditionalGeneration"):
                forward = _forward_source(source, node)
                # Only the classes whose loss is the causal-LM loss on the head's logits are logitless' business;
                # encoder-decoder or audio-codec generators with their own losses are not candidates.
                if forward and "self.loss_function(" in forward and "lm_head" in forward:
                    found.append(Candidate(node.name, module, CONDITIONAL))
    return found
