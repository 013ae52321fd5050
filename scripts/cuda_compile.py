"""Compile every CUDA source with nvcc, without a GPU (``make cuda-compile``).

Sources, nvcc flags, GPU architectures and the C++ standard come from csrc/build_flags.json,
as for setup.py and CMakeLists.txt; a .cu file under csrc/ that the JSON does not list is an
error (it would never be built). Object files go to a temporary folder and are thrown away:
this only proves that the CUDA sources compile against the installed torch headers, so CUDA
code that does not build cannot land. Exits non-zero, naming the file, on the first failure.
"""

from __future__ import annotations

import glob
import json
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


def _text(root: str, path: str) -> str:
    with open(os.path.join(root, path), encoding="utf-8") as f:
        return f.read()


def main() -> int:
    nvcc = nvcc_path()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "csrc", "build_flags.json"), encoding="utf-8") as f:
        build = json.load(f)
    sources = [os.path.join(root, path) for path in build["cuda_sources"]["value"]]
    unlisted = sorted(set(glob.glob(os.path.join(root, "csrc", "**", "*.cu"), recursive=True)) - set(sources))
    if unlisted:
        names = ", ".join(os.path.relpath(path, root) for path in unlisted)
        sys.exit(f"cuda-compile: {names} not in cuda_sources of csrc/build_flags.json (no build would compile it)")
    if not sources:
        sys.exit("cuda-compile: csrc/build_flags.json lists no CUDA sources")
    archs = build["cuda_architectures"]["value"]
    standard = build["cmake_cxx_standard"]["value"]
    # torch's and Python's headers as system headers, as CMake includes them: the checked
    # standard may be older than the one torch's own headers are written for (C++17 against
    # torch 2.13), whose warnings there are not ours to fix.
    system_includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    cuda_include = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    flags = [
        f"-std=c++{standard}", *build["nvcc_flags"]["value"], "-Xcompiler", "-fPIC", "-DXCLIP_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        *(f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs),
        *(arg for path in system_includes for arg in ("-isystem", path)),
        f"-I{os.path.join(root, 'csrc')}", f"-I{cuda_include}",
    ]
    targets = ", ".join(f"sm_{arch}" for arch in archs)
    with tempfile.TemporaryDirectory() as out:
        # A CPU build of torch ships c10/cuda headers without the generated
        # c10/cuda/impl/cuda_cmake_macros.h they include; CUDA builds have it. Stand in for it.
        if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in system_includes):
            stub = os.path.join(out, "stub", "c10", "cuda", "impl")
            os.makedirs(stub)
            with open(os.path.join(stub, "cuda_cmake_macros.h"), "w", encoding="utf-8") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            flags.append(f"-I{os.path.join(out, 'stub')}")
        for source in sources:
            target = os.path.join(out, os.path.basename(source) + ".o")
            print(f"nvcc {os.path.relpath(source, root)} (C++{standard}; {targets})", flush=True)
            result = subprocess.run([nvcc, *flags, "-c", source, "-o", target])
            if result.returncode != 0:
                print(f"cuda-compile: {os.path.relpath(source, root)} failed", file=sys.stderr)
                return result.returncode
        # The C++ sources with a CUDA-only part (the CUDA registrations of the binding) compile
        # only in a CUDA build: check that part too, with the host compiler nvcc would use.
        cxx_with_cuda = [path for path in build["cpu_sources"]["value"] if "XCLIP_WITH_CUDA" in _text(root, path)]
        cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
        cxx_flags = [*build["cxx_flags"]["value"], *build["openmp_flags"]["value"], f"-std=c++{standard}", "-Werror",
                     *(flag for flag in flags if flag.startswith(("-D", "-I"))),
                     *(arg for path in system_includes for arg in ("-isystem", path))]
        for path in cxx_with_cuda:
            print(f"{os.path.basename(cxx)} -DXCLIP_WITH_CUDA {path} (C++{standard}, syntax only)", flush=True)
            result = subprocess.run([cxx, *cxx_flags, "-fsyntax-only", os.path.join(root, path)])
            if result.returncode != 0:
                print(f"cuda-compile: {path} failed with XCLIP_WITH_CUDA", file=sys.stderr)
                return result.returncode
    print(f"cuda-compile: {len(sources)} CUDA file(s) compiled as C++{standard} for {targets}; "
          f"{len(cxx_with_cuda)} C++ file(s) checked with XCLIP_WITH_CUDA")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
