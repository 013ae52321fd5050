"""The CUDA host model itself (csrc/cuda/host_model/simt.h and warp_mma.cuh's host side): a tiny
tensor-core kernel against float64, the fragment layouts against the PTX ISA's tables, the 16-bit
conversions against torch's, and the kernel bugs the model must report.

Entry points: csrc/cuda/host_model/selftest_model.cpp.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_host_model import call, host_model, ptr

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
ENTRY = "selftest_model.cpp"


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The 16-bit tensor's storage as int16 (what the entry points take), contiguous."""
    return t.contiguous().view(torch.int16)


def _mma(dtype: torch.dtype, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, a_trans: bool,
         b_trans: bool) -> torch.Tensor:
    """The selftest kernel's D = A B + C for (batch, 16, 16) operands, staged as the flags say."""
    lib = host_model(ENTRY)
    a_in = _bits(a.transpose(1, 2) if a_trans else a)
    b_in = _bits(b if b_trans else b.transpose(1, 2))
    d = torch.full_like(c, float("nan"))
    call(lib, "xk_selftest_mma", ctypes.c_int(dtype == torch.bfloat16), ctypes.c_int(a_trans), ctypes.c_int(b_trans),
         ctypes.c_int(a.shape[0]), ptr(a_in), ptr(b_in), ptr(c.contiguous()), ptr(d))
    return d


@pytest.mark.parametrize("b_trans", [False, True], ids=["b", "b_trans"])
@pytest.mark.parametrize("a_trans", [False, True], ids=["a", "a_trans"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_mma_tile_matches_float64(dtype: torch.dtype, a_trans: bool, b_trans: bool) -> None:
    """cp_async_16 -> ldmatrix (.trans) -> mma over 3 blocks of 2 warps: float64 truth within the
    fp32 accumulation bound, and bit-exact with the documented order (c, then k = 0..15)."""
    batch = 3
    a = torch.randn(batch, 16, 16).to(dtype)
    b = torch.randn(batch, 16, 16).to(dtype)
    c = torch.randn(batch, 16, 16)
    d = _mma(dtype, a, b, c, a_trans, b_trans)

    truth = a.double() @ b.double() + c.double()
    # 16 fp32 additions of exact products: at most 16 u sum|terms| (u = 2^-24), plus change.
    bound = 17 * 2.0**-24 * (a.double().abs() @ b.double().abs() + c.double().abs())
    error = (d.double() - truth).abs()
    assert (error <= bound).all(), f"max error {error.max().item():.3g}, bound there {bound.flatten()[error.argmax()]:.3g}"

    expected = c.clone()
    for k in range(16):
        expected = expected + a[:, :, k : k + 1].float() * b[:, k : k + 1, :].float()
    assert torch.equal(d, expected)
