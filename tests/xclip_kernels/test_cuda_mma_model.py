"""The CUDA backend's tensor-core IFA forward (csrc/cuda/ifa_mma_forward.cuh), its own source run
on the CPU through the host model (csrc/cuda/host_model/ifa_forward_model.cpp, docs/cuda.md):
fp16 and bf16 against the float64 reference on the same rounded inputs under the 2x rule, on
small odd shapes with tails in every tile dimension, both staging paths, NaN inputs, guard
regions and bitwise repeats.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from cuda_host_model import HostModelError, call, host_model, load_gpu_static
from xk_helpers import FRAME_NON_FINITE, assert_within_low_precision_rule, frame_inputs

from xclip_kernels.backends import reference

ENTRY = "ifa_forward_model.cpp"
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
GUARD = 8  # elements before and after each output; 8 keeps a 16-byte aligned buffer's output aligned
OUT_SENTINEL = 0x5A5A  # 16-bit pattern the guards of out start with (and must keep)
LSE_SENTINEL = -12345.0


def _strides(t: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_int64 * t.dim())(*t.stride())


def _address(t: torch.Tensor) -> ctypes.c_void_p:
    """The data pointer of a CPU view (any strides; the entry takes them separately)."""
    assert t.device.type == "cpu" and t.stride(-1) == 1, (t.device, t.stride())
    return ctypes.c_void_p(t.data_ptr())


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor, msg_v: torch.Tensor,
             scale: float, out_offset: int = GUARD) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """The kernel's (out, lse, (vec_in, vec_out)) for 16-bit views q, k, v (F, N, H, D) and msg_k,
    msg_v (F, H, D). out is written at ``out_offset`` elements into a buffer whose other elements
    (at least GUARD after it) must stay untouched; lse likewise with GUARD floats each side."""
    lib = host_model(ENTRY)
    frames, tokens, heads, dim = q.shape
    size = frames * tokens * heads * dim
    out_buf = torch.full((out_offset + size + GUARD,), OUT_SENTINEL, dtype=torch.int16)
    lse_buf = torch.full((2 * GUARD + frames * heads * tokens,), LSE_SENTINEL, dtype=torch.float32)
    staging = (ctypes.c_int * 2)(-1, -1)
    call(lib, "xk_ifa_forward", ctypes.c_int(q.dtype == torch.bfloat16), ctypes.c_int(frames), ctypes.c_int(tokens),
         ctypes.c_int(heads), ctypes.c_int(dim), ctypes.c_double(scale),
         *(arg for t in (q, k, v, msg_k, msg_v) for arg in (_address(t.view(torch.int16)), _strides(t))),
         ctypes.c_void_p(out_buf.data_ptr() + 2 * out_offset), ctypes.c_void_p(lse_buf.data_ptr() + 4 * GUARD), staging)
    assert (out_buf[:out_offset] == OUT_SENTINEL).all() and (out_buf[out_offset + size:] == OUT_SENTINEL).all(), (
        "out: the kernel wrote outside (F, N, H, D)")
    assert (lse_buf[:GUARD] == LSE_SENTINEL).all() and (lse_buf[GUARD + frames * heads * tokens:] == LSE_SENTINEL).all(), (
        "lse: the kernel wrote outside (F, H, N)")
    out = out_buf[out_offset:out_offset + size].view(q.dtype).reshape(frames, tokens, heads, dim)
    lse = lse_buf[GUARD:GUARD + frames * heads * tokens].reshape(frames, heads, tokens)
    return out, lse, (staging[0], staging[1])


def _lse_truth(q: torch.Tensor, k: torch.Tensor, msg_k: torch.Tensor, scale: float) -> torch.Tensor:
    """float64 log-sum-exp (F, H, N) of the scores over the N keys and the message key."""
    keys = torch.cat([k, msg_k.unsqueeze(1)], dim=1).double()
    return (torch.einsum("fnhd,fmhd->fhnm", q.double(), keys) * scale).logsumexp(-1)


def _inputs(frames: int, tokens: int, heads: int, dim: int, dtype: torch.dtype, layout: str,
            seed: int = 0) -> list[torch.Tensor]:
    """q, k, v (F, N, H, D) and msg_k, msg_v (F, H, D) at ``dtype``: ``layout`` "contiguous", or
    "qkv": q, k, v views of one (F, N, 3, H, D) tensor, as the model passes them."""
    q, k, v, msg_k, msg_v = frame_inputs(frames, tokens, heads, dim, dtype, seed=seed)
    if layout == "qkv":
        q, k, v = torch.stack([q, k, v], dim=2).unbind(2)
    return [q, k, v, msg_k, msg_v]


# (F, N, H, D): N = 1, 17, 197 at D = 64 (query tiles of 64, key tiles of 32: 197 = 3 x 64 + 5
# = 6 x 32 + 5); D = 40 (8-aligned, zero-filled to DP = 64); D = 20 (not a multiple of 8:
# element-wise staging, DP = 32); D = 80 and 128 (DP = 96 and 128; N = 45 = 32 + 13, 40 = 32 + 8).
SHAPES = [
    pytest.param((2, 1, 2, 64), "qkv", id="N1-D64-qkv"),
    pytest.param((1, 17, 2, 64), "contiguous", id="N17-D64"),
    pytest.param((2, 197, 2, 64), "qkv", id="N197-D64-qkv"),
    pytest.param((1, 70, 2, 40), "qkv", id="N70-D40-qkv"),
    pytest.param((2, 33, 1, 20), "qkv", id="N33-D20-qkv"),
    pytest.param((1, 45, 2, 80), "contiguous", id="N45-D80"),
    pytest.param((1, 40, 1, 128), "qkv", id="N40-D128-qkv"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", SHAPES)
def test_forward_matches_float64_reference(shape: tuple[int, int, int, int], layout: str, dtype: torch.dtype) -> None:
    """out within 2x plain PyTorch's error at this dtype of the float64 reference on the same
    rounded inputs; lse (float32 math throughout) within float32's 1e-5; guards untouched; a
    second run bitwise identical; the staging path the one the strides and D call for."""
    q, k, v, msg_k, msg_v = inputs = _inputs(*shape, dtype, layout)
    scale = shape[-1] ** -0.5
    out, lse, staging = _forward(*inputs, scale)

    truth = reference.frame_attention(*(t.double() for t in inputs), scale)
    plain = reference.frame_attention(*inputs, scale)
    assert_within_low_precision_rule(out, plain, truth, "output", f"out {shape} {layout}")
    lse_truth = _lse_truth(q, k, msg_k, scale)
    lse_error = (lse.double() - lse_truth).abs().max().item()
    assert lse_error <= 1e-5 * max(1.0, lse_truth.abs().max().item()), f"lse: max |error| {lse_error:.3g}"

    vectorizable = shape[-1] % 8 == 0
    assert staging == (int(vectorizable), int(vectorizable)), staging
    again, lse_again, _ = _forward(*inputs, scale)
    assert torch.equal(out.view(torch.int16), again.view(torch.int16)) and torch.equal(lse, lse_again)


@pytest.mark.parametrize("dtype", DTYPES)
def test_element_wise_staging_gives_the_same_bits(dtype: torch.dtype) -> None:
    """Inputs and an output that are not 16-byte aligned take the element-wise paths, which must
    fill shared memory and write out exactly as the 16-byte copies do."""
    shape = (1, 70, 2, 64)
    inputs = _inputs(*shape, dtype, "qkv", seed=3)
    scale = 0.125
    out, lse, staging = _forward(*inputs, scale)
    assert staging == (1, 1)
    # The same values one element into a larger buffer: 2-byte aligned rows.
    shifted = torch.empty(inputs[0].shape[0], 70 * 3 * 2 * 64 + 1, dtype=dtype)
    q, k, v = shifted[:, 1:].view(1, 70, 3, 2, 64).unbind(2)
    q.copy_(inputs[0]), k.copy_(inputs[1]), v.copy_(inputs[2])
    out_plain, lse_plain, staging = _forward(q, k, v, *inputs[3:], scale, out_offset=GUARD + 1)
    assert staging == (0, 0)
    assert torch.equal(out.view(torch.int16), out_plain.view(torch.int16)) and torch.equal(lse, lse_plain)


NAN_CASES = [case for case in FRAME_NON_FINITE if case.id.startswith("nan-")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, change", NAN_CASES)
def test_nan_inputs_come_out_where_the_reference_has_them(case: str, change, dtype: torch.dtype) -> None:
    """A NaN in any input makes NaN exactly where the float64 reference on the same values has
    them (out and lse); every other element stays within the 2x rule."""
    shape = (2, 17, 3, 8)
    inputs = _inputs(*shape, dtype, "qkv", seed=14)
    change(inputs)
    scale = 0.35
    out, lse, _ = _forward(*inputs, scale)
    truth = reference.frame_attention(*(t.double() for t in inputs), scale)
    lse_truth = _lse_truth(inputs[0], inputs[1], inputs[3], scale)
    assert torch.isnan(truth).any(), f"{case}: the case must make NaN"
    assert torch.equal(torch.isnan(out), torch.isnan(truth)), f"{case}: out NaN at other places than the reference"
    assert torch.equal(torch.isnan(lse), torch.isnan(lse_truth)), f"{case}: lse NaN at other places"
    finite = ~torch.isnan(truth)
    plain = reference.frame_attention(*inputs, scale)
    assert_within_low_precision_rule(out[finite], plain[finite], truth[finite], "output", f"{case}: finite out")



@pytest.mark.parametrize("dim", [20, 64, 80, 128])
def test_gpu_static_mirrors_the_kernels_tiles(dim: int) -> None:
    """scripts/gpu_static.py's copy of FwdTiles (tiles and shared bytes, for its table and the
    GPU-time model) equals the header's, as the launcher uses it."""
    tiles = (ctypes.c_long * 4)()
    call(host_model(ENTRY), "xk_ifa_forward_tiles", ctypes.c_int(dim), tiles)
    dp, block_m, block_n, shared = tiles
    gs = load_gpu_static()
    assert gs.cuda_tiles("ifa_mma_fwd_kernel", [dp]) == (block_m, block_n)
    for dtype in ("float16", "bfloat16"):
        assert gs.cuda_shared_bytes("ifa_mma_fwd_kernel", dtype, [dp]) == shared


def test_entry_rejects_a_head_dim_over_128() -> None:
    inputs = _inputs(1, 3, 1, 8, torch.float16, "contiguous")
    inputs[:3] = [torch.zeros(1, 3, 1, 136, dtype=torch.float16)] * 3
    inputs[3:] = [torch.zeros(1, 1, 136, dtype=torch.float16)] * 2
    with pytest.raises(HostModelError, match=r"head dim D must be in \[1, 128\], got 136"):
        _forward(*inputs, 0.1)
