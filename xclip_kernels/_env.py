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


CPU_ISA_CHOICES = ("auto", "avx2")


def cpu_isa() -> str | None:
    """Widest instruction set for the cpp backend's CPU tile kernels, from ``XCLIP_KERNELS_CPU_ISA``.

    ``"auto"`` (the widest the CPU has) or ``"avx2"`` (AVX2 even on an AVX-512 CPU); None when
    unset or empty. Applied once, when the extension loads; later changes go through the
    extension's ``set_cpu_isa``. Any other value raises ValueError naming the variable.
    """
    value = os.environ.get("XCLIP_KERNELS_CPU_ISA", "").strip()
    if not value:
        return None
    if value not in CPU_ISA_CHOICES:
        raise ValueError(
            f"XCLIP_KERNELS_CPU_ISA: expected one of {', '.join(CPU_ISA_CHOICES)} (or unset), got {value!r}"
        )
    return value
