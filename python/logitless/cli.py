"""``python -m logitless <command>``: each command lives in its own module and is imported only when run."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# command -> (module, one-line help). Each module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("logitless.demo", "train a small Llama stock vs logitless and compare loss, memory and speed"),
    "audit": ("logitless.audit_cli", "list which transformers causal LMs logitless rewrites, and why not"),
    "rewrite": ("logitless.audit_cli", "print the rewritten forward of one class as a unified diff"),
    "verify": ("logitless.verify", "check every causal LM stock vs logitless on identical tiny weights"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m logitless", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        p.set_defaults(_module=module)
        # Only the chosen command's module is imported, so `audit` never pays for torch.
        if (argv if argv is not None else sys.argv[1:])[:1] == [name]:
            mod = importlib.import_module(module)
            _hook(mod, f"add_{name}_arguments", "add_arguments")(p)
    args = parser.parse_args(argv)
    mod = importlib.import_module(args._module)
    return int(_hook(mod, f"run_{args.command}", "run")(args) or 0)


def _hook(module: object, specific: str, generic: str) -> Callable[..., object]:
    """A command module names its hooks after the command (``run_audit``) or generically (``run``)."""
    hook = getattr(module, specific, None) or getattr(module, generic, None)
    if hook is None:
        raise AttributeError(f"{module!r} defines neither {specific}() nor {generic}()")
    return hook


if __name__ == "__main__":
    raise SystemExit(main())
