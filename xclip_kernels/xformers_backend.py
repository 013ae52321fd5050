"""Backend ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only).

xformers takes ``(B, M, H, K)`` tensors, which is our frame-batched layout as it is; queries
and keys may differ in length, so only the frame's N tokens are queries. Like SDPA it needs
the message key/value appended to the keys (one copy).
"""

from __future__ import annotations

import torch


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    msg_k: torch.Tensor,
    msg_v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """IFA via xformers. q, k, v: ``(F, N, H, D)``; msg_k, msg_v: ``(F, H, D)``. Returns ``(F, N, H, D)``."""
    import xformers.ops as xops  # imported on first call: never at import time

    keys = torch.cat([k, msg_k.unsqueeze(1)], dim=1)
    values = torch.cat([v, msg_v.unsqueeze(1)], dim=1)
    return xops.memory_efficient_attention(q, keys, values, scale=scale)
