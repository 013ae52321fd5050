"""``python -m xclip``: command-line tools of the X-CLIP model.

    python -m xclip classify VIDEO... --checkpoint PATH --labels "a,b,c"

The logic lives in :mod:`xclip.classify`; this module only parses arguments.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

VIEWS_HELP = (
    "views per video as CLIPSxCROPS (e.g. 4x3, the paper's multi-view evaluation) or a count N "
    "= clips x crops: a multiple of 3 means N/3 clips x 3 crops, otherwise N clips x 1 crop; "
    "instead of --clips/--crops"
)


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
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
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


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; returns the exit status (argument errors exit with 2 via argparse)."""
    from .classify import parse_labels, read_labels_file, run_classify

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


if __name__ == "__main__":
    sys.exit(main())
