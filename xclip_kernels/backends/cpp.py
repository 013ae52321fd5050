"""Backend ``cpp``: the CPU kernels of the compiled extension (``csrc/cpu``, registered under the
CPU dispatch key of ``torch.ops.xclip_ext``; loaded and completed by :mod:`._extension`).

float32 IFA with a head dim that is a multiple of 16 (every X-CLIP variant) runs forward and
backward on register-tiled kernels built for AVX-512 and AVX2 in one library (x86-64 builds;
the widest the CPU has is chosen at run time, :func:`set_cpu_isa` changes it), and so do the
message path's projections, forward and backward. float64, other head dims and builds for
other CPUs take a BLAS path.

bfloat16 is stored as bf16 and computed in float32 (accumulation, softmax, lse): IFA forward
and backward widen each frame-head into float32 buffers for the float32 tiles (the convert
path). A native forward on ``vdpbf16ps`` (CPUs with ``avx512_bf16``, head dims that are
multiples of 32) is opt-in, ``set_cpu_isa("avx512_bf16")``: on the Xeon it was measured on it
is slower than the convert path (``BENCHMARKS.md``); :func:`bf16_path` says which runs. Other
head dims and builds without the tiles widen whole tensors to float32 for the BLAS path. The
message path widens its activations and vectors to float32, while its projection weights stay
bf16, read by the projection tiles and widened in registers (no float32 copy of a weight per
call; builds without the tiles, and shapes the tiles do not take, copy them). Outputs and
gradients are rounded to bf16 once. This declaration
loads nothing: the extension is loaded when availability is first asked.
"""

from __future__ import annotations

import torch

from . import _extension
from .base import OPS, Backend, functions_of


def set_cpu_isa(name: str) -> None:
    """What the tile kernels may use: "auto" (the widest vectors the CPU has, bfloat16 on the
    convert path; the default, ``XCLIP_KERNELS_CPU_ISA`` sets it when the extension is loaded),
    "avx512_bf16" (that, and the native bfloat16 forward where the CPU has ``avx512_bf16``) or
    "avx2". Applies to every thread from the next call on."""
    _extension.extension().set_cpu_isa(name)


def cpu_isa() -> str:
    """What the float32 tile kernels run on now: "avx512", "avx2", or "none" (a build without them)."""
    return _extension.extension().cpu_isa()


def bf16_path() -> str:
    """How the bfloat16 IFA forward runs now for head dims that are multiples of 32: "native"
    (``vdpbf16ps``), "convert" (float32 tiles on widened copies) or "float32 BLAS" (a build
    without the tiles)."""
    return _extension.extension().bf16_path()


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
        return ["built without the x86-64 register-tile kernels: every shape takes the BLAS path "
                "(bfloat16 widened to float32 first)"]
    notes = [f"float32 tile kernels run on {module.cpu_isa()} (XCLIP_KERNELS_CPU_ISA=avx2 forces AVX2)"]
    if module.bf16_path() == "native":
        notes.append("bfloat16 IFA forward runs natively on avx512_bf16 (vdpbf16ps, asked for by "
                     "XCLIP_KERNELS_CPU_ISA=avx512_bf16); its backward takes the convert path")
    elif module.cpu_has_native_bf16():
        notes.append("bfloat16 takes the convert path (float32 tiles on widened copies); this CPU has "
                     "avx512_bf16 for the native forward, opt-in: XCLIP_KERNELS_CPU_ISA=avx512_bf16")
    else:
        notes.append("bfloat16 takes the convert path (float32 tiles on widened copies); this CPU lacks "
                     "avx512_bf16 for the native forward")
    return notes


BACKEND = Backend(
    name="cpp",
    description="C++ CPU kernels from csrc/",
    ops=OPS,
    devices=("cpu",),
    dtypes=(torch.float32, torch.float64, torch.bfloat16),
    supports_backward=True,
    load=functions_of(_extension.__name__),
    availability=_availability,
    notes=_notes,
)
