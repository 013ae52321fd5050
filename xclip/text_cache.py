"""The on-disk cache of label text features, so that a run with the same weights and labels
skips the text encoder.

The label features ``(K, E)`` depend only on the text tower's weights and the exact label
list, so they are stored as a safetensors file named by a SHA-256 of (a hash of the weights'
content, :func:`weights_digest`; the labels in order; the context length). The key never
depends on where the weights came from: a checkpoint rewritten with other weights of the same
size and modification time gets a new key, and the same weights under another path or a new
modification time share one. The digest and the labels are stored in the file too, and a
file whose stored values differ from the request is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .classify import encode_labels
from .model import XCLIP

CACHE_FORMAT = 2
"""Bumped when the cached features would change for the same key (e.g. a text-encoder fix).
2: the key is the weights' content, no longer the checkpoint's path, size and mtime."""

# Parameters the text features cannot depend on (the vision tower, MIT, the video-specific
# prompts and the logit scale): everything else is hashed, so a text-side parameter added to
# the model later is covered without a change here.
_VIDEO_ONLY = ("visual.", "mit.", "prompts_", "logit_scale")


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xclip``, or ``~/.cache/xclip``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xclip"


def weights_digest(model: XCLIP) -> str:
    """SHA-256 hex of what the label features depend on: the model's config and, for every
    text-side tensor (token and position embeddings, text transformer, final LayerNorm, text
    projection), its name, dtype, shape and bytes.

    Computed from the weights in memory on each call, so it always describes them (an
    in-place update, a ``load_state_dict``, another file: another digest). Cost: one pass
    over the text tower's bytes, 254 MB for X-CLIP-B/32 in float32, which took 0.19 s (best
    of 3; encoding 30 labels took 1.8 s) on a 2-core share of an "Intel(R) Xeon(R) Processor",
    torch 2.13.0+cpu, random weights, 2026-12-03.

    Returns:
        64 hex digits.
    """
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode("utf-8"))
    for name, tensor in model.state_dict().items():
        if name.startswith(_VIDEO_ONLY):
            continue
        t = tensor.detach()
        # Name, dtype and shape first: the same bytes under another layout are other weights.
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        h.update(t.cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def cache_key(weights: str, labels: Sequence[str], context_length: int) -> str:
    """SHA-256 hex of the weights' digest (:func:`weights_digest`), the exact label list and
    the context length."""
    blob = json.dumps(
        {"format": CACHE_FORMAT, "weights": weights, "labels": list(labels), "context_length": context_length},
        sort_keys=True,  # the same content gives the same key whatever the dict order
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class TextFeatureCache:
    """Label features on disk, one safetensors file per (checkpoint, label list)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
        """The file of ``key`` (whether it exists or not)."""
        return self.directory / f"text-{key}.safetensors"

    def load(self, key: str, labels: Sequence[str], embed_dim: int, weights: str | None = None) -> torch.Tensor | None:
        """The cached ``(K, E)`` features, or ``None`` when absent, unreadable, for other labels
        or (when ``weights`` is given) stored for weights of another digest."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                stored = json.loads(metadata.get("labels", "null"))
                features = f.get_tensor("text_features")
        except Exception:  # a truncated or foreign file is a miss; the caller rewrites it
            return None
        # The labels are stored in the file too: a key collision or a hand-copied file must
        # not hand back features of other labels.
        if stored != list(labels) or tuple(features.shape) != (len(labels), embed_dim):
            return None
        if weights is not None and metadata.get("weights") != weights:
            return None
        return features

    def store(self, key: str, labels: Sequence[str], features: torch.Tensor, weights: str | None = None) -> Path:
        """Write ``(K, E)`` ``features`` of ``labels`` (of the weights of digest ``weights``)
        under ``key``; returns the file.

        Atomic (a temporary file renamed into place), so a concurrent run or an interrupted
        write never leaves a half-written file under the key.
        """
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        target = self.path(key)
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".text-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(
                {"text_features": features.detach().to("cpu", torch.float32).contiguous()},
                tmp,
                metadata={
                    "labels": json.dumps(list(labels), ensure_ascii=False),
                    **({"weights": weights} if weights is not None else {}),
                },
            )
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target


def text_features(
    model: XCLIP,
    labels: Sequence[str],
    *,
    checkpoint: str | os.PathLike | None = None,
    cache: TextFeatureCache | None = None,
    on_cache_error: Callable[[OSError], None] | None = None,
) -> tuple[torch.Tensor, bool]:
    """Label features ``(K, E)`` float32 (CPU), from ``cache`` when it has them for these
    weights (:func:`weights_digest` of ``model``) and this exact label list, else encoded (and
    stored when a cache is given).

    Args:
        checkpoint: accepted for compatibility and unused: the weights identify themselves,
            whatever file they were loaded from.
        on_cache_error: called with the ``OSError`` when the cache cannot be written (the
            features are still returned); ``None`` lets the error propagate.

    Returns:
        ``(features, hit)`` with ``hit`` true when they came from the cache.
    """
    del checkpoint  # the key is the weights' content; a path could name other weights by now
    if cache is None:
        return encode_labels(model, labels), False
    weights = weights_digest(model)
    key = cache_key(weights, labels, model.config.context_length)
    cached = cache.load(key, labels, model.config.embed_dim, weights=weights)
    if cached is not None:
        return cached, True
    features = encode_labels(model, labels)
    try:
        cache.store(key, labels, features, weights=weights)
    except OSError as exc:
        if on_cache_error is None:
            raise
        on_cache_error(exc)
    return features, False
