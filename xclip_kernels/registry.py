"""The backend registry: what each backend supports, declared as data, and how one is chosen.

Every op call describes itself as an :class:`OpInputs`; each :class:`Backend` answers
:meth:`Backend.not_supported_reasons` for it. ``backend=None`` walks :data:`PRIORITY` for the
tensors' device and takes the first backend with no reasons; when none fits, one
:class:`BackendNotSupportedError` lists every backend's reasons. A backend named by the
caller that cannot run raises that same report for it alone: nothing falls back silently.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import _env

OPS: tuple[str, ...] = ("frame_attention", "message_attention")

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


_AVAILABILITY: dict[Callable[[], list[str]], list[str]] = {}
"""Answers of each backend's ``availability`` check, asked once per process."""

_IMPLEMENTATIONS: dict[tuple[str, str], Callable] = {}
"""Functions of the backends' modules, imported on first use."""


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


@dataclass(frozen=True)
class Backend:
    """One backend's capabilities, as data.

    ``module`` holds one function per supported op, named after the op; it is imported on
    first use, so declaring a backend costs nothing. ``availability`` returns the reasons the
    backend cannot run on this machine at all (missing package, extension not built), and is
    asked once per process.
    """

    name: str
    description: str
    module: str
    ops: tuple[str, ...]
    devices: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    supports_backward: bool
    max_head_dim: int | None = None
    min_head_dim: int = 1
    head_dim_multiple: int = 1
    max_frames: int | None = None
    availability: Callable[[], list[str]] = field(default=lambda: [], compare=False)
    device_reasons: Callable[[str], list[str]] = field(default=lambda device: [], compare=False)

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
        """The function implementing ``op`` on this backend (its module is imported once).

        Under ``torch.compile`` the lookup is a plain dict read; importing is not traceable,
        so :func:`preload` a backend before compiling a model that is forced onto it.
        """
        function = _IMPLEMENTATIONS.get((self.name, op))
        if function is None:
            function = getattr(importlib.import_module(self.module), op)
            _IMPLEMENTATIONS[(self.name, op)] = function
        return function


def _torch_cuda_reasons(device: str) -> list[str]:
    if device == "cuda" and not torch.cuda.is_available():
        return ["torch.cuda.is_available() is False"]
    return []


def _xformers_availability() -> list[str]:
    try:
        importlib.import_module("xformers.ops")
    except Exception as exc:  # ImportError, or a broken install raising anything else
        return [f"xformers is not importable ({type(exc).__name__}: {exc})"]
    return []


def _triton_availability() -> list[str]:
    if importlib.util.find_spec("triton") is None:
        return ["triton is not installed (pip install triton)"]
    return []


def _compiled_availability(device: str) -> Callable[[], list[str]]:
    def reasons() -> list[str]:
        from . import compiled  # imports torch only; the extension is loaded on this first ask

        return compiled.unavailable_reasons(device)

    return reasons


def _triton_device_reasons(device: str) -> list[str]:
    if device == "cpu" and not _env.triton_interpreter_enabled():
        return ["CPU tensors need TRITON_INTERPRET=1 set before triton is imported"]
    return _torch_cuda_reasons(device)


_ALL = (
    Backend(
        name="reference",
        description="naive literal port of the official math (cat of the message token)",
        module="xclip_kernels.reference",
        ops=OPS,
        devices=("cpu", "cuda"),
        dtypes=_FLOAT_DTYPES,
        supports_backward=True,
        device_reasons=_torch_cuda_reasons,
    ),
    Backend(
        name="sdpa",
        description="torch scaled_dot_product_attention on the frame-batched layout",
        module="xclip_kernels.sdpa",
        ops=OPS,
        devices=("cpu", "cuda"),
        dtypes=_FLOAT_DTYPES,
        supports_backward=True,
        device_reasons=_torch_cuda_reasons,
    ),
    Backend(
        name="xformers",
        description="xformers memory_efficient_attention with Nq != Nkv",
        module="xclip_kernels.xformers_backend",
        ops=("frame_attention",),
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        supports_backward=True,
        max_head_dim=128,
        availability=_xformers_availability,
        device_reasons=_torch_cuda_reasons,
    ),
    Backend(
        name="triton",
        description="fused Triton kernels (no cat, no message query row)",
        module="xclip_kernels.triton_attention",
        ops=OPS,
        devices=("cuda", "cpu"),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        supports_backward=True,
        max_head_dim=128,
        min_head_dim=16,
        max_frames=64,
        availability=_triton_availability,
        device_reasons=_triton_device_reasons,
    ),
    Backend(
        name="cuda",
        description="CUDA kernels from csrc/",
        module="xclip_kernels.compiled",
        ops=OPS,
        devices=("cuda",),
        dtypes=(torch.float16, torch.bfloat16, torch.float32),
        supports_backward=True,
        max_head_dim=128,
        max_frames=64,
        availability=_compiled_availability("cuda"),
        device_reasons=_torch_cuda_reasons,
    ),
    Backend(
        name="cpp",
        description="C++ CPU kernels from csrc/",
        module="xclip_kernels.compiled",
        ops=OPS,
        devices=("cpu",),
        dtypes=(torch.float32, torch.float64),
        supports_backward=True,
        availability=_compiled_availability("cpu"),
    ),
)

_BY_NAME: dict[str, Backend] = {b.name: b for b in _ALL}

BACKENDS: tuple[str, ...] = tuple(_BY_NAME)
"""Names of every backend, available here or not."""

PRIORITY: dict[str, tuple[str, ...]] = {
    # The Triton interpreter is far too slow to be chosen automatically on the CPU.
    "cuda": ("triton", "cuda", "xformers", "sdpa", "reference"),
    "cpu": ("cpp", "sdpa", "reference"),
}
"""Automatic choice: the first backend in the device's list that supports the call."""


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str) or name not in _BY_NAME:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} or None, got {name!r}")
    return _BY_NAME[name]


def preload(name: str) -> None:
    """Import backend ``name``'s implementations now if it can run here (before tracing)."""
    backend = get_backend(name)
    if not backend.unavailable_reasons():
        for op in backend.ops:
            backend.implementation(op)


def _report(inputs: OpInputs, reasons: dict[str, list[str]]) -> str:
    head = (
        f"no backend can run {inputs.op} on {inputs.device_type} "
        f"{str(inputs.dtype).removeprefix('torch.')}, head dim {inputs.head_dim}"
        f"{', with grad' if inputs.requires_grad else ''}:"
    )
    lines = [f"  {name}: {'; '.join(why)}" for name, why in reasons.items()]
    return "\n".join([head, *lines])


def select_backend(inputs: OpInputs, backend: str | None = None) -> Backend:
    """The backend that runs ``inputs``.

    ``backend`` names one (it must support the call, or this raises); ``None`` takes the
    ``XCLIP_KERNELS_BACKEND`` environment variable if set, else the first supporting
    backend in :data:`PRIORITY` for the device.
    """
    if torch.compiler.is_compiling():
        i = inputs
        return _BY_NAME[
            _select_while_tracing(i.op, i.device_type, i.dtype, i.head_dim, i.requires_grad, i.num_frames, backend)
        ]
    return _select(inputs, backend)


def _select(inputs: OpInputs, backend: str | None) -> Backend:
    if backend is None:
        backend = _env.forced_backend()
        if backend is not None and backend not in _BY_NAME:
            raise ValueError(
                f"XCLIP_KERNELS_BACKEND: expected one of {', '.join(BACKENDS)} or unset, got {backend!r}"
            )
    if backend is not None:
        chosen = get_backend(backend)
        reasons = chosen.not_supported_reasons(inputs)
        if reasons:
            raise BackendNotSupportedError(_report(inputs, {chosen.name: reasons}))
        return chosen
    candidates = PRIORITY.get(inputs.device_type, ("reference",))
    all_reasons: dict[str, list[str]] = {}
    for name in candidates:
        reasons = _BY_NAME[name].not_supported_reasons(inputs)
        if not reasons:
            return _BY_NAME[name]
        all_reasons[name] = reasons
    raise BackendNotSupportedError(_report(inputs, all_reasons))


def _select_while_tracing(
    op: str, device_type: str, dtype: torch.dtype, head_dim: int, requires_grad: bool, num_frames: int | None,
    backend: str | None,
) -> str:
    """:func:`select_backend` under ``torch.compile``: run in plain Python at trace time, the
    chosen name baked into the graph.

    Availability checks import modules and load the extension, which Dynamo cannot trace; without
    this an automatic choice, or a backend not yet used eagerly, would break a ``fullgraph=True``
    compile. Every backend that can run on some device here is imported now, before the trace
    reads the table of implementations (Dynamo reads it once per trace, so an op imported after
    that would be missing from its view).
    """
    for b in _ALL:
        if not b.unavailable_reasons() and any(not b.device_reasons(device) for device in b.devices):
            preload(b.name)
    return _select(OpInputs(op, device_type, dtype, head_dim, requires_grad, num_frames), backend).name


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo (and with
# it Inductor and Triton: seconds) when this module is imported; tests/xclip/test_compile.py
# checks that the decorator still works this way.
_select_while_tracing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def backend_table() -> list[dict[str, object]]:
    """One row per backend: name, availability on this machine and the reasons, capabilities."""
    rows = []
    for b in _ALL:
        reasons = b.unavailable_reasons()
        rows.append(
            {
                "name": b.name,
                "available": not reasons,
                "reasons": reasons,
                "devices": b.devices,
                "dtypes": tuple(str(d).removeprefix("torch.") for d in b.dtypes),
                "ops": b.ops,
                "backward": b.supports_backward,
                "max_head_dim": b.max_head_dim,
                "description": b.description,
            }
        )
    return rows
