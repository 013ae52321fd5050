"""The official X-CLIP fine-tuning recipe (``X-CLIP/main.py`` and ``utils/optimizer.py`` of
microsoft/VideoX): which parameters train and how fast, the learning-rate schedule, the
classifier over the class prompts and one optimizer step of cross-entropy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from xclip.model import XCLIP

from .distributed import gradient_sync, sync_replicated_grads

NEW_MODULE_MARKERS = ("message_", "mit.", "prompts_")
"""A parameter whose name contains one of these belongs to a module X-CLIP adds to CLIP
(cross-frame message tokens, MIT, video-specific prompt generator and its visual inputs); as
in the official ``build_optimizer``, these train at ``new_lr_scale`` times the learning rate."""

TEXT_TOWER_PREFIXES = (
    "transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale",
)
"""Parameter-name prefixes of the text side that ``--freeze-text`` freezes: the official
``fix_text`` freezes everything outside ``visual.``, ``mit`` and ``prompts``."""

ADAMW_BETAS = (0.9, 0.98)
ADAMW_EPS = 1e-8


# -- which parameters train, and how ----------------------------------------------------------


def is_new_parameter(name: str) -> bool:
    """Whether parameter ``name`` (an :class:`xclip.XCLIP` name) belongs to a module X-CLIP
    adds to CLIP (see :data:`NEW_MODULE_MARKERS`)."""
    return any(marker in name for marker in NEW_MODULE_MARKERS)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether parameter ``name`` is exempt from weight decay: biases, norm gains, the
    prompt ``alpha`` and the logit scale (all with fewer than 2 dims) and embeddings."""
    return param.dim() < 2 or name.endswith("bias") or "embedding" in name


def freeze_text_tower(model: XCLIP) -> list[str]:
    """Stop gradients to the text tower (as the official ``FIX_TEXT``); returns the names frozen."""
    frozen = []
    for name, param in model.named_parameters():
        if name.startswith(TEXT_TOWER_PREFIXES):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(
    model: XCLIP, *, lr: float, weight_decay: float, new_lr_scale: float = 10.0
) -> list[dict[str, object]]:
    """AdamW parameter groups of the official recipe for the trainable parameters of ``model``.

    Four groups, empty ones left out, each with a ``name``: ``clip`` (lr, decay), ``clip
    no-decay`` (lr, no decay), ``new`` (``new_lr_scale * lr``, decay), ``new no-decay``.
    See :func:`is_new_parameter` and :func:`is_no_decay`. Parameters with
    ``requires_grad=False`` are left out.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((is_new_parameter(name), is_no_decay(name, param)), []).append(param)
    groups = []
    for new in (False, True):
        for no_decay in (False, True):
            params = buckets.get((new, no_decay))
            if params:
                groups.append(
                    dict(
                        name=("new" if new else "clip") + (" no-decay" if no_decay else ""),
                        params=params,
                        lr=lr * (new_lr_scale if new else 1.0),
                        weight_decay=0.0 if no_decay else weight_decay,
                    )
                )
    return groups


def build_optimizer(groups: list[dict[str, object]]) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` with the official betas (0.9, 0.98) and eps 1e-8."""
    return torch.optim.AdamW(groups, betas=ADAMW_BETAS, eps=ADAMW_EPS)


# -- the learning-rate schedule ---------------------------------------------------------------


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.01) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear from 0 to 1 over
    ``warmup_steps`` (the first step gets ``1 / warmup_steps``), then cosine from 1 down to
    ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine_scheduler(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that scales every group's learning rate by :func:`warmup_cosine`; stepped
    once per optimizer step (as the official recipe does), not per epoch."""
    schedule = functools.partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


# -- the model and one step -------------------------------------------------------------------


def train_step(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    video: torch.Tensor,
    target: torch.Tensor,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    accumulation_steps: int = 1,
    replicated: Sequence[torch.Tensor] = (),
    world_size: int = 1,
) -> float:
    """One optimizer step on one batch; returns this process's mean loss.

    Args:
        classifier: a :class:`VideoClassifier`, possibly wrapped by DDP or FSDP2, in train mode.
        video: ``(b, T, 3, S, S)`` on the classifier's device.
        target: ``(b,)`` class indices, or ``(b, K)`` class probabilities (mixup).
        scheduler: stepped once after the optimizer.
        scaler: a GradScaler for fp16 autocast.
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (None: off).
        label_smoothing: as :func:`torch.nn.functional.cross_entropy`.
        accumulation_steps: split the batch into this many equal micro-batches, one backward
            each, gradients synchronised only after the last (``b`` must be a multiple).
        replicated: parameters whose gradients no wrapper averages (see
            :func:`xclip.train.distributed.apply_fsdp`).
        world_size: processes in the group, for ``replicated``.

    The loss is the mean over the batch of cross-entropy of each video's logits against all
    class prompts; DDP/FSDP average gradients over processes, so equal per-process batches give
    the gradient of the mean over the global batch.
    """
    batch = video.shape[0]
    if accumulation_steps < 1 or batch % accumulation_steps:
        raise ValueError(
            f"accumulation_steps: expected a divisor of the batch size {batch}, got {accumulation_steps}"
        )
    optimizer.zero_grad(set_to_none=True)
    device_type = video.device.type
    total = torch.zeros((), dtype=torch.float64, device=video.device)
    chunks = zip(video.chunk(accumulation_steps), target.chunk(accumulation_steps))
    for index, (video_part, target_part) in enumerate(chunks):
        with gradient_sync(classifier, index == accumulation_steps - 1):
            with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = classifier(video_part)
            # The loss in at least float32 (autocast logits are bf16/fp16; float64 stays).
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits, target_part, label_smoothing=label_smoothing) / accumulation_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    sync_replicated_grads(replicated, world_size)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(total)
