"""Backend ``xformers``: ``xformers.ops.memory_efficient_attention`` (CUDA only).

xformers takes ``(B, M, H, K)`` tensors, which is our frame-batched layout as it is; queries
and keys may differ in length, so only the frame's N tokens are queries. Like SDPA it needs
the message key/value appended to the keys (one copy). xformers itself is imported on the
first call, never when this declaration is read.
"""

from __future__ import annotations

import importlib
import torch

from .base import Backend, functions_of, torch_cuda_reasons


def frame_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    msg_k: torch.Tensor,
    msg_v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """IFA via xformers. q, k, v: ``(F, N, H, D)``; msg_k, msg_v: ``(F, H, D)``. Returns ``(F, N, H, D)``."""
    import xformers.ops as xops

    keys = torch.cat([k, msg_k.unsqueeze(1)], dim=1)
    values = torch.cat([v, msg_v.unsqueeze(1)], dim=1)
    return xops.memory_efficient_attention(q, keys, values, scale=scale)


def _availability() -> list[str]:
    try:
        importlib.import_module("xformers.ops")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return [f"xformers is not importable ({type(exc).__name__}: {exc})"]
    return []


BACKEND = Backend(
    name="xformers",
    description="xformers memory_efficient_attention with Nq != Nkv",
    ops=("frame_attention",),
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    supports_backward=True,
    load=functions_of(__name__),
    max_head_dim=128,
    availability=_availability,
    device_reasons=torch_cuda_reasons,
)
