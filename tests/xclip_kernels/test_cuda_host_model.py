"""The CUDA host model itself (csrc/cuda/host_model/simt.h and warp_mma.cuh's host side): a tiny
tensor-core kernel against float64, the fragment layouts against the PTX ISA's tables, the 16-bit
conversions against torch's, and the kernel bugs the model must report.

Entry points: csrc/cuda/host_model/selftest_model.cpp.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_host_model import HostModelError, call, host_model

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
         ctypes.c_int(a.shape[0]), a_in, b_in, c.contiguous(), d)
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


# ---- bugs the model must report (bug_kernel in selftest_model.cpp; two warps of 32) -------------

BUGS = [
    pytest.param(1, r"warp 0: lanes wait at different warp collectives: lanes 0-15 wait at shfl_xor \(.*selftest_model"
                    r"\.cpp:\d+\); lanes 16-31 wait at sync_warp", id="divergent-collectives"),
    pytest.param(2, r"warp 0: lanes wait at different warp collectives: lanes 0-15 wait at ldmatrix_x4 \(.*:(\d+)\); "
                    r"lanes 16-31 wait at ldmatrix_x4 \(.*:(?!\1)\d+\)", id="divergent-call-sites"),
    pytest.param(3, r"warp 0: a warp collective not reached by every lane: lanes 0-15 wait at shfl_xor .*; "
                    r"lanes 16-31 have exited", id="lanes-exited"),
    pytest.param(4, r"sync_block at .* not reached by every thread: threads 0-4, 6-63 wait, threads 5 have exited",
                 id="barrier-skipped"),
    pytest.param(5, r"warp 0: a warp collective not reached by every lane: lanes 0-2, 4-31 wait at sync_warp .*; "
                    r"lanes 3 wait at sync_block", id="barrier-vs-warp"),
    pytest.param(6, r"ldmatrix_x4 at .*lane 5 of warp 0\): row address \(shared offset 168\) is not 16-byte aligned",
                 id="ldmatrix-misaligned"),
    pytest.param(7, r"ldmatrix_x4 at .*lane 7 of warp 0\): row address is outside the block's 1024 bytes",
                 id="ldmatrix-outside"),
    pytest.param(8, r"thread 9: cp_async_16 at .*: shared destination offset 8 is not 16-byte aligned",
                 id="cp-async-dst-misaligned"),
    pytest.param(9, r"thread 9: cp_async_16 at .*: shared destination is outside the block's 1024 bytes",
                 id="cp-async-dst-outside"),
    pytest.param(10, r"thread 9: cp_async_16 at .*: global source address is not 16-byte aligned",
                 id="cp-async-src-misaligned"),
    pytest.param(11, r"thread 9: cp_async_16 at .*: global source is outside every buffer given to "
                     r"xk_sim::register_global", id="cp-async-src-unregistered"),
    pytest.param(12, r"ldmatrix_x4 at .*lane 0 of warp 0\): reads shared offset 0 while a cp_async_16 into it "
                     r"\(thread 0\) is still in flight", id="read-before-wait"),
    pytest.param(13, r"ldmatrix_x4 at .*: reads shared offset 0 while a cp_async_16 into it \(thread 0\) is still in "
                     r"flight", id="wait-without-commit"),
    pytest.param(14, r"ldmatrix_x4 at .*selftest_model\.cpp:\d+ \(block \(0, 0, 0\), lane 0 of warp 0\): reads shared "
                     r"offset 512 while a cp_async_16 into it \(thread 0\) is still in flight", id="newer-group-pending"),
    pytest.param(15, r"ldmatrix_x4 at .*lane 0 of warp 1\): reads shared offset 0, which thread 0's cp_async_16 landed "
                     r"at its cp_async_wait with no sync_block since", id="wait-after-barrier"),
    pytest.param(16, r"warp 1: sync_warp at .* needs 32 lanes, the warp has 16", id="partial-warp"),
    pytest.param(17, r"200000 bytes of dynamic shared memory, sm_80 allows 166912", id="shared-too-large"),
]


def _run_bug(which: int) -> torch.Tensor:
    lib = host_model(ENTRY)
    g = torch.arange(1024, dtype=torch.int16)
    out = torch.zeros(64, 4, dtype=torch.int32)
    call(lib, "xk_selftest_bug", ctypes.c_int(which), g, out)
    return out


@pytest.mark.parametrize(("which", "message"), BUGS)
def test_kernel_bug_is_reported(which: int, message: str) -> None:
    """Each bug kernel gets an error naming the instruction, the place and the lanes, and the
    process lives on (the next launch on this thread works)."""
    with pytest.raises(HostModelError, match=message):
        _run_bug(which)
    out = _run_bug(0)
    # The same kernel without the bug: lane 0 holds tile 0's elements (0, 1) of row 0.
    assert out[0, 0].item() == 0 | (1 << 16)


def test_cp_async_lands_at_its_wait() -> None:
    """A plain load of a cp_async_16 destination sees 0xFFFF (NaN in fp16/bf16) until the wait that
    covers the copy's group, the data after it; full=false writes zeros."""
    lib = host_model(ENTRY)
    g = torch.arange(256, dtype=torch.int16)
    out = torch.zeros(32, 4, dtype=torch.int16)
    call(lib, "xk_selftest_cp_async_visibility", g, out)
    lanes = torch.arange(32, dtype=torch.int16)
    expected = torch.stack([torch.full_like(lanes, -1), torch.full_like(lanes, -1), lanes * 8, torch.zeros_like(lanes)], 1)
    assert torch.equal(out, expected)


def test_shfl_xor_exchanges_within_each_warp() -> None:
    """Lane l of each warp gets the value of lane l ^ mask of the same warp (its own past lane 31)."""
    lib = host_model(ENTRY)
    values = torch.arange(64, dtype=torch.float32) * 1.5
    masks = torch.randint(0, 40, (64,), dtype=torch.int32)
    out = torch.full((64,), float("nan"))
    call(lib, "xk_selftest_shfl", ctypes.c_int(64), values, masks, out)
    for t in range(64):
        source = (t % 32) ^ int(masks[t])
        assert out[t].item() == (values[t - t % 32 + source] if source < 32 else values[t]).item(), t


def test_thread_and_block_coordinates_and_order() -> None:
    """threadIdx/blockIdx/blockDim/gridDim of a 3-d launch, and the deterministic order: blocks
    x-fastest, threads of a block in linear order (x fastest) between collectives."""
    lib = host_model(ENTRY)
    grid, block = (3, 2, 2), (8, 2, 3)
    threads, blocks = 8 * 2 * 3, 3 * 2 * 2
    out = torch.zeros(blocks, threads, 13, dtype=torch.int32)
    call(lib, "xk_selftest_indices", torch.tensor(grid, dtype=torch.int32),
         torch.tensor(block, dtype=torch.int32), out)
    for b in range(blocks):
        bx, by, bz = b % 3, (b // 3) % 2, b // 6
        for t in range(threads):
            tx, ty, tz = t % 8, (t // 8) % 2, t // 16
            assert out[b, t].tolist() == [tx, ty, tz, bx, by, bz, *block, *grid, b * threads + t], (b, t)
