"""``python -m xclip``: the command-line tools of the X-CLIP model, argument parsing and the
command runners.

    python -m xclip classify VIDEO... --checkpoint PATH --labels "a,b,c"

``classify`` loads the checkpoint once, takes the label features from the disk cache or encodes
them once (:mod:`xclip.text_cache`), then classifies the files in order
(:func:`xclip.classify.classify_file`), printing each result on stdout as soon as it is ready.
A file that fails (missing, not a video, too few frames) is reported on stderr and the others
still run; the exit status is then 1. Errors in the arguments or the run settings exit with 2.

On a terminal a progress bar (tqdm) goes to stderr; tqdm is imported when the command runs,
not when :mod:`xclip` is.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, TextIO

import torch

from xclip_kernels import checks, get_backend

from .checkpoint import load_checkpoint
from .classify import Result, classify_file
from .labels import check_labels, parse_labels, read_labels_file
from .text_cache import TextFeatureCache, default_cache_dir, text_features
from .video import CROP_COUNTS

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


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``python -m xclip`` and its commands."""
    parser = argparse.ArgumentParser(prog="python -m xclip", description="X-CLIP command-line tools.")
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
    classify.add_argument("videos", nargs="+", metavar="VIDEO", help="video files (anything FFmpeg decodes)")
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
    return parser


# -- output -------------------------------------------------------------------------------------


def format_result(result: Result, as_json: bool) -> str:
    """The text printed for one file: the path, then ``  probability  label`` lines (4
    decimals), or with ``as_json`` one JSON object ``{"path", "top": [{"label", "probability"}]}``."""
    if as_json:
        payload: dict[str, object] = {"path": result.path}
        payload["top"] = [{"label": label, "probability": p} for label, p in result.top or []]
        return json.dumps(payload, ensure_ascii=False)
    lines = [result.path] + [f"  {p:.4f}  {label}" for label, p in result.top or []]
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


# -- commands -----------------------------------------------------------------------------------


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
    terminal, there is more than one file and not ``quiet``.

    Raises ``ValueError`` / ``TypeError`` for bad settings (labels, ``k``, views, device,
    backend, a label longer than the context) and ``ImportError`` when tqdm is missing.
    """
    stdout = stdout if stdout is not None else sys.stdout
    stderr = stderr if stderr is not None else sys.stderr
    labels = check_labels(labels)
    if k is None:
        k = min(5, len(labels))
    checks.integer("top_k", k)
    checks.integer("clips", num_clips)
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"crops: expected one of {CROP_COUNTS}, got {num_crops!r}")
    import_tqdm()  # a missing tqdm fails here, not after the checkpoint and labels are loaded

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
    failed = 0
    with progress_bar(len(videos), stderr, show) as bar:  # closed (erased) also on an exception
        for path in videos:
            bar.set_postfix_str(os.path.basename(path))  # draws the bar, naming the file in work
            result = classify_file(
                model, features, labels, path,
                k=k, num_clips=num_clips, num_crops=num_crops, allow_short=allow_short,
            )
            if result.error is not None:
                failed += 1
                write_line(bar, f"xclip classify: error: {result.error}", stderr)
            else:
                write_line(bar, format_result(result, as_json), stdout)
            bar.update(1)
    if failed:
        note(f"{failed} of {len(videos)} files failed")
    return 1 if failed else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit status (argument errors exit with 2 via argparse)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "classify":
        if args.views is not None and (args.clips is not None or args.crops is not None):
            parser.error("--views: not allowed with --clips or --crops (it sets both)")
        clips, crops = args.views if args.views is not None else (args.clips or 1, args.crops or 1)
        try:
            labels = read_labels_file(args.labels_file) if args.labels_file is not None else parse_labels(args.labels)
        except (OSError, ValueError) as exc:
            parser.error(f"--labels{'-file' if args.labels_file is not None else ''}: {exc}")
        try:
            return run_classify(
                videos=args.videos, checkpoint=args.checkpoint, labels=labels, k=args.top_k,
                num_clips=clips, num_crops=crops, allow_short=args.allow_short, cache_dir=args.cache_dir,
                use_cache=not args.no_cache, device=args.device, backend=args.backend, as_json=args.json,
                quiet=args.quiet,
            )
        except (ValueError, TypeError, ImportError) as exc:
            print(f"xclip classify: error: {exc}", file=sys.stderr)
            return 2
    parser.error(f"unknown command {args.command!r}")  # pragma: no cover - argparse refuses first
    return 2
