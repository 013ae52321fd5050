"""The compiled extension ``xclip_kernels._C`` (built from ``csrc/``), shared by the ``cpp`` and
``cuda`` backends: loading it, the Python half of its ops, and the entry points that call them.

The extension registers ``torch.ops.xclip_ext.{frame_attention, frame_attention_backward,
message_attention, message_attention_backward}`` with a CPU kernel each and, when built with
CUDA, a CUDA kernel for all but ``message_attention_backward``, all behind argument checks at
the C++ boundary. This module adds what the dispatcher needs from Python: fake
implementations for tracing, the autograd formulas (:mod:`xclip_kernels.autograd`), FLOP
formulas, and the CUDA kernel of ``message_attention_backward`` (its PyTorch formula).

Importing this module loads nothing. If the extension is not built (or was built for another
torch), :func:`load_error` says so and how to build it, and calling an op raises that message.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import threading
import types
from pathlib import Path

import torch

from .. import _env, autograd

_lock = threading.Lock()
_loaded: types.ModuleType | ImportError | None = None


def build_hint() -> str:
    """How to (re)build the extension for the torch running now, for this kind of install."""
    source_tree = Path(__file__).resolve().parents[2]
    if (source_tree / "setup.py").is_file() and (source_tree / "csrc").is_dir():
        return "build it with `python setup.py build_ext --inplace` in the source tree (make test does)"
    return (
        "reinstall xclip-kernels against this torch from its source: "
        "`pip install --no-build-isolation --no-deps --force-reinstall <source folder, sdist or git URL>`"
    )


def _built_for() -> str | None:
    """The torch version an installed xclip-kernels wheel was built against, from its metadata."""
    try:
        requirements = importlib.metadata.requires("xclip-kernels") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    pinned = [r.split("==", 1)[1].split(";")[0].strip() for r in requirements if r.replace(" ", "").startswith("torch==")]
    return pinned[0] if pinned else None


def extension() -> types.ModuleType:
    """The loaded extension, its Python half registered; loads it on the first call (any
    thread), raises ``RuntimeError`` with the reason and the build command if it cannot be used."""
    error = load_error()
    if error is not None:
        raise RuntimeError(f"the cpp/cuda backends need the compiled extension: {error}")
    return _loaded  # type: ignore[return-value]


def load_error() -> str | None:
    """Why the extension cannot be used here (with the command that fixes it), or None: it is
    not built, does not load, or was compiled against another torch than the one running."""
    loaded = _load()
    if isinstance(loaded, ImportError):
        return describe(loaded)
    built_for, running = loaded.torch_version(), torch.__version__.split("+")[0]
    if built_for != running:
        return f"xclip_kernels._C was compiled against torch {built_for}, this is torch {torch.__version__}; {build_hint()}"
    return None


def describe(error: ImportError) -> str:
    """``error`` of loading the extension, with the torch an installed wheel was built for and the fix."""
    built_for = _built_for()
    running = torch.__version__.split("+")[0]
    mismatch = f"; it was built for torch {built_for}, this is torch {torch.__version__}" if (
        built_for is not None and built_for != running) else ""
    return f"xclip_kernels._C is not loadable ({error}){mismatch}; {build_hint()}"


def _load() -> types.ModuleType | ImportError:
    global _loaded
    if _loaded is None:
        cpu_isa = _env.cpu_isa()  # a bad value raises here, before anything is loaded
        # One thread loads and registers; the others wait (registering twice would raise).
        with _lock:
            if _loaded is None:
                try:
                    module = importlib.import_module("xclip_kernels._C")
                except ImportError as exc:
                    _loaded = exc
                else:
                    _register_python_parts()
                    module.set_cpu_isa(cpu_isa or "auto")
                    _loaded = module
    return _loaded


def _register_python_parts() -> None:
    """Fake implementations, autograd, FLOP formulas and the CUDA message backward (once)."""
    from .. import flop_formulas  # imports torch's FLOP counter (and with it Triton): not before loading

    @torch.library.register_fake("xclip_ext::frame_attention")
    def _(q, k, v, msg_k, msg_v, scale):  # noqa: ANN001, ANN202
        frames, tokens, heads, head_dim = q.shape
        lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        return q.new_empty((frames, tokens, heads, head_dim)), q.new_empty((frames, heads, tokens), dtype=lse_dtype)

    @torch.library.register_fake("xclip_ext::frame_attention_backward")
    def _(grad_out, q, k, v, msg_k, msg_v, out, lse, scale):  # noqa: ANN001, ANN202
        return (q.new_empty(q.shape), q.new_empty(q.shape), q.new_empty(q.shape),
                msg_k.new_empty(msg_k.shape), msg_v.new_empty(msg_v.shape))

    @torch.library.register_fake("xclip_ext::message_attention")
    def _(messages, *args):  # noqa: ANN001, ANN002, ANN202
        return torch.empty_like(messages, memory_format=torch.contiguous_format)

    @torch.library.register_fake("xclip_ext::message_attention_backward")
    def _(grad_out, messages, ln_w, ln_b, in_w, in_b, out_w, out_b, *sizes):  # noqa: ANN001, ANN002, ANN202
        return tuple(t.new_empty(t.shape) for t in (messages, ln_w, ln_b, in_w, in_b, out_w, out_b))

    # The extension has no CUDA kernel for the message backward: on CUDA it is the PyTorch formula.
    torch.library.register_kernel("xclip_ext::message_attention_backward", "cuda", autograd.message_attention_backward)

    torch.library.register_autograd(
        "xclip_ext::frame_attention",
        autograd.frame_attention_grad(torch.ops.xclip_ext.frame_attention_backward),
        setup_context=autograd.frame_attention_setup,
    )
    torch.library.register_autograd(
        "xclip_ext::message_attention",
        autograd.message_attention_grad(torch.ops.xclip_ext.message_attention_backward),
        setup_context=autograd.message_attention_setup,
    )
    flop_formulas.register_frame_attention(
        torch.ops.xclip_ext.frame_attention, torch.ops.xclip_ext.frame_attention_backward
    )
    flop_formulas.register_message_attention(
        torch.ops.xclip_ext.message_attention, torch.ops.xclip_ext.message_attention_backward
    )


def _require() -> None:
    if torch.compiler.is_compiling():
        # Inside a trace: this backend was chosen because the extension loaded (its
        # availability check), and the loader itself is not traceable.
        return
    extension()


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def frame_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor, msg_v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """IFA. q, k, v: ``(F, N, H, D)`` (any strides); msg_k, msg_v: ``(F, H, D)``. Returns ``(F, N, H, D)``."""
    _require()
    if scale is None:
        scale = q.shape[-1] ** -0.5
    args = [_last_dim_contiguous(t) for t in (q, k, v, msg_k, msg_v)]
    return torch.ops.xclip_ext.frame_attention(*args, float(scale))[0]


def message_attention(
    messages: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor, out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor,
    num_frames: int, num_heads: int, eps: float = 1e-5,
) -> torch.Tensor:
    """CFA of one block over each video's T messages. messages: ``(F, W)``. Returns ``(F, W)``."""
    _require()
    tensors = [t.contiguous() for t in (messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias,
                                        out_proj_weight, out_proj_bias)]
    return torch.ops.xclip_ext.message_attention(*tensors, num_frames, num_heads, float(eps))
