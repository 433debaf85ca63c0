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

from logitless import _versions

__all__ = ["add_audit_arguments", "add_rewrite_arguments", "audit_report", "run_audit", "run_rewrite"]


def find_transformers() -> Path:
    """The installed transformers package directory (``find_spec`` of a top-level package does not import it)."""
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("logitless audit: transformers is not installed; pass --transformers DIR")
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


class AuditError(Exception):
    """A transformers tree the audit cannot read: reported in one line, exit status 2."""


def audit_report(package_dir: Path) -> dict[str, Any]:
    """The ``--json`` document (schema shared with ``logitless.audit()``, docs/spec.md "Audit"): every causal-LM
    class keyed ``"module.Class"``, its status, per-status ``counts``, and a ``summary`` per kind."""
    from logitless import _core

    models = package_dir / "models"
    if not models.is_dir():
        raise AuditError(f"{package_dir}: not a transformers package (no models/ directory)")
    try:
        rows = _core.audit_tree(str(models))
    except ValueError as exc:
        raise AuditError(str(exc)) from None
    if not rows:
        raise AuditError(f"{package_dir}: no causal-LM classes found under models/")
    classes: dict[str, dict[str, Any]] = {}
    for row in rows:
        classes.setdefault(f"{row['module']}.{row['class']}", row)
    summary: dict[str, Any] = {}
    for kind in ("causal-lm", "conditional-generation"):
        of_kind = [c for c in classes.values() if c["kind"] == kind]
        summary[kind] = {
            "total": len(of_kind),
            "patched": sum(c["status"] == "patched" for c in of_kind),
            "refused": dict(sorted(Counter(c["code"] for c in of_kind if c["status"] == "refused").items())),
        }
    counts = dict(sorted(Counter(c["status"] for c in classes.values()).items()))
    return {
        "transformers": transformers_version(package_dir),
        "counts": counts,
        "classes": dict(sorted(classes.items())),
        "summary": summary,
    }


def _table(report: dict[str, Any]) -> str:
    lines = [f"{'class':<52} {'status':<8} {'head':<26} epilogue / reason"]
    for c in sorted(report["classes"].values(), key=lambda c: c["class"]):
        name = c["class"]
        if c["status"] == "patched":
            detail = ", ".join(f"{e['kind']}({e['expr']})" for e in c["epilogue"]) or "-"
        else:
            detail = f"[{c['code']}] {c['reason']}"
        # A composite head shows the path to the linear layer the loss is fused on: `cls.predictions.decoder`.
        head = ".".join([c["head"], *c.get("head_path", [])]) if c["head"] else "-"
        lines.append(f"{name:<52} {c['status']:<8} {head:<26} {detail}")
    lines.append("")
    lines.append(f"transformers {report['transformers'] or '(unknown version)'}")
    for kind, s in report["summary"].items():
        refused = ", ".join(f"{code} {n}" for code, n in s["refused"].items()) or "none"
        lines.append(f"{kind}: {s['patched']}/{s['total']} patched; refused: {refused}")
    return "\n".join(lines)


def add_audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--transformers", type=Path, help="transformers package directory (default: the installed one)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run_audit(args: argparse.Namespace) -> int:
    package_dir = args.transformers or find_transformers()
    try:
        report = audit_report(package_dir)
    except AuditError as exc:
        print(f"logitless audit: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else _table(report))
    unsupported = _versions.unsupported() if args.transformers is None else None
    if unsupported is not None:
        # The report reads the source alone; install() checks the versions and would patch none of it.
        print(f"logitless audit: {unsupported}: install() patches nothing", file=sys.stderr)
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

    try:
        source = _forward_source(args.file.read_text(encoding="utf-8"), args.class_name)
    except (OSError, UnicodeDecodeError) as exc:
        print(f"logitless rewrite: {args.file}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
        return 2
    except SyntaxError as exc:
        print(f"logitless rewrite: {args.file}:{exc.lineno}: not valid Python ({exc.msg})", file=sys.stderr)
        return 2
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
