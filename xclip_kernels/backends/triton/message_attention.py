"""Backend ``triton``, cross-frame fusion attention (CFA, the message path): kernel, launcher,
the ``torch.library`` op (fake implementation, autograd, FLOP formula) and the entry point.

CFA over the T <= 64 messages of a video runs as one program per (video, head): LayerNorm
of the video's messages, that head's q/k/v projection, softmax attention over T, written out
together with ``messages + out_proj_bias``; one GEMM then applies the output projection and
accumulates the residual. Two launches per block. The backward is
:func:`xclip_kernels.autograd.message_attention_backward` (PyTorch ops, by recomputation).

This module imports triton; the registry imports it on the backend's first use.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ... import autograd, flop_formulas
from ._common import LOG2E, block_d, checked_grid, dot_precision, launch_device


# ---------------------------------------------------------------------------------------------
# Kernel and launcher


@triton.jit(do_not_specialize=["T"])
def _cfa_fwd_kernel(
    M, LN_W, LN_B, W_IN, B_IN, B_OUT, O, R,
    T, W, H, eps, scale_log2e,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
):
    video = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_t = tl.arange(0, BLOCK_T)
    offs_k = tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < T
    mask_d = offs_d < HEAD_DIM
    rows = (video * T + offs_t) * W  # the video's T message rows

    # LayerNorm statistics over W, in fp32.
    total = tl.zeros([BLOCK_T], tl.float32)
    total_sq = tl.zeros([BLOCK_T], tl.float32)
    for start in range(0, W, BLOCK_K):
        cols = start + offs_k
        x = tl.load(M + rows[:, None] + cols[None, :], mask=mask_t[:, None] & (cols < W)[None, :], other=0.0)
        x = x.to(tl.float32)
        total += tl.sum(x, axis=1)
        total_sq += tl.sum(x * x, axis=1)
    mean = total / W
    rstd = 1.0 / tl.sqrt(tl.maximum(total_sq / W - mean * mean, 0.0) + eps)

    # This head's q, k, v = LN(m) @ W_in[head rows]^T + b_in, accumulated over W in chunks.
    q = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    k = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    v = tl.zeros([BLOCK_T, BLOCK_D], tl.float32)
    head_rows = h * HEAD_DIM + offs_d
    for start in range(0, W, BLOCK_K):
        cols = start + offs_k
        mask_k = cols < W
        x = tl.load(M + rows[:, None] + cols[None, :], mask=mask_t[:, None] & mask_k[None, :], other=0.0)
        gamma = tl.load(LN_W + cols, mask=mask_k, other=0.0).to(tl.float32)
        beta = tl.load(LN_B + cols, mask=mask_k, other=0.0).to(tl.float32)
        normed = (x.to(tl.float32) - mean[:, None]) * rstd[:, None] * gamma[None, :] + beta[None, :]
        normed = tl.where(mask_t[:, None], normed, 0.0).to(M.dtype.element_ty)
        w_mask = mask_d[:, None] & mask_k[None, :]
        wq = tl.load(W_IN + head_rows[:, None] * W + cols[None, :], mask=w_mask, other=0.0)
        wk = tl.load(W_IN + (W + head_rows)[:, None] * W + cols[None, :], mask=w_mask, other=0.0)
        wv = tl.load(W_IN + (2 * W + head_rows)[:, None] * W + cols[None, :], mask=w_mask, other=0.0)
        q += tl.dot(normed, tl.trans(wq), input_precision=PRECISION)
        k += tl.dot(normed, tl.trans(wk), input_precision=PRECISION)
        v += tl.dot(normed, tl.trans(wv), input_precision=PRECISION)
    q += tl.load(B_IN + head_rows, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    k += tl.load(B_IN + W + head_rows, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    v += tl.load(B_IN + 2 * W + head_rows, mask=mask_d, other=0.0).to(tl.float32)[None, :]

    # Softmax attention over the T messages (all of a video's keys fit in one tile).
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2e
    s = tl.where(mask_t[None, :], s, float("-inf"))
    p = tl.exp2(s - tl.max(s, axis=1)[:, None])
    p = p / tl.sum(p, axis=1)[:, None]
    o = tl.dot(p, v, input_precision="ieee")
    o_cols = h * HEAD_DIM + offs_d
    tl.store(O + rows[:, None] + o_cols[None, :], o.to(O.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])

    # The residual plus the output bias, for the GEMM that follows (head h writes its slice).
    x = tl.load(M + rows[:, None] + o_cols[None, :], mask=mask_t[:, None] & mask_d[None, :], other=0.0)
    bias = tl.load(B_OUT + o_cols, mask=mask_d, other=0.0)
    tl.store(R + rows[:, None] + o_cols[None, :], (x.to(tl.float32) + bias.to(tl.float32)[None, :]).to(R.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])


def cfa_launch_config(dtype: torch.dtype, head_dim: int, num_frames: int) -> dict:
    """The constexprs and compile options the launcher compiles the CFA kernel with for messages
    of ``dtype``, head dim ``head_dim`` and ``num_frames`` messages per video (T <= 64: one
    tile holds a video's messages). Above T = 32 the kernel takes 8 warps: with 4 its fp16/bf16
    build spilled 0.4-1.8 KB per thread at T = 64 (``make gpu-static``)."""
    return dict(HEAD_DIM=head_dim, BLOCK_T=max(16, triton.next_power_of_2(num_frames)), BLOCK_K=32,
                BLOCK_D=block_d(head_dim), PRECISION=dot_precision(dtype), num_warps=4 if num_frames <= 32 else 8)


def cfa_grid(frames: int, num_frames: int, num_heads: int) -> tuple[int, int]:
    """The programs of the CFA kernel: ``(b, H)``, videos on axis 0 (limit 2^31 - 1) and heads
    on axis 1 (65535). Raises ValueError when an axis is past CUDA's limit."""
    return checked_grid((frames // num_frames, num_heads), "message_attention (triton)", ("videos", "heads"))


def _cfa_forward(
    messages: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor, out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor,
    num_frames: int, num_heads: int, eps: float,
) -> torch.Tensor:
    messages, in_proj_weight = messages.contiguous(), in_proj_weight.contiguous()
    frames, width = messages.shape
    head_dim = width // num_heads
    mixed = torch.empty_like(messages)
    residual = torch.empty_like(messages)
    with launch_device(messages):
        _cfa_fwd_kernel[cfa_grid(frames, num_frames, num_heads)](
            messages, ln_weight.contiguous(), ln_bias.contiguous(), in_proj_weight, in_proj_bias.contiguous(),
            out_proj_bias.contiguous(), mixed, residual,
            num_frames, width, num_heads, eps, head_dim**-0.5 * LOG2E,
            **cfa_launch_config(messages.dtype, head_dim, num_frames),
        )
    # Output projection with the residual accumulated by the GEMM: the second launch.
    return torch.addmm(residual, mixed, out_proj_weight.t())


# ---------------------------------------------------------------------------------------------
# torch.library op


@torch.library.custom_op("xclip_kernels::triton_message_attention", mutates_args=())
def _message_attention_op(
    messages: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor, out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor,
    num_frames: int, num_heads: int, eps: float,
) -> torch.Tensor:
    return _cfa_forward(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                        out_proj_bias, num_frames, num_heads, eps)


@_message_attention_op.register_fake
def _(messages, *args):  # noqa: ANN001, ANN002, ANN202
    return torch.empty_like(messages)


_message_attention_op.register_autograd(
    autograd.message_attention_grad(autograd.message_attention_backward),
    setup_context=autograd.message_attention_setup,
)

flop_formulas.register_message_attention(torch.ops.xclip_kernels.triton_message_attention)


# ---------------------------------------------------------------------------------------------
# Entry point (called by xclip_kernels.ops after argument checks)


def message_attention(
    messages: torch.Tensor, ln_weight: torch.Tensor, ln_bias: torch.Tensor, in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor, out_proj_weight: torch.Tensor, out_proj_bias: torch.Tensor,
    num_frames: int, num_heads: int, eps: float = 1e-5,
) -> torch.Tensor:
    """CFA of one block over each video's T <= 64 messages. messages: ``(F, W)``. Returns ``(F, W)``."""
    return _message_attention_op(messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight,
                                 out_proj_bias, num_frames, num_heads, eps)
