"""The naive reference: a literal port of the official X-CLIP math, ground truth for tests.

Everything is computed in the inputs' dtype with plain PyTorch ops, exactly as the official
code orders it (append the message token with ``cat``, softmax over all keys), so the same
functions serve as the float64 ground truth and as "plain PyTorch at the test dtype" in the
low-precision parity rule. Tests and benchmarks import these; nobody re-declares them.
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
    """Intra-frame attention over each frame's N keys plus its message key.

    q, k, v: ``(F, N, H, D)``; msg_k, msg_v: ``(F, H, D)``. Returns ``(F, N, H, D)``.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    keys = torch.cat([k, msg_k.unsqueeze(1)], dim=1)  # (F, N+1, H, D)
    values = torch.cat([v, msg_v.unsqueeze(1)], dim=1)
    scores = torch.einsum("fnhd,fmhd->fhnm", q, keys) * scale
    probs = scores.softmax(dim=-1)
    return torch.einsum("fhnm,fmhd->fnhd", probs, values)


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
    """Cross-frame fusion attention (CFA) of one block: ``m + attn(LN(m))`` over each video's T messages.

    messages: ``(F, W)`` with ``F = b * num_frames``, frames of one video adjacent.
    in_proj_weight ``(3W, W)`` packs q, k, v like ``nn.MultiheadAttention``. Returns ``(F, W)``.
    """
    frames, width = messages.shape
    videos = frames // num_frames
    head_dim = width // num_heads
    normed = F.layer_norm(messages, (width,), ln_weight, ln_bias, eps)
    qkv = normed @ in_proj_weight.t() + in_proj_bias  # (F, 3W)
    q, k, v = qkv.view(videos, num_frames, 3, num_heads, head_dim).unbind(dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * head_dim**-0.5
    mixed = torch.einsum("bhts,bshd->bthd", scores.softmax(dim=-1), v)
    attended = mixed.reshape(frames, width) @ out_proj_weight.t() + out_proj_bias
    return messages + attended


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, literally ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(1.702 * x)


def linear_residual(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """``residual + x @ weight.T + bias``; x ``(..., K)``, residual ``(..., M)``."""
    return residual + (x @ weight.t() + bias)


def mlp_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
) -> torch.Tensor:
    """``residual + c_proj(QuickGELU(c_fc(x)))``; x, residual ``(..., W)``."""
    return residual + (quick_gelu(x @ fc_weight.t() + fc_bias) @ proj_weight.t() + proj_bias)
