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


GEMM_PROVIDERS = ("auto", "matmul", "onednn", "float32")


def gemm_provider() -> str | None:
    """CPU inference GEMM provider named by ``XCLIP_KERNELS_GEMM`` ("matmul", "onednn" or
    "float32": bf16/fp16 widened), or
    None for "auto"/unset (measured per dtype: :func:`xclip_kernels.gemm.provider`)."""
    raw = os.environ.get("XCLIP_KERNELS_GEMM", "")
    value = raw.strip().lower()
    if value not in GEMM_PROVIDERS and value:
        raise ValueError(f"XCLIP_KERNELS_GEMM: expected one of {', '.join(GEMM_PROVIDERS)} (or unset), got {raw!r}")
    return None if value in ("", "auto") else value


CPU_ISAS = ("auto", "avx512_bf16", "avx2")


def cpu_isa() -> str | None:
    """Instruction set named by ``XCLIP_KERNELS_CPU_ISA`` for the ``cpp`` tile kernels, or None.

    "auto" (the widest the CPU has), "avx512_bf16" (that, and the native bfloat16 forward on
    CPUs with avx512_bf16) or "avx2" (e.g. to compare with AVX-512). Read once, when
    the extension is loaded, as oneDNN reads ``ONEDNN_MAX_CPU_ISA``; afterwards
    :func:`xclip_kernels.backends.cpp.set_cpu_isa` changes it.
    """
    raw = os.environ.get("XCLIP_KERNELS_CPU_ISA", "")
    value = raw.strip().lower()
    if not value:
        return None
    if value not in CPU_ISAS:
        raise ValueError(f"XCLIP_KERNELS_CPU_ISA: expected one of {', '.join(CPU_ISAS)} (or unset), got {raw!r}")
    return value
