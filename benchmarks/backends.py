"""What the benchmarks time: the backends that run here, and the dtypes they take by name."""

from __future__ import annotations

import torch

import xclip_kernels as xk

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
"""``--dtype`` names of the benchmark scripts."""


def runnable_backends(
    ops: tuple[str, ...], device: str, dtype: torch.dtype, head_dim: int, grad: bool = False,
    num_frames: int | None = None,
) -> list[str]:
    """Backends that can run every op of ``ops`` here, in :data:`xclip_kernels.BACKENDS` order.

    The Triton interpreter is left out on the CPU: it is a correctness tool, far too slow to time.
    """
    names = []
    for name in xk.BACKENDS:
        if device == "cpu" and name == "triton":
            continue
        backend = xk.get_backend(name)
        if all(not backend.not_supported_reasons(xk.OpInputs(op, device, dtype, head_dim, grad, num_frames)) for op in ops):
            names.append(name)
    return names
