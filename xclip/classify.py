"""Zero-shot classification of video files: label features, per-video probabilities over the
labels, the top ``k`` of them, and one file end to end (:func:`classify_file`).

For each file ``clips x crops`` views are decoded (:mod:`xclip.video`) and run as one batch;
the per-view softmaxes over the labels are averaged, as the official multi-view evaluation
does. The label features come from :func:`encode_labels` (or the disk cache of
:mod:`xclip.text_cache`); ``python -m xclip classify`` (:mod:`xclip.cli`) ties it together.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .model import XCLIP
from .tokenizer import tokenize
from .video import VideoError, load_views


@torch.no_grad()
def encode_labels(model: XCLIP, labels: Sequence[str]) -> torch.Tensor:
    """Label features ``(K, E)`` (before the video-specific prompts), float32 on the CPU."""
    device = model.token_embedding.weight.device
    tokens = tokenize(list(labels), model.config.context_length).to(device)
    # float32 on the CPU whatever the model's device and dtype: the form the disk cache stores.
    return model.encode_text(tokens).to("cpu", torch.float32)


@torch.no_grad()
def video_probabilities(model: XCLIP, features: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Label probabilities ``(K,)`` of one video: softmax over labels per view, averaged over views.

    Args:
        features: ``(K, E)`` from :func:`encode_labels` or :func:`xclip.text_cache.text_features`.
        views: ``(V, T, 3, S, S)`` from :func:`xclip.video.load_views`.

    Returns:
        float32 ``(K,)`` on the CPU, summing to 1.
    """
    device = model.token_embedding.weight.device
    video = model.encode_video_features(views.to(device))
    logits = model.logits(video, features.to(device, model.token_embedding.weight.dtype))  # (V, K)
    return logits.float().softmax(dim=-1).mean(dim=0).cpu()


def top_k(probabilities: torch.Tensor, labels: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable ``(label, probability)`` of ``(K,)`` ``probabilities``, most
    probable first (ties: label order); all ``K`` when ``k > K``."""
    k = min(k, len(labels))
    # A stable sort keeps the label order among equal probabilities.
    order = torch.sort(probabilities, descending=True, stable=True).indices[:k]
    return [(labels[i], float(probabilities[i])) for i in order.tolist()]


@dataclass
class Result:
    """The outcome for one file: ``top`` (label, probability) pairs, or an ``error`` message."""

    path: str
    top: list[tuple[str, float]] | None = None
    error: str | None = None


def classify_file(
    model: XCLIP,
    features: torch.Tensor,
    labels: Sequence[str],
    path: str,
    *,
    k: int,
    num_clips: int = 1,
    num_crops: int = 1,
    allow_short: bool = False,
) -> Result:
    """Classify one file against the ``(K, E)`` label ``features`` of ``labels``.

    A missing, undecodable or too-short file gives a :class:`Result` with ``error`` set
    instead of raising, so that one bad file in a batch does not stop the others.

    Returns:
        ``Result(path, top=top_k(...))`` with ``min(k, K)`` pairs, or ``Result(path, error=...)``.
    """
    c = model.config
    try:
        views = load_views(
            path, c.num_frames, c.image_size, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short
        )
    except (OSError, VideoError) as exc:
        message = str(exc)
        if path not in message:  # e.g. an OSError from the file system: name the file
            message = f"path: {path}: {message}"
        return Result(path, error=message)
    return Result(path, top=top_k(video_probabilities(model, features, views), labels, k))
