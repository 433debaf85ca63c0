"""A ``sys.meta_path`` finder that runs a callback on matching modules once executed (``transformers.models.*.modeling_*``
for the installer's class patching, ``trl.*`` for the TRL integration).

The finder never loads anything itself: it asks the finders behind it for the real spec and wraps only the spec's
loader, so transformers' ``_LazyModule`` (which imports submodules through ``importlib``) keeps working and the
module object, its file, its ``__spec__.origin`` and its source stay the stock ones.
"""

from __future__ import annotations

import re
import sys
import threading
from collections.abc import Callable, Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType
from typing import Any

__all__ = ["MODELING_MODULE", "TRL_MODULE", "ModelingImportHook"]

# transformers.models.llama.modeling_llama, transformers.models.deprecated.x.modeling_x, ...
MODELING_MODULE = re.compile(r"^transformers\.models\.(?:\w+\.)+modeling_\w+$")
# trl.trainer.utils (where add_fused_lm_head lives) and the trainer modules that import it by name.
TRL_MODULE = re.compile(r"^trl(?:\.\w+)*$")


class _PatchingLoader:
    """Delegates everything to the real loader; after ``exec_module`` hands the module to the callback."""

    def __init__(self, inner: Any, hook: ModelingImportHook) -> None:
        self._inner = inner
        self._hook = hook

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        # The hook may have been removed since find_spec: then the module stays stock.
        if self._hook.active:
            self._hook.on_loaded(module)

    def __getattr__(self, name: str) -> Any:
        # get_source, get_filename, get_resource_reader, is_package, ...: inspect and linecache rely on these.
        return getattr(self._inner, name)


class ModelingImportHook:
    """``sys.meta_path`` entry; ``on_loaded(module)`` is called after each matching module has executed."""

    def __init__(self, on_loaded: Callable[[ModuleType], None], pattern: re.Pattern[str] = MODELING_MODULE) -> None:
        self.on_loaded = on_loaded
        self.pattern = pattern
        self.active = True
        # find_spec asks the other finders, which never call back into us, but a finder behind us could import
        # something matching while it searches: the guard keeps that from recursing.
        self._busy = threading.local()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not self.active or not self.pattern.match(fullname) or getattr(self._busy, "on", False):
            return None
        self._busy.on = True
        try:
            spec = self._find_real_spec(fullname, path, target)
        finally:
            self._busy.on = False
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader, self)
        return spec

    def _find_real_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None
    ) -> ModuleSpec | None:
        for finder in list(sys.meta_path):
            if finder is self:
                continue
            find_spec = getattr(finder, "find_spec", None)
            if find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                return spec
        return None

    def insert(self) -> None:
        self.active = True
        if self not in sys.meta_path:
            sys.meta_path.insert(0, self)

    def remove(self) -> None:
        self.active = False
        while self in sys.meta_path:
            sys.meta_path.remove(self)
