"""Training data: labelled video folders, synthetic clips, mixup / CutMix, the sharded loader.

A dataset item is ``(clip (T, 3, S, S) float, class index)``; every dataset also has
``labels`` (the prompt text of each class, by index) and ``classes`` (the class names).

A video folder can skip files that cannot be loaded (:class:`SkippedFiles`): the item of a bad
file is the next loadable file's, the file is remembered (in every loader process) and never
tried again, and the run reports them at the end; without it a bad file raises, naming itself.
"""

from __future__ import annotations

import functools
import math
import multiprocessing
import os
import random
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts")
"""File name endings (case-insensitive) that count as videos in a class folder."""

ClipLoader = Callable[[str], torch.Tensor]
"""``path -> (T, 3, S, S)`` float clip: how a :class:`VideoFolder` turns a file into a clip."""


def label_text(folder_name: str) -> str:
    """The prompt of a class from its folder name: underscores become spaces."""
    return " ".join(folder_name.replace("_", " ").split())


def default_clip_loader(num_frames: int, image_size: int) -> ClipLoader:
    """``path -> (T, 3, S, S)`` float clip from :func:`xclip.video.load_clip` (PyAV decoding,
    the official segment sampling, resize, centre crop, normalisation).

    Imported here, not at module level: synthetic runs and tests need no video decoder.
    Videos shorter than T frames repeat frames, as the official sampler does.
    """
    try:
        from xclip import video
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise ImportError(
            "--data: decoding videos needs xclip.video (and PyAV: pip install av); "
            f"it could not be imported ({exc}). Pass load_clip=... to VideoFolder, or use --synthetic N"
        ) from exc
    return functools.partial(video.load_clip, num_frames=num_frames, image_size=image_size, allow_short=True)


def no_clip_loader(path: str) -> torch.Tensor:
    """Placeholder :data:`ClipLoader` of a :class:`VideoFolder` opened before its clip size is
    known (the run checks the folder before reading the model, then sets the real one)."""
    raise RuntimeError("VideoFolder.load_clip was not set")


class SkippedFiles:
    """The files of a :class:`VideoFolder` that could not be loaded, with the reason, by path.

    With ``shared=True`` the record lives in a ``multiprocessing`` manager process, so that the
    DataLoader's worker processes (each with its own copy of the dataset) add to one record the
    run reads at the end; call :meth:`close` when done. Without, a plain dict (``--workers 0``).
    """

    def __init__(self, *, shared: bool = False) -> None:
        self._manager = multiprocessing.Manager() if shared else None
        self._files: dict[str, str] = self._manager.dict() if self._manager is not None else {}

    def __getstate__(self) -> dict[str, object]:
        # A worker process gets the record (a picklable proxy), not the manager.
        return {"_manager": None, "_files": self._files}

    def __contains__(self, path: object) -> bool:
        try:
            return path in self._files
        except (OSError, EOFError):  # the manager is gone (the run ended while a worker prefetched)
            return False

    def record(self, path: str, reason: str) -> bool:
        """Remember ``path`` as unloadable; True when it was not known yet (two workers failing
        on one file at once may both see True: the cost is one repeated warning)."""
        try:
            if path in self._files:
                return False
            self._files[path] = reason
            return True
        except (OSError, EOFError):
            return False

    def items(self) -> dict[str, str]:
        """A plain copy: ``{path: reason}``."""
        try:
            return dict(self._files.items())
        except (OSError, EOFError):
            return {}

    def close(self) -> None:
        """Stop the manager process (a no-op when not shared or closed already)."""
        if self._manager is not None:
            self._manager.shutdown()
            self._manager = None


class VideoFolder(Dataset):
    """Labelled videos in ``root/<class_name>/<video files>``.

    Classes are the sub-folders of ``root`` in sorted order (index = position); their label
    texts are :func:`label_text` of the folder names. Items are ``(clip (T, 3, S, S) float,
    class index)``; ``load_clip(path)`` makes the clip. ``argument`` names the source in
    error messages (the run passes ``"--data"``).

    ``skipped``: ``None`` (the default), and a file that ``load_clip`` cannot load raises,
    naming it; a :class:`SkippedFiles`, and such a file is recorded there (with a warning on
    stderr the first time) and the item is the next loadable file's, in sample order, with
    that file's class, so that batches stay full (a skipped file's place in the epoch goes to
    a repeat of another). Files already recorded are not tried again.

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is missing or not a folder.
        ValueError: fewer than two class folders, or a class folder without video files.
    """

    def __init__(
        self, root: str | os.PathLike, load_clip: ClipLoader, *, argument: str = "root",
        skipped: SkippedFiles | None = None,
    ) -> None:
        root_path = Path(root)
        layout = "a folder of class folders (root/<class_name>/<video files>)"
        if not root_path.exists():
            raise FileNotFoundError(f"{argument}: expected {layout}, got {str(root)!r}, which does not exist")
        if not root_path.is_dir():
            raise NotADirectoryError(f"{argument}: expected {layout}, got {str(root)!r}, which is not a folder")
        folders = sorted(p for p in root_path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if len(folders) < 2:
            found = ", ".join(repr(p.name) for p in folders) or "none"
            raise ValueError(f"{argument}: expected at least 2 class folders in {str(root)!r}, got {len(folders)} ({found})")
        self.root = root_path
        self.load_clip = load_clip
        self.argument = argument
        self.skipped = skipped
        self.classes = [p.name for p in folders]
        self.labels = [label_text(name) for name in self.classes]
        empty = [name for name, text in zip(self.classes, self.labels) if not text]
        if empty:
            raise ValueError(f"{argument}: class folder names must contain a word, got {empty}")
        self.samples: list[tuple[str, int]] = []
        for index, folder in enumerate(folders):
            videos = sorted(
                str(p) for p in folder.iterdir()
                if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in VIDEO_EXTENSIONS
            )
            if not videos:
                raise ValueError(
                    f"{argument}: class folder {str(folder)!r} has no video files "
                    f"(expected names ending in {', '.join(VIDEO_EXTENSIONS)})"
                )
            self.samples.extend((path, index) for path in videos)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        count = len(self.samples)
        for offset in range(count if self.skipped is not None else 1):
            path, label = self.samples[(index + offset) % count]
            if self.skipped is not None and path in self.skipped:
                continue
            try:
                clip = self.load_clip(path)
            except ImportError:  # a missing decoder fails every file alike: not a bad file
                raise
            except Exception as exc:  # noqa: BLE001 - whatever a broken file makes the decoder raise
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())
                if self.skipped is None:
                    raise RuntimeError(f"{self.argument}: {path} could not be loaded ({reason})") from exc
                if self.skipped.record(path, reason):
                    print(f"warning: {self.argument}: skipping {path}: {reason}", file=sys.stderr, flush=True)
                continue
            if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.shape[1] != 3 or not clip.is_floating_point():
                got = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
                raise ValueError(f"load_clip: expected a float tensor (T, 3, S, S) for {path!r}, got {got}")
            return clip, label
        path, reason = next(iter(self.skipped.items().items()), ("?", "?"))  # all recorded by now
        raise RuntimeError(f"{self.argument}: none of the {count} video files could be loaded (e.g. {path}: {reason})")


class SyntheticVideos(Dataset):
    """``count`` random clips ``(T, 3, S, S)`` in ``num_classes`` classes, for smoke tests and
    benchmarks.

    Clip ``i`` has class ``i % num_classes`` and is that class's fixed random pattern plus
    noise of its own, so a model can learn the classes; every clip is a pure function of
    ``(seed, i)``, the same in every process. Labels are "class 0", "class 1", ...
    """

    def __init__(self, count: int, num_classes: int, num_frames: int, image_size: int, seed: int = 0) -> None:
        self.count = count
        self.shape = (num_frames, 3, image_size, image_size)
        self.seed = seed
        self.labels = [f"class {k}" for k in range(num_classes)]
        self.classes = list(self.labels)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        label = index % len(self.labels)
        pattern = torch.Generator().manual_seed(self.seed * 1_000_003 + label)
        noise = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self.labels) + index)
        clip = torch.randn(self.shape, generator=pattern) + 0.5 * torch.randn(self.shape, generator=noise)
        return clip, label


def sharded_loader(
    dataset: Dataset, *, batch_size: int, rank: int, world_size: int, seed: int, workers: int, pin_memory: bool
) -> DataLoader:
    """The batches of process ``rank`` of ``world_size``: ``(video (batch_size, T, 3, S, S),
    target (batch_size,))``, reshuffled each epoch by ``loader.sampler.set_epoch(epoch)``.

    Every process gets an equal, disjoint shard and only full batches (``drop_last``), so that
    per-process mean losses and gradients average to those of the global batch.
    """
    sampler = DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
    )
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=True, num_workers=workers,
        pin_memory=pin_memory, persistent_workers=workers > 0,
    )


def mix_batch(
    video: torch.Tensor, target: torch.Tensor, num_classes: int, *, mixup: float, cutmix: float, rng: random.Random
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a batch with itself reversed (the official ``CutmixMixupBlending``).

    video ``(b, T, 3, S, S)``, target ``(b,)`` class indices -> mixed video and soft targets
    ``(b, K)``. With both enabled each batch takes one of them with probability 1/2. Mixup:
    ``lam ~ Beta(mixup, mixup)``, ``lam * x + (1 - lam) * x.flip(0)``. CutMix: one box of area
    ``(1 - lam) S^2`` (``lam ~ Beta(cutmix, cutmix)``), the same in every frame, pasted from
    the reversed batch; ``lam`` becomes the kept area. Targets mix the same way.
    """
    one_hot = F.one_hot(target, num_classes).to(torch.float32)
    use_cutmix = cutmix > 0 and (mixup <= 0 or rng.random() < 0.5)
    if use_cutmix:
        size = video.shape[-1]
        lam = rng.betavariate(cutmix, cutmix)
        cut = int(size * math.sqrt(1.0 - lam))
        cy, cx = rng.randrange(size), rng.randrange(size)
        y0, y1 = max(cy - cut // 2, 0), min(cy + cut // 2, size)
        x0, x1 = max(cx - cut // 2, 0), min(cx + cut // 2, size)
        video = video.clone()
        video[..., y0:y1, x0:x1] = video.flip(0)[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (size * size)
    elif mixup > 0:
        lam = rng.betavariate(mixup, mixup)
        video = lam * video + (1.0 - lam) * video.flip(0)
    else:
        return video, one_hot
    return video, lam * one_hot + (1.0 - lam) * one_hot.flip(0)
