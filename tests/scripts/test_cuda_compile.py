"""The pure parts of ``scripts/cuda_compile.py`` (``make cuda-compile`` itself runs nvcc in CI)."""

from __future__ import annotations

import importlib.util
import os

import pytest

_PATH = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "cuda_compile.py")


@pytest.fixture(scope="module")
def cuda_compile():  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("cuda_compile", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ``nm -C`` of an nvcc object (nvcc 13.0) instantiating a templated kernel for double and float.
NM_WITH_FP64 = """\
00000000000001f1 t __device_stub__ZN9xclip_ext36_GLOBAL__N__9dd3d30d_4_k_cu_0c6faf7e14cfa_fwd_kernelIddLi32EEEvPKT_PS2_T0_(double const*, double*, double)
00000000000003ec t __device_stub__ZN9xclip_ext36_GLOBAL__N__9dd3d30d_4_k_cu_0c6faf7e14cfa_fwd_kernelIffLi64EEEvPKT_PS2_T0_(float const*, float*, float)
00000000000006dd t void xclip_ext::(anonymous namespace)::cfa_fwd_kernel<double, double, 32>(double const*, double*, double)
000000000000070c t void xclip_ext::(anonymous namespace)::cfa_fwd_kernel<float, float, 64>(float const*, float*, float)
00000000000003b0 t void xclip_ext::(anonymous namespace)::__wrapper__device_stub_cfa_fwd_kernel<double, double, 32>(double const*&, double*&, double&)
00000000000005ab t void xclip_ext::(anonymous namespace)::__wrapper__device_stub_cfa_fwd_kernel<float, float, 64>(float const*&, float*&, float&)
0000000000000100 t void xclip_ext::(anonymous namespace)::ifa_fwd_kernel<c10::BFloat16, float, 64, 64, 64>(float, double)
"""


def test_fp64_kernels_are_found(cuda_compile):
    assert cuda_compile.fp64_kernels(NM_WITH_FP64) == [
        "__wrapper__device_stub_cfa_fwd_kernel<double, double, 32>",
        "cfa_fwd_kernel<double, double, 32>",
    ]


def test_fp32_fp16_bf16_kernels_pass(cuda_compile):
    lines = [line for line in NM_WITH_FP64.splitlines() if "double, double" not in line]
    assert cuda_compile.fp64_kernels("\n".join(lines)) == []


def test_the_installed_torch_standard_is_read(cuda_compile):
    import torch

    standard = cuda_compile.torch_cxx_standard(default=-1)
    assert standard in (17, 20, 23), standard
    major, minor = (int(x) for x in torch.__version__.split(".")[:2])
    if (major, minor) >= (2, 13):
        assert standard == 20  # torch 2.13 moved extensions to C++20
