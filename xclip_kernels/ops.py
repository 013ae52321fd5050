"""The public ops: check the arguments, choose a backend, call it."""

from __future__ import annotations

import torch

from . import checks
from .registry import OpInputs, select_backend


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    msg_k: torch.Tensor,
    msg_v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Intra-frame diffusion attention (IFA) of X-CLIP on the frame-batched layout.

    Each frame's N query tokens attend over its own N keys plus its message-token key:
    ``softmax(q [k; msg_k]^T * scale) [v; msg_v]``. No query row is computed for the
    message token (the model drops that row).

    Args:
        q, k, v: ``(F, N, H, D)``, any strides (views of one fused QKV output are fine).
        msg_k, msg_v: ``(F, H, D)``, each frame's message-token key and value.
        scale: softmax scale, default ``D ** -0.5``.
        backend: a name from :data:`xclip_kernels.BACKENDS`, or ``None`` for automatic choice.

    Returns:
        ``(F, N, H, D)``, differentiable with respect to all five inputs.
    """
    checks.tensor("q", q, ndim=4)
    frames, tokens, heads, head_dim = q.shape
    for name, t in (("k", k), ("v", v)):
        checks.tensor(name, t, ndim=4)
        checks.shape(name, t, q.shape, "(F, N, H, D) of q")
    for name, t in (("msg_k", msg_k), ("msg_v", msg_v)):
        checks.tensor(name, t, ndim=3)
        checks.shape(name, t, (frames, heads, head_dim), "(F, H, D) of q")
    checks.same_device_and_dtype("q", q, k=k, v=v, msg_k=msg_k, msg_v=msg_v)
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ValueError(f"scale: expected a finite positive float or None, got {scale!r}")
        scale = float(scale)
    chosen = select_backend(OpInputs.of("frame_attention", q, k, v, msg_k, msg_v, head_dim=head_dim), backend)
    return chosen.implementation("frame_attention")(q, k, v, msg_k, msg_v, scale)


def message_attention(
    messages: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    *,
    num_frames: int,
    num_heads: int,
    eps: float = 1e-5,
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-frame fusion attention (CFA) of one X-CLIP block.

    ``messages + out_proj(MHA(LN(messages)))`` where the multi-head self-attention runs over
    the ``num_frames`` message tokens of each video (no mask), with the packed
    ``nn.MultiheadAttention`` projection layout of the official checkpoints.

    Args:
        messages: ``(F, W)``, ``F = b * num_frames``, the frames of one video adjacent.
        ln_weight, ln_bias: ``(W,)`` of ``message_ln``.
        in_proj_weight: ``(3W, W)``; in_proj_bias: ``(3W,)``, q/k/v packed in that order.
        out_proj_weight: ``(W, W)``; out_proj_bias: ``(W,)``.
        num_frames: T, the number of message tokens per video.
        num_heads: H, with ``W % H == 0``.
        eps: LayerNorm epsilon.
        backend: a name from :data:`xclip_kernels.BACKENDS`, or ``None`` for automatic choice.

    Returns:
        ``(F, W)``, differentiable with respect to every tensor argument.
    """
    checks.tensor("messages", messages, ndim=2)
    frames, width = messages.shape
    num_frames = checks.integer("num_frames", num_frames)
    num_heads = checks.integer("num_heads", num_heads)
    if frames % num_frames:
        raise ValueError(
            f"messages: expected F = b * num_frames rows with num_frames={num_frames}, got F={frames}"
        )
    if width % num_heads:
        raise ValueError(f"num_heads: expected a divisor of the width {width}, got {num_heads}")
    expected = {
        "ln_weight": (ln_weight, (width,), "(W,)"),
        "ln_bias": (ln_bias, (width,), "(W,)"),
        "in_proj_weight": (in_proj_weight, (3 * width, width), "(3W, W)"),
        "in_proj_bias": (in_proj_bias, (3 * width,), "(3W,)"),
        "out_proj_weight": (out_proj_weight, (width, width), "(W, W)"),
        "out_proj_bias": (out_proj_bias, (width,), "(W,)"),
    }
    for name, (t, want, meaning) in expected.items():
        checks.tensor(name, t)
        checks.shape(name, t, want, meaning)
    checks.same_device_and_dtype("messages", messages, **{n: t for n, (t, _, _) in expected.items()})
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps: expected a positive float, got {eps!r}")
    tensors = (messages, *(t for t, _, _ in expected.values()))
    inputs = OpInputs.of("message_attention", *tensors, head_dim=width // num_heads, num_frames=num_frames)
    chosen = select_backend(inputs, backend)
    return chosen.implementation("message_attention")(*tensors, num_frames, num_heads, float(eps))
