"""The on-disk cache of label text features, so that a run with the same checkpoint and labels
skips the text encoder.

The label features ``(K, E)`` depend only on the checkpoint and the exact label list, so they
are stored as a safetensors file named by a SHA-256 of (the checkpoint's resolved path, size and
modification time; for a Hugging Face directory, of each file in it; the labels in order; the
context length). Changing a label, their order, or the checkpoint file gives a new key; a cache
file whose stored labels differ from the request is ignored.
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

CACHE_FORMAT = 1
"""Bumped when the cached features would change for the same key (e.g. a text-encoder fix)."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xclip``, or ``~/.cache/xclip``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xclip"


def checkpoint_identity(path: str | os.PathLike) -> dict[str, object]:
    """What identifies a checkpoint for the text cache: resolved path, size and mtime (ns);
    for a directory (Hugging Face), the same for each file directly in it.

    Returns:
        ``{"path": str, "file": [size, mtime_ns]}``, or for a directory ``{"path": str,
        "files": {name: [size, mtime_ns]}}``; JSON-serialisable, for :func:`cache_key`.
    """
    real = os.path.realpath(os.fspath(path))

    def stamp(p: str) -> list[int]:
        st = os.stat(p)
        return [st.st_size, st.st_mtime_ns]

    if os.path.isdir(real):
        files = sorted(e.name for e in os.scandir(real) if e.is_file())
        return {"path": real, "files": {name: stamp(os.path.join(real, name)) for name in files}}
    return {"path": real, "file": stamp(real)}


def cache_key(identity: dict[str, object], labels: Sequence[str], context_length: int) -> str:
    """SHA-256 hex of the checkpoint identity, the exact label list and the context length."""
    blob = json.dumps(
        {"format": CACHE_FORMAT, "checkpoint": identity, "labels": list(labels), "context_length": context_length},
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

    def load(self, key: str, labels: Sequence[str], embed_dim: int) -> torch.Tensor | None:
        """The cached ``(K, E)`` features, or ``None`` when absent, unreadable or for other labels."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                stored = json.loads((f.metadata() or {}).get("labels", "null"))
                features = f.get_tensor("text_features")
        except Exception:  # a truncated or foreign file is a miss; the caller rewrites it
            return None
        # The labels are stored in the file too: a key collision or a hand-copied file must
        # not hand back features of other labels.
        if stored != list(labels) or tuple(features.shape) != (len(labels), embed_dim):
            return None
        return features

    def store(self, key: str, labels: Sequence[str], features: torch.Tensor) -> Path:
        """Write ``(K, E)`` ``features`` of ``labels`` under ``key``; returns the file.

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
                metadata={"labels": json.dumps(list(labels), ensure_ascii=False)},
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
    """Label features ``(K, E)`` float32 (CPU), from ``cache`` when it has them for this
    ``checkpoint`` and exact label list, else encoded (and stored when a cache is given).

    Args:
        checkpoint: the file or directory ``model`` was loaded from; without it (or without a
            cache) the features are always encoded, as nothing identifies the weights.
        on_cache_error: called with the ``OSError`` when the cache cannot be written (the
            features are still returned); ``None`` lets the error propagate.

    Returns:
        ``(features, hit)`` with ``hit`` true when they came from the cache.
    """
    if cache is None or checkpoint is None:
        return encode_labels(model, labels), False
    key = cache_key(checkpoint_identity(checkpoint), labels, model.config.context_length)
    cached = cache.load(key, labels, model.config.embed_dim)
    if cached is not None:
        return cached, True
    features = encode_labels(model, labels)
    try:
        cache.store(key, labels, features)
    except OSError as exc:
        if on_cache_error is None:
            raise
        on_cache_error(exc)
    return features, False
