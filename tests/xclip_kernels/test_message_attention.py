"""``xclip_kernels.message_attention`` (CFA): parity with the float64 reference, the official
``nn.MultiheadAttention`` math, and argument checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import xclip_kernels as xk
from xclip_kernels import autograd
from xclip_kernels.backends import reference
from xclip_kernels.registry import OpInputs
from xk_helpers import (
    automatic_cpu_backend,
    DTYPES,
    MESSAGE_ARG_NAMES,
    MESSAGE_NON_FINITE,
    assert_matches_truth,
    assert_same_non_finite,
    cpu_backends,
    leaves,
    message_inputs,
    output_and_grads,
    skip_unless_supported,
)

# (b videos, T frames, W width, H heads): T = 8, 16, 32 and odd T = 1, 3; the B (768/12) and
# L (1024/16) widths and a small W = 64 with one head; b = 1, 2, 3, and 9 (more rows than
# the cpp backend's register tiles take).
CASES = [
    pytest.param((2, 8, 768, 12), id="b2-T8-W768-H12"),
    pytest.param((1, 16, 768, 12), id="b1-T16-W768-H12"),
    pytest.param((1, 32, 1024, 16), id="b1-T32-W1024-H16"),
    pytest.param((3, 8, 1024, 16), id="b3-T8-W1024-H16"),
    pytest.param((2, 3, 768, 12), id="b2-T3-W768-H12"),
    pytest.param((3, 1, 768, 12), id="b3-T1-W768-H12"),
    pytest.param((2, 8, 64, 1), id="b2-T8-W64-H1"),
    pytest.param((3, 3, 64, 1), id="b3-T3-W64-H1"),
    pytest.param((1, 1, 64, 1), id="b1-T1-W64-H1"),
    pytest.param((9, 8, 64, 2), id="b9-T8-W64-H2"),  # 72 rows: the cpp projections take BLAS
]

BACKENDS = cpu_backends("message_attention")


def test_sdpa_is_among_the_cpu_parity_backends():
    assert "sdpa" in BACKENDS


def _call(fn, tensors, num_frames, num_heads, eps=1e-5, **kwargs):
    return fn(*tensors, num_frames=num_frames, num_heads=num_heads, eps=eps, **kwargs)


def _reference(*tensors, num_frames, num_heads, eps=1e-5):
    return reference.message_attention(*tensors, num_frames, num_heads, eps)


def _skip_unsupported(backend, dtype, width, heads, requires_grad):
    skip_unless_supported(backend, OpInputs("message_attention", "cpu", dtype, width // heads, requires_grad))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_forward_matches_float64_reference(backend, dtype, case):
    videos, frames, width, heads = case
    _skip_unsupported(backend, dtype, width, heads, False)
    tensors = message_inputs(videos, frames, width, dtype)
    out = _call(xk.message_attention, tensors, frames, heads, backend=backend)
    truth = _call(_reference, [t.double() for t in tensors], frames, heads)
    assert_matches_truth(out, truth, dtype, "output")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_gradients_match_float64_reference(backend, dtype, case):
    videos, frames, width, heads = case
    _skip_unsupported(backend, dtype, width, heads, True)
    tensors = leaves(message_inputs(videos, frames, width, dtype))
    upstream = torch.randn(videos * frames, width, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, grads = output_and_grads(
        lambda *t: _call(xk.message_attention, t, frames, heads, backend=backend), tensors, upstream
    )
    truth, truth_grads = output_and_grads(
        lambda *t: _call(_reference, t, frames, heads), leaves(tensors, torch.float64), upstream
    )
    assert_matches_truth(out, truth, dtype, "output")
    for name, grad, expected in zip(MESSAGE_ARG_NAMES, grads, truth_grads):
        assert_matches_truth(grad, expected, dtype, f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("eps", [1e-3, 0.5], ids=["eps1e-3", "eps0.5"])
def test_custom_eps(backend, eps):
    videos, frames, width, heads = 2, 3, 64, 2
    tensors = message_inputs(videos, frames, width, torch.float64, seed=2)
    tensors[0] = 0.05 * tensors[0]  # small variance, so eps visibly matters
    out = _call(xk.message_attention, tensors, frames, heads, eps=eps, backend=backend)
    truth = _call(_reference, tensors, frames, heads, eps=eps)
    assert_matches_truth(out, truth, torch.float64, f"output with eps={eps}")
    default = _call(xk.message_attention, tensors, frames, heads, backend=backend)
    assert (default - out).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_fp64(backend):
    tensors = leaves(message_inputs(2, 3, 8, torch.float64, seed=3))
    assert torch.autograd.gradcheck(
        lambda *t: _call(xk.message_attention, t, 3, 2, backend=backend), tensors, fast_mode=True
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_backward_formula_matches_float64_autograd_of_the_reference(dtype, case):
    # The message backward of the triton and cuda backends (the CPU extension has its own).
    videos, num_frames, width, heads = case
    tensors = message_inputs(videos, num_frames, width, dtype, seed=3)
    upstream = torch.randn(videos * num_frames, width, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    grads = autograd.message_attention_backward(upstream.to(dtype), *tensors, num_frames, heads, 1e-5)
    inputs = leaves(tensors, torch.float64)
    truth = torch.autograd.grad(reference.message_attention(*inputs, num_frames, heads), inputs, upstream)
    for name, grad, expected in zip(MESSAGE_ARG_NAMES, grads, truth, strict=True):
        assert_matches_truth(grad, expected, dtype, f"grad of {name}")


# Each path of the cpp message kernels: the outer-product projection tiles (16 rows, W = 768),
# the dot-product tiles (7 rows, W = 96), BLAS (72 rows), and float64.
NON_FINITE_CASES = [
    pytest.param(torch.float32, (2, 8, 768, 12), id="fp32-b2-T8-W768"),
    pytest.param(torch.float32, (1, 7, 96, 3), id="fp32-b1-T7-W96"),
    pytest.param(torch.float32, (9, 8, 64, 2), id="fp32-b9-T8-W64"),
    pytest.param(torch.float64, (2, 8, 64, 2), id="fp64-b2-T8-W64"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype, case", NON_FINITE_CASES)
@pytest.mark.parametrize("name, change", MESSAGE_NON_FINITE)
def test_non_finite_inputs_come_out_as_the_references(backend, dtype, case, name, change):
    """NaN and Inf in messages or weights, and q.k overflowing, give NaN/Inf exactly where the
    reference at the same dtype does, in the output and in every gradient."""
    videos, frames, width, heads = case
    _skip_unsupported(backend, dtype, width, heads, True)
    tensors = message_inputs(videos, frames, width, dtype, seed=5)
    change(tensors)
    upstream = torch.randn(videos * frames, width, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    out, grads = output_and_grads(
        lambda *t: _call(xk.message_attention, t, frames, heads, backend=backend), leaves(tensors), upstream
    )
    expected, expected_grads = output_and_grads(lambda *t: _call(_reference, t, frames, heads), leaves(tensors), upstream)
    assert_same_non_finite(out, expected, dtype, "output")
    for name, grad, want in zip(MESSAGE_ARG_NAMES, grads, expected_grads):
        assert_same_non_finite(grad, want, dtype, f"grad of {name}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width, heads", [(768, 12), (64, 2)], ids=["W768", "W64"])
def test_no_videos_give_an_empty_output_and_the_references_gradients(backend, dtype, width, heads):
    _skip_unsupported(backend, dtype, width, heads, True)
    tensors = leaves(message_inputs(0, 8, width, dtype))
    out = _call(xk.message_attention, tensors, 8, heads, backend=backend)
    assert out.shape == (0, width) and out.dtype == dtype
    # .sum() hands the backward an expanded (stride 0) empty gradient, as real graphs do.
    grads = torch.autograd.grad(out.sum(), tensors)
    expected = torch.autograd.grad(_call(_reference, (ref := leaves(tensors)), 8, heads).sum(), ref)
    for name, grad, want in zip(MESSAGE_ARG_NAMES, grads, expected):
        assert torch.equal(grad, want), f"grad of {name}: {grad}, the reference {want}"


# What a backend without a second derivative raises instead (PyTorch's own error).
NO_DOUBLE_BACKWARD = {"sdpa": r"derivative for aten::_scaled_dot_product_\w+_backward is not implemented"}


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_double_backward_is_exact_or_raises(backend):
    """gradgradcheck in float64; the fused backends (whose backward ops are not differentiable)
    use the PyTorch backward formula under create_graph=True instead of a silently wrong one."""
    tensors = leaves(message_inputs(2, 3, 8, torch.float64, seed=7))

    def attend(*t):  # noqa: ANN002, ANN202
        return _call(xk.message_attention, t, 3, 2, backend=backend)

    if backend in NO_DOUBLE_BACKWARD:
        with pytest.raises(RuntimeError, match=NO_DOUBLE_BACKWARD[backend]):
            torch.autograd.gradgradcheck(attend, tensors, fast_mode=True)
        return
    assert torch.autograd.gradgradcheck(attend, tensors, fast_mode=True)


def test_reference_backend_is_the_reference_function():
    tensors = message_inputs(2, 3, 64, torch.float32, seed=4)
    out = _call(xk.message_attention, tensors, 3, 4, eps=1e-4, backend="reference")
    assert torch.equal(out, reference.message_attention(*tensors, 3, 4, 1e-4))


def test_automatic_choice_gives_the_first_available_backends_result_on_cpu():
    tensors = message_inputs(2, 8, 64, torch.float32, seed=5)
    assert torch.equal(
        _call(xk.message_attention, tensors, 8, 2),
        _call(xk.message_attention, tensors, 8, 2, backend=automatic_cpu_backend()),
    )


# --------------------------------------------------------------------------- the official math


@pytest.mark.parametrize(
    "case",
    [
        pytest.param((2, 8, 768, 12), id="b2-T8-W768-H12"),
        pytest.param((3, 3, 64, 1), id="b3-T3-W64-H1"),
        pytest.param((1, 16, 1024, 16), id="b1-T16-W1024-H16"),
        pytest.param((2, 1, 64, 4), id="b2-T1-W64-H4"),
    ],
)
@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_matches_layernorm_then_nn_multiheadattention(backend, case):
    """The official block: ``m + message_attn(message_ln(m))`` run sequence-first over (T, b, W)."""
    videos, frames, width, heads = case
    tensors = message_inputs(videos, frames, width, torch.float64, seed=6)
    messages, ln_w, ln_b, in_w, in_b, out_w, out_b = tensors

    ln = torch.nn.LayerNorm(width, eps=1e-5, dtype=torch.float64)
    mha = torch.nn.MultiheadAttention(width, heads, dtype=torch.float64)  # batch_first=False
    with torch.no_grad():
        ln.weight.copy_(ln_w)
        ln.bias.copy_(ln_b)
        mha.in_proj_weight.copy_(in_w)
        mha.in_proj_bias.copy_(in_b)
        mha.out_proj.weight.copy_(out_w)
        mha.out_proj.bias.copy_(out_b)
        seq_first = messages.view(videos, frames, width).transpose(0, 1)  # (T, b, W)
        normed = ln(seq_first)
        attended, _ = mha(normed, normed, normed, need_weights=False)
        expected = (seq_first + attended).transpose(0, 1).reshape(videos * frames, width)

    out = _call(xk.message_attention, tensors, frames, heads, backend=backend)
    assert_matches_truth(out, expected, torch.float64, "output vs nn.MultiheadAttention")


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_videos_do_not_mix_and_frames_of_a_video_do(backend):
    videos, frames, width, heads = 3, 4, 64, 2
    tensors = message_inputs(videos, frames, width, torch.float64, seed=7)
    out = _call(xk.message_attention, tensors, frames, heads, backend=backend)
    changed_msgs = tensors[0].clone()
    # video 1, frame 2; not a constant shift, which message_ln would remove
    changed_msgs[frames * 1 + 2] += torch.randn(width, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    changed = _call(xk.message_attention, [changed_msgs, *tensors[1:]], frames, heads, backend=backend)
    rows = out.view(videos, frames, width), changed.view(videos, frames, width)
    assert torch.equal(rows[0][0], rows[1][0]) and torch.equal(rows[0][2], rows[1][2])
    # Every frame of video 1 sees the change through attention, not only frame 2 itself.
    assert ((rows[0][1] - rows[1][1]).abs().amax(dim=-1) > 1e-4).all()


@pytest.mark.parametrize("backend", ["reference", *BACKENDS])
def test_single_frame_is_layernorm_value_projection_residual(backend):
    """With T = 1 the softmax has one entry, so CFA is ``m + out_proj(v_proj(LN(m)))``."""
    tensors = message_inputs(4, 1, 64, torch.float64, seed=8)
    messages, ln_w, ln_b, in_w, in_b, out_w, out_b = tensors
    value = F.linear(F.layer_norm(messages, (64,), ln_w, ln_b, 1e-5), in_w[128:], in_b[128:])
    expected = messages + F.linear(value, out_w, out_b)
    out = _call(xk.message_attention, tensors, 1, 4, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


# --------------------------------------------------------------------------- bad input

B_, T_, W_, H_ = 2, 3, 16, 4


def _valid() -> dict[str, object]:
    return dict(zip(MESSAGE_ARG_NAMES, message_inputs(B_, T_, W_, torch.float32, seed=9)))


BAD_TENSORS = [
    ("messages-rank3", {"messages": torch.randn(B_, T_, W_)}, ValueError, r"^messages: expected a 2-d tensor, got 3-d"),
    ("messages-rank1", {"messages": torch.randn(W_)}, ValueError, r"^messages: expected a 2-d tensor"),
    ("messages-int64", {"messages": torch.ones(B_ * T_, W_, dtype=torch.int64)}, TypeError, r"^messages: expected a floating-point"),
    ("messages-list", {"messages": [[0.0] * W_]}, TypeError, r"^messages: expected a torch.Tensor, got list"),
    ("ln_weight-None", {"ln_weight": None}, TypeError, r"^ln_weight: expected a torch.Tensor, got NoneType"),
    ("ln_weight-length", {"ln_weight": torch.ones(W_ + 1)}, ValueError, r"^ln_weight: expected shape \(W,\) = \(16,\), got \(17,\)"),
    ("ln_bias-2d", {"ln_bias": torch.zeros(1, W_)}, ValueError, r"^ln_bias: expected shape \(W,\)"),
    ("in_proj_weight-square", {"in_proj_weight": torch.randn(W_, W_)}, ValueError, r"^in_proj_weight: expected shape \(3W, W\) = \(48, 16\)"),
    ("in_proj_weight-transposed", {"in_proj_weight": torch.randn(W_, 3 * W_)}, ValueError, r"^in_proj_weight: expected shape"),
    ("in_proj_bias-length", {"in_proj_bias": torch.zeros(W_)}, ValueError, r"^in_proj_bias: expected shape \(3W,\)"),
    ("out_proj_weight-shape", {"out_proj_weight": torch.randn(W_, 3 * W_)}, ValueError, r"^out_proj_weight: expected shape \(W, W\)"),
    ("out_proj_bias-length", {"out_proj_bias": torch.zeros(3 * W_)}, ValueError, r"^out_proj_bias: expected shape \(W,\)"),
    ("out_proj_bias-int32", {"out_proj_bias": torch.zeros(W_, dtype=torch.int32)}, TypeError, r"^out_proj_bias: expected a floating-point"),
    ("in_proj_bias-float64", {"in_proj_bias": torch.zeros(3 * W_, dtype=torch.float64)}, ValueError, r"^in_proj_bias: expected dtype torch.float32"),
    ("ln_weight-bfloat16", {"ln_weight": torch.ones(W_, dtype=torch.bfloat16)}, ValueError, r"^ln_weight: expected dtype"),
    ("out_proj_weight-meta", {"out_proj_weight": torch.randn(W_, W_, device="meta")}, ValueError, r"^out_proj_weight: expected device cpu"),
]


@pytest.mark.parametrize("replace, error, pattern", [pytest.param(r, e, p, id=i) for i, r, e, p in BAD_TENSORS])
def test_bad_tensor_arguments_name_the_argument(replace, error, pattern):
    args = {**_valid(), **replace}
    with pytest.raises(error, match=pattern):
        xk.message_attention(*args.values(), num_frames=T_, num_heads=H_)


BAD_OPTIONS = [
    ("F-not-multiple-of-T", {"num_frames": 4}, ValueError, r"^messages: expected F = b \* num_frames rows with num_frames=4, got F=6"),
    ("num_frames-0", {"num_frames": 0}, ValueError, r"^num_frames: expected an int >= 1, got 0"),
    ("num_frames-negative", {"num_frames": -3}, ValueError, r"^num_frames: expected an int >= 1"),
    ("num_frames-float", {"num_frames": 3.0}, TypeError, r"^num_frames: expected an int, got float"),
    ("num_frames-bool", {"num_frames": True}, TypeError, r"^num_frames: expected an int, got bool"),
    ("num_frames-None", {"num_frames": None}, TypeError, r"^num_frames: expected an int"),
    ("num_heads-not-divisor", {"num_heads": 3}, ValueError, r"^num_heads: expected a divisor of the width 16, got 3"),
    ("num_heads-0", {"num_heads": 0}, ValueError, r"^num_heads: expected an int >= 1, got 0"),
    ("num_heads-str", {"num_heads": "4"}, TypeError, r"^num_heads: expected an int, got str"),
    ("eps-0", {"eps": 0.0}, ValueError, r"^eps: expected a positive float"),
    ("eps-negative", {"eps": -1e-5}, ValueError, r"^eps: expected a positive float"),
    ("eps-nan", {"eps": float("nan")}, ValueError, r"^eps: expected a positive float"),
    ("eps-str", {"eps": "1e-5"}, ValueError, r"^eps: expected a positive float"),
    ("backend-unknown", {"backend": "flash"}, ValueError, r"^backend: expected one of reference, sdpa"),
]


@pytest.mark.parametrize("options, error, pattern", [pytest.param(o, e, p, id=i) for i, o, e, p in BAD_OPTIONS])
def test_bad_options_name_the_argument(options, error, pattern):
    kwargs = {"num_frames": T_, "num_heads": H_, **options}
    with pytest.raises(error, match=pattern):
        xk.message_attention(*_valid().values(), **kwargs)


def test_valid_arguments_of_the_bad_input_tests_run():
    # The bad-input cases differ from this call in one argument only.
    out = xk.message_attention(*_valid().values(), num_frames=T_, num_heads=H_)
    assert out.shape == (B_ * T_, W_)
