"""The model's GEMMs on the CPU during inference: torch's matmul or oneDNN with prepacked weights.

Nearly all of X-CLIP's work is its linear layers. On the CPU torch's ``matmul`` calls oneMKL,
which on some CPUs (AMD EPYC among them) runs at half the rate that oneDNN (shipped inside
torch) reaches on the same shapes once the weight is reordered into oneDNN's blocked layout;
on others the two are even. So there are two **providers**:

* ``"matmul"``: torch's ``addmm``/``linear`` (the differentiable path; always used in training,
  under grad, under autocast and while compiling);
* ``"onednn"``: ``torch.ops.mkldnn._linear_pointwise`` on a weight reordered once per weight,
  dtype and scale (:func:`packed_weight`), with the epilogue as a oneDNN post-op: bias, swish
  (the MLP's QuickGELU, see below), or a residual add (a binary post-op, into a fresh tensor:
  oneDNN's API here has no in-place sum).

:func:`provider` picks one per dtype the first time it is asked, by timing both on an
X-CLIP-sized GEMM (``800 x 768 -> 3072``) in this process, and keeps ``"matmul"`` unless
oneDNN is at least :data:`MARGIN` faster (both are fp32/bf16-exact; a near tie goes to
matmul, the provider the differentiable path uses, so results do not flip with noise). ``XCLIP_KERNELS_GEMM=matmul|onednn`` or
:func:`set_provider` fix it instead; ``python -m xclip_kernels`` says what this CPU gets.

QuickGELU ``h * sigmoid(1.702 h)`` is ``silu(1.702 h) / 1.702``. oneDNN's swish post-op here
ignores its alpha, so the first MLP weight and bias are packed scaled by 1.702 (``silu`` of
that GEMM is ``1.702 * QuickGELU(h)``) and the second weight by ``1 / 1.702``.

**A packed weight is never stale.** Each entry remembers the weight's storage (it holds a
``detach()``-ed alias, so that memory cannot be reused by another tensor while the entry
lives) and its autograd version counter, which every in-place write through the tensor or
any of its views bumps: an optimizer step, ``load_state_dict`` (``copy_``), an edit under
``no_grad``, ``nn.init``. ``module.to()``, ``param.data = ...`` and ``requires_grad_``
followed by training replace or bypass the entry (new storage, or the differentiable path).
An entry is reused only when both still match; otherwise the weight is packed again. Writes
that autograd itself does not see cannot be detected this way: through ``param.data``
(``param.data.mul_(2)`` bumps no version), through a NumPy view from ``.numpy()``, or through
raw pointers. :func:`clear` drops every entry; do that after such a write (or make the write
through the parameter under ``torch.no_grad()``, as ``nn.init`` does).
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from . import _env

PROVIDERS = ("matmul", "onednn")
"""The GEMM providers: torch's matmul (oneMKL on x86) and oneDNN's prepacked linear."""

MARGIN = 1.25
"""oneDNN is chosen only when its measured rate is at least this many times matmul's. Where
the two GEMMs run at one rate, the two paths are level end to end as well (the matmul path
keeps in-place residual adds and reused scratch buffers, which oneDNN's out-of-place post-ops
lose; ``benchmarks.main --gemm both``, BENCHMARKS.md), so a small lead on one timed GEMM is as
likely noise as gain; where oneDNN is far ahead (twice matmul's rate on some AMD EPYC CPUs)
the margin is no obstacle."""

PACKED_DTYPES = (torch.float32, torch.bfloat16)

CALIBRATION_SHAPE = (800, 768, 3072)
"""rows x in_features -> out_features timed by :func:`provider`: X-CLIP-B/32's MLP at 8 frames
and batch 2 (the model's most frequent GEMM shapes are of this size)."""


@dataclass(frozen=True)
class Measurement:
    """What :func:`provider` measured for one dtype: GFLOP/s of each provider and the choice."""

    dtype: torch.dtype
    matmul_gflops: float
    onednn_gflops: float
    chosen: str


@dataclass
class _Pack:
    source: torch.Tensor  # an alias of the weight's memory: keeps it from being reused
    version: int
    packed: torch.Tensor


_lock = threading.Lock()
_packs: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight (or its view base) -> {key: _Pack}
_choices: dict[torch.dtype, str] = {}
_measurements: dict[torch.dtype, Measurement] = {}
_override: str | None = None


# -- the provider ---------------------------------------------------------------------------------


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op (x86-64 and aarch64 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def set_provider(name: str | None) -> None:
    """Fix the CPU inference GEMM provider for every dtype: "matmul", "onednn", or None/"auto"
    to measure (the default; ``XCLIP_KERNELS_GEMM`` sets it per process)."""
    global _override
    if name is not None and name != "auto" and name not in PROVIDERS:
        raise ValueError(f"name: expected one of {', '.join(PROVIDERS)}, 'auto' or None, got {name!r}")
    if name == "onednn" and not onednn_available():
        raise ValueError("name: 'onednn' is not available in this torch build (torch.backends.mkldnn)")
    _override = None if name in (None, "auto") else name


def provider(dtype: torch.dtype) -> str:
    """The provider CPU inference GEMMs of ``dtype`` take in this process (see the module doc).

    The first call per dtype may time both providers (about a tenth of a second)."""
    forced = _override or _env.gemm_provider()
    if forced is not None:
        return forced if forced == "matmul" or onednn_available() else "matmul"
    if dtype not in PACKED_DTYPES or not onednn_available():
        return "matmul"
    chosen = _choices.get(dtype)
    if chosen is None:
        measure(dtype)
        chosen = _choices[dtype]  # the first measurement's choice, also when threads raced to it
    return chosen


def measure(dtype: torch.dtype, rounds: int = 3) -> Measurement:
    """Time both providers on an X-CLIP-sized GEMM of ``dtype`` in this process, interleaved,
    and remember the choice for :func:`provider`."""
    rows, inner, outer = CALIBRATION_SHAPE
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, inner, generator=generator).to(dtype)
    weight = (torch.randn(outer, inner, generator=generator) / math.sqrt(inner)).to(dtype)
    bias = torch.zeros(outer, dtype=dtype)
    flop = 2.0 * rows * inner * outer
    with torch.inference_mode(False), torch.no_grad():
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
        runs = {
            "matmul": lambda: torch.addmm(bias, x, weight.t()),
            "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], ""),
        }
        best = {name: math.inf for name in runs}
        for run in runs.values():  # warm-up: primitive creation, first touch of the outputs
            run()
        for _ in range(rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    rates = {name: flop / seconds / 1e9 for name, seconds in best.items()}
    chosen = "onednn" if rates["onednn"] >= MARGIN * rates["matmul"] else "matmul"
    result = Measurement(dtype, rates["matmul"], rates["onednn"], chosen)
    with _lock:
        _measurements[dtype] = result
        _choices.setdefault(dtype, chosen)
    return result


def measurements() -> dict[torch.dtype, Measurement]:
    """What :func:`measure` found so far in this process, per dtype."""
    return dict(_measurements)


# -- when the packed path applies -----------------------------------------------------------------


def use_packed(x: torch.Tensor, *weights: torch.Tensor, others: tuple[torch.Tensor | None, ...] = ()) -> bool:
    """Whether a linear layer on ``x`` with ``weights`` (packed) and ``others`` (biases,
    residuals: used as they are) takes the oneDNN path: inference on the CPU (no gradient will
    be needed), not under autocast or torch.compile, one packable dtype for all, weights that
    are not inference tensors (they keep no version counter), and :func:`provider` says
    "onednn"."""
    if x.device.type != "cpu" or x.dtype not in PACKED_DTYPES or x.dim() < 1:
        return False
    if torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling():
        return False
    tensors = [t for t in (*weights, *others) if t is not None]
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
        return False
    if any(t.device.type != "cpu" or t.dtype != x.dtype for t in tensors):
        return False
    if any(w.is_inference() for w in weights):
        return False
    return provider(x.dtype) == "onednn"


# -- packed weights -------------------------------------------------------------------------------


def _owner(weight: torch.Tensor) -> torch.Tensor:
    """The tensor a pack is filed under: the weight itself, or the parameter it is a view of
    (``in_proj_weight[W:]``, a reshaped conv kernel), which outlives the per-call view."""
    base = weight._base
    return weight if base is None else base


def packed_weight(weight: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``weight * scale`` (``(out, in)``) reordered for oneDNN's linear, made once and reused
    until the weight's memory or version changes (see the module doc)."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) tensor, got shape {tuple(weight.shape)}")
    if weight.is_inference():
        raise ValueError("weight: an inference tensor has no version counter, so a packed copy could go stale")
    owner = _owner(weight)
    key = (weight.dtype, scale, weight.storage_offset(), tuple(weight.shape), weight.stride())
    # Views share their base's version counter and storage: checking the owner covers all.
    version, memory = owner._version, owner.untyped_storage().data_ptr()
    with _lock:
        entries = _packs.get(owner)
        entry = None if entries is None else entries.get(key)
        if entry is not None and entry.version == version and entry.source.untyped_storage().data_ptr() == memory:
            return entry.packed
        if entries is not None:  # drop every pack of this owner made from older contents
            for stale in [k for k, e in entries.items() if e.version != version
                          or e.source.untyped_storage().data_ptr() != memory]:
                del entries[stale]
    # Packing outside inference mode makes an ordinary tensor, usable under no_grad as well.
    with torch.inference_mode(False), torch.no_grad():
        source = weight.detach()
        scaled = source if scale == 1.0 else (source.float() * scale).to(weight.dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(scaled.contiguous(), None)
    with _lock:
        _packs.setdefault(owner, {})[key] = _Pack(source, version, packed)
    return packed


def clear() -> None:
    """Drop every packed weight (they are packed again on next use)."""
    with _lock:
        _packs.clear()


def packed_count() -> int:
    """How many packed weights are held now (for tests and memory accounting)."""
    with _lock:
        return sum(len(entries) for entries in _packs.values())


# -- the linear layers ----------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, ``F.linear``'s contract: x ``(..., K)``, weight ``(M, K)``, bias
    ``(M,)`` or None -> ``(..., M)``; on the packed path during CPU inference, else F.linear."""
    if not use_packed(x, weight, others=(bias,)):
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(_rows(x), packed_weight(weight), bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])


def linear_quick_gelu_scaled(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: float) -> torch.Tensor:
    """``slope * QuickGELU(x @ weight.T + bias)`` = ``silu(slope * (x @ weight.T + bias))`` on the
    packed path (callers check :func:`use_packed`): x ``(R, K)`` -> ``(R, M)``."""
    return torch.ops.mkldnn._linear_pointwise(
        _rows(x), packed_weight(weight, slope), (bias.float() * slope).to(bias.dtype), "swish", [], ""
    )


def linear_add(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, scale: float = 1.0
) -> torch.Tensor:
    """``residual + (x @ (scale * weight).T) + bias`` into a fresh tensor of residual's shape, the
    add as a oneDNN post-op (callers check :func:`use_packed`): x ``(..., K)``, residual
    ``(..., M)``."""
    out = torch.ops.mkldnn._linear_pointwise.binary(
        _rows(x), _rows(residual).contiguous(), packed_weight(weight, scale), bias, "add"
    )
    return out.view(residual.shape)
