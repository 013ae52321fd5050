"""FLOP formulas of the custom ops, so ``torch.utils.flop_counter.FlopCounterMode`` counts them.

The counts follow the conventions of the ops they replace (2 FLOPs per multiply-accumulate,
matmul-like work only): IFA forward is ``4 F H N (N+1) D`` (QK^T and PV over N queries and
N + 1 keys, exactly what the counter gives SDPA on the concatenated keys), its backward
2.5x that; the message path counts its two projections and its attention over T, its backward
twice that plus the q/k/v projection and the attention it recomputes.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.utils.flop_counter import flop_registry, register_flop_formula


def frame_attention_flops(q_shape: Sequence[int]) -> int:
    """Forward FLOPs of IFA for q of shape ``(F, N, H, D)``."""
    frames, tokens, heads, head_dim = q_shape
    return 4 * frames * heads * tokens * (tokens + 1) * head_dim


def message_attention_flops(messages_shape: Sequence[int], num_frames: int, num_heads: int) -> int:
    """Forward FLOPs of the message path for messages ``(F, W)`` in videos of ``num_frames``."""
    frames, width = messages_shape
    projections = 2 * frames * width * 3 * width + 2 * frames * width * width
    attention = 4 * frames * num_frames * width  # (F/T videos) x H heads x T x T x D, twice
    return projections + attention


def message_attention_backward_flops(messages_shape: Sequence[int], num_frames: int, num_heads: int) -> int:
    """FLOPs of the message path's backward op, which recomputes the q/k/v projection and the attention."""
    frames, width = messages_shape
    recomputed = 2 * frames * width * 3 * width + 4 * frames * num_frames * width
    return 2 * message_attention_flops(messages_shape, num_frames, num_heads) + recomputed


def register_frame_attention(forward_op: object, backward_op: object) -> None:
    """Register the IFA formulas for one backend's forward and backward ops (``torch.ops``
    overload packets)."""

    @register_flop_formula(forward_op)
    def _(q_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        return frame_attention_flops(q_shape)

    @register_flop_formula(backward_op)
    def _(grad_out_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        return frame_attention_flops(grad_out_shape) * 5 // 2


def register_message_attention(forward_op: object, backward_op: object | None = None) -> None:
    """Register the message-path formulas for one backend's ops; a backend whose backward is
    not an op of its own (PyTorch ops, counted as they run) passes none for it."""

    @register_flop_formula(forward_op)
    def _(messages_shape, ln_w, ln_b, in_w, in_b, out_w, out_b, num_frames, num_heads, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        return message_attention_flops(messages_shape, num_frames, num_heads)

    if backward_op is not None:

        @register_flop_formula(backward_op)
        def _(grad_out_shape, messages_shape, ln_w, ln_b, in_w, in_b, out_w, out_b, num_frames, num_heads, *args,  # noqa: ANN001
              **kwargs) -> int:  # noqa: ANN002, ANN003
            return message_attention_backward_flops(messages_shape, num_frames, num_heads)


def _linear_flops(x_shape: Sequence[int], weight_shape: Sequence[int]) -> int:
    """FLOPs of ``x @ weight.T`` for x of shape ``(..., K)`` and weight ``(N, K)``."""
    rows = 1
    for size in x_shape[:-1]:
        rows *= size
    return 2 * rows * x_shape[-1] * weight_shape[0]


def register_gemm_formulas() -> None:
    """Count the GEMMs the fused epilogues take that the counter has no formula for:
    ``addmm_`` (the in-place residual accumulation) like ``addmm``, and oneDNN's prepacked
    ``mkldnn::_linear_pointwise`` (both overloads; the CPU inference provider "onednn") like
    the linear it replaces. Registering is a dict entry, no work."""
    inplace = torch.ops.aten.addmm_
    if inplace not in flop_registry:

        @register_flop_formula(inplace)
        def _(self_shape, a_shape, b_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
            rows, inner = a_shape
            return 2 * rows * inner * b_shape[1]

    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return
    pointwise = torch.ops.mkldnn._linear_pointwise
    if pointwise in flop_registry:
        return

    # One formula serves the packet's two overloads: ``default(X, W, B, attr, scalars, algorithm)``
    # and ``binary(X, other, W, B, attr)``; the fourth argument tells them apart (attr is a str).
    @register_flop_formula(pointwise)
    def _(x_shape, *args, **kwargs) -> int:  # noqa: ANN001, ANN002, ANN003
        weight_shape = args[0] if isinstance(args[2], str) else args[1]
        return _linear_flops(x_shape, weight_shape)
