"""Backend ``triton``: fused Triton kernels for X-CLIP's two attentions.

``frame_attention.py`` (IFA: online softmax seeded by the message key, no ``cat``, no message
query row; forward and backward kernels) and ``message_attention.py`` (the message path: one
kernel for LayerNorm + q/k/v + softmax over T, then one GEMM) each hold kernels, launchers,
``torch.library`` ops and their entry point. This file only declares what they support, so
reading the declaration imports no Triton: ``load`` imports the kernels on first use.
"""

from __future__ import annotations

import importlib.util
from typing import Callable, Mapping

import torch

from ... import _env
from ..base import OPS, Backend, torch_cuda_reasons


def _availability() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install triton)"]
    return []


def _device_reasons(device: str) -> list[str]:
    if device == "cpu" and not _env.triton_interpreter_enabled():
        return ["CPU tensors need TRITON_INTERPRET=1 set before triton is imported"]
    return torch_cuda_reasons(device)


def _implementations() -> Mapping[str, Callable]:
    from .frame_attention import frame_attention
    from .message_attention import message_attention

    return {"frame_attention": frame_attention, "message_attention": message_attention}


BACKEND = Backend(
    name="triton",
    description="fused Triton kernels (no cat, no message query row)",
    ops=OPS,
    devices=("cuda", "cpu"),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    supports_backward=True,
    load=_implementations,
    # One (query tile x head dim) block in registers: D up to 128, and tl.dot's minimum of 16.
    max_head_dim=128,
    min_head_dim=16,
    # message_attention.py keeps all of a video's T messages in one tile.
    max_frames=64,
    availability=_availability,
    device_reasons=_device_reasons,
)
