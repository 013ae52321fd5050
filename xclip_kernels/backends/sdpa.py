"""Backend ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the frame-batched layout.

SDPA takes one key tensor, so the message key/value must be appended to each frame's keys:
that copy is the price of this backend (the fused backends read them in place). The queries
are only the frame's N tokens: no query row is spent on the message token.
"""

from __future__ import annotations

import functools
import torch
import torch.nn.functional as F

from . import reference
from .base import FLOAT_DTYPES, OPS, Backend, functions_of, torch_cuda_reasons


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


message_attention = functools.partial(reference.message_attention, attention=F.scaled_dot_product_attention)
"""CFA of one block with SDPA over each video's T messages: the reference's LayerNorm and
projections around ``scaled_dot_product_attention``. messages ``(F, W)`` -> ``(F, W)``."""


BACKEND = Backend(
    name="sdpa",
    description="torch scaled_dot_product_attention on the frame-batched layout",
    ops=OPS,
    devices=("cpu", "cuda"),
    dtypes=FLOAT_DTYPES,
    supports_backward=True,
    load=functions_of(__name__),
    device_reasons=torch_cuda_reasons,
)
