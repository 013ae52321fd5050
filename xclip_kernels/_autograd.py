"""Autograd formulas shared by the fused backends' custom ops (triton, cpp, cuda).

Each backend registers these with ``torch.library.register_autograd`` on its own ops: the
frame-attention forward op returns ``(out, lse)`` and has a backward op of the same
signature everywhere; the message path is recomputed through PyTorch for its backward
(except on the CPU, where the extension has a backward op of its own: compiled.py).
"""

from __future__ import annotations

from typing import Callable

import torch


def frame_attention_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    """Save what the backward op needs; the log-sum-exp output is not differentiable."""
    q, k, v, msg_k, msg_v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, msg_k, msg_v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def frame_attention_grad(backward_op: Callable) -> Callable:
    """The backward formula calling ``backward_op(grad_out, q, k, v, msg_k, msg_v, out, lse, scale)``."""

    def grad(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):  # noqa: ANN001, ANN202
        q, k, v, msg_k, msg_v, out, lse = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        return (*backward_op(grad_out, q, k, v, msg_k, msg_v, out, lse, ctx.scale), None)

    return grad


def message_attention_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    ctx.save_for_backward(*inputs[:7])
    ctx.sizes = inputs[7:]


def message_attention_grad(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN202
    from . import sdpa

    return sdpa.message_attention_backward(ctx.saved_tensors, ctx.needs_input_grad, ctx.sizes, grad_out)
