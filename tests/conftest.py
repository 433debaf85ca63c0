"""Session-wide test setup.

Triton's interpreter (TRITON_INTERPRET=1, for tests/test_triton.py) is chosen when ``@triton.jit`` decorates, and
that includes Triton's own ``triton.language`` functions, decorated when anything first imports Triton (torch
does, lazily, from several places). So it is switched on here, before any test module imports torch, on machines
without an NVIDIA GPU; on GPU machines the kernels are compiled for real and tests/test_triton.py steps aside.
"""

from __future__ import annotations

import os
import shutil

if shutil.which("nvidia-smi") is None and not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402 - after the interpreter switch above, which must precede any import of torch


@pytest.fixture
def stock_world():  # type: ignore[no-untyped-def]
    """logitless uninstalled before and after the test, torch on one thread (tiny models on a shared 2-core
    machine). Modules that compare stock with logitless use it for every test (``pytestmark``)."""
    import _tiny_lm as tiny  # imports torch: only once a test runs, after the switch above

    import logitless

    logitless.uninstall()
    with tiny.one_thread():
        yield
    logitless.uninstall()
