"""pytest-benchmark micro-suite of the ops at CPU-sized shapes (``make bench-micro``).

Not part of ``make test``: these time, they do not check. Each benchmark runs one op on one
backend at X-CLIP-B/32 shapes (batch 2 x 8 frames), so regressions show up as numbers;
compare runs with ``pytest-benchmark compare``.
"""

from __future__ import annotations

import pytest
import torch

import xclip_kernels as xk
from xclip_kernels import fused
from xclip_kernels.registry import OpInputs

FRAMES, TOKENS, HEADS, HEAD_DIM, WIDTH, T = 16, 50, 12, 64, 768, 8


def _cpu_backends(op: str) -> list[str]:
    return [
        name for name in xk.BACKENDS
        if name != "triton"
        and not xk.get_backend(name).not_supported_reasons(OpInputs(op, "cpu", torch.float32, HEAD_DIM, False, T))
    ]


@pytest.mark.parametrize("backend", _cpu_backends("frame_attention"))
def test_frame_attention(benchmark, backend):
    torch.manual_seed(0)
    q, k, v = torch.randn(FRAMES, TOKENS, 3, HEADS, HEAD_DIM).unbind(2)
    msg_k, msg_v = torch.randn(FRAMES, HEADS, HEAD_DIM), torch.randn(FRAMES, HEADS, HEAD_DIM)
    with torch.inference_mode():
        benchmark(xk.frame_attention, q, k, v, msg_k, msg_v, backend=backend)


@pytest.mark.parametrize("backend", _cpu_backends("message_attention"))
def test_message_attention(benchmark, backend):
    torch.manual_seed(0)
    tensors = [torch.randn(FRAMES, WIDTH), torch.ones(WIDTH), torch.zeros(WIDTH), torch.randn(3 * WIDTH, WIDTH) * 0.03,
               torch.zeros(3 * WIDTH), torch.randn(WIDTH, WIDTH) * 0.03, torch.zeros(WIDTH)]
    with torch.inference_mode():
        benchmark(xk.message_attention, *tensors, num_frames=T, num_heads=HEADS, backend=backend)


def test_mlp_residual_inplace(benchmark):
    torch.manual_seed(0)
    x, residual = torch.randn(FRAMES * TOKENS, WIDTH), torch.randn(FRAMES * TOKENS, WIDTH)
    weights = [torch.randn(4 * WIDTH, WIDTH) * 0.03, torch.zeros(4 * WIDTH), torch.randn(WIDTH, 4 * WIDTH) * 0.02,
               torch.zeros(WIDTH)]
    workspace = fused.Workspace()
    with torch.inference_mode():
        benchmark(fused.mlp_residual, x, residual, *weights, inplace=True, workspace=workspace)


def test_mlp_unfused_reference(benchmark):
    torch.manual_seed(0)
    x, residual = torch.randn(FRAMES * TOKENS, WIDTH), torch.randn(FRAMES * TOKENS, WIDTH)
    weights = [torch.randn(4 * WIDTH, WIDTH) * 0.03, torch.zeros(4 * WIDTH), torch.randn(WIDTH, 4 * WIDTH) * 0.02,
               torch.zeros(WIDTH)]
    from xclip_kernels.backends import reference

    with torch.inference_mode():
        benchmark(reference.mlp_residual, x, residual, *weights)
