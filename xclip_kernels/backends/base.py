"""What a backend declares: :class:`Backend` (its capabilities, as data) and :class:`OpInputs`
(what a call needs a backend to support).

Every backend module (``reference``, ``sdpa``, ``xformers``, ``triton``, ``cpp``, ``cuda``)
holds one ``BACKEND = Backend(...)`` beside its code; :mod:`xclip_kernels.registry` collects
them and chooses. Declaring costs nothing: ``Backend.load`` imports the backend's
implementations (and with them Triton, xformers or the compiled extension) on first use.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

OPS: tuple[str, ...] = ("frame_attention", "message_attention")
"""The ops every backend may implement (:mod:`xclip_kernels.ops`)."""

FLOAT_DTYPES: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

_AVAILABILITY: dict[Callable[[], list[str]], list[str]] = {}
"""Answers of each backend's ``availability`` check, asked once per process."""

_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
"""Each backend's function per op, loaded on first use."""


class BackendNotSupportedError(RuntimeError):
    """No backend (or not the one asked for) can run this call; the message says why."""


@dataclass(frozen=True)
class OpInputs:
    """What a backend needs to know about a call to say whether it can run it."""

    op: str
    device_type: str
    dtype: torch.dtype
    head_dim: int
    requires_grad: bool
    num_frames: int | None = None  # message_attention: messages per video

    @staticmethod
    def of(op: str, *tensors: torch.Tensor, head_dim: int, num_frames: int | None = None) -> "OpInputs":
        """Describe a call of ``op`` on ``tensors`` (the first one gives device and dtype)."""
        first = tensors[0]
        requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        return OpInputs(op, first.device.type, first.dtype, head_dim, requires_grad, num_frames)


def functions_of(module_name: str) -> Callable[[], Mapping[str, Callable]]:
    """``Backend.load`` for a backend whose functions live in module ``module_name`` under the
    ops' names (looked up when loading, so a module can be its own declaration's target)."""

    def load() -> Mapping[str, Callable]:
        module = importlib.import_module(module_name)
        return {op: getattr(module, op) for op in OPS if hasattr(module, op)}

    return load


@dataclass(frozen=True)
class Backend:
    """One backend's capabilities, as data.

    ``load`` returns the backend's function per op (named as in :data:`OPS`, called with the
    op's checked arguments); it runs once, on first use, and may import heavy packages.
    ``availability`` returns the reasons the backend cannot run on this machine at all
    (missing package, extension not built), asked once per process; ``device_reasons`` those
    for one of its declared devices (no GPU here, interpreter not enabled), asked per call;
    ``notes`` facts about this installation worth printing beside it (``python -m
    xclip_kernels``) that do not stop it from running.
    """

    name: str
    description: str
    ops: tuple[str, ...]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    supports_backward: bool
    load: Callable[[], Mapping[str, Callable]] = field(compare=False)
    max_head_dim: int | None = None
    min_head_dim: int = 1
    head_dim_multiple: int = 1
    max_frames: int | None = None
    availability: Callable[[], list[str]] = field(default=lambda: [], compare=False)
    device_reasons: Callable[[str], list[str]] = field(default=lambda device: [], compare=False)
    notes: Callable[[], list[str]] = field(default=lambda: [], compare=False)

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run on this machine at all; empty when it can (asked once)."""
        if self.availability not in _AVAILABILITY:
            _AVAILABILITY[self.availability] = list(self.availability())
        return _AVAILABILITY[self.availability]

    def not_supported_reasons(self, inputs: OpInputs) -> list[str]:
        """Every reason this backend cannot run ``inputs``; empty when it can."""
        reasons = list(self.unavailable_reasons())
        if inputs.op not in self.ops:
            reasons.append(f"does not implement {inputs.op}")
        if inputs.device_type not in self.devices:
            reasons.append(
                f"device {inputs.device_type!r} not supported (supports {', '.join(self.devices)})"
            )
        else:
            reasons.extend(self.device_reasons(inputs.device_type))
        if inputs.dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {str(inputs.dtype).removeprefix('torch.')} not supported (supports {names})")
        if self.max_head_dim is not None and inputs.head_dim > self.max_head_dim:
            reasons.append(f"head dim {inputs.head_dim} > {self.max_head_dim}")
        if inputs.head_dim < self.min_head_dim:
            reasons.append(f"head dim {inputs.head_dim} < {self.min_head_dim}")
        if self.max_frames is not None and inputs.num_frames is not None and inputs.num_frames > self.max_frames:
            reasons.append(f"{inputs.num_frames} frames per video > {self.max_frames}")
        if inputs.head_dim % self.head_dim_multiple:
            reasons.append(f"head dim {inputs.head_dim} is not a multiple of {self.head_dim_multiple}")
        if inputs.requires_grad and not self.supports_backward:
            reasons.append("backward not supported (inputs require grad)")
        return reasons

    def implementation(self, op: str) -> Callable:
        """The function implementing ``op`` on this backend (``load`` runs on the first ask).

        Under ``torch.compile`` the lookup is a plain dict read; loading is not traceable, so
        :func:`xclip_kernels.registry.preload` a backend before compiling a model forced onto it.
        """
        function = _IMPLEMENTATIONS.get((self.name, op))
        if function is None:
            function = self.load()[op]
            _IMPLEMENTATIONS[(self.name, op)] = function
        return function


def torch_cuda_reasons(device: str) -> list[str]:
    """``device_reasons`` of a backend that runs on CUDA through torch: is there a GPU?"""
    if device == "cuda" and not torch.cuda.is_available():
        return ["torch.cuda.is_available() is False"]
    return []
