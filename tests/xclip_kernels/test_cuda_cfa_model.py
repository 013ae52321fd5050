"""The CUDA backend's tensor-core message-path kernel (csrc/cuda/cfa_mma.cuh), its own source run
on the CPU through the host model (csrc/cuda/host_model/cfa_forward_model.cpp, docs/cuda.md):
fp16 and bf16 against the float64 reference message path on the same rounded inputs under the
2x rule (``mixed``, and the op's output after the out-projection the launcher leaves to
cuBLAS), ``residual`` exactly, both weight staging paths, NaN inputs, guard regions and
bitwise repeats.
"""

from __future__ import annotations

import ctypes

import pytest
import torch
from cuda_host_model import HostModelError, call, host_model, load_gpu_static
from xk_helpers import MESSAGE_NON_FINITE, assert_within_low_precision_rule, message_inputs

from xclip_kernels.backends import reference

ENTRY = "cfa_forward_model.cpp"
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
GUARD = 8  # elements before and after each output
SENTINEL = 0x5A5A  # 16-bit pattern the guards start with (and must keep)
EPS = 1e-5


def _kernel(tensors: list[torch.Tensor], frames: int, heads: int,
            w_in: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The kernel's (mixed, residual, vec_w) for the seven message_attention tensors (16-bit,
    contiguous); ``w_in`` optionally replaces in_proj_weight by a view with the same values (to
    choose its alignment). mixed and residual are written into buffers whose GUARD elements on
    each side must stay untouched."""
    messages, ln_w, ln_b, in_w, in_b, _, out_b = tensors
    w_in = in_w if w_in is None else w_in
    rows, width = messages.shape
    size = rows * width
    bufs = [torch.full((size + 2 * GUARD,), SENTINEL, dtype=torch.int16) for _ in range(2)]
    staging = (ctypes.c_int * 1)(-1)

    def address(t: torch.Tensor) -> ctypes.c_void_p:
        assert t.is_contiguous() and t.device.type == "cpu"
        return ctypes.c_void_p(t.data_ptr())

    call(host_model(ENTRY), "xk_cfa_forward", ctypes.c_int(messages.dtype == torch.bfloat16),
         ctypes.c_int(rows // frames), ctypes.c_int(frames), ctypes.c_int(width), ctypes.c_int(heads),
         ctypes.c_double(EPS), *(address(t) for t in (messages, ln_w, ln_b, w_in, in_b, out_b)),
         *(ctypes.c_void_p(b.data_ptr() + 2 * GUARD) for b in bufs), staging)
    for name, buf in zip(("mixed", "residual"), bufs):
        assert (buf[:GUARD] == SENTINEL).all() and (buf[GUARD + size:] == SENTINEL).all(), (
            f"{name}: the kernel wrote outside (F, W)")
    mixed, residual = (b[GUARD:GUARD + size].view(messages.dtype).reshape(rows, width) for b in bufs)
    return mixed, residual, staging[0]


def _reference(tensors: list[torch.Tensor], frames: int, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed, output) of the reference message path at the tensors' dtype: mixed (F, W) the
    heads' attention before the out-projection, captured through the reference's hook."""
    captured = []

    def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        captured.append(reference.softmax_attention(q, k, v))
        return captured[-1]

    out = reference.message_attention(*tensors, frames, heads, EPS, attention=attention)
    mixed = captured[0].transpose(1, 2).reshape(out.shape)  # (b, H, T, D) -> (F, W)
    return mixed, out


def _op_output(mixed: torch.Tensor, residual: torch.Tensor, out_w: torch.Tensor) -> torch.Tensor:
    """at::addmm(residual, mixed, out_w^T) as cuBLAS does it at 16 bits: fp32 accumulation, one
    rounding."""
    return (residual.float() + mixed.float() @ out_w.float().t()).to(mixed.dtype)


# (b videos, T, W, H): T = 1, 8, 13, 64 (one to four m-tiles, ragged); W = 64 / H = 2 (hd 32 =
# DP, two k-chunks), W = 96 / H = 2 (hd 48 padded to DP 64, three chunks); W = 36 / H = 3 (W % 8
# != 0: element-wise weight staging, a ragged chunk); hd 80 and 128 (DP 96 / 128: q, k, v in
# three passes over W); the B/16 width W = 768 / H = 12 at T = 8.
SHAPES = [
    *(pytest.param((2, t, 64, 2), id=f"b2-T{t}-W64-H2") for t in (1, 8, 13, 64)),
    *(pytest.param((2, t, 96, 2), id=f"b2-T{t}-W96-H2") for t in (1, 8, 13, 64)),
    pytest.param((3, 13, 36, 3), id="b3-T13-W36-H3"),
    pytest.param((2, 13, 160, 2), id="b2-T13-W160-H2"),
    pytest.param((2, 8, 256, 2), id="b2-T8-W256-H2"),
    pytest.param((2, 8, 768, 12), id="b2-T8-W768-H12"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_reference(shape: tuple[int, int, int, int], dtype: torch.dtype) -> None:
    """mixed and the op's output within 2x plain PyTorch's error at this dtype of the float64
    reference on the same rounded inputs; residual = messages + out_proj_bias rounded once;
    guards untouched; a second run bitwise identical; the staging path W calls for."""
    videos, frames, width, heads = shape
    tensors = message_inputs(videos, frames, width, dtype, seed=width + frames)
    mixed, residual, vec_w = _kernel(tensors, frames, heads)

    truth_mixed, truth = _reference([t.double() for t in tensors], frames, heads)
    plain_mixed, plain = _reference(tensors, frames, heads)
    assert_within_low_precision_rule(mixed, plain_mixed, truth_mixed, "output", f"mixed {shape}")
    expected_residual = (tensors[0].float() + tensors[6].float()).to(dtype)
    assert torch.equal(residual.view(torch.int16), expected_residual.view(torch.int16)), "residual"
    assert_within_low_precision_rule(_op_output(mixed, residual, tensors[5]), plain, truth, "output",
                                     f"output {shape}")

    assert vec_w == int(width % 8 == 0), vec_w
    again, residual_again, _ = _kernel(tensors, frames, heads)
    assert torch.equal(mixed.view(torch.int16), again.view(torch.int16))
    assert torch.equal(residual.view(torch.int16), residual_again.view(torch.int16))


@pytest.mark.parametrize("dtype", DTYPES)
def test_element_wise_weight_staging_gives_the_same_bits(dtype: torch.dtype) -> None:
    """A weight that is not 16-byte aligned takes the element-wise staging path, which must fill
    shared memory exactly as the 16-byte copies do."""
    frames, heads = 8, 2
    tensors = message_inputs(2, frames, 96, dtype, seed=5)
    mixed, residual, vec_w = _kernel(tensors, frames, heads)
    assert vec_w == 1
    in_w = tensors[3]
    shifted = torch.empty(in_w.numel() + 1, dtype=dtype)[1:]  # 2 bytes past an aligned start
    shifted.copy_(in_w.reshape(-1))
    mixed_plain, residual_plain, vec_w = _kernel(tensors, frames, heads, w_in=shifted.view(in_w.shape))
    assert vec_w == 0
    assert torch.equal(mixed.view(torch.int16), mixed_plain.view(torch.int16))
    assert torch.equal(residual.view(torch.int16), residual_plain.view(torch.int16))


NAN_CASES = [case for case in MESSAGE_NON_FINITE if case.id.startswith("nan-")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case, change", NAN_CASES)
def test_nan_inputs_come_out_where_the_reference_has_them(case: str, change, dtype: torch.dtype) -> None:
    """A NaN in any input makes NaN in mixed and in the op's output exactly where the float64
    reference on the same values has them; every other element stays within the 2x rule."""
    videos, frames, width, heads = 2, 8, 64, 2
    tensors = message_inputs(videos, frames, width, dtype, seed=9)
    change(tensors)
    mixed, residual, _ = _kernel(tensors, frames, heads)
    output = _op_output(mixed, residual, tensors[5])
    truth_mixed, truth = _reference([t.double() for t in tensors], frames, heads)
    plain_mixed, plain = _reference(tensors, frames, heads)
    assert torch.isnan(truth).any(), f"{case}: the case must make NaN"
    assert torch.equal(torch.isnan(mixed), torch.isnan(truth_mixed)), f"{case}: mixed NaN at other places"
    assert torch.equal(torch.isnan(output), torch.isnan(truth)), f"{case}: output NaN at other places"
    finite = ~torch.isnan(truth_mixed)
    assert_within_low_precision_rule(mixed[finite], plain_mixed[finite], truth_mixed[finite], "output",
                                     f"{case}: finite mixed")



@pytest.mark.parametrize("head_dim", [20, 64, 80, 128])
@pytest.mark.parametrize("frames", [1, 8, 13, 64])
def test_gpu_static_mirrors_the_kernels_shared_memory(head_dim: int, frames: int) -> None:
    """scripts/gpu_static.py's copy of CfaTiles (shared bytes per T, for its table and the
    GPU-time model) equals the header's, as the launcher uses it."""
    tiles = (ctypes.c_long * 4)()
    call(host_model(ENTRY), "xk_cfa_forward_tiles", ctypes.c_int(head_dim), ctypes.c_int(frames), tiles)
    dp, chunk, passes, shared = tiles
    assert (chunk, passes) == (32, 3 if dp > 64 else 1)
    gs = load_gpu_static()
    assert gs.cuda_tiles("cfa_mma_fwd_kernel", [dp]) == (1, 1)
    for dtype in ("float16", "bfloat16"):
        assert gs.cuda_shared_bytes("cfa_mma_fwd_kernel", dtype, [dp], frames=frames) == shared
    assert shared <= 163 * 1024, "within sm_80's shared memory per block"


def test_entry_rejects_a_head_dim_over_128() -> None:
    tensors = message_inputs(1, 2, 272, torch.float16)
    with pytest.raises(HostModelError, match=r"head dim W / H must be in \[1, 128\], got 136"):
        _kernel(tensors, 2, 2)
