"""Every environment variable the library reads, read in this one module.

Values are read when asked for, never at import time, so tests can set them per process.
"""

from __future__ import annotations

import os


def triton_interpreter_enabled() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads this variable itself when it is imported, so it must be set before that.
    """
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced_backend() -> str | None:
    """Backend named by ``XCLIP_KERNELS_BACKEND``, used where a call passes ``backend=None``."""
    name = os.environ.get("XCLIP_KERNELS_BACKEND", "").strip()
    return name or None

