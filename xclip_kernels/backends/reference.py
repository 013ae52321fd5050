"""Backend ``reference``: a literal port of the official X-CLIP math, the ground truth for tests.

Everything is computed in the inputs' dtype with plain PyTorch ops, exactly as the official
code orders it (append the message token with ``cat``, softmax over all keys), so the same
functions serve as the float64 ground truth and as "plain PyTorch at the test dtype" in the
low-precision parity rule (``docs/testing.md``). Tests and benchmarks import these; nobody
re-declares them. The math itself: ``docs/xclip-math.md``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from .base import FLOAT_DTYPES, OPS, Backend, functions_of, torch_cuda_reasons

QUICK_GELU_SLOPE = 1.702
"""CLIP's activation is ``x * sigmoid(QUICK_GELU_SLOPE * x)``."""


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


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q k^T / sqrt(D)) v`` over the last two dims: q, k, v ``(..., S, D)`` -> ``(..., S, D)``."""
    scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
    return scores.softmax(dim=-1) @ v


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
    *,
    attention: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] = softmax_attention,
) -> torch.Tensor:
    """Cross-frame fusion attention (CFA) of one block: ``m + attn(LN(m))`` over each video's T messages.

    messages: ``(F, W)`` with ``F = b * num_frames``, frames of one video adjacent.
    in_proj_weight ``(3W, W)`` packs q, k, v like ``nn.MultiheadAttention``. Returns ``(F, W)``.
    ``attention`` computes the heads' softmax attention on ``(b, H, T, D)`` tensors (the
    ``sdpa`` backend passes ``scaled_dot_product_attention``; the rest is the same math).
    """
    frames, width = messages.shape
    videos = frames // num_frames
    normed = F.layer_norm(messages, (width,), ln_weight, ln_bias, eps)
    qkv = normed @ in_proj_weight.t() + in_proj_bias  # (F, 3W)
    q, k, v = qkv.view(videos, num_frames, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)
    mixed = attention(q, k, v).transpose(1, 2).reshape(frames, width)  # (b, H, T, D) -> (F, W)
    return messages + (mixed @ out_proj_weight.t() + out_proj_bias)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """CLIP's activation, literally ``x * sigmoid(1.702 x)``."""
    return x * torch.sigmoid(QUICK_GELU_SLOPE * x)


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


BACKEND = Backend(
    name="reference",
    description="naive literal port of the official math (cat of the message token)",
    ops=OPS,
    devices=("cpu", "cuda"),
    dtypes=FLOAT_DTYPES,
    supports_backward=True,
    load=functions_of(__name__),
    device_reasons=torch_cuda_reasons,
)
