"""The model's GEMMs on the CPU during inference: torch's matmul, oneDNN with prepacked weights,
or, for bf16/fp16, the same product computed in float32.

Nearly all of X-CLIP's work is its linear layers. On the CPU torch's ``matmul`` calls oneMKL,
which on some CPUs (AMD EPYC among them) runs at half the rate that oneDNN (shipped inside
torch) reaches on the same shapes once the weight is reordered into oneDNN's blocked layout;
on others the two are even. And on CPUs with ``avx512_bf16`` but no AMX, both run bf16 GEMMs
*below* their float32 rate. So there are three **providers**:

* ``"matmul"``: torch's ``addmm``/``linear`` (the differentiable path; always used in training,
  under grad, under autocast and while compiling);
* ``"onednn"``: ``torch.ops.mkldnn._linear_pointwise`` on a weight reordered once per weight,
  dtype and scale (:func:`packed_weight`), with the epilogue as a oneDNN post-op: bias, swish
  (the MLP's QuickGELU, see below), or a residual add (a binary post-op, into a fresh tensor:
  oneDNN's API here has no in-place sum);
* ``"float32"`` (bf16 and fp16 only): the product *widened* to float32. The activations are
  converted per call, the weight is kept as a float32 copy (:func:`float32_weight`, or a
  oneDNN-packed float32 copy where float32 GEMMs take oneDNN here), the GEMM runs at the
  float32 rate, bias, QuickGELU and the residual add are applied in float32, and each layer's
  output is rounded to the input dtype once. Products of bf16 (or fp16) numbers are exact in
  float32 and half-precision GEMMs accumulate in float32 anyway, so this is at least as
  accurate as the native route (the MLP's hidden activations are never rounded to bf16 at
  all). **Memory:** the float32 copies take twice the memory of the bf16/fp16 weights they
  copy (freed with the weights, or by :func:`clear`).

:func:`provider` picks one per dtype the first time it is asked, by timing the candidates on an
X-CLIP-sized GEMM (``800 x 768 -> 3072``) in this process, interleaved. It keeps ``"matmul"``
unless oneDNN is at least :data:`MARGIN` faster, and for bf16/fp16 takes ``"float32"`` (timed
with its conversions: ``x.float()``, the float32 GEMM, the rounding of the output) only when it
is at least :data:`MARGIN` faster than the faster native provider (a near tie goes to the
provider the differentiable path uses, so results do not flip with noise).
``XCLIP_KERNELS_GEMM=matmul|onednn|float32`` or :func:`set_provider` fix it instead ("float32"
leaves float32 GEMMs on their measured provider); ``python -m xclip_kernels`` says what this
CPU gets.

QuickGELU ``h * sigmoid(1.702 h)`` is ``silu(1.702 h) / 1.702``. oneDNN's swish post-op here
ignores its alpha, so the first MLP weight and bias are packed scaled by 1.702 (``silu`` of
that GEMM is ``1.702 * QuickGELU(h)``) and the second weight by ``1 / 1.702``.

**A packed or widened weight is never stale.** Each cached copy remembers the weight's storage
(it holds a ``detach()``-ed alias, so that memory cannot be reused by another tensor while the
entry lives) and its autograd version counter, which every in-place write through the tensor or
any of its views bumps: an optimizer step, ``load_state_dict`` (``copy_``), an edit under
``no_grad``, ``nn.init``. ``module.to()``, ``param.data = ...`` and ``requires_grad_``
followed by training replace or bypass the entry (new storage, or the differentiable path).
An entry is reused only when both still match; otherwise the copy is made again. Writes
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
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

from . import _env
from .tracing import is_tracing
from .workspace import Workspace

PROVIDERS = ("matmul", "onednn", "float32")
"""The GEMM providers: torch's matmul (oneMKL on x86), oneDNN's prepacked linear, and the
bf16/fp16 product widened to float32 (run on the provider float32 GEMMs take here)."""

MARGIN = 1.25
"""A provider other than matmul is chosen only when its measured rate is at least this many
times that of the one it replaces: oneDNN against matmul; the widened route against the faster
of the two. Where two GEMMs run at one rate, the paths are level end to end as well (the matmul
path keeps in-place residual adds and reused scratch buffers, which oneDNN's out-of-place
post-ops and the widened route's conversions lose; ``benchmarks.main --gemm both``,
BENCHMARKS.md), so a small lead on one timed GEMM is as likely noise as gain; where a provider
is far ahead (oneDNN at twice matmul's rate on some AMD EPYC CPUs; float32 at 1.5 times the
bf16 rate on AVX-512 CPUs without AMX) the margin is no obstacle."""

PACKED_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes oneDNN's linear takes natively."""

WIDENED_DTYPES = (torch.bfloat16, torch.float16)
"""Dtypes the "float32" provider widens (their products are exact in float32)."""

MEASURED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
"""Dtypes :func:`provider` chooses for by measurement (every other dtype takes matmul)."""

CALIBRATION_SHAPE = (800, 768, 3072)
"""rows x in_features -> out_features timed by :func:`provider`: X-CLIP-B/32's MLP at 8 frames
and batch 2 (the model's most frequent GEMM shapes are of this size)."""


@dataclass(frozen=True)
class Measurement:
    """What :func:`provider` measured for one dtype: GFLOP/s of each provider timed (None where
    a provider does not apply to the dtype) and the choice. ``float32_gflops`` is the widened
    route's rate, conversions included."""

    dtype: torch.dtype
    matmul_gflops: float
    onednn_gflops: float | None
    chosen: str
    float32_gflops: float | None = None


@dataclass
class _Copy:
    source: torch.Tensor  # an alias of the weight's memory: keeps it from being reused
    version: int
    copy: torch.Tensor  # packed for oneDNN, or a plain float32 copy


_lock = threading.Lock()
_copies: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight (or its view base) -> {key: _Copy}
_choices: dict[torch.dtype, str] = {}
_measurements: dict[torch.dtype, Measurement] = {}
_override: str | None = None


# -- the provider ---------------------------------------------------------------------------------


def onednn_available() -> bool:
    """Whether this torch has oneDNN's linear op (x86-64 and aarch64 CPU builds do)."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def set_provider(name: str | None) -> None:
    """Fix the CPU inference GEMM provider for every dtype: "matmul", "onednn", "float32" (bf16
    and fp16 widened; float32 GEMMs keep their measured provider), or None/"auto" to measure
    (the default; ``XCLIP_KERNELS_GEMM`` sets it per process)."""
    global _override
    if name is not None and name != "auto" and name not in PROVIDERS:
        raise ValueError(f"name: expected one of {', '.join(PROVIDERS)}, 'auto' or None, got {name!r}")
    if name == "onednn" and not onednn_available():
        raise ValueError("name: 'onednn' is not available in this torch build (torch.backends.mkldnn)")
    _override = None if name in (None, "auto") else name


def candidates(dtype: torch.dtype) -> tuple[str, ...]:
    """The providers that apply to GEMMs of ``dtype`` here (matmul always)."""
    names = ["matmul"]
    if dtype in PACKED_DTYPES and onednn_available():
        names.append("onednn")
    if dtype in WIDENED_DTYPES:
        names.append("float32")
    return tuple(names)


def provider(dtype: torch.dtype) -> str:
    """The provider CPU inference GEMMs of ``dtype`` take in this process (see the module doc).

    The first call per dtype may time the candidates (a few tenths of a second)."""
    forced = _override or _env.gemm_provider()
    if forced == "onednn" and not onednn_available():
        return "matmul"
    if forced == "float32" and dtype not in WIDENED_DTYPES:
        return _measured(dtype)  # widening float32 (or float64) changes nothing: its own choice
    if forced is not None:
        return forced
    return _measured(dtype)


def _measured(dtype: torch.dtype) -> str:
    if dtype not in MEASURED_DTYPES or len(candidates(dtype)) == 1:
        return "matmul"
    chosen = _choices.get(dtype)
    if chosen is None:
        measure(dtype)
        chosen = _choices[dtype]  # the first measurement's choice, also when threads raced to it
    return chosen


def float32_engine() -> str:
    """The provider the widened route's float32 GEMMs take: "onednn" or "matmul", as float32's
    own GEMMs here."""
    return "onednn" if provider(torch.float32) == "onednn" else "matmul"


def choose(rates: dict[str, float]) -> str:
    """The provider to take given measured GFLOP/s per provider (``"matmul"`` required; absent
    providers do not apply): oneDNN if at least :data:`MARGIN` times matmul, then the widened
    route if at least :data:`MARGIN` times the faster native one."""
    if "matmul" not in rates:
        raise ValueError(f"rates: expected a 'matmul' entry, got {sorted(rates)}")
    onednn = rates.get("onednn", 0.0)
    chosen = "onednn" if onednn >= MARGIN * rates["matmul"] else "matmul"
    if rates.get("float32", 0.0) >= MARGIN * max(rates["matmul"], onednn):
        chosen = "float32"
    return chosen


def measure(dtype: torch.dtype, rounds: int = 5) -> Measurement:
    """Time every provider of ``dtype`` (:func:`candidates`) on an X-CLIP-sized GEMM in this
    process, interleaved, and remember the choice (:func:`choose`) for :func:`provider`. The
    widened route is timed as the model runs it (:func:`widened_linear`): the widening of x,
    the float32 GEMM on :func:`float32_engine` with the float32 weight made in the warm-up,
    and the rounding back."""
    if dtype not in MEASURED_DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(map(str, MEASURED_DTYPES))}, got {dtype}")
    names = candidates(dtype)
    if "float32" in names:
        float32_engine()  # float32's own choice first: the widened route runs on it
    rows, inner, outer = CALIBRATION_SHAPE
    flop = 2.0 * rows * inner * outer
    # The first GEMM of a process (and so this measurement) may run inside anything the caller
    # set up. Normal tensors even under torch.inference_mode: the widened route caches a float32
    # copy of its weight, which an inference tensor (no version counter) may not have. The
    # caller's dispatch modes set aside: a FlopCounterMode would count these GEMMs as the
    # caller's (billions of FLOPs for a small layer), any mode would be timed with them.
    with _disable_current_modes(), torch.inference_mode(False), torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(rows, inner, generator=generator, device="cpu").to(dtype)
        weight = (torch.randn(outer, inner, generator=generator, device="cpu") / math.sqrt(inner)).to(dtype)
        bias = torch.zeros(outer, dtype=dtype, device="cpu")
        runs = {"matmul": lambda: torch.addmm(bias, x, weight.t())}
        if "onednn" in names:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, None)
            runs["onednn"] = lambda: torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        if "float32" in names:
            # The route itself, scratch buffers and the cached float32 weight included.
            runs["float32"] = lambda: widened_linear(x, weight, bias)
        best = {name: math.inf for name in runs}
        for run in runs.values():  # warm-up: primitive creation, first touch of the outputs
            run()
        for _ in range(rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    rates = {name: flop / seconds / 1e9 for name, seconds in best.items()}
    chosen = choose(rates)
    result = Measurement(dtype, rates["matmul"], rates.get("onednn"), chosen, rates.get("float32"))
    with _lock:
        _measurements[dtype] = result
        _choices.setdefault(dtype, chosen)
    return result


def measurements() -> dict[torch.dtype, Measurement]:
    """What :func:`measure` found so far in this process, per dtype."""
    return dict(_measurements)


# -- when a provider other than matmul applies ----------------------------------------------------


def route(x: torch.Tensor, *weights: torch.Tensor, others: tuple[torch.Tensor | None, ...] = ()) -> str:
    """Which provider a linear layer on ``x`` with ``weights`` (packed or widened copies are
    cached) and ``others`` (biases, residuals: used as they are) takes: "onednn" or "float32"
    for inference on the CPU (no gradient will be needed), not under autocast or
    torch.compile, one dtype for all that the provider applies to, weights that are not
    inference tensors (they keep no version counter), when :func:`provider` says so; else
    "matmul", the differentiable ``F.linear``/``addmm`` path."""
    if x.device.type != "cpu" or x.dtype not in MEASURED_DTYPES or x.dim() < 1:
        return "matmul"
    tensors = [t for t in (*weights, *others) if t is not None]
    if torch.is_autocast_enabled("cpu") or is_tracing(x, *tensors):
        return "matmul"
    if torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in tensors)):
        return "matmul"
    if any(t.device.type != "cpu" or t.dtype != x.dtype for t in tensors):
        return "matmul"
    if any(w.is_inference() for w in weights):
        return "matmul"
    chosen = provider(x.dtype)
    if chosen == "onednn" and x.dtype in PACKED_DTYPES:
        return "onednn"
    if chosen == "float32" and x.dtype in WIDENED_DTYPES:
        return "float32"
    return "matmul"


def use_packed(x: torch.Tensor, *weights: torch.Tensor, others: tuple[torch.Tensor | None, ...] = ()) -> bool:
    """Whether a linear layer on ``x`` with ``weights`` (packed) and ``others`` (biases,
    residuals: used as they are) takes the oneDNN path (:func:`route` says "onednn")."""
    return route(x, *weights, others=others) == "onednn"


# -- packed and widened weights -------------------------------------------------------------------


def _owner(weight: torch.Tensor) -> torch.Tensor:
    """The tensor a copy is filed under: the weight itself, or the parameter it is a view of
    (``in_proj_weight[W:]``, a reshaped conv kernel), which outlives the per-call view."""
    base = weight._base
    return weight if base is None else base


def _cached(weight: torch.Tensor, kind: tuple, make: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The copy of ``weight`` described by ``kind``, made by ``make(weight.detach())`` once and
    reused until the weight's memory or version changes (see the module doc)."""
    if weight.dim() != 2:
        raise ValueError(f"weight: expected a 2-D (out_features, in_features) tensor, got shape {tuple(weight.shape)}")
    if weight.is_inference():
        raise ValueError("weight: an inference tensor has no version counter, so a cached copy could go stale")
    owner = _owner(weight)
    key = (*kind, weight.dtype, weight.storage_offset(), tuple(weight.shape), weight.stride())
    # Views share their base's version counter and storage: checking the owner covers all.
    version, memory = owner._version, owner.untyped_storage().data_ptr()
    with _lock:
        entries = _copies.get(owner)
        entry = None if entries is None else entries.get(key)
        if entry is not None and entry.version == version and entry.source.untyped_storage().data_ptr() == memory:
            return entry.copy
        if entries is not None:  # drop every copy of this owner made from older contents
            for stale in [k for k, e in entries.items() if e.version != version
                          or e.source.untyped_storage().data_ptr() != memory]:
                del entries[stale]
    # Made outside inference mode: an ordinary tensor, usable under no_grad as well.
    with torch.inference_mode(False), torch.no_grad():
        source = weight.detach()
        copy = make(source)
    with _lock:
        _copies.setdefault(owner, {})[key] = _Copy(source, version, copy)
    return copy


def packed_weight(weight: torch.Tensor, scale: float = 1.0, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``weight * scale`` (``(out, in)``) in ``dtype`` (default: the weight's) reordered for
    oneDNN's linear, made once and reused until the weight's memory or version changes (see the
    module doc). The scaling is done in float32, then rounded to ``dtype``."""
    target = weight.dtype if dtype is None else dtype

    def make(source: torch.Tensor) -> torch.Tensor:
        scaled = source.to(target) if scale == 1.0 else (source.float() * scale).to(target)
        return torch.ops.mkldnn._reorder_linear_weight(scaled.contiguous(), None)

    return _cached(weight, ("onednn", target, scale), make)


def float32_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` as a contiguous float32 ``(out, in)`` copy for the widened route (its scale
    rides on the GEMM's ``alpha``), made once and reused until the weight's memory or version
    changes (see the module doc). Twice the memory of a bf16/fp16 weight."""
    if not weight.is_floating_point():
        raise ValueError(f"weight: expected a floating-point tensor, got dtype {weight.dtype}")
    return _cached(weight, ("float32",), lambda source: source.float().contiguous())


def clear() -> None:
    """Drop every packed and widened weight copy (they are made again on next use)."""
    with _lock:
        _copies.clear()


def packed_count() -> int:
    """How many packed or widened weight copies are held now (for tests and memory accounting)."""
    with _lock:
        return sum(len(entries) for entries in _copies.values())


def cached_bytes() -> int:
    """Bytes held by the packed and widened weight copies (a packed weight's own size as torch
    reports it; oneDNN's blocked layout may pad a little more)."""
    with _lock:
        return sum(e.copy.numel() * e.copy.element_size() for entries in _copies.values() for e in entries.values())


# -- the linear layers ----------------------------------------------------------------------------


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1])


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ weight.T + bias``, ``F.linear``'s contract: x ``(..., K)``, weight ``(M, K)``, bias
    ``(M,)`` or None -> ``(..., M)``; on the provider :func:`route` gives during CPU inference,
    else F.linear."""
    chosen = route(x, weight, others=(bias,))
    if chosen == "matmul":
        return F.linear(x, weight, bias)
    if chosen == "onednn":
        out = torch.ops.mkldnn._linear_pointwise(_rows(x), packed_weight(weight), bias, "none", [], "")
    else:
        out = widened_linear(_rows(x), weight, bias)
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


# -- the widened route ----------------------------------------------------------------------------


_WIDENED = Workspace()
"""The widened route's float32 scratch (per thread): the widened input (and residual, on
oneDNN) and the float32 result before its rounding, and the MLP's hidden when the caller asks for it. Fresh float32 copies of
that size on every call ran the calibration GEMM at half its rate under
``THP_MEM_ALLOC_ENABLE=1`` in most processes (huge-page faults on each call), and made the
measured choice flip between processes."""


def _widened(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    """x as float32: x itself if it already is (the MLP's hidden), else copied into the
    scratch buffer ``name`` (contiguous)."""
    if x.dtype == torch.float32:
        return x
    return _WIDENED.buffer(name, tuple(x.shape), torch.float32, x.device).copy_(x)


def widened_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    scale: float = 1.0,
) -> torch.Tensor:
    """``residual + x @ (scale * weight).T + bias`` computed in float32 and rounded once (callers
    check :func:`route`): x ``(R, K)`` (bf16/fp16, or float32 hidden activations), weight
    ``(M, K)``, bias ``(M,)`` or None, residual ``(R, M)`` or None -> ``(R, M)`` fresh, in
    residual's dtype if given, else x's. The weight's float32 copy is cached; x, bias and
    residual are widened per call (x and the float32 sum into this thread's scratch)."""
    out_dtype = x.dtype if residual is None else residual.dtype
    x32 = _widened(x)
    bias32 = None if bias is None else bias.float()
    if float32_engine() == "onednn":
        packed = packed_weight(weight, scale, torch.float32)
        if residual is None:
            out = torch.ops.mkldnn._linear_pointwise(x32, packed, bias32, "none", [], "")
        else:
            out = torch.ops.mkldnn._linear_pointwise.binary(x32, _widened(residual, "residual").contiguous(), packed, bias32, "add")
        return out.to(out_dtype)
    weight32 = float32_weight(weight)
    out = _WIDENED.buffer("out", (x.shape[0], weight.shape[0]), torch.float32, x.device)
    if residual is None:
        if bias32 is None:
            torch.mm(x32, weight32.t(), out=out)
            if scale != 1.0:
                out.mul_(scale)
        else:
            torch.addmm(bias32, x32, weight32.t(), alpha=scale, out=out)
    else:
        # The float32 sum the GEMM accumulates into (residual itself is not written).
        if bias32 is not None:
            torch.add(residual, bias32, out=out)
        else:
            out.copy_(residual)
        out.addmm_(x32, weight32.t(), alpha=scale)
    return out.to(out_dtype)  # fresh: the scratch never escapes


def widened_linear_quick_gelu_scaled(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, slope: float, *, scratch: bool = False
) -> torch.Tensor:
    """``slope * QuickGELU(x @ weight.T + bias)`` = ``silu(slope * (x @ weight.T + bias))`` in
    float32 (callers check :func:`route`): x ``(R, K)`` bf16/fp16 -> ``(R, M)`` **float32**,
    never rounded to x's dtype (the MLP's hidden goes on to :func:`widened_linear`). With
    ``scratch=True`` the result lives in this thread's scratch buffer, valid until the next
    such call (the MLP consumes it at once); otherwise it is a fresh tensor."""
    x32 = _widened(x)
    bias32 = bias.float()
    if float32_engine() == "onednn":
        return torch.ops.mkldnn._linear_pointwise(
            x32, packed_weight(weight, slope, torch.float32), bias32 * slope, "swish", [], ""
        )
    shape = (x.shape[0], weight.shape[0])
    hidden = _WIDENED.buffer("hidden", shape, torch.float32, x.device) if scratch else torch.empty(shape, device=x.device)
    torch.addmm(bias32, x32, float32_weight(weight).t(), beta=slope, alpha=slope, out=hidden)
    return F.silu(hidden, inplace=True)
