"""Run a Hugging Face ``transformers`` X-CLIP on the xclip_kernels ops, in place.

    from transformers import XCLIPModel
    from xclip_kernels.integrations import patch_hf_xclip, unpatch_hf_xclip

    model = XCLIPModel.from_pretrained("microsoft/xclip-base-patch32")
    patch_hf_xclip(model, backend="sdpa")   # every cross-frame block now runs on our ops
    unpatch_hf_xclip(model)                 # Hugging Face's own forwards again

Each ``XCLIPVisionEncoderLayer`` (HF's cross-frame block) gets a forward of its own that reads
the layer's parameters where they are: the message path (``message_fc``, then ``message_ln`` +
``message_attn`` over the T frames of each video, plus the residual) runs as
:func:`xclip_kernels.message_attention`, and the intra-frame attention, which HF computes by
concatenating the message token to the frame's tokens and dropping its output row afterwards,
runs as :func:`xclip_kernels.frame_attention`: q, k, v of the frame tokens plus the message
token's key and value, no concatenated copy, no query row for the message token. Nothing is
copied out of the model, so training the patched model updates HF's parameters.

A call the kernels cannot serve (``output_attentions=True``: the kernels never form the
attention weights; attention dropout in training; an attention mask) runs the layer's original
forward for that call, as Hugging Face's own SDPA path falls back to eager attention when the
weights are asked for, with one :class:`HFFallbackWarning` per reason per process.

This module imports nothing from ``transformers``: HF layers are recognised by their class,
looked up in ``sys.modules`` (a process that has not imported HF's X-CLIP holds no such layer).
"""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import types
import warnings
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch
from torch import nn

from .. import checks
from ..ops import frame_attention, message_attention
from ..registry import get_backend, preload, preload_automatic

__all__ = ["HFFallbackWarning", "patch_hf_xclip", "unpatch", "unpatch_hf_xclip"]

_HF_MODULE = "transformers.models.x_clip.modeling_x_clip"
_HF_LAYER = "XCLIPVisionEncoderLayer"  # HF's name for the official CrossFramelAttentionBlock
_PATCH_ATTRIBUTE = "_xclip_kernels_patch"

ModuleT = TypeVar("ModuleT", bound=nn.Module)


class HFFallbackWarning(UserWarning):
    """A patched Hugging Face block ran its original forward for a call the xclip_kernels ops
    cannot serve (issued once per reason per process)."""


_WARNED: set[str] = set()
"""The fallback reasons already warned about in this process."""
_WARNED_LOCK = threading.Lock()


@dataclass(frozen=True)
class _Patch:
    """What :func:`patch_hf_xclip` keeps on a layer.

    ``original`` is the forward the layer itself held before (set by other code), or ``None``
    when it used its class's (the usual case), so that unpatching restores exactly that.
    ``returns_tuple``: transformers 4 layers take ``causal_attention_mask`` and return
    ``(hidden_states,)``; transformers 5 layers return the tensor.
    """

    original: Callable[..., Any] | None
    backend: str | None
    returns_tuple: bool


def patch_hf_xclip(model: ModuleT, backend: str | None = None) -> ModuleT:
    """Run every HF cross-frame block in ``model`` on xclip_kernels; returns ``model`` (patched in place).

    Args:
        model: a ``transformers`` ``XCLIPModel``, ``XCLIPVisionModel``, or any ``nn.Module``
            containing ``XCLIPVisionEncoderLayer`` blocks (one block alone too).
        backend: a name from :data:`xclip_kernels.BACKENDS`, or ``None`` for the automatic
            choice at each call. Patching a patched model again only changes the backend.

    The patched blocks take and return what HF's do (``hidden_states`` ``(b*T, L, W)`` ->
    ``(b*T, L, W)``; a 1-tuple on transformers 4) and honour HF gradient checkpointing. A
    call the kernels cannot serve runs the layer's original forward instead, for that call
    only, and warns once per process and reason with :class:`HFFallbackWarning`: an attention
    mask, ``output_attentions=True`` (passed or the config's default; the kernels never form
    the attention weights) and attention dropout in training. Every other call runs on the
    kernels. ``torch.compile(model, fullgraph=True)`` traces the patched blocks.

    Raises:
        TypeError: ``model`` is not a module, or holds no HF cross-frame block.
        ValueError: ``backend`` is not a known name.
    """
    layers = _cross_frame_layers(model)
    if backend is not None:
        get_backend(backend)  # unknown names fail here, not at the first forward
        preload(backend)  # imports happen now, not inside a torch.compile trace
    else:
        # What the automatic choice will take: loaded now, not inside a torch.compile trace, and
        # its FLOP formulas registered before a FlopCounterMode around the first forward.
        preload_automatic()
    for layer in layers:
        previous = layer.__dict__.get(_PATCH_ATTRIBUTE)
        if previous is not None:  # already patched: keep the saved original, never wrap twice
            setattr(layer, _PATCH_ATTRIBUTE, _Patch(previous.original, backend, previous.returns_tuple))
            continue
        returns_tuple = "causal_attention_mask" in inspect.signature(type(layer).forward).parameters
        setattr(layer, _PATCH_ATTRIBUTE, _Patch(layer.__dict__.get("forward"), backend, returns_tuple))
        layer.forward = types.MethodType(_patched_forward, layer)
    return model


def unpatch_hf_xclip(model: ModuleT) -> ModuleT:
    """Give every patched HF cross-frame block in ``model`` its original forward back; returns ``model``.

    Raises:
        TypeError: ``model`` is not a module, or holds no HF cross-frame block.
        ValueError: none of its blocks is patched (unpatching twice is a mistake worth hearing
            about: the model it was meant for may be another object).
    """
    layers = _cross_frame_layers(model)
    patched = [layer for layer in layers if _PATCH_ATTRIBUTE in layer.__dict__]
    if not patched:
        raise ValueError(
            f"model: expected a model patched by patch_hf_xclip, got a {type(model).__name__} whose "
            f"{len(layers)} {_HF_LAYER} blocks all run their own forward"
        )
    for layer in patched:
        saved: _Patch = layer.__dict__[_PATCH_ATTRIBUTE]
        delattr(layer, _PATCH_ATTRIBUTE)
        if saved.original is None:
            del layer.forward  # the class's forward shows through again
        else:
            layer.forward = saved.original
    return model


unpatch = unpatch_hf_xclip
"""Alias of :func:`unpatch_hf_xclip`."""


def _cross_frame_layers(model: object) -> list[nn.Module]:
    """The HF cross-frame blocks in ``model``; ``TypeError`` naming what came if there are none."""
    expected = f"a Hugging Face XCLIPModel, XCLIPVisionModel or other torch.nn.Module containing {_HF_LAYER} blocks"
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected {expected}, got {type(model).__name__}")
    layer_class = getattr(sys.modules.get(_HF_MODULE), _HF_LAYER, None)
    layers = [] if layer_class is None else [m for m in model.modules() if isinstance(m, layer_class)]
    if not layers:
        hint = (
            " (xclip.XCLIP runs on xclip_kernels already: use model.set_attention_backend)"
            if hasattr(model, "set_attention_backend") else ""
        )
        raise TypeError(f"model: expected {expected}, got a {type(model).__name__} without any{hint}")
    return layers


def _patched_forward(
    layer: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    causal_attention_mask: torch.Tensor | None = None,
    output_attentions: bool | None = None,
    **kwargs: Any,
) -> torch.Tensor | tuple[torch.Tensor]:
    """The forward of a patched HF cross-frame block. hidden_states ``(b*T, L, W)`` -> ``(b*T, L, W)``.

    Other keyword arguments HF passes down (flags its output capture reads) are accepted and
    not needed.
    """
    patch: _Patch = getattr(layer, _PATCH_ATTRIBUTE)
    reason = _fallback_reason(layer, attention_mask, causal_attention_mask, output_attentions)
    if reason is not None:
        _warn_once(reason)
        if output_attentions is not None:  # given by the caller: the original forward must see it too
            kwargs["output_attentions"] = output_attentions
        if causal_attention_mask is not None or patch.returns_tuple:  # the transformers 4 signature
            kwargs["causal_attention_mask"] = causal_attention_mask
        original = patch.original if patch.original is not None else types.MethodType(type(layer).forward, layer)
        return original(hidden_states, attention_mask, **kwargs)
    checks.tensor("hidden_states", hidden_states, ndim=3)
    body = functools.partial(_cross_frame_block, layer, patch.backend)
    # transformers 5 checkpoints inside the class's forward, which this one replaces.
    if getattr(layer, "gradient_checkpointing", False) and layer.training and torch.is_grad_enabled():
        out = layer._gradient_checkpointing_func(body, hidden_states)
    else:
        out = body(hidden_states)
    return (out,) if patch.returns_tuple else out


_FALLBACK_WHY = {
    "attention_mask": "the xclip_kernels ops take no attention mask (HF's vision tower passes none)",
    "output_attentions": "output_attentions=True: the xclip_kernels ops never form the attention weights",
    "attention_dropout": "attention dropout in training: the xclip_kernels ops have no attention dropout",
}


def _fallback_reason(
    layer: nn.Module,
    attention_mask: torch.Tensor | None,
    causal_attention_mask: torch.Tensor | None,
    output_attentions: bool | None,
) -> str | None:
    """The key in :data:`_FALLBACK_WHY` of why this call needs HF's own forward, or None when
    the kernels can serve it."""
    if attention_mask is not None or causal_attention_mask is not None:
        return "attention_mask"
    if output_attentions is None:  # not passed: HF's output capture reads the config's default
        output_attentions = getattr(layer.self_attn.config, "output_attentions", False)
    if output_attentions:
        return "output_attentions"
    if layer.training and (layer.self_attn.dropout > 0 or layer.message_attn.dropout > 0):
        return "attention_dropout"
    return None


def _warn_once(reason: str) -> None:
    """One :class:`HFFallbackWarning` per ``reason`` per process (whatever the warning filters
    say: a training loop would otherwise repeat it every layer of every step)."""
    with _WARNED_LOCK:
        if reason in _WARNED:
            return
        _WARNED.add(reason)
    warnings.warn(
        f"patch_hf_xclip: {_FALLBACK_WHY[reason]}; these calls run Hugging Face's original forward "
        "of the cross-frame blocks (other calls still run on xclip_kernels). Warned once per process.",
        HFFallbackWarning,
        stacklevel=3,
    )


def _cross_frame_block(layer: nn.Module, backend: str | None, hidden_states: torch.Tensor) -> torch.Tensor:
    """HF's ``XCLIPVisionEncoderLayer`` math on xclip_kernels. ``(F, L, W)`` -> ``(F, L, W)``, F = b*T."""
    frames, tokens, width = hidden_states.shape
    attn, message_attn = layer.self_attn, layer.message_attn

    # CFA: one message token per frame from its class token, attending over its video's T
    # messages. HF keeps q/k/v as three Linear layers; the op takes them packed, so the
    # (3W, W) packing is made per call (autograd carries the gradients back to each Linear).
    projections = (message_attn.q_proj, message_attn.k_proj, message_attn.v_proj)
    messages = layer.message_fc(hidden_states[:, 0])
    mixed = message_attention(
        messages,
        layer.message_ln.weight, layer.message_ln.bias,
        torch.cat([p.weight for p in projections]), torch.cat([p.bias for p in projections]),
        message_attn.out_proj.weight, message_attn.out_proj.bias,
        num_frames=layer.num_frames, num_heads=message_attn.num_heads, eps=layer.message_ln.eps, backend=backend,
    )
    if layer.training and not isinstance(layer.drop_path, nn.Identity):
        # HF drops the attention branch only, per video: on its (b, T, W) view of the messages.
        branch = (mixed - messages).view(-1, layer.num_frames, width)
        mixed = messages + layer.drop_path(branch).view(frames, width)
    messages = mixed

    # IFA: the frame tokens' queries, keys and values, plus the message token's key and value
    # (layer_norm1 and the projections are per token, so they equal HF's on the concatenation).
    heads, head_dim = attn.num_heads, attn.head_dim
    normed = layer.layer_norm1(hidden_states)
    q, k, v = (p(normed).view(frames, tokens, heads, head_dim) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    normed_messages = layer.layer_norm1(messages)
    msg_k = attn.k_proj(normed_messages).view(frames, heads, head_dim)
    msg_v = attn.v_proj(normed_messages).view(frames, heads, head_dim)
    attended = frame_attention(q, k, v, msg_k, msg_v, scale=attn.scale, backend=backend)
    hidden_states = hidden_states + attn.out_proj(attended.reshape(frames, tokens, width))
    return hidden_states + layer.mlp(layer.layer_norm2(hidden_states))
