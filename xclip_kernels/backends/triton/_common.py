"""Helpers shared by the Triton kernels' launchers (this module imports triton)."""

from __future__ import annotations

import torch
import triton

LOG2E = 1.4426950408889634
"""The kernels use exp2: ``exp(x) = exp2(x * LOG2E)``."""


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for inputs of ``dtype``: fp32 inputs get exact fp32
    products (TF32 would break the fp32 parity bar)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two (at least 16, ``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(head_dim))
