"""Packaging for xclip-kernels: ``xclip_kernels`` and ``xclip``, plus the compiled ops.

The C++ CPU extension ``xclip_kernels._C`` is always built, from csrc/build_flags.json (the
sources and flags CMakeLists.txt and scripts/cuda_compile.py read too). Build-time switches:
``XCLIP_CPU_TILES=0`` leaves out the x86-64 register-tile kernels (the portable configuration,
what other architectures always get: every shape on the BLAS path); CUDA sources join when
nvcc is found (CUDA_HOME, or nvcc on PATH) and the installed torch is a CUDA build, or when
``XCLIP_FORCE_CUDA=1``; ``XCLIP_CUDA_ARCHS`` (default from the JSON, "80;90a") picks the GPU
architectures; ``XCLIP_DEBUG_BUILD=1`` keeps debug information; ``XCLIP_NO_EXTENSION=1`` skips
the extension entirely. Nothing here downloads anything or looks at the CPU's features.
"""

import json
import os
import platform

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    with open("requirements.txt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    runtime = ("torch", "numpy", "safetensors", "instant-clip-tokenizer")
    # Loose lower bounds for users; the exact pins are for our own venv (requirements.txt).
    return [line.replace("==", ">=") for line in lines if line.split("==")[0] in runtime]


# Compiler flags, sources and GPU architectures: csrc/build_flags.json, shared with CMakeLists.txt
# and scripts/cuda_compile.py.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "build_flags.json"), encoding="utf-8") as f:
    BUILD = json.load(f)


def _value(key: str) -> list[str]:
    return list(BUILD[key]["value"])


def _cpu_tiles() -> bool:
    """The x86-64 register tiles (and AVX2/FMA code) where the build targets x86-64, unless
    XCLIP_CPU_TILES=0 asks for the portable configuration (the BLAS path for every shape)."""
    choice = os.environ.get("XCLIP_CPU_TILES", "").strip()
    if choice not in ("", "0", "1"):
        raise SystemExit(f"XCLIP_CPU_TILES: expected 0 or 1 (unset: on for x86-64), got {choice!r}")
    x86_64 = platform.machine().lower() in ("x86_64", "amd64")
    if choice == "1" and not x86_64:
        raise SystemExit(f"XCLIP_CPU_TILES=1: the tile kernels are x86-64 code, this machine is {platform.machine()}")
    return x86_64 and choice != "0"


def _compile_options() -> tuple[list[str], list[str], list[str], list[tuple[str, None]]]:
    """Sources, C++ flags, link flags and defines of the CPU part of the extension."""
    sources = _value("cpu_sources")
    cxx = _value("cxx_flags") + _value("openmp_flags")
    link = _value("openmp_flags")
    defines = []
    if _cpu_tiles():
        x86 = BUILD["x86_64"]
        sources += x86["sources"]
        cxx += x86["cxx_flags"]
        defines.append((x86["define"], None))
    if os.environ.get("XCLIP_DEBUG_BUILD") != "1":
        cxx += _value("release_cxx_flags")
        link += _value("release_link_flags")
    return sources, cxx, link, defines


def _extensions() -> tuple[list, dict]:
    if os.environ.get("XCLIP_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources, cxx_flags, link_flags, defines = _compile_options()
    with_cuda = os.environ.get("XCLIP_FORCE_CUDA") == "1" or (CUDA_HOME is not None and torch.version.cuda is not None)
    if with_cuda:
        # XCLIP_CUDA_ARCHS="90a" builds for one architecture only (the GPU check does, to save time).
        archs = os.environ.get("XCLIP_CUDA_ARCHS", "").split(";") if os.environ.get("XCLIP_CUDA_ARCHS") else _value(
            "cuda_architectures")
        nvcc_flags = _value("nvcc_flags") + [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
        extension = CUDAExtension(
            "xclip_kernels._C",
            sources + _value("cuda_sources"),
            define_macros=[*defines, ("XCLIP_WITH_CUDA", None)],
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "xclip_kernels._C", sources, define_macros=defines, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="xclip-kernels",
    version="0.1.0",
    description="Fused attention kernels and a drop-in model for X-CLIP video recognition",
    packages=find_packages(include=["xclip_kernels", "xclip_kernels.*", "xclip", "xclip.*"]),
    python_requires=">=3.10",
    install_requires=_requirements(),
    extras_require={"triton": ["triton"], "test": ["pytest", "transformers"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
