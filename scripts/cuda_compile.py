"""Compile every ``csrc/**/*.cu`` with nvcc for sm_80 and sm_90a, without a GPU (``make cuda-compile``).

Object files go to a temporary folder and are thrown away: this only proves that the CUDA
sources compile against the installed torch headers, so CUDA code that does not build
cannot land. Exits non-zero, naming the file, on the first failure.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile

import torch
from torch.utils import cpp_extension


def nvcc_path() -> str:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate):
            return candidate
    sys.exit("cuda-compile: nvcc not found (set NVCC or put it on PATH)")


def main() -> int:
    nvcc = nvcc_path()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sources = sorted(glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True))
    if not sources:
        sys.exit("cuda-compile: no .cu files under csrc/")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"], os.path.join(root, "csrc")]
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [
        "-std=c++20", "-O3", "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC", "-DXCLIP_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a",
        *(f"-I{path}" for path in [*includes, cuda_include]),
    ]
    with tempfile.TemporaryDirectory() as out:
        # A CPU build of torch ships c10/cuda headers without the generated
        # c10/cuda/impl/cuda_cmake_macros.h they include; CUDA builds have it. Stand in for it.
        if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in includes):
            stub = os.path.join(out, "stub", "c10", "cuda", "impl")
            os.makedirs(stub)
            with open(os.path.join(stub, "cuda_cmake_macros.h"), "w", encoding="utf-8") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            flags.append(f"-I{os.path.join(out, 'stub')}")
        for source in sources:
            target = os.path.join(out, os.path.basename(source) + ".o")
            print(f"nvcc {os.path.relpath(source, root)} (sm_80, sm_90a)", flush=True)
            result = subprocess.run([nvcc, *flags, "-c", source, "-o", target])
            if result.returncode != 0:
                print(f"cuda-compile: {os.path.relpath(source, root)} failed", file=sys.stderr)
                return result.returncode
    print(f"cuda-compile: {len(sources)} file(s) compiled for sm_80 and sm_90a")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
