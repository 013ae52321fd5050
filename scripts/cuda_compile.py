"""Compile every CUDA source with nvcc, without a GPU (``make cuda-compile``).

Sources, nvcc flags, GPU architectures and the C++ standard come from csrc/build_flags.json,
as for setup.py and CMakeLists.txt; a .cu file under csrc/ that the JSON does not list is an
error (it would never be built). Each source is compiled twice: as C++17 (the JSON's standard,
what torch 2.11 on the GPU machines builds extensions with) for every architecture, and in the
standard the installed torch's ``cpp_extension`` passes (C++20 from torch 2.13, what setup.py
builds here) for the first architecture only (the standard changes the front end, not the
code of each architecture). Each object's kernels are then listed: an fp64 instantiation is an
error (the registry never runs fp64 on CUDA). Object files go to a temporary folder and are
thrown away: this only proves that the CUDA sources compile against the installed torch
headers, so CUDA code that does not build cannot land. Exits non-zero, naming the file, on
the first failure.
"""

from __future__ import annotations

import glob
import inspect
import json
import os
import re
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


def torch_cxx_standard(default: int) -> int:
    """The C++ standard the installed torch's ``cpp_extension`` compiles extensions with (it has
    no API for it: its source passes one literal ``-std=c++NN``); ``default`` if that cannot be
    read."""
    found = set(re.findall(r"-std=c\+\+(\d+)", inspect.getsource(cpp_extension)))
    return int(found.pop()) if len(found) == 1 else default


def fp64_kernels(nm_output: str) -> list[str]:
    """The ``__global__`` instantiations for double in ``nm -C`` output of a CUDA object: every
    kernel here is a template whose first argument is the scalar type, named ``*_kernel<...>``."""
    return sorted({m.group(0) for m in re.finditer(r"\w+_kernel<double\b[^>]*>", nm_output)})


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
        *build["nvcc_flags"]["value"], "-Xcompiler", "-fPIC", "-DXCLIP_WITH_CUDA",
        "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__",
        *(arg for path in system_includes for arg in ("-isystem", path)),
        f"-I{os.path.join(root, 'csrc')}", f"-I{cuda_include}",
    ]
    gencode = {arch: f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs}
    # (standard, architectures): the JSON's for every architecture, torch's for the first.
    builds = [(standard, archs)]
    installed = torch_cxx_standard(standard)
    if installed != standard:
        builds.append((installed, archs[:1]))
    nm = shutil.which("nm")
    with tempfile.TemporaryDirectory() as out:
        # A CPU build of torch ships c10/cuda headers without the generated
        # c10/cuda/impl/cuda_cmake_macros.h they include; CUDA builds have it. Stand in for it.
        if not any(os.path.isfile(os.path.join(p, "c10", "cuda", "impl", "cuda_cmake_macros.h")) for p in system_includes):
            stub = os.path.join(out, "stub", "c10", "cuda", "impl")
            os.makedirs(stub)
            with open(os.path.join(stub, "cuda_cmake_macros.h"), "w", encoding="utf-8") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            flags.append(f"-I{os.path.join(out, 'stub')}")
        for std, build_archs in builds:
            targets = ", ".join(f"sm_{arch}" for arch in build_archs)
            for source in sources:
                target = os.path.join(out, f"{os.path.basename(source)}.c++{std}.o")
                print(f"nvcc {os.path.relpath(source, root)} (C++{std}; {targets})", flush=True)
                command = [nvcc, f"-std=c++{std}", *flags, *(gencode[arch] for arch in build_archs), "-c", source,
                           "-o", target]
                result = subprocess.run(command)
                if result.returncode != 0:
                    print(f"cuda-compile: {os.path.relpath(source, root)} failed as C++{std}", file=sys.stderr)
                    return result.returncode
                if nm is not None:
                    symbols = subprocess.run([nm, "-C", target], capture_output=True, text=True, check=True).stdout
                    doubles = fp64_kernels(symbols)
                    if doubles:
                        print(f"cuda-compile: {os.path.relpath(source, root)} instantiates fp64 kernels, which the "
                              f"registry never runs on CUDA: {', '.join(doubles)}", file=sys.stderr)
                        return 1
        # The C++ sources with a CUDA-only part (the CUDA registrations of the binding) compile
        # only in a CUDA build: check that part too, with the host compiler nvcc would use.
        cxx_with_cuda = [path for path in build["cpu_sources"]["value"] if "XCLIP_WITH_CUDA" in _text(root, path)]
        cxx = os.environ.get("CXX") or shutil.which("c++") or "g++"
        for std, _ in builds:
            cxx_flags = [*build["cxx_flags"]["value"], *build["openmp_flags"]["value"], f"-std=c++{std}", "-Werror",
                         *(flag for flag in flags if flag.startswith(("-D", "-I"))),
                         *(arg for path in system_includes for arg in ("-isystem", path))]
            for path in cxx_with_cuda:
                print(f"{os.path.basename(cxx)} -DXCLIP_WITH_CUDA {path} (C++{std}, syntax only)", flush=True)
                result = subprocess.run([cxx, *cxx_flags, "-fsyntax-only", os.path.join(root, path)])
                if result.returncode != 0:
                    print(f"cuda-compile: {path} failed with XCLIP_WITH_CUDA as C++{std}", file=sys.stderr)
                    return result.returncode
    compiled = "; ".join(f"C++{std} for {', '.join(f'sm_{arch}' for arch in build_archs)}"
                         for std, build_archs in builds)
    print(f"cuda-compile: {len(sources)} CUDA file(s) compiled ({compiled}), no fp64 kernels"
          f"{'' if nm else ' (not checked: no nm)'}; {len(cxx_with_cuda)} C++ file(s) checked with XCLIP_WITH_CUDA")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
