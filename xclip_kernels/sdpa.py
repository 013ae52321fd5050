"""Backend ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the frame-batched layout.

SDPA takes one key tensor, so the message key/value must be appended to each frame's keys:
that copy is the price of this backend (the fused backends read them in place). The queries
are only the frame's N tokens: no query row is spent on the message token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    msg_k: torch.Tensor,
    msg_v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """IFA via SDPA. q, k, v: ``(F, N, H, D)``; msg_k, msg_v: ``(F, H, D)``. Returns ``(F, N, H, D)``."""
    keys = torch.cat([k, msg_k.unsqueeze(1)], dim=1)  # (F, N+1, H, D)
    values = torch.cat([v, msg_v.unsqueeze(1)], dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2), scale=scale
    )
    # SDPA's CPU and CUDA flash kernels allocate the output as (F, N, H, D), so this
    # transpose is usually contiguous and the caller's reshape to (F, N, W) is free.
    return out.transpose(1, 2)


def message_attention(
    messages: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    num_frames: int,
    num_heads: int,
    eps: float = 1e-5,
) -> torch.Tensor:
    """CFA via SDPA over each video's T messages. messages: ``(F, W)``. Returns ``(F, W)``."""
    frames, width = messages.shape
    videos = frames // num_frames
    normed = F.layer_norm(messages, (width,), ln_weight, ln_bias, eps)
    qkv = F.linear(normed, in_proj_weight, in_proj_bias)
    q, k, v = qkv.view(videos, num_frames, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
    mixed = F.scaled_dot_product_attention(q, k, v)  # (b, H, T, D)
    mixed = mixed.transpose(1, 2).reshape(frames, width)
    return torch.addmm(messages + out_proj_bias, mixed, out_proj_weight.t())


def message_attention_backward(
    saved: tuple[torch.Tensor, ...], needs_input_grad: tuple[bool, ...], sizes: tuple, grad_out: torch.Tensor
) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`message_attention` by recomputation, for the fused backends.

    The message path is T <= 64 tokens per video, so the fused forward kernels of triton and
    cuda take their backward here (cpp has a backward op of its own): recompute with these
    differentiable ops and let autograd differentiate. ``saved`` are the seven tensor
    arguments, ``sizes`` the rest (num_frames, num_heads, eps); returns one gradient per
    argument (None for the sizes).
    """
    tensors = [t.detach().requires_grad_(needs) for t, needs in zip(saved, needs_input_grad)]
    wanted = [t for t in tensors if t.requires_grad]
    with torch.enable_grad():
        out = message_attention(*tensors, *sizes)
        grads = iter(torch.autograd.grad(out, wanted, grad_out)) if wanted else iter(())
    return (*(next(grads) if t.requires_grad else None for t in tensors), *(None for _ in sizes))
