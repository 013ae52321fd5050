"""Fused epilogues around attention (projection + bias + residual, the QuickGELU MLP) and the
policy of when a block may write in place or into scratch buffers.

On the CPU, X-CLIP's time outside the matmuls goes to elementwise passes over fresh
activation buffers: QuickGELU alone (``x * sigmoid(1.702 x)``, three passes and three
allocations over the ``(F*L, 4W)`` hidden) cost more than all the attention. These ops fold
that work into the matmuls' epilogues:

* ``QuickGELU(h) = silu(1.702 h) / 1.702``: the first GEMM writes ``1.702 h`` directly
  (``addmm`` with ``alpha = beta = 1.702``), one in-place ``silu`` follows, and the
  ``1 / 1.702`` rides on the second GEMM's ``alpha``.
* bias and residual are accumulated by the GEMM itself (``beta = 1`` onto the residual).

With ``inplace=True`` (inference: the caller owns ``residual`` and needs no gradient) the
result is accumulated into ``residual`` and no activation-sized buffer is allocated for it;
a :class:`Workspace` also keeps the MLP's hidden buffer from one call to the next (fresh
multi-megabyte buffers cost page faults on every first touch, as much as a tenth of the
GEMM time on the CPU).

Where :mod:`.gemm` chose oneDNN for this CPU (inference only), the same epilogues run as
oneDNN post-ops on prepacked weights instead (out of place: that API has no in-place sum), and
the blocks then take fresh tensors rather than the in-place accumulation below. Where it chose
the widened route for bf16/fp16 ("float32"), the GEMMs, bias, QuickGELU and residual add run in
float32 on float32 weight copies and each output is rounded once (the MLP's hidden stays
float32); those outputs are fresh tensors too.

The model's blocks follow one policy (:func:`writes_in_place`, :func:`block_mlp_residual`,
:func:`qkv_projection`): a block never writes its input (its caller and forward hooks may
hold it); its first residual add (:func:`linear_residual`) makes a fresh tensor that the
block owns, and later adds accumulate into that one in place only when nothing will
differentiate through it (no grad) and no autocast is active (autocast casts neither in-place
nor ``out=`` operations); scratch buffers hold only what never leaves the block.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import flop_formulas, gemm
from .backends.reference import QUICK_GELU_SLOPE, quick_gelu
from .tracing import is_tracing
from .workspace import Workspace

# So that FlopCounterMode sees the in-place accumulating and prepacked GEMMs below (dict entries, no work).
flop_formulas.register_gemm_formulas()


def _inplace_allowed(inplace: bool, x: torch.Tensor, residual: torch.Tensor, *weights: torch.Tensor) -> bool:
    if not inplace:
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in (x, residual, *weights)):
        raise RuntimeError("inplace=True: in-place accumulation cannot be used on tensors that require grad")
    if not residual.is_contiguous():
        raise ValueError(f"residual: inplace=True needs a contiguous tensor, got strides {residual.stride()}")
    # (Storage identity is not traceable, and fake tensors have no memory; under torch.compile
    # functionalisation makes it moot.)
    if not is_tracing(x, residual) and x.untyped_storage().data_ptr() == residual.untyped_storage().data_ptr():
        raise ValueError("x: inplace=True needs x and residual in separate memory (x would be overwritten)")
    return True


def _fresh_sum(
    residual: torch.Tensor, bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0
) -> torch.Tensor:
    """``residual + bias + alpha * a @ b`` in one fresh tensor of ``residual``'s shape (residual
    itself is not written): the GEMM accumulates into the sum of the other two in place, one
    activation-sized allocation instead of two. Under autocast (which casts no in-place op)
    the GEMM runs out of place."""
    out = residual.reshape(-1, residual.shape[-1]) + bias
    if torch.is_autocast_enabled(a.device.type):
        out = torch.addmm(out, a, b, alpha=alpha)
    else:
        out.addmm_(a, b, alpha=alpha)
    return out.view(residual.shape)


def linear_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    *,
    inplace: bool = False,
) -> torch.Tensor:
    """``residual + x @ weight.T + bias``.

    x: ``(..., K)``; residual: ``(..., M)`` with the same leading dims; weight ``(M, K)``;
    bias ``(M,)``. With ``inplace=True`` the sum is written into ``residual`` (contiguous),
    which is returned.
    """
    rows = x.reshape(-1, x.shape[-1])
    accumulate = _inplace_allowed(inplace, x, residual, weight, bias)
    route = gemm.route(x, weight, others=(residual, bias))
    if route == "float32":
        out = gemm.widened_linear(rows, weight, bias, residual=residual.reshape(-1, residual.shape[-1]))
        return residual.copy_(out.view(residual.shape)) if accumulate else out.view(residual.shape)
    if accumulate:
        out = residual.view(-1, residual.shape[-1])
        out.add_(bias).addmm_(rows, weight.t())
        return residual
    if route == "onednn":
        return gemm.linear_add(rows, residual, weight, bias)
    return _fresh_sum(residual, bias, rows, weight.t())


def mlp_residual(
    x: torch.Tensor,
    residual: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    *,
    inplace: bool = False,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``residual + c_proj(QuickGELU(c_fc(x)))``, CLIP's MLP with its residual.

    x, residual: ``(..., W)``; fc_weight ``(4W, W)``, fc_bias ``(4W,)``; proj_weight
    ``(W, 4W)``, proj_bias ``(W,)`` (any hidden size works). With ``inplace=True`` the sum is
    written into ``residual`` (contiguous), which is returned, and the hidden activations
    live in ``workspace`` if one is given.
    """
    rows = x.reshape(-1, x.shape[-1])
    accumulate = _inplace_allowed(inplace, x, residual, fc_weight, fc_bias, proj_weight, proj_bias)
    route = gemm.route(x, fc_weight, proj_weight, others=(residual, fc_bias, proj_bias))
    if route == "float32":
        # Both GEMMs and QuickGELU in float32: the hidden is never rounded to bf16/fp16, and
        # only the sum with the residual is, once.
        scaled = gemm.widened_linear_quick_gelu_scaled(rows, fc_weight, fc_bias, QUICK_GELU_SLOPE, scratch=True)
        out = gemm.widened_linear(
            scaled, proj_weight, proj_bias, residual=residual.reshape(-1, residual.shape[-1]),
            scale=1.0 / QUICK_GELU_SLOPE,
        ).view(residual.shape)
        return residual.copy_(out) if accumulate else out
    if not accumulate and route == "onednn":
        if rows.dtype == torch.float32:
            # silu of the 1.702-scaled first GEMM, then the second with its weight over 1.702
            # (the scaled float32 weights are off by one float32 rounding: far inside 1e-5).
            scaled = gemm.linear_quick_gelu_scaled(rows, fc_weight, fc_bias, QUICK_GELU_SLOPE)
            return gemm.linear_add(scaled, residual, proj_weight, proj_bias, scale=1.0 / QUICK_GELU_SLOPE)
        # In bf16 a scaled copy of a weight would be rounded once more than the weight itself
        # (measured: twice the logits error of the plain bf16 model), so QuickGELU stays a pass.
        hidden = quick_gelu(gemm.linear(rows, fc_weight, fc_bias))
        return gemm.linear_add(hidden, residual, proj_weight, proj_bias)
    if accumulate and workspace is not None:
        hidden_shape = (rows.shape[0], fc_weight.shape[0])
        scaled = workspace.buffer("mlp_hidden", hidden_shape, rows.dtype, rows.device)
        torch.addmm(fc_bias, rows, fc_weight.t(), beta=QUICK_GELU_SLOPE, alpha=QUICK_GELU_SLOPE, out=scaled)
    else:
        scaled = torch.addmm(fc_bias, rows, fc_weight.t(), beta=QUICK_GELU_SLOPE, alpha=QUICK_GELU_SLOPE)
    if accumulate or not torch.is_grad_enabled():
        hidden = F.silu(scaled, inplace=True)
    else:
        hidden = F.silu(scaled)
    if accumulate:
        out = residual.view(-1, residual.shape[-1])
        out.add_(proj_bias).addmm_(hidden, proj_weight.t(), alpha=1.0 / QUICK_GELU_SLOPE)
        return residual
    return _fresh_sum(residual, proj_bias, hidden, proj_weight.t(), alpha=1.0 / QUICK_GELU_SLOPE)


# -- the blocks' policy ---------------------------------------------------------------------------

_WORKSPACE = Workspace()
"""Scratch buffers shared by every block of every model in this process during inference (per
thread): blocks run one after another, so one set of buffers serves them all."""


def writes_in_place(x: torch.Tensor) -> bool:
    """Whether a block may accumulate into tensors it made itself and use scratch buffers:
    without grad (nothing keeps them for the backward) and not under autocast (which casts
    neither in-place nor ``out=`` operations, so they would meet float32 weights with
    low-precision activations)."""
    return not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)


def _scratch(x: torch.Tensor) -> Workspace | None:
    """The shared workspace when :func:`writes_in_place` holds for ``x`` and nothing is traced
    (a buffer made for fake tensors would be handed to the next real call)."""
    if not writes_in_place(x) or is_tracing(x):
        return None
    return _WORKSPACE


def qkv_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias`` for the fused q/k/v projection: x ``(R, W)``, weight ``(3W, W)``.

    During inference the result lives in the thread's scratch buffer, valid until the next
    call: the attention reads q, k, v from it and returns a fresh tensor, so it never escapes.
    """
    workspace = _scratch(x)
    if workspace is None or gemm.route(x, weight, others=(bias,)) != "matmul":
        return gemm.linear(x, weight, bias)
    qkv = workspace.buffer("qkv", (x.shape[0], weight.shape[0]), x.dtype, x.device)
    return torch.addmm(bias, x, weight.t(), out=qkv)


def block_mlp_residual(
    x: torch.Tensor,
    owned_residual: torch.Tensor,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
) -> torch.Tensor:
    """A block's MLP add, ``owned_residual + c_proj(QuickGELU(c_fc(x)))``: accumulated into
    ``owned_residual`` (a tensor the block made, e.g. by :func:`linear_residual`) when
    :func:`writes_in_place` allows, with the hidden activations in a scratch buffer; else a
    fresh tensor. x, owned_residual ``(..., W)``."""
    route = gemm.route(x, fc_weight, proj_weight, others=(owned_residual, fc_bias, proj_bias))
    inplace = writes_in_place(owned_residual) and route == "matmul"
    return mlp_residual(
        x, owned_residual, fc_weight, fc_bias, proj_weight, proj_bias,
        inplace=inplace, workspace=_scratch(owned_residual) if inplace else None,
    )
