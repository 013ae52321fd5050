"""The CUDA backend's tensor-core IFA backward (csrc/cuda/ifa_mma_backward.cuh), run on the CPU
through the host model (csrc/cuda/host_model/ifa_backward_model.cpp, docs/cuda.md): the kernels'
own source, with the launcher's grid, shared memory and staging choice, against the float64
reference's autograd gradients on the same rounded inputs (the 3x rule of docs/testing.md).

lse and the forward output O come from the float64 reference, delta = rowsum(dO * O) in float32
exactly as the launcher computes it, and the per-query-tile partials of d msg_k / d msg_v are
summed over tiles as the launcher does. O enters delta two ways:

- in float32 (the reference's O, only rounded to float32): the kernels' own arithmetic against
  the truth, at every shape, N = 1 included;
- in the test dtype, as a 16-bit forward hands it to the launcher: the backward as it runs, at
  N >= 17. At N = 1 or 2 the rounding of O alone can put d msg_k, dq or dk past 3x plain
  PyTorch's error (delta = dO.O then carries an error of about 2^-9 |dO| |O| that the small
  difference dO.msg_v - delta does not absorb; plain PyTorch's softmax backward forms that
  difference from its own probabilities). The Triton backward and the fp32-FMA CUDA kernels
  compute delta the same way.
"""

from __future__ import annotations

import ctypes

import pytest
import torch

from cuda_host_model import HostModelError, call, host_model, load_gpu_static, ptr
from xclip_kernels.backends import reference
from xk_helpers import assert_within_low_precision_rule, frame_inputs, nan_padded, output_and_grads

ENTRY = "ifa_backward_model.cpp"
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]
GRAD_NAMES = ("dq", "dk", "dv", "dmsg_k", "dmsg_v")
GUARD = 64  # elements of untouched buffer on each side of every output


def _rows_ptr(t: torch.Tensor) -> ctypes.c_void_p:
    """Data pointer of a (F, N, H, D) view whose last dim is contiguous (any other strides)."""
    assert t.dim() == 4 and t.stride(-1) == 1, f"expected a (F, N, H, D) view with unit last stride, got {t.stride()}"
    return ctypes.c_void_p(t.data_ptr())


def _vecs_ptr(t: torch.Tensor) -> ctypes.c_void_p:
    assert t.dim() == 3 and t.stride(-1) == 1, f"expected a (F, H, D) view with unit last stride, got {t.stride()}"
    return ctypes.c_void_p(t.data_ptr())


def _strides(tensors: list[torch.Tensor], dims: int) -> torch.Tensor:
    return torch.tensor([s for t in tensors for s in t.stride()[:dims]], dtype=torch.int64)


def _guarded(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A buffer of numel + 2 GUARD elements filled with a sentinel bit pattern, and its middle."""
    buffer = torch.full((numel + 2 * GUARD,), 0x5A5A, dtype=torch.int32).to(torch.int16)
    if dtype == torch.float32:
        buffer = torch.full((numel + 2 * GUARD,), 0x5A5A5A5A, dtype=torch.int32)
    return buffer, buffer[GUARD : GUARD + numel]


def forward_stats(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor, msg_v: torch.Tensor,
                  scale: float, out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """What the forward hands the backward, from the float64 reference on these (rounded) values:
    O ``(F, N, H, D)`` rounded to ``out_dtype`` and lse ``(F, H, N)`` float32 (natural log)."""
    q64, k64, msg_k64 = q.double(), k.double(), msg_k.double()
    out = reference.frame_attention(q64, k64, v.double(), msg_k64, msg_v.double(), scale=scale)
    scores = torch.einsum("fnhd,fmhd->fhnm", q64, torch.cat([k64, msg_k64.unsqueeze(1)], dim=1)) * scale
    return out.to(out_dtype), torch.logsumexp(scores, dim=-1).float()


def model_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor, msg_v: torch.Tensor,
                   dout: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float
                   ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The host model's backward: q, k, v, dout ``(F, N, H, D)`` (fp16/bf16 views, last dim
    contiguous), msg_k, msg_v ``(F, H, D)``, out ``(F, N, H, D)`` (any float dtype: only its
    float32 value enters delta) and lse ``(F, H, N)`` float32.

    Returns (dq, dk, dv, d msg_k, d msg_v) in q's dtype, reduced as the launcher reduces them, and
    the raw guarded buffers (dq, dk, dv, dmk_part, dmv_part) with GUARD sentinels on each side."""
    lib = host_model(ENTRY)
    frames, tokens, heads, head_dim = q.shape
    dtype = q.dtype
    # delta_i = sum_d dO_id O_id in float32, (F, H, N): the launcher's own expression.
    delta = (dout.float() * out.float()).sum(-1).transpose(1, 2).contiguous()
    tiles = lib.xk_ifa_backward_q_tiles(ctypes.c_int(tokens))
    numel = frames * tokens * heads * head_dim
    parts = frames * heads * tiles * head_dim
    buffers = [_guarded(numel, dtype) for _ in range(3)] + [_guarded(parts, torch.float32) for _ in range(2)]
    rows_strides = _strides([q, k, v, dout], 3)
    vecs_strides = _strides([msg_k, msg_v], 2)
    call(lib, "xk_ifa_backward", ctypes.c_int(dtype == torch.bfloat16), ctypes.c_int(frames), ctypes.c_int(tokens),
         ctypes.c_int(heads), ctypes.c_int(head_dim), ctypes.c_double(scale), _rows_ptr(q), _rows_ptr(k),
         _rows_ptr(v), _rows_ptr(dout), ptr(rows_strides), _vecs_ptr(msg_k), _vecs_ptr(msg_v), ptr(vecs_strides),
         ptr(lse), ptr(delta), *(ptr(middle) for _, middle in buffers))
    shape = (frames, tokens, heads, head_dim)
    dq, dk, dv = (middle.view(dtype).view(shape) for _, middle in buffers[:3])
    dmk_part, dmv_part = (middle.view(torch.float32).view(frames, heads, tiles, head_dim) for _, middle in buffers[3:])
    # The launcher's deterministic reduction: a torch sum over the tiles, then the input dtype.
    grads = (dq, dk, dv, dmk_part.sum(2).to(dtype), dmv_part.sum(2).to(dtype))
    return grads, tuple(buffer for buffer, _ in buffers)


def _inputs(shape: tuple[int, int, int, int], dtype: torch.dtype, packed: bool, seed: int = 0
            ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """q, k, v, msg_k, msg_v rounded to dtype (q, k, v as views of one (F, N, 3, H, D) tensor when
    packed, the layout the model passes), and the upstream gradient dO rounded to dtype."""
    frames, tokens, heads, head_dim = shape
    q, k, v, msg_k, msg_v = frame_inputs(frames, tokens, heads, head_dim, dtype, seed)
    if packed:
        qkv = torch.stack([q, k, v], dim=2)  # (F, N, 3, H, D)
        q, k, v = qkv.unbind(2)
    gen = torch.Generator().manual_seed(seed + 1)
    dout = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return [q, k, v, msg_k, msg_v], dout


def _truth_and_plain(inputs: list[torch.Tensor], dout: torch.Tensor, scale: float
                     ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    """The float64 reference's gradients on the rounded inputs, and plain PyTorch's at their dtype."""
    leaves64 = [t.detach().double().requires_grad_(True) for t in inputs]
    _, truth = output_and_grads(reference.frame_attention, leaves64, dout.double(), scale=scale)
    leaves_low = [t.detach().clone().requires_grad_(True) for t in inputs]
    _, plain = output_and_grads(reference.frame_attention, leaves_low, dout, scale=scale)
    return truth, plain


def _run(inputs: list[torch.Tensor], dout: torch.Tensor, scale: float, out_dtype: torch.dtype
         ) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
    out, lse = forward_stats(*inputs, scale, out_dtype)
    return model_backward(*inputs, dout, out, lse, scale)


# (F, N, H, D), packed: N = 1, 17 and 197 at D = 64 (197 = 3 x 64 + 5: ragged key and query tiles
# in both kernels; 17 = one warp's 16 rows + 1); D = 40 (DP 64, zero columns inside a 16-byte
# chunk, cp.async path), D = 20 (DP 32, D % 8 != 0: the plain-load staging path), D = 80 (DP 96)
# and D = 128 (the 16-query dK/dV tile). q, k, v are views of one (F, N, 3, H, D) tensor
# ("qkv_view", the model's layout) at N = 17, N = 197 and D = 20.
CASES = [
    pytest.param((2, 1, 1, 64), False, id="N1"),
    pytest.param((1, 17, 2, 64), False, id="N17"),
    pytest.param((1, 17, 2, 64), True, id="N17-qkv_view"),
    pytest.param((1, 197, 2, 64), False, id="N197"),
    pytest.param((1, 197, 2, 64), True, id="N197-qkv_view"),
    pytest.param((2, 37, 1, 40), False, id="D40"),
    pytest.param((1, 23, 2, 20), False, id="D20"),
    pytest.param((1, 23, 2, 20), True, id="D20-qkv_view"),
    pytest.param((1, 45, 2, 80), False, id="D80"),
    pytest.param((2, 33, 1, 128), False, id="D128"),
]


@pytest.mark.parametrize(("shape", "packed"), CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_match_float64_reference(dtype: torch.dtype, shape: tuple[int, int, int, int], packed: bool) -> None:
    """All five gradients within 3x plain PyTorch's error against the float64 truth, O in float32."""
    _check_gradients(dtype, shape, packed, torch.float32)


@pytest.mark.parametrize(("shape", "packed"), [c for c in CASES if c.values[0][1] >= 17])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_with_16_bit_output(dtype: torch.dtype, shape: tuple[int, int, int, int], packed: bool) -> None:
    """The same with O in the test dtype, as the launcher gets it from a 16-bit forward (N >= 17)."""
    _check_gradients(dtype, shape, packed, dtype)


def _check_gradients(dtype: torch.dtype, shape: tuple[int, int, int, int], packed: bool,
                     out_dtype: torch.dtype) -> None:
    scale = shape[3] ** -0.5 * 1.3  # not the default: the scale is used, not assumed
    inputs, dout = _inputs(shape, dtype, packed)
    grads, _ = _run(inputs, dout, scale, out_dtype)
    truth, plain = _truth_and_plain(inputs, dout, scale)
    for name, ours, want, base in zip(GRAD_NAMES, grads, truth, plain):
        assert_within_low_precision_rule(ours, base, want, "gradient", f"{name} {tuple(shape)} {dtype}, O {out_dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_guards_untouched_and_repeats_bitwise_identical(dtype: torch.dtype) -> None:
    """Nothing is written outside the outputs; two runs give the same bits; rows past N in NaN-padded
    inputs are never read (the same bits as unpadded inputs)."""
    shape = (1, 70, 2, 64)  # two dK/dV key tiles and two dQ query tiles, both ragged
    inputs, dout = _inputs(shape, dtype, packed=True)
    scale = 0.125
    out, lse = forward_stats(*inputs, scale, dtype)
    first, buffers = model_backward(*inputs, dout, out, lse, scale)
    sentinel = {torch.int16: 0x5A5A, torch.int32: 0x5A5A5A5A}
    for name, buffer in zip(("dq", "dk", "dv", "dmk_part", "dmv_part"), buffers):
        for side in (buffer[:GUARD], buffer[-GUARD:]):
            assert (side == sentinel[buffer.dtype]).all(), f"{name}: a guard element was overwritten"
    second, _ = model_backward(*inputs, dout, out, lse, scale)
    for name, a, b in zip(GRAD_NAMES, first, second):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name}: repeat differs"
    q, k, v, dout_padded = nan_padded([*inputs[:3], dout], pad=5)
    padded, _ = model_backward(q, k, v, *inputs[3:], dout_padded, out, lse, scale)
    for name, a, b in zip(GRAD_NAMES, first, padded):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name}: NaN rows past N changed the result"


@pytest.mark.parametrize("where", ["q", "k", "v", "msg_k", "msg_v", "dout"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_propagates_like_the_reference(dtype: torch.dtype, where: str) -> None:
    """A NaN in one element of one input gives NaN in exactly the gradient elements where the float64
    reference has them (the forward statistics come from the reference on the same values), and the
    finite rest within the 3x rule."""
    shape = (1, 17, 2, 64)
    inputs, dout = _inputs(shape, dtype, packed=False)
    index = {"q": (0, 3, 1, 5), "k": (0, 9, 1, 5), "v": (0, 9, 1, 5), "msg_k": (0, 1, 5), "msg_v": (0, 1, 5),
             "dout": (0, 3, 1, 5)}[where]
    target = dout if where == "dout" else inputs[["q", "k", "v", "msg_k", "msg_v"].index(where)]
    target[index] = float("nan")
    scale = 0.125
    grads, _ = _run(inputs, dout, scale, torch.float32)
    truth, plain = _truth_and_plain(inputs, dout, scale)
    for name, ours, want, base in zip(GRAD_NAMES, grads, truth, plain):
        nan_ours, nan_want = torch.isnan(ours), torch.isnan(want)
        assert nan_want.any() or name in ("dv", "dmsg_v"), f"{name}: the case must put NaN somewhere"
        assert torch.equal(nan_ours, nan_want), (
            f"{name}: NaN at {int(nan_ours.sum())} elements, the reference at {int(nan_want.sum())}")
        finite = ~nan_want
        assert torch.equal(finite, ~torch.isnan(base)), f"{name}: plain PyTorch's NaN differ from the truth's"
        if finite.any():
            assert_within_low_precision_rule(ours[finite], base[finite], want[finite], "gradient", f"{name} ({where})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_staging_path_choice(dtype: torch.dtype) -> None:
    """16-byte cp.async staging only where every row is 16-byte aligned whole chunks (as the
    launcher decides); the plain-load path elsewhere gives the same bits."""
    lib = host_model(ENTRY)
    shape = (1, 19, 2, 64)
    inputs, dout = _inputs(shape, dtype, packed=False)

    def vec(tensors: list[torch.Tensor], head_dim: int) -> int:
        strides = _strides(tensors, 3)  # alive across the call
        return lib.xk_ifa_backward_vec_staging(*(_rows_ptr(t) for t in tensors), ptr(strides), ctypes.c_int(head_dim))

    rows = [*inputs[:3], dout]
    assert vec(rows, 64) == 1
    assert vec(rows, 60) == 0  # D % 8 != 0
    # The same values one element off 16-byte alignment: the plain path, bit-identical results.
    shifted = []
    for t in rows:
        buffer = torch.empty(t.numel() + 1, dtype=dtype)[1:].view(t.shape)
        buffer.copy_(t)
        shifted.append(buffer)
    assert vec(shifted, 64) == 0
    scale = 0.125
    out, lse = forward_stats(*inputs, scale, dtype)
    aligned, _ = model_backward(*inputs, dout, out, lse, scale)
    plain, _ = model_backward(*shifted[:3], *inputs[3:], shifted[3], out, lse, scale)
    for name, a, b in zip(GRAD_NAMES, aligned, plain):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"{name}: the staging paths differ"


def test_bad_arguments_are_errors() -> None:
    """The entry refuses impossible sizes with a message (no launch)."""
    lib = host_model(ENTRY)
    empty = torch.zeros(16, dtype=torch.int64)
    null = ctypes.c_void_p(0)
    with pytest.raises(HostModelError, match="D must be in"):
        call(lib, "xk_ifa_backward", ctypes.c_int(0), ctypes.c_int(1), ctypes.c_int(1), ctypes.c_int(1),
             ctypes.c_int(129), ctypes.c_double(1.0), null, null, null, null, ptr(empty), null, null, ptr(empty),
             null, null, null, null, null, null, null)


@pytest.mark.parametrize("dp", [32, 64, 96, 128])
def test_tiles_and_shared_memory(dp: int) -> None:
    """The kernels' tiles and shared memory (BwdTiles) as docs/cuda.md states them: dK/dV keeps 64
    keys and 2 x (K, V) + 2 buffers x (Q, dO) rows of DP + 8 16-bit elements plus lse and delta
    (2 buffers of floats); dQ keeps 64 queries, Q and dO, 2 buffers x (K, V), msg_k / msg_v (DP
    floats each) and p / dS of the message column (64 floats each); all within sm_80's 163 KB."""
    lib = host_model(ENTRY)
    out = torch.zeros(6, dtype=torch.int32)
    call(lib, "xk_ifa_backward_layout", ctypes.c_int(dp), out)
    dkdv_queries, dkdv_keys, dkdv_bytes, dq_queries, dq_keys, dq_bytes = out.tolist()
    row = (dp + 8) * 2
    assert (dkdv_queries, dkdv_keys) == ({32: 64, 64: 64, 96: 32, 128: 16}[dp], 64)
    assert dkdv_bytes == (2 * dkdv_keys + 4 * dkdv_queries) * row + 4 * dkdv_queries * 4
    assert (dq_queries, dq_keys) == (64, 64 if dp <= 64 else 32)
    assert dq_bytes == (2 * dq_queries + 4 * dq_keys) * row + 2 * dp * 4 + 2 * dq_queries * 4
    assert max(dkdv_bytes, dq_bytes) <= 163 * 1024
    with pytest.raises(HostModelError, match="dp must be"):
        call(lib, "xk_ifa_backward_layout", ctypes.c_int(48), out)



@pytest.mark.parametrize("dp", [32, 64, 96, 128])
def test_gpu_static_mirrors_the_kernels_tiles(dp: int) -> None:
    """scripts/gpu_static.py's copy of BwdTiles (tiles and shared bytes, for its table and the
    GPU-time model) equals the header's, as the launcher uses it."""
    out = torch.zeros(6, dtype=torch.int32)
    call(host_model(ENTRY), "xk_ifa_backward_layout", ctypes.c_int(dp), out)
    dkdv_queries, dkdv_keys, dkdv_bytes, dq_queries, dq_keys, dq_bytes = out.tolist()
    gs = load_gpu_static()
    assert gs.cuda_tiles("ifa_mma_bwd_dkdv_kernel", [dp]) == (dkdv_queries, dkdv_keys)
    assert gs.cuda_tiles("ifa_mma_bwd_dq_kernel", [dp]) == (dq_queries, dq_keys)
    for dtype in ("float16", "bfloat16"):
        assert gs.cuda_shared_bytes("ifa_mma_bwd_dkdv_kernel", dtype, [dp]) == dkdv_bytes
        assert gs.cuda_shared_bytes("ifa_mma_bwd_dq_kernel", dtype, [dp]) == dq_bytes
