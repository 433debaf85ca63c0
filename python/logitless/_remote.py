"""Remote code (``trust_remote_code=True``): the installer's reach into a checkpoint's own modeling file.

transformers executes such a file itself (``dynamic_module_utils.get_class_in_module``: ``spec_from_file_location``
then ``exec_module``, as ``transformers_modules.<repo>.modeling_<x>``), past ``sys.meta_path``, so the import hook
never sees it. Wrapping that one function hands each module to the installer once it has executed, exactly where the
hook hands over transformers' own modules; the classes then go through the same rewriter and run-time checks.
"""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

from logitless._hook import ModelingImportHook

__all__ = ["REMOTE_MODULE", "RemoteCodeHook"]

DYNAMIC_MODULE = "transformers.dynamic_module_utils"
# transformers_modules.<org>.<repo>.<revision>.modeling_<x>: repository names keep their dashes and dots, and the
# file need not be called modeling_*; which classes are patched is decided by their names (``_core.class_kind``).
REMOTE_MODULE = re.compile(r"^transformers_modules\.")
_FUNCTION = "get_class_in_module"


class RemoteCodeHook:
    """Wraps ``get_class_in_module`` in ``transformers.dynamic_module_utils`` (now, or when it is imported)."""

    def __init__(self, on_loaded: Callable[[ModuleType], None]) -> None:
        self._on_loaded = on_loaded
        self._import_hook = ModelingImportHook(self._wrap, re.compile(rf"^{re.escape(DYNAMIC_MODULE)}$"))
        self._wrapped: tuple[ModuleType, Any, Any] | None = None
        self.active = False

    def install(self) -> None:
        self.active = True
        self._import_hook.insert()
        module = sys.modules.get(DYNAMIC_MODULE)
        if module is not None:
            self._wrap(module)
        # Remote modules executed before install() get their classes patched now, as transformers' own do.
        for name, loaded in list(sys.modules.items()):
            if loaded is not None and REMOTE_MODULE.match(name):
                self._on_loaded(loaded)

    def uninstall(self) -> None:
        self.active = False
        self._import_hook.remove()
        if self._wrapped is not None:
            module, original, wrapper = self._wrapped
            # Someone may have wrapped it again since: theirs is left alone rather than clobbered.
            if module.__dict__.get(_FUNCTION) is wrapper:
                setattr(module, _FUNCTION, original)
            self._wrapped = None

    def _wrap(self, module: ModuleType) -> None:
        original = module.__dict__.get(_FUNCTION)
        if original is None or self._wrapped is not None:
            return

        @functools.wraps(original)
        def get_class_in_module(*args: Any, **kwargs: Any) -> Any:
            cls = original(*args, **kwargs)
            loaded = sys.modules.get(getattr(cls, "__module__", ""))
            if self.active and loaded is not None and REMOTE_MODULE.match(loaded.__name__):
                self._on_loaded(loaded)
            return cls

        setattr(module, _FUNCTION, get_class_in_module)
        self._wrapped = (module, original, get_class_in_module)
