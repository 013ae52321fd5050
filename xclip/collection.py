"""Classifying and embedding a whole video collection: inputs (files, folders, manifests),
parallel decoding, clips batched across files, resumable JSONL output, torchrun sharding.

    python -m xclip classify videos/ --checkpoint C --labels-file L --output results.jsonl --workers 4
    python -m xclip embed --manifest val.csv --checkpoint C --output embeddings/ --workers 4

The pipeline: a :class:`torch.utils.data.DataLoader` whose ``workers`` processes decode one
file each (:func:`xclip.video.load_views`, the same views as ``classify`` of one file); the
main process gathers the views of consecutive files until it has ``batch_size`` clips, runs
them through the model in one batch, and splits the outputs back per file. So decoding of the
next files overlaps the model's work on the current batch. A file that fails to decode is a
record with its error, never the end of the run.

Output (:class:`ResultLog`) is JSON Lines, one object per input file, appended and flushed as
results arrive. A run killed at any point (kill -9 included) leaves whole lines and at most one
torn last line; ``resume`` drops that line and skips every path already present, so each
input appears exactly once. The settings the records depend on (:func:`run_settings`) sit
beside the output in ``OUTPUT.settings.json``, written before the first record; ``resume``
with other settings raises :class:`SettingsError` before anything is written. Under torchrun
each rank takes every ``world_size``-th input (a disjoint shard), appends to its own part file
beside the output, and rank 0 merges the parts into the output at the end (a resumed run
merges what an interrupted one left); rank 0 alone records the settings.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import hashlib
import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, get_worker_info

from xclip_kernels import checks

from .classify import top_k
from .labels import check_labels
from .model import XCLIP
from .video import CROP_COUNTS, load_views

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts")
"""File name endings (any case) a folder given as input is searched for, recursively."""


# -- inputs -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Item:
    """One input video: its ``path`` and, from a manifest, its true ``label`` (or None)."""

    path: str
    label: str | None = None


def printable(text: str) -> str:
    """``text`` with bytes that were not UTF-8 (lone surrogates in Python's file names) as
    ``\\xNN``, so that it can be written to a UTF-8 file; the key of a path in the output."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def find_videos(folder: str | os.PathLike) -> list[str]:
    """Video files under ``folder``, recursively, by name ending (:data:`VIDEO_EXTENSIONS`, any
    case), hidden files and folders skipped, sorted (the order is the same on every rank)."""
    found: list[str] = []
    for root, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # in place: os.walk descends only into these
        found.extend(
            os.path.join(root, name)
            for name in sorted(names)
            if not name.startswith(".") and name.lower().endswith(VIDEO_EXTENSIONS)
        )
    return found


def read_manifest(path: str | os.PathLike) -> list[Item]:
    """The videos listed in a manifest file.

    Formats, by name ending: ``.csv`` (a header row with a ``path`` column and optionally a
    ``label`` column), ``.jsonl`` / ``.ndjson`` (one object per line with ``"path"`` and
    optionally ``"label"``), anything else one path per line (blank lines and lines starting
    with ``#`` skipped). Relative paths are relative to the manifest's folder.

    Raises ``OSError`` for an unreadable file and ``ValueError`` naming the file and line for a
    missing ``path`` column, a line that is not a JSON object, or an empty path.
    """
    path = os.fspath(path)
    base = os.path.dirname(os.path.abspath(path))
    lower = path.lower()
    rows: list[tuple[int, Any, Any]] = []  # (line number, path, label)
    with open(path, encoding="utf-8", newline="") as f:
        if lower.endswith(".csv"):
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(f"manifest: expected a CSV header with a 'path' column in {path}, got {reader.fieldnames}")
            rows = [(reader.line_num, row.get("path"), row.get("label")) for row in reader]
        elif lower.endswith((".jsonl", ".ndjson")):
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"manifest: {path} line {number}: expected a JSON object, got {line.strip()[:60]!r} ({exc.msg})") from None
                if not isinstance(record, dict) or "path" not in record:
                    raise ValueError(f"manifest: {path} line {number}: expected an object with a 'path' key, got {line.strip()[:60]!r}")
                rows.append((number, record["path"], record.get("label")))
        else:
            rows = [(n, line.strip(), None) for n, line in enumerate(f, 1) if line.strip() and not line.lstrip().startswith("#")]
    items = []
    for number, video, label in rows:
        if not isinstance(video, str) or not video.strip():
            raise ValueError(f"manifest: {path} line {number}: expected a non-empty path, got {video!r}")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"manifest: {path} line {number}: expected the label as text, got {label!r}")
        label = label.strip() if label is not None and label.strip() else None
        items.append(Item(os.path.join(base, video.strip()), label))
    return items


def collect_inputs(
    paths: Sequence[Item | str | os.PathLike] = (), manifest: str | os.PathLike | None = None
) -> list[Item]:
    """The inputs of a run: ``paths`` in order (an :class:`Item` as it is; a folder: its videos,
    :func:`find_videos`; anything else taken as a file, decoded or reported later), then the
    ``manifest``'s entries.
    A path given twice is kept once (its first occurrence): the output has one line per path.

    Raises ``ValueError`` when there is no input at all.
    """
    items: list[Item] = []
    for path in paths:
        if isinstance(path, Item):
            items.append(path)
            continue
        path = os.fspath(path)
        if os.path.isdir(path):
            items.extend(Item(p) for p in find_videos(path))
        else:
            items.append(Item(path))
    if manifest is not None:
        items.extend(read_manifest(manifest))
    seen: set[str] = set()
    unique = []
    for item in items:
        if item.path not in seen:
            seen.add(item.path)
            unique.append(item)
    if not unique:
        raise ValueError(f"videos: expected at least one video file, got none (paths {list(paths)}, manifest {manifest})")
    return unique


# -- decoding -----------------------------------------------------------------------------------


class ViewsDataset(Dataset):
    """The views of each input, decoded where the DataLoader asks (a worker process).

    ``dataset[i]`` is ``{"index": i, "views": (V, T, 3, S, S) float32 or None, "error": None or
    the message, "seconds": decode time}``: a file that cannot be decoded (any exception) gives
    its error instead of raising, so a worker never dies of one file.
    """

    def __init__(
        self, items: Sequence[Item], num_frames: int, image_size: int, *, num_clips: int = 1, num_crops: int = 1,
        allow_short: bool = False,
    ) -> None:
        self.items = list(items)
        self.num_frames = num_frames
        self.image_size = image_size
        self.num_clips = num_clips
        self.num_crops = num_crops
        self.allow_short = allow_short

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.items[index].path
        start = time.perf_counter()
        views, error = None, None
        # In a DataLoader worker FFmpeg decodes in this thread: the workers are the parallelism
        # (one core each, torch too: _one_thread_per_worker), and FFmpeg's own threads (one per
        # core, frame-threaded) in every worker would make W workers fight over the cores with
        # W x cores threads. In this process (no workers) FFmpeg keeps its threads, since the
        # model waits while a file decodes, but torch's resize and normalise get one thread: on
        # per-frame tensors that small, torch's intra-op threads cost far more than they save
        # (python -m benchmarks.collection, in process, on the 2 development cores shared with
        # other work: 0.20 CPU s per video with torch's 2 threads, 0.04 with 1).
        in_worker = get_worker_info() is not None
        torch_threads = torch.get_num_threads()
        if not in_worker:
            torch.set_num_threads(1)
        try:
            views = load_views(
                path, self.num_frames, self.image_size, num_clips=self.num_clips, num_crops=self.num_crops,
                allow_short=self.allow_short, threads=1 if in_worker else 0,
                # A worker builds the views where the main process can map them: sent as a
                # handle, not copied into a new segment (about 7% of a worker's time per video,
                # python -m benchmarks.collection).
                shared_memory=in_worker,
            )
        except Exception as exc:  # noqa: BLE001 - one file's failure must not cost the others
            # The message of today's per-file classify: VideoError/OSError name the file; others get it added.
            message = str(exc) if isinstance(exc, OSError | ValueError) else f"{type(exc).__name__}: {exc}"
            error = message if path in message else f"path: {path}: {message}"
        finally:
            if not in_worker:
                torch.set_num_threads(torch_threads)  # the model's batches get every thread back
        return {"index": index, "views": views, "error": error, "seconds": time.perf_counter() - start}


def _one(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """collate_fn of batch size 1: the sample itself (batching across files is done by views)."""
    return batch[0]


def _one_thread_per_worker(_: int) -> None:
    # Each decode worker uses one core: N workers on N cores, not N x all cores fighting over
    # them (resize and normalise would otherwise each start torch's full intra-op pool).
    torch.set_num_threads(1)


def decode_loader(dataset: ViewsDataset, *, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over ``dataset`` in order, one file per step, decoded by ``workers``
    processes (0: in this process), pinned when the model runs on a GPU."""
    checks.integer("workers", workers, 0)
    return DataLoader(
        dataset, batch_size=1, shuffle=False, num_workers=workers, collate_fn=_one, pin_memory=pin_memory,
        worker_init_fn=_one_thread_per_worker if workers > 0 else None,
        prefetch_factor=4 if workers > 0 else None,  # a few files ahead per worker: a slow file does not stall the batch
    )


# -- output -------------------------------------------------------------------------------------


def _read_records(path: str, *, repair: bool) -> list[dict[str, Any]]:
    """The whole records of a JSONL results file (missing: none). A last line without its
    newline (the write a kill interrupted) and any line that is not a JSON object with a
    ``"path"`` are dropped; with ``repair`` the file is rewritten without them, so that
    appending continues after the last whole record."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    records: list[dict[str, Any]] = []
    good = bytearray()
    lines = data.split(b"\n")
    for number, line in enumerate(lines):
        if number == len(lines) - 1:  # after the last newline: b"" or a torn write
            break
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(record, dict) and isinstance(record.get("path"), str):
            records.append(record)
            good += line + b"\n"
    if repair and len(good) != len(data):
        with open(path, "r+b") as f:
            f.write(good)
            f.truncate()
    return records


def _write_atomic(path: str, lines: Sequence[str]) -> None:
    """Write ``lines`` to ``path`` through a temporary file renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".xclip-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(line + "\n" for line in lines)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


SETTINGS_SUFFIX = ".settings.json"
"""The settings of the run that wrote an output sit beside it: ``results.jsonl.settings.json``
(for ``embed``: ``index.jsonl.settings.json`` in the folder)."""

SETTINGS_FORMAT = 1


class SettingsError(ValueError):
    """``resume`` of an output written with other settings (the message names the setting and
    both values)."""


def model_digest(model: XCLIP) -> str:
    """SHA-256 hex of the model's config and every tensor of its state dict (name, dtype, shape
    and bytes): the same weights give the same digest wherever they were loaded from.

    One pass over the weights' bytes, once per run (weights on a GPU are copied to the host
    one tensor at a time): X-CLIP-B/32 in float32 holds 0.79 GB, digested in 0.9 s (random
    weights, on 2 cores of an "Intel(R) Xeon(R) Processor" shared with other work, torch
    2.13.0+cpu, 2026-12-03).
    """
    h = hashlib.sha256()
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode("utf-8"))
    for name, tensor in model.state_dict().items():
        t = tensor.detach()
        # Name, dtype and shape first: the same bytes under another layout are other weights.
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode("utf-8"))
        h.update(t.cpu().reshape(-1).contiguous().view(torch.uint8).numpy())
    return h.hexdigest()


def run_settings(
    command: str, model: XCLIP, *, labels: Sequence[str] | None = None, k: int | None = None, num_clips: int = 1,
    num_crops: int = 1, allow_short: bool = False,
) -> dict[str, Any]:
    """What the records of an output depend on, as recorded beside it and compared on resume:
    the command, the model's config and weights (:func:`model_digest`), the views, whether
    short videos were allowed, and for ``classify`` the labels and ``k``.

    Not recorded: batch size, workers, device, backend and autocast, which change rounding at
    most, never what a record means (``embed``'s rows do not depend on labels either).
    """
    settings: dict[str, Any] = {
        "command": command,
        "model": model.config.to_dict(),
        "weights": model_digest(model),
        "views": [num_clips, num_crops],
        "allow_short": allow_short,
    }
    if command == "classify":
        settings["labels"] = list(labels) if labels is not None else None
        settings["top_k"] = k
    return settings


def _settings_difference(recorded: dict[str, Any], current: dict[str, Any]) -> str | None:
    """The first setting that differs, named, with both values (``there``: the output's,
    ``now``: this run's); None when they are the same."""
    if recorded.get("command") != current["command"]:
        return f"command: {recorded.get('command')} there, {current['command']} now"
    # The model's config first: frames per clip, image size or variant name what changed
    # better than the weights' digest, which any of them changes too.
    old_model, new_model = recorded.get("model") or {}, current["model"]
    for key in [*new_model, *(k for k in old_model if k not in new_model)]:
        if old_model.get(key) != new_model.get(key):
            return f"model config {key}: {old_model.get(key)!r} there, {new_model.get(key)!r} now"
    if recorded.get("weights") != current["weights"]:
        return (f"checkpoint weights: sha256 {str(recorded.get('weights'))[:12]}... there, "
                f"sha256 {current['weights'][:12]}... now")
    if "labels" in current and recorded.get("labels") != current["labels"]:
        old_labels, new_labels = recorded.get("labels") or [], current["labels"]
        shorter = min(len(old_labels), len(new_labels))
        at = next((i for i, (a, b) in enumerate(zip(old_labels, new_labels)) if a != b), shorter)
        old_label = repr(old_labels[at]) if at < len(old_labels) else "none"
        new_label = repr(new_labels[at]) if at < len(new_labels) else "none"
        return (f"labels: label {at + 1} is {old_label} there, {new_label} now "
                f"({len(old_labels)} labels there, {len(new_labels)} now)")
    if recorded.get("views") != current["views"]:
        old, new = recorded.get("views") or ["?", "?"], current["views"]
        return f"views (clips x crops): {old[0]}x{old[1]} there, {new[0]}x{new[1]} now"
    if recorded.get("allow_short") != current["allow_short"]:
        return f"allow-short: {recorded.get('allow_short')} there, {current['allow_short']} now"
    if "top_k" in current and recorded.get("top_k") != current["top_k"]:
        return f"top-k: {recorded.get('top_k')} there, {current['top_k']} now"
    if recorded != current:  # a setting added later, recorded by one run and not the other
        key = next(k for k in sorted({*recorded, *current}) if recorded.get(k) != current.get(k))
        return f"{key}: {recorded.get(key)!r} there, {current.get(key)!r} now"
    return None


def _read_settings(path: str) -> dict[str, Any] | None:
    """The settings recorded in ``path`` (None: no such file). Raises ``ValueError`` naming
    the file when it is not a settings file of this format (it is written whole, by rename,
    so that means another program wrote it)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"resume: {path}: expected the JSON settings of the run that wrote the output, got {exc.msg}"
        ) from None
    if not (isinstance(record, dict) and record.get("format") == SETTINGS_FORMAT and isinstance(record.get("settings"), dict)):
        raise ValueError(
            f"resume: {path}: expected settings of format {SETTINGS_FORMAT}, got {str(text)[:60]!r}"
        )
    return record["settings"]


class ResultLog:
    """The JSONL output of a run: one record per input path, appended and flushed as it comes.

    One process appends to ``output`` itself; rank ``r`` of ``world_size > 1`` to
    ``output.part-r-of-W`` beside it, merged by :meth:`merge` (rank 0, after every rank has
    closed its part). ``done`` holds the paths found in the output and in any part file left by
    an earlier run, whatever its world size (filled when ``resume``).

    ``settings`` (:func:`run_settings`) are recorded in ``output + ".settings.json"`` (written
    whole, by rename, by rank 0, before any record). ``resume`` compares them with those
    recorded and raises :class:`SettingsError` naming the first that differs, before anything
    is written. An output from before settings were recorded (records, no settings file) is
    continued: its records cannot be checked, ``on_warning`` gets a message saying so (default:
    :func:`warnings.warn`), and this run's settings are recorded from then on.
    """

    def __init__(
        self, output: str | os.PathLike, *, rank: int = 0, world_size: int = 1, resume: bool = False,
        settings: dict[str, Any] | None = None, on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self.output = os.fspath(output)
        self.rank, self.world_size = rank, world_size
        self.path = self.output if world_size == 1 else f"{self.output}.part-{rank}-of-{world_size}"
        self.settings_path = self.output + SETTINGS_SUFFIX
        if settings is not None:
            settings = json.loads(json.dumps(settings))  # as read back: tuples become lists
        self.done: set[str] = set()
        if not resume and (os.path.exists(self.output) or self.parts()):
            raise ValueError(
                f"output: {self.output} (or its parts) already exists: pass resume=True / --resume to continue it, "
                "or remove it"
            )
        # Settings left beside no output (its results deleted) protect nothing: replaced below.
        exists = os.path.exists(self.output) or bool(self.parts())
        recorded = _read_settings(self.settings_path) if resume and settings is not None and exists else None
        if recorded is not None:
            difference = _settings_difference(recorded, settings)
            if difference is not None:
                raise SettingsError(
                    f"resume: {self.output} was written with other settings ({self.settings_path}): {difference}; "
                    "resume with the settings of that run, or write a new output"
                )
        if resume:
            for source in [self.output, *self.parts()]:
                # Only this process's own file is repaired (the others belong to other ranks).
                self.done.update(r["path"] for r in _read_records(source, repair=source == self.path))
        if settings is not None and recorded is None and self.done and rank == 0:
            message = (
                f"resume: {self.output} records no settings (written before they were recorded): its "
                f"{len(self.done)} results are kept unchecked, so they must come from the same checkpoint, labels "
                f"and views as this run; this run's settings are recorded in {self.settings_path}"
            )
            if on_warning is not None:
                on_warning(message)
            else:
                warnings.warn(message, stacklevel=3)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if settings is not None and recorded is None and rank == 0:
            # Before any record: an output never has records without the settings they came from.
            record = {"format": SETTINGS_FORMAT, "settings": settings}
            _write_atomic(self.settings_path, [json.dumps(record, ensure_ascii=False)])
        if world_size > 1:
            dist.barrier()  # every rank has looked (and rank 0 recorded the settings) before any creates its part
        self._file: TextIO = open(self.path, "a", encoding="utf-8")

    def parts(self) -> list[str]:
        """Part files beside the output (of this run or an interrupted one, any world size)."""
        return sorted(glob.glob(glob.escape(self.output) + ".part-*-of-*"))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record and flush it (a kill loses at most the line being written)."""
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def merge(self, order: Sequence[str] = ()) -> list[dict[str, Any]]:
        """Merge the output and every part file into the output (atomically), one record per
        path (the first seen), in the order of ``order`` (paths not in it last); the parts are
        then removed. Returns the merged records. Call on one process, after all have closed."""
        records: dict[str, dict[str, Any]] = {}
        parts = self.parts()
        for source in [self.output, *parts]:
            for record in _read_records(source, repair=False):
                records.setdefault(record["path"], record)
        position = {path: i for i, path in enumerate(order)}
        merged = sorted(records.values(), key=lambda r: position.get(r["path"], len(position)))
        if parts or self.world_size > 1:
            _write_atomic(self.output, [json.dumps(r, ensure_ascii=False) for r in merged])
            for part in parts:
                os.unlink(part)
        return merged


# -- the run ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Summary:
    """What a run did (summed over ranks under torchrun; accuracy from the merged output)."""

    videos: int = 0
    """Inputs processed by this run (results and errors)."""
    errors: int = 0
    skipped: int = 0
    """Inputs already in the output (``resume``)."""
    seconds: float = 0.0
    decode_seconds: float = 0.0
    """Decoding time summed over the decode processes (can exceed ``seconds`` with workers)."""
    infer_seconds: float = 0.0
    accuracy: dict[str, float] | None = None
    """With manifest labels: ``{"top1", "top5", "labelled", "failed"}`` over the labelled inputs
    that have a result (``failed``: labelled inputs that failed, not counted)."""

    def line(self) -> str:
        """One summary line: videos, errors, videos/s, seconds (and accuracy)."""
        rate = self.videos / self.seconds if self.seconds > 0 else 0.0
        text = (
            f"{self.videos} videos, {self.errors} errors, {self.skipped} already done, {rate:.2f} videos/s, "
            f"{self.seconds:.1f} s (decode {self.decode_seconds:.1f} s over workers, model {self.infer_seconds:.1f} s)"
        )
        if self.accuracy is not None:
            a = self.accuracy
            text += (
                f"; top-1 {100 * a['top1']:.2f}%, top-5 {100 * a['top5']:.2f}% of {int(a['labelled'])} labelled videos"
                f" ({int(a['failed'])} failed, not counted)"
            )
        return text


def _distributed() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _progress(total: int, enabled: bool, stream: TextIO | None) -> Any:
    from tqdm import tqdm  # imported when a run starts, not with the module

    return tqdm(total=total, disable=not enabled or total == 0, file=stream, unit="video", dynamic_ncols=True, leave=False)


def _pipeline(
    model: XCLIP,
    items: Sequence[Item],
    log: ResultLog,
    consume: Callable[[list[tuple[Item, int]], Any], list[dict[str, Any]]],
    *,
    num_clips: int,
    num_crops: int,
    allow_short: bool,
    workers: int,
    batch_size: int,
    autocast: bool | None,
    progress: bool,
    stream: TextIO | None,
) -> Summary:
    """Decode ``items`` not yet in ``log`` (this rank's shard), batch their views across files,
    and call ``consume(batch, views_of_each_file)`` with the model's video features per batch.

    ``consume(entries, features) -> records``: ``entries`` the ``(item, views count)`` of the
    batch's files in order, ``features`` the :class:`xclip.VideoFeatures` of their views
    concatenated; it returns one record per file, written here (as are decode failures).
    """
    checks.integer("batch_size", batch_size)
    checks.integer("workers", workers, 0)
    checks.integer("num_clips", num_clips)
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"num_crops: expected one of {CROP_COUNTS}, got {num_crops!r}")
    rank, world_size = _distributed()
    device = model.token_embedding.weight.device
    if autocast is None:
        autocast = device.type == "cuda"
    mine = list(items)[rank::world_size]  # a disjoint shard per rank, the same split on every rank
    todo = [item for item in mine if printable(item.path) not in log.done]
    summary = Summary(skipped=len(mine) - len(todo))
    c = model.config
    dataset = ViewsDataset(todo, c.num_frames, c.image_size, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short)
    loader = decode_loader(dataset, workers=workers, pin_memory=device.type == "cuda")
    start = time.perf_counter()
    pending: list[tuple[Item, torch.Tensor]] = []
    bar = _progress(len(todo), progress, stream)

    def flush() -> None:
        if not pending:
            return
        entries = [(item, views.shape[0]) for item, views in pending]
        # Each file's pinned views copied without blocking, then joined on the device.
        views = torch.cat([v.to(device, non_blocking=True) for _, v in pending])
        pending.clear()
        t0 = time.perf_counter()
        try:
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                # All records of the batch first, then written: a failure leaves none half-written.
                records = consume(entries, model.encode_video_features(views))
        except Exception as exc:  # noqa: BLE001 - a failing batch is its files' error, not the run's end
            for item, _ in entries:
                log.write(_error_record(item, f"path: {item.path}: {type(exc).__name__}: {exc}"))
                summary.errors += 1
        else:
            for record in records:
                log.write(record)
        summary.infer_seconds += time.perf_counter() - t0
        summary.videos += len(entries)
        bar.update(len(entries))
        # tqdm shows videos/s itself; the split says whether decode or the model is the limit.
        bar.set_postfix_str(
            f"decode {summary.decode_seconds:.1f}s, model {summary.infer_seconds:.1f}s, {summary.errors} errors"
        )

    try:
        for sample in loader:
            summary.decode_seconds += sample["seconds"]
            item = dataset.items[sample["index"]]
            if sample["error"] is not None:
                log.write(_error_record(item, sample["error"]))
                summary.videos += 1
                summary.errors += 1
                bar.update(1)
                continue
            pending.append((item, sample["views"]))
            if sum(v.shape[0] for _, v in pending) >= batch_size:
                flush()
        flush()
    finally:
        bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _error_record(item: Item, message: str) -> dict[str, Any]:
    record: dict[str, Any] = {"path": printable(item.path), "error": printable(message)}
    if item.label is not None:
        record["label"] = item.label
    return record


def _finish(summary: Summary, log: ResultLog, items: Sequence[Item]) -> list[dict[str, Any]] | None:
    """Close this rank's part, sum the counts over ranks, and on rank 0 merge the output.
    Returns the merged records on rank 0, None elsewhere."""
    log.close()
    rank, world_size = _distributed()
    if world_size > 1:
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        counts = torch.tensor(
            [summary.videos, summary.errors, summary.skipped, summary.decode_seconds, summary.infer_seconds],
            dtype=torch.float64, device=device,
        )
        dist.all_reduce(counts)  # also the barrier: every rank has closed its part
        summary.videos, summary.errors, summary.skipped = (int(x) for x in counts[:3].tolist())
        summary.decode_seconds, summary.infer_seconds = counts[3:].tolist()
    merged = log.merge([printable(item.path) for item in items]) if rank == 0 else None
    if world_size > 1:
        dist.barrier()  # the merged output exists before any rank returns
    return merged


def _accuracy(records: Sequence[dict[str, Any]], items: Sequence[Item]) -> dict[str, float] | None:
    truth = {printable(item.path): item.label for item in items if item.label is not None}
    if not truth:
        return None
    ranks = [r.get("rank") for r in records if r["path"] in truth and "error" not in r]
    failed = sum(1 for r in records if r["path"] in truth and "error" in r)
    n = len(ranks)
    return {
        "top1": sum(1 for k in ranks if k == 1) / n if n else 0.0,
        "top5": sum(1 for k in ranks if k is not None and k <= 5) / n if n else 0.0,
        "labelled": n,
        "failed": failed,
    }


def classify_collection(
    model: XCLIP,
    labels: Sequence[str],
    features: torch.Tensor,
    inputs: Sequence[Item | str | os.PathLike],
    output: str | os.PathLike,
    *,
    k: int = 5,
    num_clips: int = 1,
    num_crops: int = 1,
    allow_short: bool = False,
    workers: int = 0,
    batch_size: int = 8,
    resume: bool = False,
    autocast: bool | None = None,
    progress: bool = False,
    stream: TextIO | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> Summary:
    """Zero-shot classification of ``items`` into ``output`` (JSON Lines).

    Each line is ``{"path", "top": [{"label", "probability"}] (min(k, K), most probable first)}``,
    plus ``"label"`` (the manifest's) and ``"rank"`` (its 1-based place among all K labels) for
    a labelled input, or ``{"path", "error"}``. Probabilities are those of
    :func:`xclip.classify.classify_file`: softmax over labels per view, averaged over the
    ``num_clips x num_crops`` views.

    Args:
        features: ``(K, E)`` label features (:func:`xclip.text_cache.text_features`).
        inputs: paths, folders (searched recursively) or :class:`Item` s (:func:`collect_inputs`;
            an item's label must be one of ``labels``).
        workers: decode processes (0: decode in this process, between batches).
        batch_size: views per model batch, gathered across files (a file's views stay in one batch).
        resume: keep ``output``'s records and skip their paths; otherwise ``output`` must not exist.
            The settings (:func:`run_settings`: weights, model config, labels, views,
            ``allow_short``, ``k``) are recorded in ``output + ".settings.json"``; resuming with
            others raises :class:`SettingsError` naming the first that differs (see
            :class:`ResultLog`, also for outputs from before settings were recorded).
        autocast: bf16 autocast; None: on for CUDA, off elsewhere.
        on_warning: called with a warning's message (default :func:`warnings.warn`).

    Under torchrun (an initialised process group) every rank must call this with the same
    ``inputs``; see the module docstring. Returns the :class:`Summary` (accuracy when items
    have labels).
    """
    labels = check_labels(labels)
    checks.integer("k", k)
    if tuple(features.shape) != (len(labels), model.config.embed_dim):
        raise ValueError(f"features: expected shape ({len(labels)}, {model.config.embed_dim}) for {len(labels)} labels, got {tuple(features.shape)}")
    items = collect_inputs(inputs)
    known = set(labels)
    for item in items:
        if item.label is not None and item.label not in known:
            raise ValueError(f"items: the label {item.label!r} of {item.path} is not one of the {len(labels)} labels")
    rank, world_size = _distributed()
    settings = run_settings(
        "classify", model, labels=labels, k=k, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short
    )
    log = ResultLog(output, rank=rank, world_size=world_size, resume=resume, settings=settings, on_warning=on_warning)
    device = model.token_embedding.weight.device
    text = features.to(device, model.token_embedding.weight.dtype)

    def consume(entries: list[tuple[Item, int]], video: Any) -> list[dict[str, Any]]:
        logits = model.logits(video, text).float()  # (views, K)
        probabilities = logits.softmax(dim=-1).cpu()
        start = 0
        records = []
        for item, count in entries:
            p = probabilities[start : start + count].mean(dim=0)  # as video_probabilities: mean of softmaxes
            start += count
            record: dict[str, Any] = {"path": printable(item.path)}
            record["top"] = [{"label": label, "probability": q} for label, q in top_k(p, labels, k)]
            if item.label is not None:
                order = torch.sort(p, descending=True, stable=True).indices.tolist()
                record["label"] = item.label
                record["rank"] = order.index(labels.index(item.label)) + 1
            records.append(record)
        return records

    try:
        summary = _pipeline(
            model, items, log, consume, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short,
            workers=workers, batch_size=batch_size, autocast=autocast, progress=progress, stream=stream,
        )
    except BaseException:
        log.close()
        raise
    merged = _finish(summary, log, items)
    if merged is not None:
        summary.accuracy = _accuracy(merged, items)
    return summary


INDEX = "index.jsonl"
TEXT = "text.safetensors"


def embed(
    model: XCLIP,
    inputs: Sequence[Item | str | os.PathLike],
    output: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    text_features: torch.Tensor | None = None,
    num_clips: int = 1,
    num_crops: int = 1,
    allow_short: bool = False,
    workers: int = 0,
    batch_size: int = 8,
    shard_size: int = 4096,
    resume: bool = False,
    autocast: bool | None = None,
    progress: bool = False,
    stream: TextIO | None = None,
    on_warning: Callable[[str], None] | None = None,
) -> Summary:
    """Video embeddings of a collection, written to the folder ``output``.

    - ``video-r{rank}of{W}-{n:05d}.safetensors``: tensor ``"video"`` float32 ``(rows, E)``, each
      row one file's video features (:meth:`xclip.XCLIP.encode_video`, the MIT output, not
      normalised) averaged over its ``num_clips x num_crops`` views; written whole (renamed into
      place) once it has ``shard_size`` rows (or up to a batch more), and at the end.
    - ``index.jsonl``: one line per input, ``{"path", "shard", "row"}`` (plus ``"label"`` from a
      manifest), or ``{"path", "error"}``. A row's line is written after its shard, so the index
      never names a missing row; ``resume`` skips indexed paths (and re-does the rows of a
      shard that an interruption left unwritten). ``index.jsonl.settings.json``: the settings
      (:func:`run_settings`: weights, model config, views, ``allow_short``), checked on
      ``resume`` as for :func:`classify_collection`.
    - with ``labels``: ``text.safetensors``, tensor ``"text"`` float32 ``(K, E)``, the label
      features before the video-specific prompts (``text_features`` if given, else encoded),
      the labels in its metadata ``"labels"`` (a JSON list).

    ``inputs``: paths, folders (searched recursively) or :class:`Item` s. Under torchrun every
    rank calls this with the same inputs; rank 0 merges the index. Returns the :class:`Summary`.
    """
    from safetensors.torch import save_file

    checks.integer("shard_size", shard_size)
    items = collect_inputs(inputs)
    folder = os.fspath(output)
    os.makedirs(folder, exist_ok=True)
    rank, world_size = _distributed()
    if labels is not None:
        labels = check_labels(labels)
        if text_features is None:
            from .classify import encode_labels

            text_features = encode_labels(model, labels)
        if tuple(text_features.shape) != (len(labels), model.config.embed_dim):
            raise ValueError(
                f"text_features: expected shape ({len(labels)}, {model.config.embed_dim}), got {tuple(text_features.shape)}"
            )
    settings = run_settings("embed", model, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short)
    # The settings are checked before anything in the folder changes (text.safetensors included).
    log = ResultLog(os.path.join(folder, INDEX), rank=rank, world_size=world_size, resume=resume, settings=settings,
                    on_warning=on_warning)
    prefix = f"video-r{rank}of{world_size}-"
    # Shards of this rank's name that no index line names: rows of an interrupted run whose
    # index lines were never written. They are re-done, so the files go (only this rank's own).
    referenced = set()
    for source in [log.output, *log.parts()]:
        referenced.update(r.get("shard") for r in _read_records(source, repair=False))
    numbers = [-1]
    for name in sorted(os.listdir(folder)):
        if name.startswith(prefix) and name.endswith(".safetensors"):
            if name in referenced:
                numbers.append(int(name[len(prefix) : -len(".safetensors")]))
            else:
                os.unlink(os.path.join(folder, name))
    next_shard = max(numbers) + 1
    rows: list[tuple[Item, torch.Tensor]] = []

    def write_shard() -> None:
        nonlocal next_shard
        if not rows:
            return
        name = f"{prefix}{next_shard:05d}.safetensors"
        tmp = os.path.join(folder, f".{name}.tmp")
        save_file({"video": torch.stack([e for _, e in rows]).contiguous()}, tmp,
                  metadata={"paths": json.dumps([printable(item.path) for item, _ in rows], ensure_ascii=False)})
        os.replace(tmp, os.path.join(folder, name))
        for row, (item, _) in enumerate(rows):
            record: dict[str, Any] = {"path": printable(item.path), "shard": name, "row": row}
            if item.label is not None:
                record["label"] = item.label
            log.write(record)
        rows.clear()
        next_shard += 1

    def consume(entries: list[tuple[Item, int]], video: Any) -> list[dict[str, Any]]:
        features = video.video.float().cpu()  # (views, E)
        start = 0
        for item, count in entries:
            rows.append((item, features[start : start + count].mean(dim=0)))
            start += count
        if len(rows) >= shard_size:
            write_shard()
        return []  # the index lines come with their shard

    try:
        if labels is not None and text_features is not None and rank == 0:
            tmp = os.path.join(folder, f".{TEXT}.tmp")
            save_file({"text": text_features.detach().to("cpu", torch.float32).contiguous()}, tmp,
                      metadata={"labels": json.dumps(list(labels), ensure_ascii=False)})
            os.replace(tmp, os.path.join(folder, TEXT))
        summary = _pipeline(
            model, items, log, consume, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short,
            workers=workers, batch_size=batch_size, autocast=autocast, progress=progress, stream=stream,
        )
        write_shard()
    except BaseException:
        log.close()
        raise
    _finish(summary, log, items)
    return summary
