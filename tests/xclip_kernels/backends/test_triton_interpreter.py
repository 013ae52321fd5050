"""The ``triton`` backend on the CPU under the Triton interpreter (fp32, forward and gradients).

``make test`` runs this file in its own pytest process with ``TRITON_INTERPRET=1`` (Triton
reads it when first imported), selected by the ``triton_interpreter`` marker. The same
checks at fp16/bf16 on a GPU live in ``test_triton_cuda.py``.
"""

from __future__ import annotations

import os

import pytest
import torch

import xclip
import xclip_kernels as xk
from xclip_kernels.backends import reference
from xclip_kernels.registry import OpInputs, get_backend, select_backend
from xk_helpers import (
    FRAME_NON_FINITE,
    assert_matches_truth,
    assert_same_non_finite,
    frame_inputs,
    leaves,
    message_inputs,
    nan_padded,
    output_and_grads,
)

_REASONS = get_backend("triton").not_supported_reasons(OpInputs("frame_attention", "cpu", torch.float32, 64, True))
pytestmark = [
    pytest.mark.triton_interpreter,
    pytest.mark.skipif(bool(_REASONS), reason=f"triton on CPU: {'; '.join(_REASONS)} (make test runs this file so)"),
]

FRAME_SHAPES = [
    pytest.param((2, 50, 12, 64), id="b32-F2-N50-H12-D64"),
    pytest.param((3, 1, 2, 32), id="N1"),
    pytest.param((3, 2, 2, 32), id="N2"),
    pytest.param((5, 17, 2, 32), id="F5-N17"),
    pytest.param((2, 63, 3, 64), id="N63"),
    pytest.param((7, 17, 1, 16), id="F7-H1-D16"),
    pytest.param((2, 17, 2, 80), id="D80"),
    pytest.param((1, 33, 2, 128), id="D128"),
]


def _fused_qkv_views(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """q, k, v as strided views of one (F, N, 3, H, D) tensor, as the model makes them."""
    q, k, v, msg_k, msg_v = inputs
    packed = torch.stack([q, k, v], dim=2).detach().requires_grad_(True)
    return [*packed.unbind(2), msg_k.detach().clone().requires_grad_(True), msg_v.detach().clone().requires_grad_(True)]


@pytest.mark.parametrize("shape", FRAME_SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "fused-qkv-view"])
def test_frame_attention_forward_and_gradients(shape, layout):
    inputs = leaves(frame_inputs(*shape, torch.float32))
    if layout == "fused-qkv-view":
        inputs = _fused_qkv_views(inputs)
        assert not inputs[0].is_contiguous()
    upstream = torch.randn(shape, dtype=torch.float64)
    out, grads = output_and_grads(xk.frame_attention, inputs, upstream, backend="triton")
    truth, truth_grads = output_and_grads(reference.frame_attention, leaves(inputs, torch.float64), upstream)
    assert_matches_truth(out, truth, torch.float32, "output")
    for name, grad, expected in zip(("q", "k", "v", "msg_k", "msg_v"), grads, truth_grads):
        assert_matches_truth(grad, expected, torch.float32, f"grad of {name}")


def test_frame_attention_custom_scale():
    inputs = frame_inputs(2, 17, 2, 32, torch.float32, seed=3)
    out = xk.frame_attention(*inputs, scale=0.3, backend="triton")
    assert_matches_truth(out, reference.frame_attention(*(t.double() for t in inputs), 0.3), torch.float32, "output")


def test_frame_attention_ignores_memory_beyond_n():
    # Out-of-bounds reads would pull NaN from the padding into the softmax.
    inputs = frame_inputs(3, 17, 2, 32, torch.float32, seed=4)
    padded = nan_padded(inputs[:3], pad=15)
    out = xk.frame_attention(*padded, *inputs[3:], backend="triton")
    assert torch.isfinite(out).all()
    assert torch.equal(out, xk.frame_attention(*inputs, backend="triton"))


@pytest.mark.parametrize("case, change", [p for p in FRAME_NON_FINITE if p.id in ("nan-q", "nan-k", "qk-overflows-to-inf")])
def test_frame_attention_non_finite_inputs_come_out_as_the_references(case, change):
    # A few cases, cheaply: the GPU tests run all of them (test_triton_cuda.py).
    shape = (2, 17, 3, 32)
    inputs = frame_inputs(*shape, torch.float32, seed=14)
    change(inputs)
    upstream = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(15))
    out, grads = output_and_grads(xk.frame_attention, leaves(inputs), upstream, backend="triton")
    expected, expected_grads = output_and_grads(reference.frame_attention, leaves(inputs), upstream)
    assert_same_non_finite(out, expected, torch.float32, "output")
    for name, grad, want in zip(("q", "k", "v", "msg_k", "msg_v"), grads, expected_grads):
        assert_same_non_finite(grad, want, torch.float32, f"grad of {name}")


def test_double_backward_matches_float64_reference():
    # The Triton backward ops are not differentiable: under create_graph=True the autograd
    # formulas switch to differentiable PyTorch ones (xclip_kernels/autograd.py). fp32 (Triton
    # has no float64), so against the float64 reference rather than gradgradcheck.
    gen = torch.Generator().manual_seed(18)
    cases = [
        (lambda *t: xk.frame_attention(*t, backend="triton"), reference.frame_attention,
         frame_inputs(2, 5, 2, 16, torch.float32, seed=17)),
        (lambda *t: xk.message_attention(*t, num_frames=3, num_heads=2, backend="triton"),
         lambda *t: reference.message_attention(*t, 3, 2), message_inputs(2, 3, 32, torch.float32, seed=7)),
    ]
    for ours_fn, reference_fn, tensors in cases:
        out_shape = tensors[0].shape
        upstream = torch.randn(out_shape, dtype=torch.float64, generator=gen)
        weights = [torch.randn(t.shape, dtype=torch.float64, generator=gen) for t in tensors]

        def second(fn, inputs):  # noqa: ANN001, ANN202
            out = fn(*inputs)
            grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype), create_graph=True)
            return torch.autograd.grad(sum((g * w.to(g.dtype)).sum() for g, w in zip(grads, weights)), inputs,
                                       materialize_grads=True)  # the bias gradient is constant

        ours = second(ours_fn, leaves(tensors))
        truth = second(reference_fn, leaves(tensors, torch.float64))
        for index, (got, want) in enumerate(zip(ours, truth)):
            assert_matches_truth(got, want, torch.float32, f"second derivative w.r.t. argument {index}")


def test_frame_attention_repeated_forwards_are_bitwise_identical():
    inputs = frame_inputs(2, 50, 4, 64, torch.float32, seed=5)
    first = xk.frame_attention(*inputs, backend="triton")
    assert torch.equal(first, xk.frame_attention(*inputs, backend="triton"))


@pytest.mark.parametrize(
    "videos, num_frames, width, heads",
    [
        pytest.param(2, 8, 768, 12, id="b32-b2-T8"),
        pytest.param(3, 1, 128, 2, id="T1"),
        pytest.param(3, 3, 128, 2, id="b3-T3"),
        pytest.param(1, 32, 64, 1, id="T32-H1"),
        pytest.param(1, 64, 64, 1, id="T64"),
    ],
)
def test_message_attention_forward_and_gradients(videos, num_frames, width, heads):
    inputs = leaves(message_inputs(videos, num_frames, width, torch.float32))
    upstream = torch.randn(videos * num_frames, width, dtype=torch.float64)
    kwargs = dict(num_frames=num_frames, num_heads=heads)
    out, grads = output_and_grads(xk.message_attention, inputs, upstream, backend="triton", **kwargs)
    truth, truth_grads = output_and_grads(
        lambda *t: reference.message_attention(*t, num_frames, heads), leaves(inputs, torch.float64), upstream
    )
    assert_matches_truth(out, truth, torch.float32, "output")
    for index, (grad, expected) in enumerate(zip(grads, truth_grads)):
        assert_matches_truth(grad, expected, torch.float32, f"grad of argument {index}")


def test_more_than_64_frames_is_declared_unsupported():
    inputs = OpInputs("message_attention", "cpu", torch.float32, 64, False, num_frames=65)
    assert "65 frames per video > 64" in get_backend("triton").not_supported_reasons(inputs)


def test_opcheck_frame_attention():
    q, k, v, msg_k, msg_v = frame_inputs(2, 17, 2, 32, torch.float32, seed=6)
    for t in (q, k, v, msg_k, msg_v):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.xclip_kernels.triton_frame_attention.default, (q, k, v, msg_k, msg_v, 0.2))


def test_opcheck_message_attention():
    inputs = leaves(message_inputs(2, 3, 64, torch.float32))
    torch.library.opcheck(torch.ops.xclip_kernels.triton_message_attention.default, (*inputs, 3, 1, 1e-5))


def test_not_chosen_automatically_on_cpu_but_available_when_named():
    probe = OpInputs("frame_attention", "cpu", torch.float32, 64, False)
    assert not get_backend("triton").not_supported_reasons(probe)
    assert select_backend(probe).name != "triton"
    assert select_backend(probe, "triton").name == "triton"


TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=1, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)


def test_model_on_triton_matches_reference_and_compiles_without_graph_breaks():
    torch.manual_seed(0)
    model = xclip.build_model(TINY).eval()
    video = torch.randn(2, 3, 3, 32, 32)
    text = xclip.tokenize(["a dog", "playing the violin"])
    with torch.no_grad():
        model.set_attention_backend("reference")
        expected = model(video, text)
        model.set_attention_backend("triton")
        eager = model(video, text)
        torch.testing.assert_close(eager, expected, rtol=1e-5, atol=1e-5)
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        torch.testing.assert_close(compiled(video, text), eager, rtol=1e-6, atol=1e-6)


def test_interpreter_flag_is_set_in_this_process():
    assert os.environ.get("TRITON_INTERPRET") == "1"
