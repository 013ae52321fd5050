"""Autograd of the fused backends' custom ops (triton, cpp, cuda), in one place.

Each backend registers these with ``torch.library.register_autograd`` on its own ops:

* frame attention: the forward op returns ``(out, lse)`` and saves them; a backward op of
  the same signature on every backend computes the five input gradients from them.
* message attention: nothing is saved but the inputs; the backward recomputes LayerNorm,
  the q/k/v projection and the softmax over T (a few hundred rows: cheaper than keeping
  them) and applies the chain rule. :func:`message_attention_backward` is that backward in
  PyTorch ops, used where no compiled one exists (Triton, CUDA); the CPU extension has a
  kernel of the same signature.

The compiled and Triton backward ops are not themselves differentiable. When autograd asks
for a differentiable gradient (``create_graph=True``: grad mode is on inside the backward),
both formulas compute it instead from PyTorch ops that autograd can differentiate again: frame
attention through the reference formula (recomputing the ``(N, N + 1)`` probabilities, in at
least float32), the message path through :func:`message_attention_backward`. Double backward
is then exact on every fused backend, at the cost of the unfused memory and time.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

MessageGrads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def frame_attention_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    """Save what the backward op needs; the log-sum-exp output is not differentiable."""
    q, k, v, msg_k, msg_v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, msg_k, msg_v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def frame_attention_grad(backward_op: Callable) -> Callable:
    """The backward formula calling ``backward_op(grad_out, q, k, v, msg_k, msg_v, out, lse, scale)``."""

    def grad(ctx, grad_out: torch.Tensor, _grad_lse: torch.Tensor | None):  # noqa: ANN001, ANN202
        q, k, v, msg_k, msg_v, out, lse = ctx.saved_tensors
        if torch.is_grad_enabled():
            # create_graph=True: the backward op's result would carry no graph (autograd would
            # treat its second derivative as zero), so compute one that does.
            return (*differentiable_frame_attention_backward(grad_out, q, k, v, msg_k, msg_v, ctx.scale), None)
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        return (*backward_op(grad_out, q, k, v, msg_k, msg_v, out, lse, ctx.scale), None)

    return grad


def differentiable_frame_attention_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, msg_k: torch.Tensor,
    msg_v: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, ...]:
    """The five input gradients of frame attention as a graph autograd can differentiate again.

    grad_out, q, k, v: ``(F, N, H, D)``; msg_k, msg_v: ``(F, H, D)``. Returns the gradients of
    q, k, v, msg_k and msg_v in their dtypes, computed by differentiating the reference formula
    in at least float32 with ``create_graph=True``.
    """
    from .backends import reference  # the backends import this module

    # Inputs outside the graph get a stand-in leaf, so that autograd.grad has a variable to
    # differentiate with respect to; those inputs' gradients are discarded by autograd.
    inputs = [t if t.requires_grad else t.detach().requires_grad_(True) for t in (q, k, v, msg_k, msg_v)]
    compute = torch.promote_types(q.dtype, torch.float32)
    with torch.enable_grad():
        out = reference.frame_attention(*(t.to(compute) for t in inputs), scale)
        return torch.autograd.grad(out, inputs, grad_out.to(compute), create_graph=True)


def message_attention_setup(ctx, inputs, output) -> None:  # noqa: ANN001
    """Save the seven tensor arguments; ``num_frames, num_heads, eps`` ride along as sizes."""
    ctx.save_for_backward(*inputs[:7])
    ctx.sizes = inputs[7:]


def message_attention_grad(backward_op: Callable[..., MessageGrads]) -> Callable:
    """The backward formula calling ``backward_op(grad_out, *the seven tensors, num_frames,
    num_heads, eps)``; only the gradients autograd asks for are returned (None elsewhere)."""

    def grad(ctx, grad_out: torch.Tensor):  # noqa: ANN001, ANN202
        # create_graph=True: the PyTorch formula, which autograd differentiates again (a compiled
        # op's result would carry no graph and its second derivative would silently be wrong).
        op = message_attention_backward if torch.is_grad_enabled() else backward_op
        grads = op(grad_out.contiguous(), *ctx.saved_tensors, *ctx.sizes)
        wanted = ctx.needs_input_grad
        return (*(g if needed else None for g, needed in zip(grads, wanted[:7])), None, None, None)

    return grad


def message_attention_backward(
    grad_out: torch.Tensor,
    messages: torch.Tensor,
    ln_weight: torch.Tensor,
    ln_bias: torch.Tensor,
    in_proj_weight: torch.Tensor,
    in_proj_bias: torch.Tensor,
    out_proj_weight: torch.Tensor,
    out_proj_bias: torch.Tensor,
    num_frames: int,
    num_heads: int,
    eps: float,
) -> MessageGrads:
    """Gradients of :func:`xclip_kernels.message_attention` from its inputs, by recomputation.

    grad_out and messages: ``(F, W)``; the weights as in the forward. Returns the gradients
    of messages, ln_weight, ln_bias, in_proj_weight, in_proj_bias, out_proj_weight and
    out_proj_bias, in the messages' dtype; computed in at least float32.
    """
    dtype = messages.dtype
    compute = torch.promote_types(dtype, torch.float32)
    x, gamma, w_in, b_in, w_out = (t.to(compute) for t in (messages, ln_weight, in_proj_weight, in_proj_bias,
                                                           out_proj_weight))
    d_out = grad_out.to(compute)
    frames, width = x.shape
    videos, head_dim = frames // num_frames, width // num_heads
    scale = head_dim**-0.5

    # The forward, again: LayerNorm, q/k/v of each video's T messages, softmax over T.
    normalized = F.layer_norm(x, (width,), eps=eps)
    rstd = torch.rsqrt(x.var(dim=-1, unbiased=False, keepdim=True) + eps)
    normed = torch.addcmul(ln_bias.to(compute), normalized, gamma)
    qkv = torch.addmm(b_in, normed, w_in.t())
    q, k, v = qkv.view(videos, num_frames, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4)  # (b, H, T, D) each
    probs = (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)
    mixed = (probs @ v).transpose(1, 2).reshape(frames, width)

    # Back through the output projection, the attention and the q/k/v projection.
    d_out_weight = d_out.t() @ mixed
    d_out_bias = d_out.sum(0)
    d_mixed = (d_out @ w_out).view(videos, num_frames, num_heads, head_dim).transpose(1, 2)
    d_v = probs.transpose(-2, -1) @ d_mixed
    d_probs = d_mixed @ v.transpose(-2, -1)
    d_scores = probs * (d_probs - (d_probs * probs).sum(dim=-1, keepdim=True)) * scale
    d_q = d_scores @ k
    d_k = d_scores.transpose(-2, -1) @ q
    d_qkv = torch.stack((d_q, d_k, d_v)).permute(1, 3, 0, 2, 4).reshape(frames, 3 * width)
    d_in_weight = d_qkv.t() @ normed
    d_in_bias = d_qkv.sum(0)
    d_normed = d_qkv @ w_in

    # Back through the LayerNorm; the residual passes grad_out straight to the messages.
    d_ln_weight = (d_normed * normalized).sum(0)
    d_ln_bias = d_normed.sum(0)
    d_normalized = d_normed * gamma
    d_x = rstd * (
        d_normalized
        - d_normalized.mean(dim=-1, keepdim=True)
        - normalized * (d_normalized * normalized).mean(dim=-1, keepdim=True)
    )
    grads = (d_out + d_x, d_ln_weight, d_ln_bias, d_in_weight, d_in_bias, d_out_weight, d_out_bias)
    return tuple(g.to(dtype) for g in grads)  # type: ignore[return-value]
