"""The backend registry: collects the backends' declarations and chooses one per call.

Each backend module under :mod:`xclip_kernels.backends` declares ``BACKEND``, its
capabilities as data (:class:`~xclip_kernels.backends.base.Backend`). Every op call
describes itself as an :class:`OpInputs`; each backend answers
:meth:`Backend.not_supported_reasons` for it. ``backend=None`` walks :data:`PRIORITY` for the
tensors' device and takes the first backend with no reasons; when none fits, one
:class:`BackendNotSupportedError` lists every backend's reasons. A backend named by the
caller that cannot run raises that same report for it alone: nothing falls back silently.
"""

from __future__ import annotations

import torch

from . import _env
from .backends.base import OPS, Backend, BackendNotSupportedError, OpInputs

__all__ = [
    "BACKENDS",
    "OPS",
    "PRIORITY",
    "Backend",
    "BackendNotSupportedError",
    "OpInputs",
    "backend_table",
    "get_backend",
    "preload",
    "select_backend",
]

BACKENDS: tuple[str, ...] = ("reference", "sdpa", "xformers", "triton", "cuda", "cpp")
"""Names of every backend, available here or not."""

PRIORITY: dict[str, tuple[str, ...]] = {
    # The Triton interpreter is far too slow to be chosen automatically on the CPU.
    "cuda": ("triton", "cuda", "xformers", "sdpa", "reference"),
    "cpu": ("cpp", "sdpa", "reference"),
}
"""Automatic choice: the first backend in the device's list that supports the call."""


_BY_NAME: dict[str, Backend] = {}
"""The declarations by name, filled on first use (a plain dict: read as is inside a trace)."""


def _declared() -> dict[str, Backend]:
    """Every backend's declaration, by name. The backend modules are imported on first use, so
    that importing xclip_kernels reads none; a declaration itself imports no extension, Triton
    or xformers (each backend's ``load`` does, when the backend first runs)."""
    global _BY_NAME
    if not _BY_NAME:
        from .backends import cpp, cuda, reference, sdpa, triton, xformers

        declared = {m.BACKEND.name: m.BACKEND for m in (reference, sdpa, xformers, triton, cuda, cpp)}
        if tuple(declared) != BACKENDS:
            raise AssertionError(f"backend declarations {tuple(declared)} do not match BACKENDS {BACKENDS}")
        _BY_NAME = declared  # one assignment: another thread sees all of it or none
    return _BY_NAME


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ``ValueError`` listing the known names otherwise."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)} or None, got {name!r}")
    return _declared()[name]


def preload(name: str) -> None:
    """Import backend ``name``'s implementations now if it can run here (before tracing)."""
    backend = get_backend(name)
    if not backend.unavailable_reasons():
        for op in backend.ops:
            backend.implementation(op)


def _forced_backend() -> str | None:
    """The backend ``XCLIP_KERNELS_BACKEND`` names (checked), or None when unset."""
    name = _env.forced_backend()
    if name is not None and name not in BACKENDS:
        raise ValueError(f"XCLIP_KERNELS_BACKEND: expected one of {', '.join(BACKENDS)} or unset, got {name!r}")
    return name


def preload_automatic() -> list[str]:
    """Preload what ``backend=None`` will take here: the ``XCLIP_KERNELS_BACKEND`` backend if
    set, else per device (the CPU, and CUDA where available) the first backend of
    :data:`PRIORITY` that can run at all. Returns their names.

    Loading is what registers a compiled backend's fake implementations and FLOP formulas, so
    doing it before a ``torch.compile`` trace or a ``FlopCounterMode`` (which reads the formulas
    when it is entered) keeps the first call from being traced or counted without them."""
    forced = _forced_backend()
    if forced is not None:
        preload(forced)
        return [forced]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    loaded = []
    for device in devices:
        for name in PRIORITY[device]:
            if not get_backend(name).unavailable_reasons() and device in get_backend(name).devices:
                preload(name)
                loaded.append(name)
                break
    return loaded


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
        name = _select_while_tracing(i.op, i.device_type, i.dtype, i.head_dim, i.requires_grad, i.num_frames, backend)
        return _BY_NAME[name]  # filled by the call above, in plain Python
    return _select(inputs, backend)


def _select(inputs: OpInputs, backend: str | None) -> Backend:
    if backend is None:
        backend = _forced_backend()
    if backend is not None:
        chosen = get_backend(backend)
        reasons = chosen.not_supported_reasons(inputs)
        if reasons:
            raise BackendNotSupportedError(_report(inputs, {chosen.name: reasons}))
        return chosen
    candidates = PRIORITY.get(inputs.device_type, ("reference",))
    all_reasons: dict[str, list[str]] = {}
    for name in candidates:
        reasons = get_backend(name).not_supported_reasons(inputs)
        if not reasons:
            return get_backend(name)
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
    for b in _declared().values():
        if not b.unavailable_reasons() and any(not b.device_reasons(device) for device in b.devices):
            preload(b.name)
    return _select(OpInputs(op, device_type, dtype, head_dim, requires_grad, num_frames), backend).name


# What ``torch.compiler.assume_constant_result`` does, without importing torch._dynamo (and with
# it Inductor and Triton: seconds) when this module is imported; tests/xclip/test_compile.py
# checks that the decorator still works this way.
_select_while_tracing._dynamo_marked_constant = True  # type: ignore[attr-defined]


def backend_table() -> list[dict[str, object]]:
    """One row per backend: name, availability on this machine and the reasons, capabilities, notes."""
    rows = []
    for b in _declared().values():
        reasons = b.unavailable_reasons()
        rows.append(
            {
                "name": b.name,
                "available": not reasons,
                "reasons": reasons,
                "notes": [] if reasons else b.notes(),
                "devices": b.devices,
                "dtypes": tuple(str(d).removeprefix("torch.") for d in b.dtypes),
                "ops": b.ops,
                "backward": b.supports_backward,
                "max_head_dim": b.max_head_dim,
                "description": b.description,
            }
        )
    return rows
