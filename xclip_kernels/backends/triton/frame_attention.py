"""Backend ``triton``, intra-frame attention (IFA): kernels, launchers, the ``torch.library``
ops (fake implementations, autograd, FLOP formulas) and the entry point, top to bottom.

The kernels read q, k, v ``(F, N, H, D)`` through their strides (views of one fused QKV
output cost nothing) and each frame's message key/value from their own ``(F, H, D)``
tensors: no ``cat``, and no query row for the message token. One program per (query tile,
frame, head) runs a flash-style online softmax in fp32 whose running max and sum start from
the message key, and saves the log-sum-exp (base 2) for the backward pass, which recomputes
the probabilities tile by tile. N is a runtime argument: no recompilation per length.

This module imports triton; the registry imports it on the backend's first use. On the CPU
it runs under ``TRITON_INTERPRET=1`` (set before triton is imported), for tests.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ... import autograd, flop_formulas
from ._common import LOG2E, block_d, checked_grid, dot_precision, launch_device

# ---------------------------------------------------------------------------------------------
# Launch configuration and grid (the launchers below use these, and so does the static check
# of every configuration: what runs is what is checked)

IFA_KERNELS = ("forward", "backward_dkdv", "backward_dq")


class LaunchConfig(NamedTuple):
    """One kernel's compile-time choices: its ``tl.constexpr`` tile sizes, ``tl.dot`` precision,
    ``num_warps`` and ``num_stages`` (None: Triton's default)."""

    block_m: int
    block_n: int
    block_d: int
    precision: str
    num_warps: int
    num_stages: int | None


def ifa_launch_config(kernel: str, dtype: torch.dtype, head_dim: int) -> LaunchConfig:
    """What the launcher compiles ``kernel`` (one of :data:`IFA_KERNELS`) with for inputs of
    ``dtype`` and head dim ``head_dim``.

    fp16/bf16: (query x key) tiles of 64 x 64 over 4 warps on tensor cores; above D = 64 the
    key tile is 32 wide and the kernels take 8 warps (the forward also 2 pipeline stages): with
    4 warps the D = 80/128 kernels spilled 4-96 bytes per thread on sm_80/sm_90 with Triton
    3.6 or 3.9 (``make gpu-static``, which fails on any fp16/bf16 spill).
    fp32 computes exact (``ieee``) products with FMAs, and Triton's FMA ``tl.dot`` holds each
    thread's rows of both operands over the whole reduction in registers: at those tiles the
    fp32 kernels spilled 1.5-35 KB per thread (sm_80/sm_90) and the D = 128 backward asked for
    145 KiB of shared memory. fp32 takes 16 x 16 tiles over 8 warps without software pipelining
    (``num_stages=1``): no spills, at most 170 registers and 33 KiB of shared memory
    (BENCHMARKS.md, GPU).
    """
    if kernel not in IFA_KERNELS:
        raise ValueError(f"kernel: expected one of {IFA_KERNELS}, got {kernel!r}")
    if dtype == torch.float32:
        block_m, block_n, num_warps, num_stages = 16, 16, 8, 1
    elif head_dim <= 64:
        block_m, block_n, num_warps, num_stages = 64, 64, 4, None
    else:
        block_m, block_n, num_warps, num_stages = 64, 32, 8, 2 if kernel == "forward" else None
    return LaunchConfig(block_m, block_n, block_d(head_dim), dot_precision(dtype), num_warps, num_stages)


def ifa_grid(frames: int, heads: int, tokens: int, block: int) -> tuple[int, int]:
    """The programs of an IFA kernel: ``(F * H, ceil(N / block))``.

    F * H goes on axis 0 (limit 2^31 - 1): it passes 65535, the limit of axes 1 and 2, as soon
    as b * T * H does (L/14, H = 16: b * T > 4095). The tiles of N go on axis 1. Raises
    ValueError when an axis is past CUDA's limit.
    """
    return checked_grid((frames * heads, triton.cdiv(tokens, block)), "frame_attention (triton)",
                        ("F * H frame-heads", f"tiles of {block} of N = {tokens}"))


# ---------------------------------------------------------------------------------------------
# IFA kernels


# N (and T) stay runtime values: no specialisation on their value or divisibility, so one
# compiled kernel serves every sequence length.
@triton.jit(do_not_specialize=["N"])
def _ifa_fwd_kernel(
    Q, K, V, MK, MV, O, LSE,
    s_qf, s_qn, s_qh, s_kf, s_kn, s_kh, s_vf, s_vn, s_vh,
    s_mkf, s_mkh, s_mvf, s_mvh, s_of, s_on, s_oh,
    N, H, scale_log2e,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_fh = tl.program_id(0)
    pid_m = tl.program_id(1)
    f = (pid_fh // H).to(tl.int64)
    h = (pid_fh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM

    q = tl.load(Q + f * s_qf + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    msg_k = tl.load(MK + f * s_mkf + h * s_mkh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    msg_v = tl.load(MV + f * s_mvf + h * s_mvh + offs_d, mask=mask_d, other=0.0).to(tl.float32)

    # The message key opens the online softmax: running max = its score, running sum = 1.
    m_i = tl.sum(q.to(tl.float32) * msg_k[None, :], axis=1) * scale_log2e
    l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32) + msg_v[None, :]

    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + f * s_kf + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + f * s_vf + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new

    out = acc / l_i[:, None]
    tl.store(O + f * s_of + h * s_oh + offs_m[:, None] * s_on + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + (f * H + h) * N + offs_m, m_i + tl.log2(l_i), mask=mask_m)


@triton.jit(do_not_specialize=["N"])
def _ifa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    s_qf, s_qn, s_qh, s_kf, s_kn, s_kh, s_vf, s_vn, s_vh, s_dof, s_don, s_doh,
    N, H, scale, scale_log2e,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_fh = tl.program_id(0)
    pid_n = tl.program_id(1)
    f = (pid_fh // H).to(tl.int64)
    h = (pid_fh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N
    mask_d = offs_d < HEAD_DIM
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + f * s_kf + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + f * s_vf + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    row = (f * H + h) * N
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N
        q_mask = mask_m[:, None] & mask_d[None, :]
        q = tl.load(Q + f * s_qf + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :], mask=q_mask, other=0.0)
        do = tl.load(DO + f * s_dof + h * s_doh + offs_m[:, None] * s_don + offs_d[None, :], mask=q_mask, other=0.0)
        lse = tl.load(LSE + row + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    out_offs = f * (N * H * HEAD_DIM) + offs_n[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :]
    tl.store(DK + out_offs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit(do_not_specialize=["N", "M_TILES"])
def _ifa_bwd_dq_kernel(
    Q, K, V, MK, MV, DO, LSE, DELTA, DQ, DMK_PART, DMV_PART,
    s_qf, s_qn, s_qh, s_kf, s_kn, s_kh, s_vf, s_vn, s_vh, s_mkf, s_mkh, s_mvf, s_mvh, s_dof, s_don, s_doh,
    N, H, M_TILES, scale, scale_log2e,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_fh = tl.program_id(0)
    pid_m = tl.program_id(1)
    f = (pid_fh // H).to(tl.int64)
    h = (pid_fh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N
    mask_d = offs_d < HEAD_DIM
    q_mask = mask_m[:, None] & mask_d[None, :]
    q = tl.load(Q + f * s_qf + h * s_qh + offs_m[:, None] * s_qn + offs_d[None, :], mask=q_mask, other=0.0)
    do = tl.load(DO + f * s_dof + h * s_doh + offs_m[:, None] * s_don + offs_d[None, :], mask=q_mask, other=0.0)
    row = (f * H + h) * N
    lse = tl.load(LSE + row + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + f * s_kf + h * s_kh + offs_n[:, None] * s_kn + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + f * s_vf + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :], mask=kv_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2e
        p = tl.exp2(s - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    # The message key/value: one more column of the softmax, handled as vectors.
    msg_k = tl.load(MK + f * s_mkf + h * s_mkh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    msg_v = tl.load(MV + f * s_mvf + h * s_mvh + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    qf = q.to(tl.float32)
    dof = do.to(tl.float32)
    p_msg = tl.exp2(tl.sum(qf * msg_k[None, :], axis=1) * scale_log2e - lse)
    p_msg = tl.where(mask_m, p_msg, 0.0)
    ds_msg = p_msg * (tl.sum(dof * msg_v[None, :], axis=1) - delta)
    dq += ds_msg[:, None] * msg_k[None, :]
    tl.store(DQ + f * (N * H * HEAD_DIM) + offs_m[:, None] * (H * HEAD_DIM) + h * HEAD_DIM + offs_d[None, :],
             (dq * scale).to(DQ.dtype.element_ty), mask=q_mask)
    # Per-tile partial sums of d msg_k, d msg_v, reduced by the launcher (deterministic, no atomics).
    part = ((f * H + h) * M_TILES + pid_m) * HEAD_DIM + offs_d
    tl.store(DMK_PART + part, tl.sum(ds_msg[:, None] * qf, axis=0) * scale, mask=mask_d)
    tl.store(DMV_PART + part, tl.sum(p_msg[:, None] * dof, axis=0), mask=mask_d)


# ---------------------------------------------------------------------------------------------
# IFA launchers


def _last_dim_contiguous(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def _constexprs(head_dim: int, config: LaunchConfig) -> dict:
    """The keyword arguments of a launch: the kernel's constexprs and its compile options."""
    options = {"num_warps": config.num_warps}
    if config.num_stages is not None:
        options["num_stages"] = config.num_stages
    return dict(HEAD_DIM=head_dim, BLOCK_D=config.block_d, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                PRECISION=config.precision, **options)


def _ifa_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor, msg_v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k, v, msg_k, msg_v = _last_dim_contiguous(q, k, v, msg_k, msg_v)
    frames, tokens, heads, head_dim = q.shape
    out = torch.empty((frames, tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((frames, heads, tokens), dtype=torch.float32, device=q.device)
    config = ifa_launch_config("forward", q.dtype, head_dim)
    grid = ifa_grid(frames, heads, tokens, config.block_m)
    with launch_device(q):
        _ifa_fwd_kernel[grid](
            q, k, v, msg_k, msg_v, out, lse,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), msg_k.stride(0), msg_k.stride(1), msg_v.stride(0), msg_v.stride(1),
            out.stride(0), out.stride(1), out.stride(2),
            tokens, heads, scale * LOG2E, **_constexprs(head_dim, config),
        )
    return out, lse


def _ifa_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor,
    msg_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v, msg_k, msg_v, grad_out = _last_dim_contiguous(q, k, v, msg_k, msg_v, grad_out)
    frames, tokens, heads, head_dim = q.shape
    # delta_i = sum_d dO_id O_id, the softmax-backward correction per query row.
    delta = (grad_out.float() * out.float()).sum(-1).transpose(1, 2).contiguous()  # (F, H, N)
    dq = torch.empty((frames, tokens, heads, head_dim), dtype=q.dtype, device=q.device)
    dk = torch.empty_like(dq)
    dv = torch.empty_like(dq)
    dkdv = ifa_launch_config("backward_dkdv", q.dtype, head_dim)
    dq_config = ifa_launch_config("backward_dq", q.dtype, head_dim)
    dkdv_grid = ifa_grid(frames, heads, tokens, dkdv.block_n)
    dq_grid = ifa_grid(frames, heads, tokens, dq_config.block_m)
    m_tiles = dq_grid[1]
    dmk_part = torch.empty((frames, heads, m_tiles, head_dim), dtype=torch.float32, device=q.device)
    dmv_part = torch.empty_like(dmk_part)
    with launch_device(q):
        _ifa_bwd_dkdv_kernel[dkdv_grid](
            q, k, v, grad_out, lse, delta, dk, dv,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            tokens, heads, scale, scale * LOG2E, **_constexprs(head_dim, dkdv),
        )
        _ifa_bwd_dq_kernel[dq_grid](
            q, k, v, msg_k, msg_v, grad_out, lse, delta, dq, dmk_part, dmv_part,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), msg_k.stride(0), msg_k.stride(1), msg_v.stride(0), msg_v.stride(1),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            tokens, heads, m_tiles, scale, scale * LOG2E, **_constexprs(head_dim, dq_config),
        )
    return dq, dk, dv, dmk_part.sum(2).to(msg_k.dtype), dmv_part.sum(2).to(msg_v.dtype)


# ---------------------------------------------------------------------------------------------
# torch.library ops


@torch.library.custom_op("xclip_kernels::triton_frame_attention", mutates_args=())
def _frame_attention_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor, msg_v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return _ifa_forward(q, k, v, msg_k, msg_v, scale)


@_frame_attention_op.register_fake
def _(q, k, v, msg_k, msg_v, scale):  # noqa: ANN001, ANN202
    frames, tokens, heads, head_dim = q.shape
    return q.new_empty((frames, tokens, heads, head_dim)), q.new_empty((frames, heads, tokens), dtype=torch.float32)


@torch.library.custom_op("xclip_kernels::triton_frame_attention_backward", mutates_args=())
def _frame_attention_backward_op(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor,
    msg_v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _ifa_backward(grad_out, q, k, v, msg_k, msg_v, out, lse, scale)


@_frame_attention_backward_op.register_fake
def _(grad_out, q, k, v, msg_k, msg_v, out, lse, scale):  # noqa: ANN001, ANN202
    shape = q.shape
    return (q.new_empty(shape), q.new_empty(shape), q.new_empty(shape),
            msg_k.new_empty(msg_k.shape), msg_v.new_empty(msg_v.shape))


_frame_attention_op.register_autograd(
    autograd.frame_attention_grad(_frame_attention_backward_op), setup_context=autograd.frame_attention_setup
)

flop_formulas.register_frame_attention(
    torch.ops.xclip_kernels.triton_frame_attention, torch.ops.xclip_kernels.triton_frame_attention_backward
)


# ---------------------------------------------------------------------------------------------
# Entry point (called by xclip_kernels.ops after argument checks)


def frame_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor, msg_v: torch.Tensor,
    scale: float | None = None,
) -> torch.Tensor:
    """IFA. q, k, v: ``(F, N, H, D)``; msg_k, msg_v: ``(F, H, D)``. Returns ``(F, N, H, D)``."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return _frame_attention_op(q, k, v, msg_k, msg_v, float(scale))[0]
