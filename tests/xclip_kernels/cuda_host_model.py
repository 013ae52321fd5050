"""Builds and calls the CUDA host model: kernels written on ``csrc/cuda/warp_mma.cuh`` run on the
CPU through ``csrc/cuda/host_model/simt.h`` (docs/cuda.md, "The host model").

An entry source ``csrc/cuda/host_model/<name>.cpp`` includes the kernel header and defines
``extern "C"`` functions over raw pointers returning ``int`` (0 ok, else the message is
``xk_last_error()``). :func:`build` compiles it with ``g++`` into ``build/host-model/<sha>.so``,
the hash over the compiler command and every file under ``csrc/cuda``, so a rebuild happens
only when a source changed. :func:`host_model` is the tests' front door (skips without g++);
:func:`call` runs an entry point and raises :class:`HostModelError` with the model's message.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"
ENTRY_DIR = CUDA_DIR / "host_model"
BUILD_DIR = ROOT / "build" / "host-model"

# -O1: the model's fibers and rendezvous dominate the run time, not the arithmetic; higher levels
# only lengthen the compile. -Wno-unknown-pragmas: g++ does not know nvcc's `#pragma unroll`.
FLAGS = ("-DXK_HOST_MODEL", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas",
         "-shared", "-fPIC")


class HostModelUnavailable(RuntimeError):
    """No C++ compiler to build the host model with (tests skip with this reason)."""


class HostModelBuildError(RuntimeError):
    """The entry source did not compile (a test failure, never a skip)."""


class HostModelError(RuntimeError):
    """An entry point returned nonzero: the model detected a kernel bug or a bad launch."""


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise HostModelUnavailable("the CUDA host model needs g++ (or $CXX) on PATH, none found")
    return compiler


def _command(compiler: str, source: Path, output: Path, defines: tuple[str, ...]) -> list[str]:
    return [compiler, *FLAGS, *(f"-D{d}" for d in defines), "-I", str(CUDA_DIR), str(source), "-o", str(output)]


def _digest(command: list[str]) -> str:
    """SHA-256 over the compiler command (with placeholder paths) and every file under csrc/cuda."""
    sha = hashlib.sha256("\0".join(command).encode())
    for path in sorted(p for p in CUDA_DIR.rglob("*") if p.is_file()):
        sha.update(str(path.relative_to(CUDA_DIR)).encode() + b"\0")
        sha.update(path.read_bytes())
    return sha.hexdigest()[:24]


_FAILED: dict[Path, HostModelBuildError] = {}


@functools.lru_cache(maxsize=None)
def build(entry_source: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Compiles ``csrc/cuda/host_model/<entry_source>`` (one translation unit) and loads it.

    ``defines``: extra macros (``NAME`` or ``NAME=VALUE``), e.g. ``("XK_SIM_UCONTEXT",)`` for the
    portable fiber switch.

    Concurrent builds (two pytest processes) are safe: each compiles to its own temporary file
    and moves it into place atomically. Raises :class:`HostModelUnavailable` without g++ and
    :class:`HostModelBuildError` with the compiler's output when the source does not compile.
    """
    source = ENTRY_DIR / entry_source
    if source.parent != ENTRY_DIR or not source.is_file():
        raise ValueError(f"entry_source: expected a file name under {ENTRY_DIR}, got {entry_source!r}")
    if not isinstance(defines, tuple) or not all(isinstance(d, str) and d and " " not in d for d in defines):
        raise ValueError(f"defines: expected a tuple of macro names (NAME or NAME=VALUE), got {defines!r}")
    compiler = _compiler()
    library = BUILD_DIR / f"{_digest(_command(compiler, Path(entry_source), Path('out.so'), defines))}.so"
    if library in _FAILED:
        raise _FAILED[library]
    if not library.exists():
        BUILD_DIR.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(suffix=".so", dir=BUILD_DIR)
        os.close(handle)
        try:
            result = subprocess.run(_command(compiler, source, Path(temporary), defines), capture_output=True, text=True)
            if result.returncode != 0:
                # Kept, so that the other tests of this source fail at once instead of recompiling.
                _FAILED[library] = HostModelBuildError(f"g++ failed on {source.relative_to(ROOT)}:\n{result.stderr}")
            else:
                os.replace(temporary, library)
        finally:
            if os.path.exists(temporary):
                os.unlink(temporary)
        if library in _FAILED:
            raise _FAILED[library]
    lib = ctypes.CDLL(str(library))
    lib.xk_last_error.restype = ctypes.c_char_p
    lib.xk_last_error.argtypes = []
    return lib


def host_model(entry_source: str, defines: tuple[str, ...] = ()) -> ctypes.CDLL:
    """:func:`build`, skipping the calling test when no compiler is available."""
    try:
        return build(entry_source, defines)
    except HostModelUnavailable as error:
        pytest.skip(str(error))


def ptr(tensor: torch.Tensor) -> ctypes.c_void_p:
    """The data pointer of a contiguous CPU tensor, for an entry point's pointer argument (the
    caller keeps the tensor alive; :func:`call` does this for tensors passed to it directly)."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError(f"tensor: expected a contiguous CPU tensor, got device {tensor.device}, "
                         f"contiguous={tensor.is_contiguous()}")
    return ctypes.c_void_p(tensor.data_ptr())


def call(lib: ctypes.CDLL, name: str, *args: Any) -> None:
    """Runs entry point ``name``; raises :class:`HostModelError` with the model's message on failure.

    Tensor arguments (contiguous, CPU) go as their data pointers, held alive for the call; other
    arguments are passed as given (``ctypes.c_int`` / ``ctypes.c_long`` as the entry declares).
    """
    function = getattr(lib, name)
    function.restype = ctypes.c_int
    status = function(*(ptr(a) if isinstance(a, torch.Tensor) else a for a in args))
    if status != 0:
        raise HostModelError(f"{name}: {lib.xk_last_error().decode(errors='replace')}")


def load_gpu_static() -> Any:
    """scripts/gpu_static.py as a module (not a package): the host-model tests check its mirror
    of the kernels' tiles and shared memory against the headers."""
    spec = importlib.util.spec_from_file_location("gpu_static_for_host_model", ROOT / "scripts" / "gpu_static.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module
