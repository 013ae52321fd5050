"""Helpers shared by the Triton kernels' launchers (this module imports triton)."""

from __future__ import annotations

import contextlib

import torch
import triton

LOG2E = 1.4426950408889634
"""The kernels use exp2: ``exp(x) = exp2(x * LOG2E)``."""

MAX_GRID = (2**31 - 1, 65535, 65535)
"""CUDA's limits on the number of programs along grid axes 0, 1 and 2."""


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input precision for inputs of ``dtype``: fp32 inputs get exact fp32
    products (TF32 would break the fp32 parity bar)."""
    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """The head dim padded to a power of two (at least 16, ``tl.dot``'s minimum)."""
    return max(16, triton.next_power_of_2(head_dim))


def checked_grid(grid: tuple[int, ...], what: str, axes: tuple[str, ...]) -> tuple[int, ...]:
    """``grid`` itself, after checking every axis against :data:`MAX_GRID` (a launch past a
    limit fails on the GPU with an unhelpful error); ``axes`` names what each axis counts."""
    for axis, (size, limit, meaning) in enumerate(zip(grid, MAX_GRID, axes)):
        if size > limit:
            raise ValueError(f"{what}: grid axis {axis} ({meaning}) would be {size}, above CUDA's limit of {limit}")
    return grid


def launch_device(tensor: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context to launch a kernel on ``tensor``'s device in.

    Triton launches on the *current* CUDA device and stream, not on the tensors' device:
    inputs on ``cuda:1`` while ``cuda:0`` is current would run on the wrong GPU and fault.
    CPU tensors (the interpreter) and meta tensors (tools that record launches) need nothing.
    """
    if not _is_cuda(tensor.device):
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _is_cuda(device: torch.device) -> bool:
    # A function of its own so a test can let meta tensors stand in for a second CUDA device.
    return device.type == "cuda"
