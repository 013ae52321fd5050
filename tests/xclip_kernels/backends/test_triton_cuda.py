"""GPU parity of the attention backends (triton, cuda, sdpa, xformers) at fp32, fp16 and bf16.

Skipped on machines without CUDA, with each backend's own reason. The truth is the ground
truth of ``docs/testing.md``: the reference in float64 on the same rounded inputs the op under
test received (inputs drawn in float64, rounded to the test dtype, converted back). fp32 is
held to ``assert_matches_truth`` (1e-5 of the tensor's scale); fp16/bf16 to the 2x/3x rule of
``docs/testing.md#low-precision``: error at most 2x that of plain PyTorch (the reference run at
the same dtype on the same inputs) for outputs, 3x for gradients, plus a small floor.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch

import xclip
import xclip_kernels as xk
from xclip_kernels.backends import reference
from xclip_kernels.registry import OpInputs, get_backend
from xk_helpers import (
    FRAME_NON_FINITE,
    MESSAGE_ARG_NAMES,
    MESSAGE_NON_FINITE,
    assert_matches_truth,
    assert_same_non_finite,
    frame_inputs,
    leaves,
    message_inputs,
    nan_padded,
    output_and_grads,
)

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in (torch.float32, torch.float16, torch.bfloat16)]
GPU_BACKENDS = ["triton", "cuda", "sdpa", "xformers"]
SHAPES = [
    pytest.param((16, 50, 12, 64), id="b32"),
    pytest.param((8, 197, 12, 64), id="b16"),
    pytest.param((4, 257, 16, 64), id="l14"),
    pytest.param((2, 577, 16, 64), id="l14-336"),
    pytest.param((7, 17, 3, 64), id="odd-N17-F7"),
    pytest.param((3, 1, 2, 32), id="N1"),
    pytest.param((5, 63, 2, 128), id="N63-D128"),
]


@pytest.fixture(autouse=True)
def _exact_fp32_references():
    # The float64 truths need nothing, but the model test compares fp32 backends with the
    # reference backend run in fp32, which must then really be fp32.
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _skip_unless(backend: str, op: str, dtype: torch.dtype, head_dim: int, grad: bool, frames: int | None = None):
    reasons = get_backend(backend).not_supported_reasons(OpInputs(op, "cuda", dtype, head_dim, grad, frames))
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def _assert_within_rule(ours: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, factor: float, what: str) -> None:
    """``max|ours - truth| <= factor * max|plain PyTorch at this dtype - truth| + floor``, with
    ``truth`` in float64 on the same rounded inputs."""
    assert truth.dtype == torch.float64, f"{what}: the truth must be float64, got {truth.dtype}"
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = (ours.double() - truth).abs().max().item()
    base = (plain.double() - truth).abs().max().item()
    floor = 1e-5 * max(1.0, truth.abs().max().item())
    assert err <= factor * base + floor, f"{what}: error {err:.3g} > {factor} x {base:.3g} + {floor:.3g}"


def _check_parity(
    fn: Callable[..., torch.Tensor], ref: Callable[..., torch.Tensor], inputs: list[torch.Tensor],
    upstream: torch.Tensor, names: list[str], **kwargs,
) -> None:
    """The op ``fn`` (``kwargs`` name its backend) on ``inputs``, already at the test dtype,
    against the reference ``ref`` in float64 on the same values; plain PyTorch is ``ref`` at the
    test dtype."""
    dtype = inputs[0].dtype
    truth, truth_grads = output_and_grads(ref, leaves(inputs, torch.float64), upstream)
    out, grads = output_and_grads(fn, leaves(inputs), upstream, **kwargs)
    if dtype == torch.float32:
        assert_matches_truth(out, truth, dtype, "output")
        for name, grad, expected in zip(names, grads, truth_grads):
            assert_matches_truth(grad, expected, dtype, f"grad of {name}")
        return
    plain, plain_grads = output_and_grads(ref, leaves(inputs), upstream)
    _assert_within_rule(out, plain, truth, 2.0, "output")
    for name, grad, plain_grad, expected in zip(names, grads, plain_grads, truth_grads):
        _assert_within_rule(grad, plain_grad, expected, 3.0, f"grad of {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_frame_attention_parity(backend, shape, dtype):
    _skip_unless(backend, "frame_attention", dtype, shape[-1], True)
    # Drawn in float64 and rounded to dtype: ours, plain PyTorch and the truth see these values.
    inputs = [t.cuda() for t in frame_inputs(*shape, dtype)]
    upstream = torch.randn(shape, device="cuda", dtype=torch.float64).to(dtype)
    _check_parity(xk.frame_attention, reference.frame_attention, inputs, upstream, ["q", "k", "v", "msg_k", "msg_v"],
                  backend=backend)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "cuda", "sdpa"])
@pytest.mark.parametrize("videos, num_frames, width, heads", [(32, 8, 768, 12), (4, 16, 1024, 16), (3, 3, 128, 2)])
def test_message_attention_parity(backend, videos, num_frames, width, heads, dtype):
    _skip_unless(backend, "message_attention", dtype, width // heads, True, num_frames)
    inputs = [t.cuda() for t in message_inputs(videos, num_frames, width, dtype)]
    upstream = torch.randn(videos * num_frames, width, device="cuda", dtype=torch.float64).to(dtype)

    def ref(*t):  # noqa: ANN002, ANN202
        return reference.message_attention(*t, num_frames, heads)

    _check_parity(xk.message_attention, ref, inputs, upstream, list(MESSAGE_ARG_NAMES),
                  num_frames=num_frames, num_heads=heads, backend=backend)


def test_cuda_refuses_float64_with_a_value_error():
    # The CUDA kernels are built for fp32/fp16/bf16 only: fp64 must not reach a dispatch.
    _skip_unless("cuda", "frame_attention", torch.float32, 64, False)
    q, k, v, mk, mv = (t.cuda() for t in frame_inputs(2, 5, 2, 64, torch.float64))
    with pytest.raises(ValueError, match=r"q: expected float32, float16 or bfloat16 on CUDA.*got Double"):
        torch.ops.xclip_ext.frame_attention(q, k, v, mk, mv, 0.125)
    message = [t.cuda() for t in message_inputs(1, 8, 64, torch.float64)]
    with pytest.raises(ValueError, match=r"messages: expected float32, float16 or bfloat16 on CUDA.*got Double"):
        torch.ops.xclip_ext.message_attention(*message, 8, 2, 1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_reads_nothing_beyond_n_and_is_deterministic(backend, dtype):
    _skip_unless(backend, "frame_attention", dtype, 64, False)
    inputs = [t.cuda().to(dtype) for t in frame_inputs(8, 197, 12, 64, torch.float32)]
    padded = nan_padded(inputs[:3], pad=59)
    out = xk.frame_attention(*padded, *inputs[3:], backend=backend)
    assert torch.isfinite(out).all()
    assert torch.equal(out, xk.frame_attention(*inputs, backend=backend))
    assert torch.equal(out, xk.frame_attention(*padded, *inputs[3:], backend=backend))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_backward_is_bitwise_repeatable(backend, dtype):
    # Every gradient element has one writer and the message partials are reduced in a fixed
    # order (no atomics): two backward passes on the same inputs give the same bits.
    _skip_unless(backend, "frame_attention", dtype, 64, True)
    inputs = [t.cuda() for t in frame_inputs(8, 197, 12, 64, dtype)]
    upstream = torch.randn(8, 197, 12, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).cuda()
    first = output_and_grads(xk.frame_attention, leaves(inputs), upstream, backend=backend)[1]
    again = output_and_grads(xk.frame_attention, leaves(inputs), upstream, backend=backend)[1]
    for name, a, b in zip(["q", "k", "v", "msg_k", "msg_v"], first, again):
        assert torch.equal(a, b), f"d{name} differs between two identical backward passes"


@pytest.mark.parametrize("case, change", FRAME_NON_FINITE)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_frame_attention_non_finite_inputs_come_out_as_the_references(backend, case, change):
    """fp32: NaN/Inf where the fp32 reference (TF32 off) has them, output and gradients."""
    shape = (2, 17, 3, 64)
    _skip_unless(backend, "frame_attention", torch.float32, 64, True)
    inputs = frame_inputs(*shape, torch.float32, seed=14)
    change(inputs)
    inputs = [t.cuda() for t in inputs]
    upstream = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(15)).cuda()
    out, grads = output_and_grads(xk.frame_attention, leaves(inputs), upstream, backend=backend)
    expected, expected_grads = output_and_grads(reference.frame_attention, leaves(inputs), upstream)
    assert_same_non_finite(out, expected, torch.float32, "output")
    for name, grad, want in zip(("q", "k", "v", "msg_k", "msg_v"), grads, expected_grads):
        assert_same_non_finite(grad, want, torch.float32, f"grad of {name}")


@pytest.mark.parametrize("name, change", MESSAGE_NON_FINITE)
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_message_attention_non_finite_inputs_come_out_as_the_references(backend, name, change):
    videos, num_frames, width, heads = 2, 8, 768, 12
    _skip_unless(backend, "message_attention", torch.float32, width // heads, True, num_frames)
    tensors = message_inputs(videos, num_frames, width, torch.float32, seed=5)
    change(tensors)
    tensors = [t.cuda() for t in tensors]
    upstream = torch.randn(videos * num_frames, width, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(6)).cuda()

    def ref(*t):  # noqa: ANN002, ANN202
        return reference.message_attention(*t, num_frames, heads)

    out, grads = output_and_grads(xk.message_attention, leaves(tensors), upstream,
                                  num_frames=num_frames, num_heads=heads, backend=backend)
    expected, expected_grads = output_and_grads(ref, leaves(tensors), upstream)
    assert_same_non_finite(out, expected, torch.float32, "output")
    for index, (grad, want) in enumerate(zip(grads, expected_grads)):
        assert_same_non_finite(grad, want, torch.float32, f"grad of argument {index}")


def _second_derivatives(fn, tensors, upstream, weights):  # noqa: ANN001, ANN202
    """Gradients w.r.t. ``tensors`` of sum(grad * weight), grad the gradients of <fn(*tensors), upstream>."""
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, upstream.to(out.dtype), create_graph=True)
    return torch.autograd.grad(sum((g * w.to(g.dtype)).sum() for g, w in zip(grads, weights)), tensors,
                               materialize_grads=True)  # the out_proj bias gradient is constant


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_double_backward_matches_float64_reference(backend):
    """fp32 second derivatives of both ops against the float64 reference: exact, never the zeros
    a non-differentiable backward op would give."""
    _skip_unless(backend, "frame_attention", torch.float32, 64, True)
    gen = torch.Generator().manual_seed(18)
    inputs = [t.cuda() for t in frame_inputs(2, 17, 3, 64, torch.float32, seed=17)]
    upstream = torch.randn(2, 17, 3, 64, dtype=torch.float64, generator=gen).cuda()
    weights = [torch.randn(t.shape, dtype=torch.float64, generator=gen).cuda() for t in inputs]
    ours = _second_derivatives(lambda *t: xk.frame_attention(*t, backend=backend), leaves(inputs), upstream, weights)
    truth = _second_derivatives(reference.frame_attention, leaves(inputs, torch.float64), upstream, weights)
    for name, got, want in zip(("q", "k", "v", "msg_k", "msg_v"), ours, truth):
        assert_matches_truth(got, want, torch.float32, f"second derivative w.r.t. {name}")

    tensors = [t.cuda() for t in message_inputs(2, 3, 128, torch.float32, seed=7)]
    upstream = torch.randn(6, 128, dtype=torch.float64, generator=gen).cuda()
    weights = [torch.randn(t.shape, dtype=torch.float64, generator=gen).cuda() for t in tensors]
    call = dict(num_frames=3, num_heads=2, backend=backend)
    ours = _second_derivatives(lambda *t: xk.message_attention(*t, **call), leaves(tensors), upstream, weights)
    truth = _second_derivatives(lambda *t: reference.message_attention(*t, 3, 2), leaves(tensors, torch.float64),
                                upstream, weights)
    for index, (got, want) in enumerate(zip(ours, truth)):
        assert_matches_truth(got, want, torch.float32, f"message path: second derivative w.r.t. argument {index}")


def test_triton_opcheck_on_cuda():
    _skip_unless("triton", "frame_attention", torch.bfloat16, 64, True)
    q, k, v, mk, mv = (t.cuda().to(torch.bfloat16).requires_grad_(True) for t in frame_inputs(4, 50, 2, 64, torch.float32))
    torch.library.opcheck(torch.ops.xclip_kernels.triton_frame_attention.default, (q, k, v, mk, mv, 0.125))
    message = [t.cuda().requires_grad_(True) for t in message_inputs(2, 8, 128, torch.float32)]
    torch.library.opcheck(torch.ops.xclip_kernels.triton_message_attention.default, (*message, 8, 2, 1e-5))


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_model_compiles_fullgraph(backend):
    _skip_unless(backend, "frame_attention", torch.bfloat16, 64, False)
    torch.manual_seed(0)
    model = xclip.build_model("xclip-b32", backend=backend).cuda().eval()
    video = torch.randn(2, 8, 3, 224, 224, device="cuda")
    text = xclip.tokenize(["archery", "bowling"]).cuda()
    with torch.no_grad():
        eager = model(video, text)
        model.set_attention_backend("reference")
        expected = model(video, text)
        model.set_attention_backend(backend)
        torch.testing.assert_close(eager, expected, rtol=1e-4, atol=1e-4)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(video, text), eager, rtol=1e-4, atol=1e-4)


def test_automatic_choice_on_cuda_prefers_triton():
    _skip_unless("triton", "frame_attention", torch.bfloat16, 64, False)
    probe = OpInputs("frame_attention", "cuda", torch.bfloat16, 64, False)
    assert xk.select_backend(probe).name == "triton"
