"""Packaging for xclip-kernels: ``xclip_kernels`` and ``xclip``, plus the compiled ops.

The C++ CPU extension ``xclip_kernels._C`` is always built. CUDA sources join it when nvcc is
found (CUDA_HOME, or nvcc on PATH) and the installed torch is a CUDA build, or when
``XCLIP_FORCE_CUDA=1``; ``XCLIP_NO_EXTENSION=1`` skips the extension entirely, and
``XCLIP_CUDA_ARCHS`` (default "80;90a") picks the GPU architectures. Nothing here
downloads anything or looks at the hardware.
"""

import glob
import os

from setuptools import find_packages, setup


def _requirements() -> list[str]:
    with open("requirements.txt", encoding="utf-8") as f:
        lines = [line.strip() for line in f]
    runtime = ("torch", "numpy", "safetensors", "instant-clip-tokenizer")
    # Loose lower bounds for users; the exact pins are for our own venv (requirements.txt).
    return [line.replace("==", ">=") for line in lines if line.split("==")[0] in runtime]


# Vectorised inner loops (and libmvec's exp) need AVX2/FMA and -ffast-math; the kernels are
# written without infinities or NaN tests, so the fast-math assumptions hold. at::parallel_for
# is inlined as an OpenMP region: without -fopenmp it silently runs on one thread.
CXX_FLAGS = ["-O3", "-mavx2", "-mfma", "-ffast-math", "-fopenmp"]
# XCLIP_CUDA_ARCHS="90a" builds for one architecture only (the GPU check does, to save time).
CUDA_ARCHS = os.environ.get("XCLIP_CUDA_ARCHS", "80;90a").split(";")
NVCC_FLAGS = [
    "-O3", "--expt-relaxed-constexpr",
    *(f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in CUDA_ARCHS),
]


def _extensions() -> tuple[list, dict]:
    if os.environ.get("XCLIP_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = ["csrc/binding.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    with_cuda = os.environ.get("XCLIP_FORCE_CUDA") == "1" or (CUDA_HOME is not None and torch.version.cuda is not None)
    if with_cuda:
        extension = CUDAExtension(
            "xclip_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=[("XCLIP_WITH_CUDA", None), ("XCLIP_CPU_TILES", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            extra_link_args=["-fopenmp"],
        )
    else:
        extension = CppExtension(
            "xclip_kernels._C", sources, define_macros=[("XCLIP_CPU_TILES", None)],
            extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"]
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
