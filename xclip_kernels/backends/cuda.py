"""Backend ``cuda``: the CUDA kernels of the compiled extension (``csrc/cuda``, registered under the
CUDA dispatch key of ``torch.ops.xclip_ext``; loaded and completed by :mod:`._extension`).

IFA forward and backward and the fused message path in fp32, fp16 and bf16. The message
path's backward is the PyTorch formula of :mod:`xclip_kernels.autograd`, registered as the
CUDA kernel of ``xclip_ext::message_attention_backward``. This declaration loads nothing.
"""

from __future__ import annotations

import torch

from . import _extension
from .base import OPS, Backend, functions_of, torch_cuda_reasons


def _availability() -> list[str]:
    error = _extension.load_error()
    if error is not None:
        return [error]
    if not _extension.extension().has_cuda():
        return ["xclip_kernels._C was built without CUDA (needs nvcc and a CUDA build of torch at build time)"]
    return []


BACKEND = Backend(
    name="cuda",
    description="CUDA kernels from csrc/",
    ops=OPS,
    devices=("cuda",),
    dtypes=(torch.float16, torch.bfloat16, torch.float32),
    supports_backward=True,
    load=functions_of(_extension.__name__),
    # csrc/cuda/frame_attention.cu pads the head dim to one of 32, 64, 96, 128 (compiled
    # tiles); message_attention.cu gives a video's T rows to 8 row groups of 8 rows: T <= 64.
    max_head_dim=128,
    max_frames=64,
    availability=_availability,
    device_reasons=torch_cuda_reasons,
)
