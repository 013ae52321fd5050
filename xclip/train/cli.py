"""The command line of a fine-tuning run: the flags (``--help``) and their checks.

Every refusal names the flag, what was expected and what came, before any work is done.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence

import xclip
from xclip_kernels import checks

PROG = "finetune.py"
"""The program name ``--help`` and argparse errors show: the script users run
(``examples/finetune.py``); ``python -m xclip.train`` passes its own."""


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    """The command-line interface (``--help``); ``prog`` is the name usage lines show."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fine-tune X-CLIP on root/<class_name>/<videos> with the official recipe; "
        "runs as is under torchrun.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="root/<class_name>/<video files>; labels = folder names, _ -> space")
    data.add_argument("--synthetic", type=int, metavar="N", help="instead of --data: N random clips (smoke tests)")
    data.add_argument("--synthetic-classes", type=int, default=4, metavar="K", help="classes of --synthetic (%(default)s)")
    data.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank (%(default)s)")
    data.add_argument(
        "--strict-data", action="store_true",
        help="a --data file that cannot be loaded ends the run (default: it is skipped with a warning, its "
        "place in the batch taken by the next file, and the skipped files are listed at the end)",
    )

    model = parser.add_argument_group("model")
    model.add_argument(
        "--model", default="xclip-b16",
        help="checkpoint to start from (official .pth, HF XCLIP folder, model.save() file) or a variant "
        f"({', '.join(xclip.VARIANTS)}) with random weights (%(default)s)",
    )
    model.add_argument(
        "--num-frames", type=int, metavar="T",
        help="frames per clip (default: the model's); a checkpoint's MIT positions are interpolated",
    )
    model.add_argument("--backend", help="attention backend (python -m xclip_kernels; default: automatic)")
    model.add_argument(
        "--freeze-text", action="store_true", help="freeze the text tower, encode the prompts once (official FIX_TEXT)"
    )
    model.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute block activations in backward (less memory)"
    )

    train = parser.add_argument_group("training (defaults: the official recipe)")
    train.add_argument("--epochs", type=int, default=30, help="(%(default)s)")
    train.add_argument("--warmup-epochs", type=float, default=5.0, help="linear warm-up, then cosine (%(default)s)")
    train.add_argument("--max-steps", type=int, metavar="N", help="stop after N optimizer steps (the schedule spans them)")
    train.add_argument("--batch-size", type=int, default=8, help="clips per process per optimizer step (%(default)s)")
    train.add_argument(
        "--accumulation-steps", type=int, default=1,
        help="micro-batches per optimizer step, dividing --batch-size (%(default)s)",
    )
    train.add_argument("--lr", type=float, default=8e-6, help="learning rate of the CLIP parameters (%(default)s)")
    train.add_argument(
        "--new-lr-scale", type=float, default=10.0,
        help="learning-rate factor of message tokens, MIT and prompts (%(default)s)",
    )
    train.add_argument("--weight-decay", type=float, default=0.001, help="AdamW decoupled weight decay (%(default)s)")
    train.add_argument("--label-smoothing", type=float, default=0.1, help="(%(default)s)")
    train.add_argument("--mixup", type=float, default=0.8, help="mixup Beta alpha, 0: off (%(default)s)")
    train.add_argument("--cutmix", type=float, default=1.0, help="cutmix Beta alpha, 0: off (%(default)s)")
    train.add_argument("--seed", type=int, default=1024, help="(%(default)s)")

    run = parser.add_argument_group("run")
    run.add_argument("--device", help="cuda or cpu (default: cuda if available); torchrun ranks take cuda:LOCAL_RANK")
    run.add_argument(
        "--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
        help="autocast dtype; auto: bf16 on CUDA, off on CPU (%(default)s)",
    )
    run.add_argument(
        "--dtype", choices=("float32", "float64"), default="float32",
        help="parameter dtype; float64 for numerical checks (%(default)s)",
    )
    run.add_argument(
        "--fsdp", action="store_true", help="shard with FSDP2 (fully_shard per block) instead of DDP; needs torchrun"
    )
    run.add_argument("--output", metavar="DIR", help="where rank 0 writes checkpoints and labels.txt (default: nothing saved)")
    run.add_argument(
        "--save-every", type=int, default=1, metavar="EPOCHS",
        help="a checkpoint every N epochs, 0: only the final one (%(default)s)",
    )
    run.add_argument("--log-every", type=int, default=10, metavar="STEPS", help="(%(default)s)")
    return parser


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad arguments before any work, naming the flag, the expectation and the value.

    Raises:
        ValueError: a value out of range or a combination that cannot run.
        FileNotFoundError: ``--model`` is neither a file nor a variant name.
        NotADirectoryError: ``--output`` is a file.
    """
    if (args.data is None) == (args.synthetic is None):
        got = "both" if args.data is not None else "neither"
        raise ValueError(f"--data / --synthetic: expected exactly one of --data DIR or --synthetic N, got {got}")
    positive = dict(
        synthetic=args.synthetic, synthetic_classes=args.synthetic_classes, epochs=args.epochs,
        batch_size=args.batch_size, accumulation_steps=args.accumulation_steps, max_steps=args.max_steps,
        num_frames=args.num_frames, log_every=args.log_every,
    )
    for name, value in positive.items():
        if value is not None:
            checks.integer(f"--{name.replace('_', '-')}", value)
    if args.synthetic is not None and args.synthetic_classes < 2:
        raise ValueError(f"--synthetic-classes: expected at least 2 classes, got {args.synthetic_classes}")
    for name in ("workers", "save_every"):
        checks.integer(f"--{name.replace('_', '-')}", getattr(args, name), minimum=0)
    for name in ("lr", "new_lr_scale"):
        value = getattr(args, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')}: expected a positive number, got {value}")
    for name in ("weight_decay", "mixup", "cutmix", "warmup_epochs"):
        value = getattr(args, name)
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"--{name.replace('_', '-')}: expected a number >= 0, got {value}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing: expected a number in [0, 1), got {args.label_smoothing}")
    if args.batch_size % args.accumulation_steps:
        raise ValueError(
            f"--accumulation-steps: expected a divisor of --batch-size {args.batch_size}, got {args.accumulation_steps}"
        )
    if args.model not in xclip.VARIANTS and not os.path.exists(args.model):
        raise FileNotFoundError(
            f"--model: expected a checkpoint path or one of {', '.join(xclip.VARIANTS)}, got {args.model!r} (no such file)"
        )
    if args.dtype == "float64" and args.amp in ("bf16", "fp16"):
        raise ValueError(f"--amp: expected off or auto with --dtype float64, got {args.amp}")
    if args.fsdp and args.amp == "fp16":
        raise ValueError("--amp: fp16 with a GradScaler is not supported with --fsdp; expected bf16 or off, got fp16")
    if args.output is not None and os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NotADirectoryError(f"--output: expected a folder (created if missing), got {args.output!r}, which is a file")


def parse_args(argv: Sequence[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``) and :func:`check_args` the result.

    Raises:
        SystemExit: what argparse refuses (an unknown flag, a value of the wrong type), and
            after ``--help``.
        ValueError / FileNotFoundError / NotADirectoryError: see :func:`check_args`.
    """
    args = build_parser(prog).parse_args(argv)
    check_args(args)
    return args
