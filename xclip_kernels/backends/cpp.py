"""Backend ``cpp``: the CPU kernels of the compiled extension (``csrc/cpu``, registered under the
CPU dispatch key of ``torch.ops.xclip_ext``; loaded and completed by :mod:`._extension`).

float32 IFA with a head dim that is a multiple of 16 (every X-CLIP variant) runs forward and
backward on register-tiled kernels built for AVX-512 and AVX2 in one library (x86-64 builds;
the widest the CPU has is chosen at run time, :func:`set_cpu_isa` changes it), and so do the
message path's projections, forward and backward. float64, other head dims and builds for
other CPUs take a BLAS path. This declaration loads nothing: the extension is loaded when
availability is first asked.
"""

from __future__ import annotations

import torch

from . import _extension
from .base import OPS, Backend, functions_of


def set_cpu_isa(name: str) -> None:
    """Run the tile kernels on ``name``: "avx2", or "auto" for the widest the CPU has (the
    default; ``XCLIP_KERNELS_CPU_ISA`` sets it when the extension is loaded). Applies to every
    thread from the next call on."""
    _extension.extension().set_cpu_isa(name)


def cpu_isa() -> str:
    """What the tile kernels run on now: "avx512", "avx2", or "none" (a build without them)."""
    return _extension.extension().cpu_isa()


def _availability() -> list[str]:
    error = _extension.load_error()
    if error is not None:
        return [error]
    module = _extension.extension()
    if module.has_cpu_tiles() and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return ["this CPU lacks AVX2, which this x86-64 build of the cpp kernels is compiled for"]
    if not module.has_blas():
        return ["this torch build exports no sgemm_/dgemm_ BLAS entry points for the cpp kernels"]
    return []


def _notes() -> list[str]:
    if _extension.load_error() is not None:
        return []
    module = _extension.extension()
    if not module.has_cpu_tiles():
        return ["built without the x86-64 register-tile kernels: every shape takes the BLAS path"]
    return [f"float32 tile kernels run on {module.cpu_isa()} (XCLIP_KERNELS_CPU_ISA=avx2 forces AVX2)"]


BACKEND = Backend(
    name="cpp",
    description="C++ CPU kernels from csrc/",
    ops=OPS,
    devices=("cpu",),
    dtypes=(torch.float32, torch.float64),
    supports_backward=True,
    load=functions_of(_extension.__name__),
    availability=_availability,
    notes=_notes,
)
