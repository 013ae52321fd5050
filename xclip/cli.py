"""``python -m xclip``: the command-line tools of the X-CLIP model, argument parsing and the
command runners.

    python -m xclip classify VIDEO... --checkpoint PATH --labels "a,b,c"

``classify`` loads the checkpoint once, takes the label features from the disk cache or encodes
them once (:mod:`xclip.text_cache`), then classifies the files in order
(:func:`xclip.classify.classify_file`), printing each result on stdout as soon as it is ready.
A file that fails (missing, not a video, too few frames, or any other error while it is
decoded or classified) is reported on stderr in one line and the others still run; the exit
status is then 1. Errors in the arguments or the run settings (unknown or unavailable backend,
a device this machine cannot compute on, labels that are not UTF-8 or too long, a checkpoint
that cannot be loaded, PyAV or tqdm missing) are one line on stderr before any file is read,
and exit with 2.

On a terminal a progress bar (tqdm) goes to stderr; tqdm is imported when the command runs,
not when :mod:`xclip` is.

    python -m xclip classify FOLDER... [--manifest F] --output results.jsonl [--workers N --batch-size B --resume]
    python -m xclip embed FOLDER... [--manifest F] --output DIR [--labels A,B]

With ``--output`` (and always for ``embed``) a whole collection runs through
:mod:`xclip.collection` (:func:`run_collection`): decode processes, batches across files,
resumable JSONL output, torchrun shards. Without it ``classify`` is the per-file command above.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn, TextIO

import torch

from xclip_kernels import checks, get_backend
from xclip_kernels.registry import BackendNotSupportedError, OpInputs, select_backend

from .checkpoint import load_checkpoint
from .classify import Result, classify_file
from .labels import check_labels, parse_labels, read_labels_file
from .text_cache import TextFeatureCache, default_cache_dir, text_features
from .tokenizer import TextTooLongError
from .model import XCLIP
from .video import CROP_COUNTS, require_decoder

if TYPE_CHECKING:
    from tqdm import tqdm

VIEWS_HELP = (
    "views per video as CLIPSxCROPS (e.g. 4x3, the paper's multi-view evaluation) or a count N "
    "= clips x crops: a multiple of 3 means N/3 clips x 3 crops, otherwise N clips x 1 crop; "
    "instead of --clips/--crops"
)


# -- arguments ----------------------------------------------------------------------------------


def parse_views(text: str) -> tuple[int, int]:
    """``--views``: ``"CxK"`` -> ``(C, K)``; ``"N"`` -> ``(N // 3, 3)`` if 3 divides N, else ``(N, 1)``."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX*]\s*(\d+)\s*", text)
    if match:
        clips, crops = int(match.group(1)), int(match.group(2))
    elif re.fullmatch(r"\s*\d+\s*", text):
        count = int(text)
        clips, crops = (count // 3, 3) if count % 3 == 0 and count > 0 else (count, 1)
    else:
        raise argparse.ArgumentTypeError(f"expected CLIPSxCROPS (e.g. 4x3) or a count, got {text!r}")
    if clips < 1 or crops not in (1, 3):
        raise argparse.ArgumentTypeError(f"expected clips >= 1 and crops 1 or 3, got {clips}x{crops} from {text!r}")
    return clips, crops


def _positive(text: str) -> int:
    """argparse ``type`` of the count flags: the text as an int >= 1 (argparse names the flag)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    try:
        return checks.integer("value", value)
    except ValueError as exc:  # argparse puts the flag's name in front
        raise argparse.ArgumentTypeError(str(exc).removeprefix("value: ")) from None


class OneLineErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are one line on stderr (no usage block above
    it: the line names the problem, ``--help`` shows the usage), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {printable(message)} (--help for usage)\n")


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m xclip`` and its commands (sub-parsers share its class)."""
    parser = OneLineErrorParser(prog="python -m xclip", description="X-CLIP command-line tools.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    classify = commands.add_parser(
        "classify",
        help="zero-shot classification of video files",
        description=(
            "Zero-shot classification of video files: print the top-k labels with probabilities "
            "per file. Frames are sampled and preprocessed as the official evaluation does (T "
            "segment centres; short side resized to 256/224 x S and a centre crop, or to S and "
            "three crops). With several views the per-view softmaxes are averaged. Files that "
            "fail are reported on stderr; the others still run, and the exit status is 1."
        ),
    )
    classify.add_argument(
        "videos", nargs="*", metavar="VIDEO",
        help="video files (anything FFmpeg decodes); with --output also folders (searched recursively)",
    )
    classify.add_argument(
        "--checkpoint", required=True, metavar="PATH",
        help="official .pth, Hugging Face XCLIP directory, or a model.save() file",
    )
    source = classify.add_mutually_exclusive_group(required=True)
    source.add_argument("--labels", metavar="A,B,C", help="comma-separated label names")
    source.add_argument("--labels-file", metavar="FILE", help="a text file with one label per line")
    classify.add_argument(
        "--top-k", type=_positive, default=None, metavar="K", help="labels shown per file (default: 5, or fewer labels)"
    )
    classify.add_argument(
        "--clips", type=_positive, default=None, metavar="N", help="temporal clips per video (default 1)"
    )
    classify.add_argument(
        "--crops", type=int, choices=(1, 3), default=None,
        help="spatial crops per clip: 1 centre, 3 along the long side (default 1)",
    )
    classify.add_argument("--views", type=parse_views, default=None, metavar="V", help=VIEWS_HELP)
    classify.add_argument(
        "--allow-short", action="store_true",
        help=(
            "classify videos with fewer frames than the model's T by repeating frames (as the official "
            "sampler); by default they are an error"
        ),
    )
    classify.add_argument(
        "--cache-dir", metavar="DIR", default=None,
        help="text-feature cache (default $XDG_CACHE_HOME/xclip or ~/.cache/xclip)",
    )
    classify.add_argument("--no-cache", action="store_true", help="neither read nor write the text-feature cache")
    classify.add_argument("--device", default="cpu", help="torch device to run on (default cpu)")
    classify.add_argument(
        "--backend", default=None, help="attention backend (default: automatic; see python -m xclip_kernels)"
    )
    classify.add_argument("--json", action="store_true", help="one JSON object per file instead of text")
    classify.add_argument("--quiet", action="store_true", help="no progress bar and no notes on stderr (errors still)")
    add_collection_arguments(classify, "results")

    embed = commands.add_parser(
        "embed",
        help="video (and label) embeddings of a video collection",
        description=(
            "Video embeddings (the model's video features, one per file, averaged over its views, not "
            "normalised) as safetensors shards in --output, with index.jsonl mapping each path to its shard "
            "and row (or its error); with --labels, the label text features (before the video-specific "
            "prompts) in text.safetensors. Runs unchanged under torchrun."
        ),
    )
    embed.add_argument("videos", nargs="*", metavar="VIDEO", help="video files or folders (searched recursively)")
    embed.add_argument(
        "--checkpoint", required=True, metavar="PATH",
        help="official .pth, Hugging Face XCLIP directory, or a model.save() file",
    )
    texts = embed.add_mutually_exclusive_group()
    texts.add_argument("--labels", metavar="A,B,C", help="also embed these comma-separated label texts")
    texts.add_argument("--labels-file", metavar="FILE", help="also embed the labels of this file (one per line)")
    embed.add_argument("--clips", type=_positive, default=None, metavar="N", help="temporal clips per video (default 1)")
    embed.add_argument("--crops", type=int, choices=(1, 3), default=None, help="spatial crops per clip (default 1)")
    embed.add_argument("--views", type=parse_views, default=None, metavar="V", help=VIEWS_HELP)
    embed.add_argument("--allow-short", action="store_true", help="repeat frames of videos shorter than T")
    embed.add_argument("--shard-size", type=_positive, default=4096, metavar="N", help="embeddings per shard file (default 4096)")
    embed.add_argument("--device", default="cpu", help="torch device to run on (default cpu; under torchrun cuda means cuda:LOCAL_RANK)")
    embed.add_argument("--backend", default=None, help="attention backend (default: automatic)")
    embed.add_argument("--quiet", action="store_true", help="no progress bar and no notes on stderr")
    add_collection_arguments(embed, "embeddings")
    return parser


def add_collection_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """The collection flags shared by ``classify --output`` and ``embed``."""
    if what == "results":
        parser.add_argument(
            "--output", metavar="FILE", default=None,
            help=(
                "collection mode: write one JSON line per video to FILE as results arrive (decode workers, "
                "batches across files, --resume, torchrun); without it, results go to stdout file by file"
            ),
        )
    else:
        parser.add_argument("--output", metavar="DIR", required=True, help="folder of the shards and index.jsonl")
    parser.add_argument(
        "--manifest", metavar="FILE", default=None,
        help="videos listed in FILE: one path per line, or .csv / .jsonl with a 'path' and optional 'label' column",
    )
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="decode processes (0: decode in this process; default 2)")
    parser.add_argument("--batch-size", type=_positive, default=8, metavar="B", help="clips per model batch, across files (default 8)")
    parser.add_argument("--resume", action="store_true", help=(
        "keep what --output already has and skip those videos; the settings it was written with (checkpoint "
        "weights, labels, views, --top-k, --allow-short) must be this run's, or the run stops at once"
    ))


# -- output -------------------------------------------------------------------------------------


def printable(text: str) -> str:
    """``text`` as it can be printed on any UTF-8 stream: bytes that were not UTF-8 (which
    Python keeps in file names and arguments as lone surrogates, and which printing would
    refuse) are shown as ``\\xNN``."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def one_line(text: str) -> str:
    """``text`` on one line (a multi-line message's lines joined by ``"; "``), printable."""
    return printable("; ".join(line.strip() for line in str(text).splitlines() if line.strip()))


def format_result(result: Result, as_json: bool) -> str:
    """The text printed for one file: the path, then ``  probability  label`` lines (4
    decimals), or with ``as_json`` one JSON object ``{"path", "top": [{"label", "probability"}]}``."""
    path = printable(result.path)
    if as_json:
        payload: dict[str, object] = {"path": path}
        payload["top"] = [{"label": label, "probability": p} for label, p in result.top or []]
        return json.dumps(payload, ensure_ascii=False)
    lines = [path] + [f"  {p:.4f}  {label}" for label, p in result.top or []]
    return "\n".join(lines)


def import_tqdm() -> type[tqdm]:
    """The ``tqdm`` class; an ``ImportError`` with the install command when it is missing."""
    try:
        from tqdm import tqdm
    except ImportError as exc:
        raise ImportError(
            "the progress bar of python -m xclip needs tqdm: install it with `pip install tqdm` "
            "(the pinned version is in requirements.txt)"
        ) from exc
    return tqdm


def progress_bar(total: int, stream: TextIO, enabled: bool) -> tqdm:
    """A progress bar of ``total`` files on ``stream`` (the file being classified at its end);
    when not ``enabled`` (or ``total`` is 0) it writes nothing at all.

    Print other lines to the same terminal with :func:`write_line`. Closing the bar (``with``
    or ``close()``) erases it, leaving the cursor at the start of an empty line.
    """
    tqdm = import_tqdm()
    return tqdm(
        total=total,
        file=stream,
        disable=not (enabled and total > 0),
        leave=False,  # erased when closed: the results and errors are the lasting output
        unit="file",
        dynamic_ncols=True,  # the width of the stream's terminal at every draw: a wrapped line cannot be redrawn
        # Redraw at every file (few, each taking a while), not tqdm's at most every 0.1 s.
        mininterval=0,
        miniters=1,
    )


def write_line(bar: tqdm, text: str, stream: TextIO) -> None:
    """Print ``text`` and a newline to ``stream`` with ``bar`` out of the way: the bar is erased
    first and drawn again below the line. ``stream`` may be another stream than the bar's (stdout
    and stderr share one terminal), so the bar is always erased, not only when the streams are
    the same object (as ``tqdm.write`` decides)."""
    bar.clear()
    print(text, file=stream, flush=True)
    bar.refresh()


# -- run settings -------------------------------------------------------------------------------


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` this machine can compute on; ``ValueError`` naming
    ``device`` otherwise (a malformed name, ``meta``, a GPU that is not there)."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device: expected a torch device such as cpu or cuda:0, got {device!r}") from exc
    if device.type == "meta":  # tensors without data: the model would fail at its first number
        raise ValueError("device: expected a device that holds data, such as cpu or cuda:0, got meta")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: expected a device this machine has, got {device} (CUDA is not available)")
    try:
        torch.empty(1, device=device)  # an index past the last GPU, a backend not built in, ...
    except Exception as exc:  # noqa: BLE001 - torch raises several types; the message says which
        # The first sentence: torch appends pages of dispatch-table detail to some of these.
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
        raise ValueError(f"device: expected a device this machine has, got {device} ({printable(why)})") from None
    return device


def check_backend_device(backend: str | None, device: torch.device) -> None:
    """Refuse, before the checkpoint is read, a ``backend`` that cannot run on this machine or
    on ``device`` at all (not installed, not built, wrong device type)."""
    if backend is None:
        return
    chosen = get_backend(backend)  # an unknown name raises here, naming the argument
    reasons = list(chosen.unavailable_reasons())
    if device.type not in chosen.devices:
        reasons.append(f"device {device.type!r} not supported (supports {', '.join(chosen.devices)})")
    else:
        reasons.extend(chosen.device_reasons(device.type))
    if reasons:
        raise ValueError(f"backend: {backend} cannot run on {device} here: {'; '.join(reasons)}")


def check_backend_runs(model: XCLIP, backend: str | None, device: torch.device) -> None:
    """Refuse a ``backend`` (or the ``XCLIP_KERNELS_BACKEND`` setting when it is None) that
    cannot run this model's attention ops on ``device`` (dtype, head dim, frame count), before
    any file is classified: otherwise every file would fail alike."""
    c = model.config
    dtype = model.token_embedding.weight.dtype
    for op, frames in (("frame_attention", None), ("message_attention", c.num_frames)):
        try:
            select_backend(OpInputs(op, device.type, dtype, c.vision_width // c.vision_heads, False, frames), backend)
        except BackendNotSupportedError as exc:
            raise ValueError(f"backend: {one_line(str(exc))}") from None


# -- commands -----------------------------------------------------------------------------------


def checked_labels(labels: Sequence[str]) -> list[str]:
    """``labels`` checked (:func:`check_labels`) and each valid UTF-8 (argv bytes that are not
    UTF-8 reach Python as lone surrogates); raises ``ValueError`` naming the label's index."""
    labels = check_labels(labels)
    for index, label in enumerate(labels):
        try:
            label.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(
                f"labels[{index}]: expected UTF-8 text, got {label.encode('utf-8', 'surrogateescape')!r}"
            ) from None
    return labels


def _load_model(command: str, checkpoint: str, backend: str | None, device: torch.device,
                stderr: TextIO) -> XCLIP | None:
    """The checkpoint's model on ``device`` and ``backend``; None (after one error line) when
    the file cannot be loaded. Raises for a backend that cannot run there."""
    check_backend_device(backend, device)
    try:
        model = load_checkpoint(checkpoint, backend=backend, map_location=device)
    except (OSError, ValueError) as exc:
        print(f"xclip {command}: error: checkpoint: {one_line(str(exc))}", file=stderr, flush=True)
        return None
    check_backend_runs(model, backend, device)
    return model


def _label_features(command: str, model: XCLIP, labels: list[str], cache: TextFeatureCache | None,
                    unsaved: list[OSError], stderr: TextIO) -> tuple[torch.Tensor, bool] | None:
    """:func:`text_features`, or None (after one error line for command-line users) when a
    label is longer than the model's context."""
    try:
        return text_features(model, labels, cache=cache, on_cache_error=unsaved.append)
    except TextTooLongError as exc:  # its own message speaks to Python callers (truncate=True)
        print(f"xclip {command}: error: label {exc.index + 1} ({one_line(exc.text)[:40]!r}) is {exc.num_tokens} "
              f"tokens; the model reads at most {exc.context_length}: shorten it", file=stderr, flush=True)
        return None


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
    file failed, the others were classified; 2: the checkpoint could not be loaded, nothing
    was classified). Results go to ``stdout`` in input order, errors (one line each) and notes
    to ``stderr``. ``progress=None``: a bar when ``stderr`` is a terminal, there is more than
    one file and not ``quiet``.

    Raises ``ValueError`` / ``TypeError`` for bad settings (labels, ``k``, views, device,
    backend, a label longer than the context or not UTF-8) and ``ImportError`` when tqdm or
    PyAV is missing, all before any file is read.
    """
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    labels = checked_labels(labels)
    if k is None:
        k = min(5, len(labels))
    checks.integer("top_k", k)
    checks.integer("clips", num_clips)
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"crops: expected one of {CROP_COUNTS}, got {num_crops!r}")
    import_tqdm()  # a missing tqdm or PyAV fails here, not after the checkpoint and labels are loaded
    require_decoder()

    def note(message: str) -> None:
        if not quiet:
            print(f"xclip classify: {message}", file=stderr, flush=True)

    if backend is not None:
        get_backend(backend)  # an unknown name raises here, naming the argument
    device = check_device(device)
    model = _load_model("classify", checkpoint, backend, device, stderr)
    if model is None:
        return 2
    cache = None
    if use_cache:
        cache = TextFeatureCache(cache_dir if cache_dir is not None else default_cache_dir())
    unsaved: list[OSError] = []
    found = _label_features("classify", model, labels, cache, unsaved, stderr)
    if found is None:
        return 2
    features, hit = found
    if unsaved:  # an unwritable cache directory costs the cache, not the run
        print(f"xclip classify: warning: text features not cached ({unsaved[0]})", file=stderr, flush=True)
    elif cache is not None:
        where = "read from" if hit else "encoded and saved to"
        note(f"text features of {len(labels)} labels {where} {cache.directory}")

    show = progress if progress is not None else (not quiet and len(videos) > 1 and stderr.isatty())
    failed = 0
    with progress_bar(len(videos), stderr, show) as bar:  # closed (erased) also on an exception
        for path in videos:
            bar.set_postfix_str(os.path.basename(path))  # draws the bar, naming the file in work
            try:
                result = classify_file(
                    model, features, labels, path,
                    k=k, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short,
                )
            except Exception as exc:  # noqa: BLE001 - one file's failure must not cost the others
                result = Result(path, error=f"path: {path}: {type(exc).__name__}: {exc}")
            if result.error is not None:
                failed += 1
                write_line(bar, f"xclip classify: error: {one_line(result.error)}", stderr)
            else:
                write_line(bar, format_result(result, as_json), stdout)
            bar.update(1)
    if failed:
        note(f"{failed} of {len(videos)} files failed")
    return 1 if failed else 0


def _join_torchrun(device: str) -> tuple[torch.device, int, Any]:
    """Under torchrun (``WORLD_SIZE`` > 1): join the process group (gloo on the CPU, nccl with
    each process on GPU ``LOCAL_RANK``); returns the device to run on, this rank, and what
    leaves the group at the end (or None)."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) <= 1:
        return check_device(device), 0, None
    # Only distributed runs load the training package.
    from .train.distributed import setup_distributed, teardown_distributed

    run = setup_distributed(device)
    return check_device(run.device), run.rank, lambda: teardown_distributed(run)


def run_collection(
    command: str,
    *,
    videos: Sequence[str],
    manifest: str | None,
    checkpoint: str,
    output: str,
    labels: Sequence[str] | None,
    k: int | None = None,
    num_clips: int = 1,
    num_crops: int = 1,
    allow_short: bool = False,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    device: str = "cpu",
    backend: str | None = None,
    workers: int = 2,
    batch_size: int = 8,
    shard_size: int = 4096,
    resume: bool = False,
    quiet: bool = False,
    progress: bool | None = None,
    stderr: TextIO | None = None,
) -> int:
    """``classify --output FILE`` (``command="classify"``) or ``embed --output DIR``
    (``"embed"``) over a collection (:mod:`xclip.collection`); returns the exit status (0:
    every video done; 1: some failed, recorded in the output; 2: the checkpoint could not be
    loaded). A progress bar and, at the end, one summary line on stderr (rank 0 under torchrun).

    Raises ``ValueError`` / ``TypeError`` / ``ImportError`` for bad settings before any video
    is decoded (as :func:`run_classify`; also a manifest that cannot be read, an output that
    exists without ``resume``, ``resume`` of an output written with other settings, a manifest
    label not among ``labels``).
    """
    from . import collection

    stderr = stderr if stderr is not None else sys.stderr
    if labels is not None:
        labels = checked_labels(labels)
    if k is None and labels is not None:
        k = min(5, len(labels))
    checks.integer("workers", workers, 0)
    checks.integer("batch_size", batch_size)
    import_tqdm()
    require_decoder()
    try:
        items = collection.collect_inputs(videos, manifest)
    except OSError as exc:
        raise ValueError(f"manifest: {one_line(str(exc))}") from None
    if backend is not None:
        get_backend(backend)
    run_device, rank, leave = _join_torchrun(device)
    try:
        return _run_collection_on(
            command, rank, run_device, items=items, checkpoint=checkpoint, output=output, labels=labels, k=k,
            num_clips=num_clips, num_crops=num_crops, allow_short=allow_short, cache_dir=cache_dir,
            use_cache=use_cache, backend=backend, workers=workers, batch_size=batch_size, shard_size=shard_size,
            resume=resume, quiet=quiet, progress=progress, stderr=stderr,
        )
    finally:
        if leave is not None:
            leave()


def _run_collection_on(
    command: str, rank: int, run_device: torch.device, *, items: list, checkpoint: str, output: str,
    labels: list[str] | None, k: int | None, num_clips: int, num_crops: int, allow_short: bool,
    cache_dir: str | os.PathLike | None, use_cache: bool, backend: str | None, workers: int, batch_size: int,
    shard_size: int, resume: bool, quiet: bool, progress: bool | None, stderr: TextIO,
) -> int:
    """:func:`run_collection` once this process is on its device (and in its process group)."""
    from . import collection

    main_rank = rank == 0

    def note(message: str) -> None:
        if not quiet and main_rank:
            print(f"xclip {command}: {message}", file=stderr, flush=True)

    model = _load_model(command, checkpoint, backend, run_device, stderr)
    if model is None:
        return 2
    model.eval()
    features = None
    if labels is not None:
        cache = TextFeatureCache(cache_dir if cache_dir is not None else default_cache_dir()) if use_cache else None
        unsaved: list[OSError] = []
        found = _label_features(command, model, labels, cache, unsaved, stderr)
        if found is None:
            return 2
        features = found[0]
        if unsaved:
            note(f"warning: text features not cached ({unsaved[0]})")
    show = progress if progress is not None else (not quiet and main_rank and stderr.isatty())

    def warn(message: str) -> None:  # also with --quiet: it says something about the output
        if main_rank:
            print(f"xclip {command}: warning: {one_line(message)}", file=stderr, flush=True)

    common = dict(
        num_clips=num_clips, num_crops=num_crops, allow_short=allow_short, workers=workers, batch_size=batch_size,
        resume=resume, progress=show, stream=stderr, on_warning=warn,
    )
    note(f"{len(items)} videos, {workers} decode workers, batches of {batch_size} clips -> {output}")
    if command == "classify":
        assert labels is not None and features is not None and k is not None
        summary = collection.classify_collection(model, labels, features, items, output, k=k, **common)
    else:
        summary = collection.embed(
            model, items, output, labels=labels, text_features=features, shard_size=shard_size, **common
        )
    note(summary.line())
    return 1 if summary.errors else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit status: 0 done, 1 some files failed (reported one line
    each, the others done), 2 a usage error (one line on stderr; argparse's own exit with 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in ("classify", "embed"):
        if args.views is not None and (args.clips is not None or args.crops is not None):
            parser.error("--views: not allowed with --clips or --crops (it sets both)")
        clips, crops = args.views if args.views is not None else (args.clips or 1, args.crops or 1)
        collection_mode = args.command == "embed" or args.output is not None
        if not collection_mode:
            for flag, value in (("--manifest", args.manifest), ("--resume", args.resume)):
                if value:
                    parser.error(f"{flag}: only with --output (collection mode)")
            if not args.videos:
                parser.error("the following arguments are required: VIDEO")
        elif not args.videos and args.manifest is None:
            parser.error("expected VIDEO arguments or --manifest FILE, got neither")
        if collection_mode and args.workers < 0:
            parser.error(f"--workers: expected an int >= 0, got {args.workers}")
        try:
            if args.labels_file is not None:
                labels = read_labels_file(args.labels_file)
            elif args.labels is not None:
                labels = parse_labels(args.labels)
            else:
                labels = None
        except UnicodeDecodeError as exc:
            parser.error(
                f"--labels-file: expected UTF-8 text, got byte 0x{exc.object[exc.start]:02x} at offset {exc.start} "
                f"of {printable(args.labels_file)}"
            )
        except (OSError, ValueError) as exc:
            parser.error(f"--labels{'-file' if args.labels_file is not None else ''}: {one_line(str(exc))}")
        if args.labels is not None and labels is not None:
            for label in labels:
                try:
                    label.encode("utf-8")
                except UnicodeEncodeError:  # argv bytes that were not UTF-8 (kept as lone surrogates)
                    parser.error(
                        f"--labels: expected UTF-8 text, got {label.encode('utf-8', 'surrogateescape')!r}"
                    )
        if collection_mode:
            try:
                return run_collection(
                    args.command, videos=args.videos, manifest=args.manifest, checkpoint=args.checkpoint,
                    output=args.output, labels=labels, k=getattr(args, "top_k", None), num_clips=clips,
                    num_crops=crops, allow_short=args.allow_short, cache_dir=getattr(args, "cache_dir", None),
                    use_cache=not getattr(args, "no_cache", False), device=args.device, backend=args.backend,
                    workers=args.workers, batch_size=args.batch_size, shard_size=getattr(args, "shard_size", 4096),
                    resume=args.resume, quiet=args.quiet,
                )
            except (ValueError, TypeError, ImportError) as exc:
                print(f"xclip {args.command}: error: {one_line(str(exc))}", file=sys.stderr)
                return 2
        try:
            return run_classify(
                videos=args.videos, checkpoint=args.checkpoint, labels=labels, k=args.top_k,
                num_clips=clips, num_crops=crops, allow_short=args.allow_short, cache_dir=args.cache_dir,
                use_cache=not args.no_cache, device=args.device, backend=args.backend, as_json=args.json,
                quiet=args.quiet,
            )
        except (ValueError, TypeError, ImportError) as exc:
            print(f"xclip classify: error: {one_line(str(exc))}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse refuses first
    return 2
