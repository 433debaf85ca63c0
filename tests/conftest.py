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
