"""Zero-shot classification of video files: ``python -m xclip classify`` and the functions
behind it.

One run loads the checkpoint once, encodes the label texts once (or reads them from the
on-disk cache), then for each file decodes ``clips x crops`` views (:mod:`xclip.video`), runs
them as one batch and averages the per-view softmaxes over the labels, as the official
multi-view evaluation does. A file that fails (missing, not a video, too few frames) is
reported on stderr and the others still run; the exit status is 1 if any failed.

Text-feature cache: the label features ``(K, E)`` depend only on the checkpoint and the exact
label list, so they are stored as a safetensors file named by a SHA-256 of (the checkpoint's
resolved path, size and modification time; for a Hugging Face directory, of each file in it;
the labels in order; the context length). Changing a label, their order, or the checkpoint
file gives a new key; a cache file whose stored labels differ from the request is ignored.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import torch

from .model import XCLIP
from .tokenizer import tokenize
from .video import CROP_COUNTS, VideoError, load_views

CACHE_FORMAT = 1
"""Bumped when the cached features would change for the same key (e.g. a text-encoder fix)."""


# -- labels -------------------------------------------------------------------------------------


def parse_labels(text: str) -> list[str]:
    """Labels from a comma-separated string; surrounding spaces are stripped, empty items dropped."""
    if not isinstance(text, str):
        raise TypeError(f"labels: expected a comma-separated string, got {type(text).__name__}")
    return check_labels([item.strip() for item in text.split(",") if item.strip()], "labels")


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """Labels from a UTF-8 text file, one per line; surrounding spaces stripped, blank lines skipped."""
    with open(path, encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    return check_labels(labels, f"labels file {os.fspath(path)}")


def check_labels(labels: Sequence[str], name: str = "labels") -> list[str]:
    """``labels`` as a list, after checking there is at least one and none repeats."""
    labels = list(labels)
    if not labels:
        raise ValueError(f"{name}: expected at least one label, got none")
    if not all(isinstance(label, str) for label in labels):
        raise TypeError(f"{name}: expected strings, got {[type(label).__name__ for label in labels]}")
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"{name}: expected distinct labels, got repeats of {repeated}")
    return labels


# -- text features and their cache --------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xclip``, or ``~/.cache/xclip``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xclip"


def checkpoint_identity(path: str | os.PathLike) -> dict[str, object]:
    """What identifies a checkpoint for the text cache: resolved path, size and mtime (ns);
    for a directory (Hugging Face), the same for each file directly in it."""
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
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class TextFeatureCache:
    """Label features on disk, one safetensors file per (checkpoint, label list)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    def path(self, key: str) -> Path:
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
        except Exception:  # a truncated or foreign file is a miss; it is rewritten below
            return None
        if stored != list(labels) or tuple(features.shape) != (len(labels), embed_dim):
            return None
        return features

    def store(self, key: str, labels: Sequence[str], features: torch.Tensor) -> Path:
        """Write atomically (a temporary file renamed into place)."""
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


@torch.no_grad()
def encode_labels(model: XCLIP, labels: Sequence[str]) -> torch.Tensor:
    """Label features ``(K, E)`` (before the video-specific prompts), float32 on the CPU."""
    device = model.token_embedding.weight.device
    tokens = tokenize(list(labels), model.config.context_length).to(device)
    return model.encode_text(tokens).to("cpu", torch.float32)


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


# -- classification -----------------------------------------------------------------------------


@torch.no_grad()
def video_probabilities(model: XCLIP, features: torch.Tensor, views: torch.Tensor) -> torch.Tensor:
    """Label probabilities ``(K,)`` of one video: softmax over labels per view, averaged over views.

    Args:
        features: ``(K, E)`` from :func:`text_features`.
        views: ``(V, T, 3, S, S)`` from :func:`xclip.video.load_views`.
    """
    device = model.token_embedding.weight.device
    video = model.encode_video_features(views.to(device))
    logits = model.logits(video, features.to(device, model.token_embedding.weight.dtype))  # (V, K)
    return logits.float().softmax(dim=-1).mean(dim=0).cpu()


def top_k(probabilities: torch.Tensor, labels: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable ``(label, probability)``, most probable first (ties: label order)."""
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
    """Classify one file; a missing, undecodable or too-short file gives a :class:`Result`
    with ``error`` set instead of raising."""
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


# -- the command --------------------------------------------------------------------------------


class ProgressBar:
    """A one-line progress bar on a terminal (``[#####-----] 3/10 name``); does nothing when
    disabled. :meth:`clear` before printing other lines to the same terminal."""

    def __init__(self, total: int, stream: TextIO, enabled: bool) -> None:
        self.total = total
        self.stream = stream
        self.enabled = enabled and total > 0
        self.done = 0
        self.current = ""
        self._shown = False

    def _width(self) -> int:
        return max(20, min(shutil.get_terminal_size((80, 24)).columns, 200) - 1)

    def draw(self) -> None:
        if not self.enabled:
            return
        slots = 20
        filled = slots * self.done // self.total
        line = f"[{'#' * filled}{'-' * (slots - filled)}] {self.done}/{self.total} {self.current}"
        self.stream.write("\r" + line[: self._width()] + "\x1b[K")
        self.stream.flush()
        self._shown = True

    def start(self, name: str) -> None:
        self.current = name
        self.draw()

    def advance(self) -> None:
        self.done += 1
        self.current = ""
        self.draw()

    def clear(self) -> None:
        if self.enabled and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = False

    def close(self) -> None:
        self.clear()


def format_result(result: Result, as_json: bool) -> str:
    """The text printed for one file: the path, then ``  probability  label`` lines (4
    decimals), or with ``as_json`` one JSON object ``{"path", "top": [{"label", "probability"}]}``."""
    if as_json:
        payload: dict[str, object] = {"path": result.path}
        payload["top"] = [{"label": label, "probability": p} for label, p in result.top or []]
        return json.dumps(payload, ensure_ascii=False)
    lines = [result.path] + [f"  {p:.4f}  {label}" for label, p in result.top or []]
    return "\n".join(lines)


def run_classify(
    *,
    videos: Sequence[str],
    checkpoint: str,
    labels: Sequence[str],
    k: int | None = None,
    num_clips: int = 1,
    num_crops: int = 1,
    allow_short: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    device: str = "cpu",
    backend: str | None = None,
    as_json: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """The ``classify`` command: returns the exit status (0: every file classified; 1: some
    file failed, or the checkpoint could not be loaded). Results go to ``stdout`` in input
    order, errors and notes to ``stderr``. ``progress=None``: a bar when ``stderr`` is a
    terminal, there is more than one file and not ``quiet``."""
    from xclip_kernels import get_backend

    from .checkpoint import load_checkpoint

    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    labels = check_labels(labels)
    if k is None:
        k = min(5, len(labels))
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"top_k: expected an int >= 1, got {k!r}")
    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 1:
        raise ValueError(f"clips: expected an int >= 1, got {num_clips!r}")
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"crops: expected one of {CROP_COUNTS}, got {num_crops!r}")

    def note(message: str) -> None:
        if not quiet:
            print(f"xclip classify: {message}", file=stderr, flush=True)

    if backend is not None:
        get_backend(backend)  # an unknown name raises here, naming the argument
    try:
        device = torch.device(device)
    except RuntimeError as exc:
        raise ValueError(f"device: expected a torch device such as cpu or cuda:0, got {device!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected a device this machine has, got {device} (CUDA is not available)")
    try:
        model = load_checkpoint(checkpoint, backend=backend, map_location=device)
    except (OSError, ValueError) as exc:
        print(f"xclip classify: error: checkpoint: {exc}", file=stderr, flush=True)
        return 1
    cache = None
    if use_cache:
        cache = TextFeatureCache(cache_dir if cache_dir is not None else default_cache_dir())
    unsaved: list[OSError] = []
    features, hit = text_features(model, labels, checkpoint=checkpoint, cache=cache, on_cache_error=unsaved.append)
    if unsaved:  # an unwritable cache directory costs the cache, not the run
        print(f"xclip classify: warning: text features not cached ({unsaved[0]})", file=stderr, flush=True)
    elif cache is not None:
        where = "read from" if hit else "encoded and saved to"
        note(f"text features of {len(labels)} labels {where} {cache.directory}")

    show = progress if progress is not None else (not quiet and len(videos) > 1 and stderr.isatty())
    bar = ProgressBar(len(videos), stderr, show)
    failed = 0
    try:
        for path in videos:
            bar.start(os.path.basename(path))
            result = classify_file(
                model, features, labels, path,
                k=k, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short,
            )
            bar.clear()
            if result.error is not None:
                failed += 1
                print(f"xclip classify: error: {result.error}", file=stderr, flush=True)
            else:
                print(format_result(result, as_json), file=stdout, flush=True)
            bar.advance()
    finally:
        bar.close()
    if failed:
        note(f"{failed} of {len(videos)} files failed")
    return 1 if failed else 0
