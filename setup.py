"""Packaging for xclip-kernels: ``xclip_kernels`` and ``xclip``, plus the compiled ops.

Install against the torch already in the environment, without pip's build isolation::

    pip install --no-build-isolation .

The C++ extension ``xclip_kernels._C`` is compiled against the installed torch (its C++ ABI
is that torch's, so the package's metadata pins ``torch==<that version>``), which an isolated
build environment does not have: there the build stops at once and names the command above.
torch is imported only when the extension is compiled, so metadata and the sdist need none.

The extension is built from csrc/build_flags.json (the sources and flags CMakeLists.txt and
scripts/cuda_compile.py read too). Build-time switches: ``XCLIP_CPU_TILES=0`` leaves out the
x86-64 register-tile kernels (the portable configuration, what other architectures always get:
every shape on the BLAS path); CUDA sources join when nvcc is found (CUDA_HOME, or nvcc on
PATH) and the installed torch is a CUDA build, or when ``XCLIP_FORCE_CUDA=1``;
``XCLIP_CUDA_ARCHS`` (default from the JSON, "80;90a") picks the GPU architectures;
``XCLIP_DEBUG_BUILD=1`` keeps debug information; ``XCLIP_NO_EXTENSION=1`` builds a pure-Python
package with no compiled ops (and a loose torch requirement). Nothing here downloads anything
or looks at the CPU's features.
"""

from __future__ import annotations

import glob
import importlib.metadata
import json
import os
import platform
import re
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import PlatformError

ROOT = os.path.dirname(os.path.abspath(__file__))
EXTENSION = "xclip_kernels._C"
WORKING_COMMAND = "pip install --no-build-isolation ."
NO_TORCH = f"""xclip-kernels compiles its C++ ops (xclip_kernels._C) against the PyTorch that will run
them, and this build environment has no torch: pip builds in a fresh, isolated environment
unless told not to. Install torch, then build in that environment with

    {WORKING_COMMAND}

(a wheel: pip wheel --no-build-isolation --no-deps . ; without the compiled ops:
XCLIP_NO_EXTENSION=1 {WORKING_COMMAND})"""


def _read(path: str) -> str:
    with open(os.path.join(ROOT, path), encoding="utf-8") as f:
        return f.read()


# ---- Requirements ---------------------------------------------------------------------------
# What each package pinned in requirements*.txt is to a user of the package; the versions come
# from those files (as lower bounds), so the metadata cannot drift from the pins. A pinned
# package missing here stops the build: say what it is first.
ROLES = {
    "torch": "runtime",
    "numpy": "runtime",
    "safetensors": "runtime",
    "instant-clip-tokenizer": "runtime",
    "tqdm": "runtime",
    "av": "video",  # xclip.video and `python -m xclip classify` decode with PyAV
    "triton": "triton",
    "pytest": "test",
    "transformers": "test",
    "pytest-benchmark": "development",  # benchmarks only
    "matplotlib": "development",
    # The CPU inference engines benchmarks.peers compares against (never a core dependency).
    "onnx": "peers",
    "onnxscript": "peers",
    "onnxruntime": "peers",
    "openvino": "peers",
}
REQUIREMENT_FILES = ("requirements.txt", "requirements-test.txt", "requirements-peers.txt")


def _pins() -> dict[str, str]:
    """name -> version of every ``name==version`` line of the requirement files."""
    pins = {}
    for path in REQUIREMENT_FILES:
        for line in _read(path).splitlines():
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):  # comments, `-r other.txt`
                continue
            match = re.fullmatch(r"([A-Za-z0-9._-]+)\s*==\s*(\S+)", line)
            if match is None:
                raise SystemExit(f"setup.py: {path}: expected `name==version`, got {line!r}")
            name, version = re.sub(r"[-_.]+", "-", match[1]).lower(), match[2]  # the registry's spelling
            if name not in ROLES:
                raise SystemExit(f"setup.py: {path} pins {name}, which ROLES in setup.py does not place "
                                 "(runtime, an extra, or development)")
            pins[name] = version
    return pins


def _installed_torch() -> str | None:
    """The version of the torch distribution installed here, read without importing torch."""
    try:
        return _public_version(importlib.metadata.version("torch"))
    except importlib.metadata.PackageNotFoundError:
        return None


def _torch_requirement(pins: dict[str, str], with_extension: bool) -> str:
    """torch==<the installed version> when the extension is compiled against it (an sdist
    compiles nothing and keeps the lower bound; so does an environment without torch, whose
    build stops at the compile step)."""
    installed = _installed_torch()
    if with_extension and installed is not None and "sdist" not in sys.argv[1:]:
        return f"torch=={installed}"
    return f"torch>={pins['torch']}"


def _public_version(version: str) -> str:
    """2.13.0+cu130 -> 2.13.0: the local tag names the build variant, and the pin must still match it."""
    return version.split("+", 1)[0]


def _requirements(with_extension: bool) -> tuple[list[str], dict[str, list[str]]]:
    pins = _pins()
    by_role: dict[str, list[str]] = {}
    for name, version in pins.items():
        requirement = _torch_requirement(pins, with_extension) if name == "torch" else f"{name}>={version}"
        by_role.setdefault(ROLES[name], []).append(requirement)
    extras = {
        "video": by_role.get("video", []),
        "triton": by_role.get("triton", []),
        # The suite's optional parts that run without a GPU: Hugging Face parity and video decoding.
        "test": by_role.get("test", []) + by_role.get("video", []),
        # ONNX Runtime and OpenVINO (and the ONNX exporter's packages) for benchmarks.peers.
        "peers": by_role.get("peers", []),
    }
    extras["all"] = extras["video"] + extras["triton"]
    return by_role.get("runtime", []), extras


# ---- The extension --------------------------------------------------------------------------
# Compiler flags, sources and GPU architectures: csrc/build_flags.json, shared with CMakeLists.txt
# and scripts/cuda_compile.py.
BUILD = json.loads(_read(os.path.join("csrc", "build_flags.json")))


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


def _torch_extension(torch, cpp_extension) -> Extension:  # noqa: ANN001
    """The extension as torch's build tools describe it (include paths, libraries), for the
    installed torch."""
    sources, cxx_flags, link_flags, defines = _compile_options()
    with_cuda = os.environ.get("XCLIP_FORCE_CUDA") == "1" or (
        cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None
    )
    if not with_cuda:
        return cpp_extension.CppExtension(
            EXTENSION, sources, define_macros=defines, extra_compile_args={"cxx": cxx_flags},
            extra_link_args=link_flags,
        )
    # XCLIP_CUDA_ARCHS="90a" builds for one architecture only (the GPU check does, to save time).
    archs = [a for a in os.environ.get("XCLIP_CUDA_ARCHS", "").split(";") if a] or _value("cuda_architectures")
    nvcc_flags = _value("nvcc_flags") + [f"-gencode=arch=compute_{arch},code=sm_{arch}" for arch in archs]
    return cpp_extension.CUDAExtension(
        EXTENSION,
        sources + _value("cuda_sources"),
        define_macros=[*defines, ("XCLIP_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
        extra_link_args=link_flags,
    )


class BuildAgainstInstalledTorch(build_ext):
    """build_ext that imports torch only when it compiles: the extension is described by torch's
    own build tools (torch.utils.cpp_extension) for the torch found then, or the build stops
    with the command that works. Every other step (metadata, sdist) runs without torch."""

    def run(self) -> None:
        if not self.extensions:
            return
        try:
            import torch
            from torch.utils import cpp_extension
        except ImportError as exc:
            raise PlatformError(NO_TORCH) from exc
        installed = _installed_torch()
        if installed is not None and installed != _public_version(torch.__version__):
            # The metadata would pin a torch other than the one compiled against.
            raise PlatformError(f"the torch imported ({torch.__version__}, {torch.__file__}) is not the torch "
                                f"distribution installed here ({installed}); build where they are the same")
        # Same list object as self.extensions: the outputs (wheel contents, in-place copies)
        # are then the compiled extension's.
        self.distribution.ext_modules[:] = [_torch_extension(torch, cpp_extension)]
        compiler = cpp_extension.BuildExtension(self.distribution)
        for option in ("inplace", "build_lib", "build_temp", "debug", "force", "parallel", "plat_name",
                       "editable_mode"):
            if hasattr(self, option):
                setattr(compiler, option, getattr(self, option))
        compiler.ensure_finalized()
        compiler.run()


def _extensions() -> list[Extension]:
    """Stands in for the extension until build_ext runs (sources listed, so sdists carry them
    and wheels are tagged for this platform)."""
    if os.environ.get("XCLIP_NO_EXTENSION") == "1":
        return []
    sources = _value("cpu_sources") + BUILD["x86_64"]["sources"] + _value("cuda_sources")
    host_model = BUILD["host_model_dir"]["value"] + "/"
    present = {os.path.relpath(path, ROOT) for pattern in ("*.cpp", "*.cu")
               for path in glob.glob(os.path.join(ROOT, "csrc", "**", pattern), recursive=True)}
    present = {path for path in present if not path.replace(os.sep, "/").startswith(host_model)}
    unlisted = sorted(present - set(sources))
    if unlisted:
        raise SystemExit(f"setup.py: {', '.join(unlisted)} not listed in csrc/build_flags.json (no build would compile it)")
    return [Extension(EXTENSION, sources)]


ext_modules = _extensions()
install_requires, extras_require = _requirements(with_extension=bool(ext_modules))

setup(
    name="xclip-kernels",
    version="0.1.0",
    description="Fused attention kernels and a drop-in model for X-CLIP video recognition",
    long_description=_read("README.md"),
    long_description_content_type="text/markdown",
    license_expression="MIT",
    license_files=["LICENSE"],
    packages=find_packages(include=["xclip_kernels", "xclip_kernels.*", "xclip", "xclip.*"]),
    python_requires=">=3.11",
    install_requires=install_requires,
    extras_require=extras_require,
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildAgainstInstalledTorch},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Programming Language :: C++",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
