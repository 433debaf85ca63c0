"""``python -m logitless audit`` and ``python -m logitless rewrite``.

Both run on source text only: transformers is located on disk without being imported, and neither torch nor
transformers is ever imported here, so the audit of a whole installation takes well under a second.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import json
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["add_audit_arguments", "add_rewrite_arguments", "audit_report", "run_audit", "run_rewrite"]


def find_transformers() -> Path:
    """The installed transformers package directory (``find_spec`` of a top-level package does not import it)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("transformers is not installed; pass --transformers DIR")
    return Path(next(iter(spec.submodule_search_locations)))


def transformers_version(package_dir: Path) -> str | None:
    """The version from the dist-info METADATA next to the package, read as text (no import)."""
    for dist in sorted(package_dir.parent.glob("transformers-*.dist-info")):
        metadata = dist / "METADATA"
        if metadata.is_file():
            for line in metadata.read_text(encoding="utf-8", errors="replace").splitlines():
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip()
                if not line:
                    break
    return None


def audit_report(package_dir: Path) -> dict[str, Any]:
    """The ``--json`` document: every causal-LM class, its status, and a summary."""
    from logitless import _core

    models = package_dir / "models" if (package_dir / "models").is_dir() else package_dir
    rows = _core.audit_tree(str(models))
    classes: dict[str, dict[str, Any]] = {}
    for row in rows:
        # Names are unique per installed transformers; a duplicate would be a second file defining the same class.
        classes.setdefault(row["class"], {k: v for k, v in row.items() if k != "class"})
    summary: dict[str, Any] = {}
    for kind in ("causal-lm", "conditional-generation"):
        of_kind = [c for c in classes.values() if c["kind"] == kind]
        summary[kind] = {
            "total": len(of_kind),
            "patched": sum(c["status"] == "patched" for c in of_kind),
            "refused": dict(sorted(Counter(c["code"] for c in of_kind if c["status"] == "refused").items())),
        }
    return {"transformers_version": transformers_version(package_dir), "classes": classes, "summary": summary}


def _table(report: dict[str, Any]) -> str:
    lines = [f"{'class':<52} {'status':<8} {'head':<26} epilogue / reason"]
    for name, c in sorted(report["classes"].items()):
        if c["status"] == "patched":
            detail = ", ".join(f"{e['kind']}({e['expr']})" for e in c["epilogue"]) or "-"
        else:
            detail = f"[{c['code']}] {c['reason']}"
        # A composite head shows the path to the linear layer the loss is fused on: `cls.predictions.decoder`.
        head = ".".join([c["head"], *c.get("head_path", [])]) if c["head"] else "-"
        lines.append(f"{name:<52} {c['status']:<8} {head:<26} {detail}")
    lines.append("")
    lines.append(f"transformers {report['transformers_version'] or '(unknown version)'}")
    for kind, s in report["summary"].items():
        refused = ", ".join(f"{code} {n}" for code, n in s["refused"].items()) or "none"
        lines.append(f"{kind}: {s['patched']}/{s['total']} patched; refused: {refused}")
    return "\n".join(lines)


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transformers", type=Path, help="transformers package directory (default: the installed one)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_audit(args: argparse.Namespace) -> int:
    package_dir = args.transformers or find_transformers()
    report = audit_report(package_dir)
    print(json.dumps(report, indent=1) if args.json else _table(report))
    return 0


def add_rewrite_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", type=Path, help="a modeling_*.py file")
    p.add_argument("--class", dest="class_name", required=True, help="the class whose forward to rewrite")


def _forward_source(text: str, class_name: str) -> str | None:
    """The dedented ``forward`` of ``class_name`` in ``text`` (decorators included), as inspect would give it.

    A class without its own forward uses its first base class defined in the same file that has one.
    """
    tree = ast.parse(text)
    lines = text.splitlines(keepends=True)
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    seen: set[str] = set()
    name: str | None = class_name
    while name in classes and name not in seen:
        seen.add(name)
        node = classes[name]
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "forward":
                first = min([item.lineno] + [d.lineno for d in item.decorator_list])
                end = item.end_lineno or item.lineno
                return textwrap.dedent("".join(lines[first - 1 : end]))
        name = next((b.id for b in node.bases if isinstance(b, ast.Name) and b.id in classes), None)
    return None


def run_rewrite(args: argparse.Namespace) -> int:
    from logitless.rewrite import rewrite_forward

    source = _forward_source(args.file.read_text(encoding="utf-8"), args.class_name)
    if source is None:
        print(f"{args.file}: no class {args.class_name} with a forward", file=sys.stderr)
        return 2
    result = rewrite_forward(source)
    if result["status"] != "patched":
        print(f"refused [{result['code']}] line {result['line']}: {result['reason']}", file=sys.stderr)
        return 1
    name = f"{args.class_name}.forward"
    diff = difflib.unified_diff(
        source.splitlines(keepends=True), result["source"].splitlines(keepends=True), name, f"{name} (logitless)"
    )
    sys.stdout.writelines(diff)
    return 0


# cli.py evaluates ``mod.add_arguments``/``mod.run`` as getattr defaults even when the per-command names exist,
# so both must be present; they are never the ones chosen for ``audit``/``rewrite``.
add_arguments = add_audit_arguments
run = run_audit
