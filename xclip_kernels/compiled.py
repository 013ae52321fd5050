"""Backends ``cpp`` and ``cuda``: the compiled ops of ``csrc/`` (extension ``xclip_kernels._C``).

The extension registers ``torch.ops.xclip_ext.{frame_attention, frame_attention_backward,
message_attention}`` with CPU and (when built with CUDA) CUDA implementations and argument
checks at the C++ boundary. This module adds what the dispatcher needs from Python: fake
implementations for tracing and the autograd formulas, then exposes the backend entry points.

If the extension is not built, importing this module still works: :func:`unavailable_reasons`
says so and how to build it, and calling an op raises that message.
"""

from __future__ import annotations

import functools
import importlib

import torch

from . import _autograd, _env, flop_formulas

BUILD_HINT = "build it with `python setup.py build_ext --inplace` (make test does)"


@functools.cache
def _extension():  # type: ignore[no-untyped-def]
    """The loaded extension module, or the ImportError that loading raised."""
    try:
        module = importlib.import_module("xclip_kernels._C")
    except ImportError as exc:
        return exc
    # The extension reads no environment variable itself: the one reading happens here, once.
    module.set_cpu_isa(_env.cpu_isa() or "auto")
    _register_python_parts()
    return module


def unavailable_reasons(device: str) -> list[str]:
    """Why the compiled backend for ``device`` ("cpu" or "cuda") cannot run here."""
    loaded = _extension()
    if isinstance(loaded, ImportError):
        return [f"the xclip_kernels._C extension is not built ({loaded}); {BUILD_HINT}"]
    if device == "cuda" and not loaded.has_cuda():
        return ["xclip_kernels._C was built without CUDA (needs nvcc and a CUDA build of torch at build time)"]
    if device == "cpu" and loaded.has_cpu_tiles() and torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return ["this CPU lacks AVX2, which the cpp kernels are compiled for"]
    if device == "cpu" and not loaded.has_blas():
        return ["this torch build exports no sgemm_/dgemm_ BLAS entry points for the cpp kernels"]
    return []


def _require() -> None:
    if torch.compiler.is_compiling():
        # Inside a trace: this backend was chosen because the extension loaded (its
        # availability check), and the cached loader itself is not traceable.
        return
    loaded = _extension()
    if isinstance(loaded, ImportError):
        raise RuntimeError(f"the cpp/cuda backends need the compiled extension: {loaded}; {BUILD_HINT}")


def _register_python_parts() -> None:
    """Fake implementations and autograd for the extension's ops (once, after loading it)."""

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

    torch.library.register_autograd(
        "xclip_ext::frame_attention",
        _autograd.frame_attention_grad(torch.ops.xclip_ext.frame_attention_backward),
        setup_context=_autograd.frame_attention_setup,
    )

    @torch.library.register_fake("xclip_ext::message_attention_backward")
    def _(grad_out, messages, ln_w, ln_b, in_w, in_b, out_w, out_b, *sizes):  # noqa: ANN001, ANN002, ANN202
        return tuple(t.new_empty(t.shape) for t in (messages, ln_w, ln_b, in_w, in_b, out_w, out_b))

    torch.library.register_autograd(
        "xclip_ext::message_attention", _message_attention_grad, setup_context=_autograd.message_attention_setup
    )

    flop_formulas.register(
        torch.ops.xclip_ext.frame_attention,
        torch.ops.xclip_ext.frame_attention_backward,
        torch.ops.xclip_ext.message_attention,
        torch.ops.xclip_ext.message_attention_backward,
    )


def _message_attention_grad(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN202
    """The message path's backward: the extension's op on the CPU, recomputation through PyTorch
    on CUDA (where the extension has no backward op for it)."""
    saved = ctx.saved_tensors
    if saved[0].is_cuda:
        return _autograd.message_attention_grad(ctx, grad_out)
    grads = torch.ops.xclip_ext.message_attention_backward(grad_out.contiguous(), *saved, *ctx.sizes)
    return (*(g if needed else None for g, needed in zip(grads, ctx.needs_input_grad)), None, None, None)


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
