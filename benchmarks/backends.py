"""What the end-to-end and kernel benchmarks share: the backends that run here, the dtypes by
name, the model-size flags and the inputs of one run."""

from __future__ import annotations

import argparse

import torch

import xclip
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


LABELS = ("archery", "bowling", "juggling balls", "playing violin", "surfing water")
"""Label texts the benchmarks cycle through (only their count matters for the cost)."""


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, *, rounds: int) -> None:
    """``--variant --frames --batch --labels --rounds --dtype``, the size of an end-to-end run."""
    parser.add_argument("--variant", default="xclip-b32", choices=sorted(xclip.VARIANTS))
    parser.add_argument("--frames", type=positive_int, default=8)
    parser.add_argument("--batch", type=positive_int, default=2)
    parser.add_argument("--labels", type=positive_int, default=1)
    parser.add_argument("--rounds", type=positive_int, default=rounds)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def model_inputs(
    config: xclip.XCLIPConfig, batch: int, labels: int, device: str, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random video ``(batch, T, 3, S, S)`` and ``labels`` tokenized label texts ``(labels, 77)``."""
    video = torch.randn(batch, config.num_frames, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    text = xclip.tokenize([LABELS[i % len(LABELS)] for i in range(labels)]).to(device)
    return video, text
