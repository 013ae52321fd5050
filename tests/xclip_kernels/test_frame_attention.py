"""``xclip_kernels.frame_attention`` (IFA): parity with the float64 reference, and behaviour."""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import xclip_kernels as xk
from xclip_kernels.backends import reference
from xclip_kernels.registry import OpInputs
from xk_helpers import (
    DTYPES,
    FRAME_NON_FINITE,
    assert_matches_truth,
    assert_same_non_finite,
    cpu_backends,
    automatic_cpu_backend,
    frame_inputs,
    leaves,
    output_and_grads,
    skip_unless_supported,
)

NAMES = ("q", "k", "v", "msg_k", "msg_v")

# (F, N, H, D). Every variant's token count (L = 50, 197, 257, 577), odd N, one head,
# one frame, a prime frame count, and head dims 32 / 64 / 80.
SHAPES = [
    pytest.param((2, 50, 12, 64), id="b32-F2-N50-H12-D64"),
    pytest.param((2, 197, 12, 64), id="b16-F2-N197-H12-D64"),
    pytest.param((2, 257, 16, 64), id="l14-F2-N257-H16-D64"),
    pytest.param((2, 577, 16, 64), id="l14_336-F2-N577-H16-D64"),
    pytest.param((3, 1, 12, 64), id="F3-N1-H12-D64"),
    pytest.param((3, 2, 12, 64), id="F3-N2-H12-D64"),
    pytest.param((3, 17, 12, 64), id="F3-N17-H12-D64"),
    pytest.param((3, 63, 12, 64), id="F3-N63-H12-D64"),
    pytest.param((3, 17, 1, 64), id="F3-N17-H1-D64"),
    pytest.param((1, 50, 12, 64), id="F1-N50-H12-D64"),
    pytest.param((7, 17, 4, 64), id="F7-N17-H4-D64"),
    pytest.param((3, 50, 4, 32), id="F3-N50-H4-D32"),
    pytest.param((3, 50, 4, 80), id="F3-N50-H4-D80"),
]

BACKENDS = cpu_backends("frame_attention")


def test_sdpa_is_among_the_cpu_parity_backends():
    # Guards the parametrisation below: the parity sweep must never become empty.
    assert "sdpa" in BACKENDS


def _skip_unsupported(backend: str, dtype: torch.dtype, head_dim: int, requires_grad: bool) -> None:
    skip_unless_supported(backend, OpInputs("frame_attention", "cpu", dtype, head_dim, requires_grad))


def _truth(inputs, upstream=None, scale=None):
    """Float64 reference output (and gradients when ``upstream`` is given) on the same values."""
    if upstream is None:
        with torch.no_grad():
            return reference.frame_attention(*(t.double() for t in inputs), scale), None
    return output_and_grads(reference.frame_attention, leaves(inputs, torch.float64), upstream.double(), scale=scale)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_reference(backend, dtype, shape):
    _skip_unsupported(backend, dtype, shape[-1], False)
    inputs = frame_inputs(*shape, dtype)
    out = xk.frame_attention(*inputs, backend=backend)
    truth, _ = _truth(inputs)
    assert_matches_truth(out, truth, dtype, "output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gradients_match_float64_reference(backend, dtype, shape):
    _skip_unsupported(backend, dtype, shape[-1], True)
    inputs = leaves(frame_inputs(*shape, dtype))
    upstream = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, grads = output_and_grads(xk.frame_attention, inputs, upstream, backend=backend)
    truth, truth_grads = _truth(inputs, upstream)
    assert_matches_truth(out, truth, dtype, "output")
    for name, grad, expected in zip(NAMES, grads, truth_grads):
        assert_matches_truth(grad, expected, dtype, f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [pytest.param((2, 50, 12, 64), id="F2-N50-H12-D64"), pytest.param((3, 17, 1, 80), id="F3-N17-H1-D80")])
def test_views_of_one_fused_qkv_tensor(backend, dtype, shape):
    """q, k, v as strided views of one ``(F, N, 3, H, D)`` matmul output, as the model passes them."""
    _skip_unsupported(backend, dtype, shape[-1], True)
    frames, tokens, heads, head_dim = shape
    gen = torch.Generator().manual_seed(2)
    qkv = torch.randn(frames, tokens, 3, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    msg_kv = torch.randn(frames, 2, heads, head_dim, generator=gen, dtype=torch.float64).to(dtype)
    upstream = torch.randn(shape, generator=gen, dtype=torch.float64)

    def attend(qkv, msg_kv, fn, **kwargs):
        q, k, v = qkv.unbind(2)
        msg_k, msg_v = msg_kv.unbind(1)
        return fn(q, k, v, msg_k, msg_v, **kwargs)

    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous() and not k.is_contiguous() and not v.is_contiguous()
    out, grads = output_and_grads(
        lambda a, b: attend(a, b, xk.frame_attention, backend=backend), leaves([qkv, msg_kv]), upstream
    )
    truth, truth_grads = output_and_grads(
        lambda a, b: attend(a, b, reference.frame_attention), leaves([qkv, msg_kv], torch.float64), upstream
    )
    assert_matches_truth(out, truth, dtype, "output")
    assert_matches_truth(grads[0], truth_grads[0], dtype, "grad of the fused qkv tensor")
    assert_matches_truth(grads[1], truth_grads[1], dtype, "grad of the fused message k/v tensor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [0.05, 0.3, 1, 2.5], ids=["0.05", "0.3", "int1", "2.5"])
def test_custom_scale(backend, dtype, scale):
    shape = (3, 17, 4, 64)
    _skip_unsupported(backend, dtype, shape[-1], True)
    inputs = leaves(frame_inputs(*shape, dtype, seed=3))
    upstream = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    out, grads = output_and_grads(xk.frame_attention, inputs, upstream, scale=scale, backend=backend)
    truth, truth_grads = _truth(inputs, upstream, scale=float(scale))
    assert_matches_truth(out, truth, dtype, f"output with scale={scale}")
    for name, grad, expected in zip(NAMES, grads, truth_grads):
        assert_matches_truth(grad, expected, dtype, f"grad of {name} with scale={scale}")
    # The scale must actually be used: the default (D ** -0.5 = 0.125) gives another answer.
    default = xk.frame_attention(*inputs, backend=backend).detach()
    assert (default - out).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_scale_is_inverse_sqrt_head_dim(backend):
    inputs = frame_inputs(2, 9, 3, 80, torch.float64, seed=5)
    out = xk.frame_attention(*inputs, backend=backend)
    explicit = reference.frame_attention(*inputs, 80**-0.5)
    torch.testing.assert_close(out, explicit, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    inputs = leaves(frame_inputs(2, 3, 2, 4, torch.float64, seed=6))
    assert torch.autograd.gradcheck(lambda *t: xk.frame_attention(*t, backend=backend), inputs)


@pytest.mark.parametrize("dtype", [*DTYPES, pytest.param(torch.bfloat16, id="bf16")])
def test_reference_backend_is_the_reference_function(dtype):
    inputs = frame_inputs(2, 17, 3, 32, dtype, seed=7)
    assert torch.equal(xk.frame_attention(*inputs, backend="reference"), reference.frame_attention(*inputs))
    assert torch.equal(
        xk.frame_attention(*inputs, scale=0.2, backend="reference"), reference.frame_attention(*inputs, 0.2)
    )


def test_automatic_choice_gives_the_first_available_backends_result_on_cpu():
    inputs = frame_inputs(2, 17, 3, 32, torch.float32, seed=8)
    assert torch.equal(xk.frame_attention(*inputs), xk.frame_attention(*inputs, backend=automatic_cpu_backend()))


# --------------------------------------------------------------------------- NaN and Inf

# Each path of the cpp kernels: the float32 tiles on the widest instruction set the CPU has
# (D = 64), the AVX2 tiles (D = 80 is not a multiple of the AVX-512 panel, so AVX2 runs it on
# every CPU), and the BLAS path (float32 with D = 24, and float64).
NON_FINITE_PATHS = [
    pytest.param(torch.float32, 64, id="fp32-D64"),
    pytest.param(torch.float32, 80, id="fp32-D80"),
    pytest.param(torch.float32, 24, id="fp32-D24"),
    pytest.param(torch.float64, 64, id="fp64-D64"),
]


# Where PyTorch's own scaled_dot_product_attention (CPU, this torch) departs from the
# reference: (case, dtype or None for every dtype) -> what it does. Strict: a torch that
# matches the reference makes these cases fail, so the list is kept true.
SDPA_DEPARTURES = {
    ("every-score-minus-inf", None): "sdpa gives 0, not NaN, for a query whose every score is -Inf",
    ("-inf-k", torch.float32): "sdpa's float32 backward gives finite dv rows where a NaN softmax row makes them NaN",
    ("qk-overflows-to-inf", torch.float32): "sdpa's float32 backward gives finite dv rows where a NaN softmax row "
                                            "makes them NaN",
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, head_dim", NON_FINITE_PATHS)
@pytest.mark.parametrize("case, change", FRAME_NON_FINITE)
def test_non_finite_inputs_come_out_as_the_references(request, backend, dtype, head_dim, case, change):
    """NaN and Inf in any input, and q.k overflowing, give NaN/Inf exactly where the reference
    at the same dtype does, in the output and in every gradient (no fast-math shortcut may hide them)."""
    shape = (2, 17, 3, head_dim)
    _skip_unsupported(backend, dtype, head_dim, True)
    departure = SDPA_DEPARTURES.get((case, None)) or SDPA_DEPARTURES.get((case, dtype))
    if backend == "sdpa" and departure:
        request.applymarker(pytest.mark.xfail(reason=departure, strict=True))
    inputs = frame_inputs(*shape, dtype, seed=14)
    change(inputs)
    upstream = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    out, grads = output_and_grads(xk.frame_attention, leaves(inputs), upstream, backend=backend)
    expected, expected_grads = output_and_grads(reference.frame_attention, leaves(inputs), upstream)
    assert_same_non_finite(out, expected, dtype, "output")
    for name, grad, want in zip(NAMES, grads, expected_grads):
        assert_same_non_finite(grad, want, dtype, f"grad of {name}")


# --------------------------------------------------------------------------- empty inputs, double backward

# F, N or H = 0, on the tile path's head dim (64) and the BLAS path's (24).
ZERO_SIZE = [pytest.param(s, id="F{}-N{}-H{}-D{}".format(*s))
             for s in [(0, 5, 2, 64), (2, 0, 2, 64), (2, 5, 0, 64), (0, 5, 2, 24), (2, 0, 2, 24), (2, 5, 0, 24)]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", ZERO_SIZE)
def test_zero_size_inputs_give_empty_outputs_and_the_references_gradients(backend, dtype, shape):
    _skip_unsupported(backend, dtype, shape[-1], True)
    inputs = leaves(frame_inputs(*shape, dtype))
    out = xk.frame_attention(*inputs, backend=backend)
    assert out.shape == shape and out.dtype == dtype
    # .sum() hands the backward an expanded (stride 0) empty gradient, as real graphs do.
    grads = torch.autograd.grad(out.sum(), inputs)
    expected = torch.autograd.grad(reference.frame_attention(*(ref := leaves(inputs))).sum(), ref)
    for name, grad, want in zip(NAMES, grads, expected):
        assert torch.equal(grad, want), f"grad of {name}: {grad}, the reference {want}"


# What a backend without a second derivative raises instead (PyTorch's own error).
NO_DOUBLE_BACKWARD = {"sdpa": r"derivative for aten::_scaled_dot_product_\w+_backward is not implemented"}


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_double_backward_is_exact_or_raises(backend):
    """gradgradcheck in float64; the fused backends (whose backward ops are not differentiable)
    compute a differentiable gradient under create_graph=True instead of a silently wrong one."""
    inputs = leaves(frame_inputs(2, 3, 2, 4, torch.float64, seed=16))

    def attend(*t):  # noqa: ANN002, ANN202
        return xk.frame_attention(*t, backend=backend)

    if backend in NO_DOUBLE_BACKWARD:
        with pytest.raises(RuntimeError, match=NO_DOUBLE_BACKWARD[backend]):
            torch.autograd.gradgradcheck(attend, inputs, fast_mode=True)
        return
    assert torch.autograd.gradgradcheck(attend, inputs, fast_mode=True)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b not in NO_DOUBLE_BACKWARD])
def test_second_derivatives_in_float32_match_float64_reference(backend):
    """The float32 tile path's shape (D = 64): gradients of a function of the gradients."""
    shape = (2, 17, 3, 64)
    inputs = leaves(frame_inputs(*shape, torch.float32, seed=17))
    gen = torch.Generator().manual_seed(18)
    upstream = torch.randn(shape, dtype=torch.float64, generator=gen)
    weights = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in inputs]

    def second(fn, tensors):  # noqa: ANN001, ANN202
        out = fn(*tensors)
        grads = torch.autograd.grad(out, tensors, upstream.to(out.dtype), create_graph=True)
        return torch.autograd.grad(sum((g * w.to(g.dtype)).sum() for g, w in zip(grads, weights)), tensors)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "an autograd kernel was not registered": never a silent zero
        ours = second(lambda *t: xk.frame_attention(*t, backend=backend), inputs)
    truth = second(reference.frame_attention, leaves(inputs, torch.float64))
    for name, got, want in zip(NAMES, ours, truth):
        assert_matches_truth(got, want, torch.float32, f"second derivative w.r.t. {name}")


# --------------------------------------------------------------------------- the math itself


def test_reference_matches_an_explicit_per_frame_per_head_loop():
    """Independent of einsum/cat: each (frame, head) is softmax(q [k; m_k]^T * s) [v; m_v]."""
    q, k, v, msg_k, msg_v = frame_inputs(3, 5, 2, 8, torch.float64, seed=9)
    scale = 0.37
    expected = torch.empty_like(q)
    for f in range(3):
        for h in range(2):
            keys = torch.cat([k[f, :, h], msg_k[f, h][None]])  # (N+1, D)
            values = torch.cat([v[f, :, h], msg_v[f, h][None]])
            weights = torch.softmax(q[f, :, h] @ keys.T * scale, dim=-1)  # (N, N+1)
            assert weights.shape == (5, 6)
            expected[f, :, h] = weights @ values
    torch.testing.assert_close(reference.frame_attention(q, k, v, msg_k, msg_v, scale), expected, atol=1e-12, rtol=1e-12)


def _attention_without_message(q, k, v, scale):
    scores = torch.einsum("fnhd,fmhd->fhnm", q.double(), k.double()) * scale
    return torch.einsum("fhnm,fmhd->fnhd", scores.softmax(-1), v.double())


def _aligned_inputs(sign: float):
    """Queries all pointing along one unit vector u per (frame, head); msg_k = sign * 1000 u."""
    frames, tokens, heads, head_dim = 2, 17, 3, 64
    gen = torch.Generator().manual_seed(10)
    u = torch.nn.functional.normalize(torch.randn(frames, heads, head_dim, generator=gen), dim=-1)
    q = u[:, None] * (1 + torch.rand(frames, tokens, heads, 1, generator=gen))
    k = 0.3 * torch.randn(frames, tokens, heads, head_dim, generator=gen)
    v = torch.randn(frames, tokens, heads, head_dim, generator=gen)
    msg_v = torch.randn(frames, heads, head_dim, generator=gen)
    return q, k, v, sign * 1000.0 * u, msg_v


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_dominant_message_key_returns_the_message_value(backend):
    q, k, v, msg_k, msg_v = _aligned_inputs(+1.0)
    out = xk.frame_attention(q, k, v, msg_k, msg_v, backend=backend)
    # Every query row of a frame is (to fp32 precision) that frame's message value.
    torch.testing.assert_close(out, msg_v[:, None].expand_as(out), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_suppressed_message_key_leaves_plain_frame_attention(backend):
    q, k, v, msg_k, msg_v = _aligned_inputs(-1.0)
    out = xk.frame_attention(q, k, v, msg_k, msg_v, backend=backend)
    expected = _attention_without_message(q, k, v, 64**-0.5)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_message_token_changes_the_output(backend):
    """An op that dropped the message key/value would match this no-message attention; it must not."""
    q, k, v, msg_k, msg_v = frame_inputs(2, 17, 3, 64, torch.float64, seed=11)
    out = xk.frame_attention(q, k, v, msg_k, msg_v, backend=backend)
    assert (out - _attention_without_message(q, k, v, 64**-0.5)).abs().max() > 1e-2
    # ... and the message value enters too, not only the key.
    other = xk.frame_attention(q, k, v, msg_k, msg_v + 1.0, backend=backend)
    assert (out - other).abs().max() > 1e-2


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_each_frame_sees_only_its_own_tokens_and_message(backend):
    q, k, v, msg_k, msg_v = frame_inputs(3, 9, 2, 32, torch.float64, seed=12)
    out = xk.frame_attention(q, k, v, msg_k, msg_v, backend=backend)
    k2, msg_v2 = k.clone(), msg_v.clone()
    k2[1] += 1.0
    msg_v2[1] += 1.0
    changed = xk.frame_attention(q, k2, v, msg_k, msg_v2, backend=backend)
    assert torch.equal(out[0], changed[0]) and torch.equal(out[2], changed[2])
    assert (out[1] - changed[1]).abs().max() > 1e-2


# --------------------------------------------------------------------------- bad input

F_, N_, H_, D_ = 2, 5, 3, 8


def _valid():
    return dict(zip(NAMES, frame_inputs(F_, N_, H_, D_, torch.float32, seed=13)))


BAD_INPUT = [
    # (id, replacements, exception, message pattern)
    ("q-rank3", {"q": torch.randn(F_, N_, H_ * D_)}, ValueError, r"^q: expected a 4-d tensor, got 3-d"),
    ("k-rank5", {"k": torch.randn(F_, N_, H_, D_, 1)}, ValueError, r"^k: expected a 4-d tensor"),
    ("v-rank2", {"v": torch.randn(F_ * N_, H_ * D_)}, ValueError, r"^v: expected a 4-d tensor"),
    ("k-tokens", {"k": torch.randn(F_, N_ + 1, H_, D_)}, ValueError, r"^k: expected shape .*\(2, 5, 3, 8\).*got \(2, 6, 3, 8\)"),
    ("v-heads", {"v": torch.randn(F_, N_, H_ + 1, D_)}, ValueError, r"^v: expected shape"),
    ("k-frames", {"k": torch.randn(F_ + 1, N_, H_, D_)}, ValueError, r"^k: expected shape"),
    ("msg_k-rank2", {"msg_k": torch.randn(F_, H_ * D_)}, ValueError, r"^msg_k: expected a 3-d tensor"),
    ("msg_k-rank4", {"msg_k": torch.randn(F_, 1, H_, D_)}, ValueError, r"^msg_k: expected a 3-d tensor"),
    ("msg_k-head_dim", {"msg_k": torch.randn(F_, H_, D_ + 1)}, ValueError, r"^msg_k: expected shape \(F, H, D\)"),
    ("msg_v-frames", {"msg_v": torch.randn(F_ + 1, H_, D_)}, ValueError, r"^msg_v: expected shape"),
    ("k-float64", {"k": torch.randn(F_, N_, H_, D_, dtype=torch.float64)}, ValueError, r"^k: expected dtype torch.float32"),
    ("msg_v-bfloat16", {"msg_v": torch.randn(F_, H_, D_, dtype=torch.bfloat16)}, ValueError, r"^msg_v: expected dtype"),
    ("v-meta-device", {"v": torch.randn(F_, N_, H_, D_, device="meta")}, ValueError, r"^v: expected device cpu"),
    ("q-list", {"q": [[1.0]]}, TypeError, r"^q: expected a torch.Tensor, got list"),
    ("msg_k-None", {"msg_k": None}, TypeError, r"^msg_k: expected a torch.Tensor, got NoneType"),
    ("v-int64", {"v": torch.ones(F_, N_, H_, D_, dtype=torch.int64)}, TypeError, r"^v: expected a floating-point tensor"),
    ("q-bool", {"q": torch.ones(F_, N_, H_, D_, dtype=torch.bool)}, TypeError, r"^q: expected a floating-point tensor"),
    ("msg_v-int32", {"msg_v": torch.ones(F_, H_, D_, dtype=torch.int32)}, TypeError, r"^msg_v: expected a floating-point"),
]


@pytest.mark.parametrize(
    "replace, error, pattern", [pytest.param(r, e, p, id=i) for i, r, e, p in BAD_INPUT]
)
def test_bad_tensor_arguments_name_the_argument(replace, error, pattern):
    args = {**_valid(), **replace}
    with pytest.raises(error, match=pattern):
        xk.frame_attention(*args.values())


@pytest.mark.parametrize(
    "scale", [0, 0.0, -0.125, float("nan"), float("-inf"), float("inf"), "0.1", True, torch.tensor(0.1)],
    ids=["int0", "0.0", "negative", "nan", "-inf", "inf", "str", "bool", "tensor"],
)
def test_bad_scale_names_the_argument(scale):
    with pytest.raises(ValueError, match=r"^scale: expected a finite positive float or None, got "):
        xk.frame_attention(*_valid().values(), scale=scale)


def test_unknown_backend_names_the_argument():
    with pytest.raises(ValueError, match=r"^backend: expected one of " + re.escape(", ".join(xk.BACKENDS))):
        xk.frame_attention(*_valid().values(), backend="flash")


def test_valid_arguments_of_the_bad_input_tests_run():
    # The bad-input cases differ from this call in one argument only.
    assert xk.frame_attention(*_valid().values(), scale=0.5).shape == (F_, N_, H_, D_)
