"""Scratch buffers reused across calls during CPU inference, one set per thread.

Fresh multi-megabyte activation buffers cost page faults on every first touch: as much as a
tenth of the GEMM time on the CPU, and half of a float32 GEMM's rate where torch's allocator
asks for huge pages (``THP_MEM_ALLOC_ENABLE=1``). The blocks (:mod:`.fused`) and the widened
GEMM route (:mod:`.gemm`) keep what never leaves them in these buffers instead.
"""

from __future__ import annotations

import math
import threading

import torch


class Workspace:
    """Scratch buffers reused across calls during inference, one set per thread.

    ``buffer(name, shape, ...)`` returns a view of a cached tensor that grows as needed. The
    contents are scratch: a buffer is valid until the next request of the same name, so a
    caller must never let a workspace view escape (outputs are always fresh tensors). Buffers
    made under ``torch.inference_mode`` are inference tensors, which only inference mode may
    write: each mode has buffers of its own.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` whose memory is reused by the next request for ``name``."""
        buffers: dict[tuple[str, bool], torch.Tensor] = self._local.__dict__.setdefault("buffers", {})
        key = (name, torch.is_inference_mode_enabled())
        numel = math.prod(shape)
        cached = buffers.get(key)
        if cached is None or cached.numel() < numel or cached.dtype != dtype or cached.device != device:
            cached = torch.empty(numel, dtype=dtype, device=device)
            buffers[key] = cached
        return cached[:numel].view(shape)

    def clear(self) -> None:
        """Free this thread's buffers."""
        self._local.__dict__.pop("buffers", None)
