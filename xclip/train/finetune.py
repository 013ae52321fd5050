"""One fine-tuning run from command-line arguments: :func:`main` (``--help`` lists the flags).

:func:`train` is the run in order: :func:`build_training` reads the data and the model, wraps
the model for the processes and makes the optimizer and schedule; :func:`run_epochs` is the
loop; rank 0 writes ``labels.txt`` first and the checkpoints as the loop goes and at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import xclip
from xclip.config import XCLIPConfig
from xclip.model import XCLIP

from .cli import PROG, parse_args
from .data import (
    ClipLoader,
    SkippedFiles,
    SyntheticVideos,
    VideoFolder,
    default_clip_loader,
    mix_batch,
    no_clip_loader,
    sharded_loader,
)
from .distributed import Distributed, mean_over_processes, setup_distributed, teardown_distributed, wrap_for_training
from .classifier import VideoClassifier
from .recipe import build_optimizer, freeze_text_tower, param_groups, train_step, warmup_cosine_scheduler


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`main` returns: the trained ``model`` (sharded under FSDP), the global
    mean loss of every step, ``steps`` taken, throughput in clips/s over all processes
    (steps after the first), the class ``labels``, the final checkpoint (or None) and the
    ``--data`` files skipped because they could not be loaded (``{path: reason}``, all
    processes)."""

    model: XCLIP
    losses: list[float]
    steps: int
    clips_per_s: float
    labels: list[str]
    checkpoint: Path | None
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)


def main(
    argv: Sequence[str] | None = None, *, load_clip: ClipLoader | None = None, prog: str = PROG
) -> FinetuneResult:
    """Run fine-tuning from command-line arguments (see ``--help``).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        load_clip: ``path -> (T, 3, S, S)`` float clip for ``--data`` (default
            :func:`~xclip.train.data.default_clip_loader`, i.e. :func:`xclip.video.load_clip`).
        prog: the program name in usage lines and argparse errors.

    Bad arguments raise ``ValueError`` / ``FileNotFoundError`` naming the flag. Under torchrun
    every process runs this; only rank 0 logs and saves. The process group is destroyed at the
    end if this call created it.
    """
    args = parse_args(argv, prog=prog)
    run = setup_distributed(args.device, fsdp=args.fsdp)
    try:
        return train(args, run, load_clip)
    finally:
        teardown_distributed(run)


def train(args: argparse.Namespace, run: Distributed, load_clip: ClipLoader | None = None) -> FinetuneResult:
    """The run of checked arguments ``args`` (:func:`~xclip.train.cli.parse_args`) in process
    ``run``: build, write the labels, train, save the final checkpoint."""
    training = build_training(args, run, load_clip)
    try:
        write_labels(training)
        log_start(training)
        progress = run_epochs(training)
        checkpoint = save_final_checkpoint(training)
        if progress.steps > 1:
            log(run, f"done: {progress.steps} steps, {progress.clips_per_s:.1f} clips/s after the first step")
        skipped = skipped_files(training)
        log_skipped(training, skipped)
    finally:
        if training.skipped is not None:
            training.skipped.close()
    return FinetuneResult(
        training.model, progress.losses, progress.steps, progress.clips_per_s, list(training.labels),
        checkpoint if run.is_main else None, skipped,
    )


# -- building the run -------------------------------------------------------------------------


@dataclasses.dataclass
class Training:
    """Everything a run trains with, made by :func:`build_training`."""

    args: argparse.Namespace
    run: Distributed
    model: XCLIP
    """The X-CLIP whose parameters train (sharded in place under FSDP); what is saved."""
    step_module: nn.Module
    """What a step calls: the :class:`~xclip.train.classifier.VideoClassifier` (FSDP or one
    process) or DDP around it."""
    replicated: list[nn.Parameter]
    """Parameters whose gradients no wrapper averages (FSDP's scalar ``logit_scale``)."""
    frozen: list[str]
    labels: list[str]
    clips: int
    """Clips in the dataset (all processes)."""
    loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    amp: str
    """The autocast mode in effect: ``bf16``, ``fp16`` or ``off`` (``--amp auto`` resolved)."""
    autocast_dtype: torch.dtype | None
    total_steps: int
    output: Path | None
    skipped: SkippedFiles | None = None
    """Where the ``--data`` files that could not be loaded are recorded (None: ``--strict-data``
    or synthetic data)."""

    @property
    def clips_per_step(self) -> int:
        """Clips of one optimizer step over all processes."""
        return self.args.batch_size * self.run.world_size


def build_training(args: argparse.Namespace, run: Distributed, load_clip: ClipLoader | None) -> Training:
    """Data, model (wrapped for the processes), optimizer and schedule of the run, in the order
    that makes bad input fail early and keeps the initial weights the same on every rank."""
    # The folder is checked before the (possibly large) model is read; its clip loader, which
    # needs the model's T and S, is set after.
    folder = VideoFolder(args.data, no_clip_loader, argument="--data") if args.data is not None else None
    model = model_to_train(args)
    dataset = build_dataset(args, model.config, folder, load_clip)
    check_batch_fits(len(dataset), args.batch_size, run.world_size)
    amp, autocast_dtype = resolve_amp(args.amp, run.device, args.dtype)

    frozen = freeze_text_tower(model) if args.freeze_text else []
    model.set_gradient_checkpointing(args.grad_checkpointing)
    classifier = VideoClassifier(model, dataset.labels, frozen_text=args.freeze_text).to(run.device).train()
    step_module, replicated = wrap_for_training(classifier, run, fsdp=args.fsdp, param_dtype=autocast_dtype)
    # After sharding: FSDP2 replaces the parameters with sharded ones (same names), which are
    # the ones the optimizer must hold.
    optimizer = build_optimizer(
        param_groups(model, lr=args.lr, weight_decay=args.weight_decay, new_lr_scale=args.new_lr_scale)
    )

    if folder is not None and not args.strict_data:  # made last: nothing after it can fail
        # Loader workers are processes with their own copy of the folder: a shared record.
        folder.skipped = SkippedFiles(shared=args.workers > 0)
    loader = sharded_loader(
        dataset, batch_size=args.batch_size, rank=run.rank, world_size=run.world_size, seed=args.seed,
        workers=args.workers, pin_memory=run.device.type == "cuda",
    )
    total_steps, warmup_steps = plan_steps(args, steps_per_epoch=len(loader))
    return Training(
        args=args, run=run, model=model, step_module=step_module, replicated=replicated, frozen=frozen,
        labels=dataset.labels, clips=len(dataset), loader=loader, optimizer=optimizer,
        scheduler=warmup_cosine_scheduler(optimizer, warmup_steps=warmup_steps, total_steps=total_steps),
        scaler=torch.amp.GradScaler(run.device.type) if amp == "fp16" else None,
        amp=amp, autocast_dtype=autocast_dtype, total_steps=total_steps,
        output=Path(args.output) if args.output is not None else None,
        skipped=folder.skipped if folder is not None else None,
    )


def load_model(args: argparse.Namespace) -> XCLIP:
    """The starting model of ``--model`` at ``--num-frames``, on the CPU, in float32."""
    if args.model in xclip.VARIANTS:
        return xclip.build_model(args.model, num_frames=args.num_frames)
    return xclip.load_checkpoint(args.model, num_frames=args.num_frames, interpolate_frames=args.num_frames is not None)


def model_to_train(args: argparse.Namespace) -> XCLIP:
    """:func:`load_model` in ``--dtype`` with the ``--backend`` attention, on the CPU."""
    torch.manual_seed(args.seed)  # the same random initial weights on every rank
    model = load_model(args).to(getattr(torch, args.dtype))
    if args.backend is not None:
        try:
            model.set_attention_backend(args.backend)
        except ValueError as exc:
            raise ValueError(f"--backend: {exc}") from exc
    return model


def build_dataset(
    args: argparse.Namespace, config: XCLIPConfig, folder: VideoFolder | None, load_clip: ClipLoader | None
) -> VideoFolder | SyntheticVideos:
    """The ``--data`` folder (clips of the model's T frames at S pixels, by ``load_clip`` or
    :func:`~xclip.train.data.default_clip_loader`), or ``--synthetic`` clips."""
    if folder is not None:
        folder.load_clip = load_clip if load_clip is not None else default_clip_loader(config.num_frames, config.image_size)
        return folder
    return SyntheticVideos(args.synthetic, args.synthetic_classes, config.num_frames, config.image_size, seed=args.seed)


def check_batch_fits(clips: int, batch_size: int, world_size: int) -> None:
    """Refuse a ``--batch-size`` that leaves a process without one full batch (``drop_last``
    would make the run empty)."""
    if clips < batch_size * world_size:
        raise ValueError(
            f"--batch-size: expected at most {clips // world_size} clips per process "
            f"({clips} clips over {world_size} processes), got {batch_size}"
        )


def resolve_amp(amp: str, device: torch.device, dtype: str) -> tuple[str, torch.dtype | None]:
    """``--amp`` as ``(mode, autocast dtype or None)``; ``auto`` is bf16 for float32 on CUDA,
    off otherwise (CPU autocast is slower, and float64 runs are numerical checks)."""
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and dtype == "float32" else "off"
    return amp, {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]


def plan_steps(args: argparse.Namespace, *, steps_per_epoch: int) -> tuple[int, int]:
    """``(total optimizer steps, warm-up steps)``: ``--epochs`` of ``steps_per_epoch``, cut at
    ``--max-steps`` (the schedule then spans the shorter run); warm-up ``--warmup-epochs``."""
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = min(int(args.warmup_epochs * steps_per_epoch), total_steps)
    return total_steps, warmup_steps


# -- the epoch loop ---------------------------------------------------------------------------


class Progress:
    """The global mean loss of every step so far, and the throughput of the steps after the
    first (which pays for start-up: loader workers, allocations, lazy initialisation)."""

    def __init__(self, clips_per_step: int) -> None:
        self.clips_per_step = clips_per_step
        self.losses: list[float] = []
        self._timed_clips = 0
        self._timed_seconds = 0.0
        self._last = time.perf_counter()

    @property
    def steps(self) -> int:
        """Optimizer steps taken so far."""
        return len(self.losses)

    def record(self, loss: float) -> float:
        """Count a finished step of mean loss ``loss``; returns its seconds, counted from the
        end of the previous step (waiting for data included)."""
        self.losses.append(loss)
        now = time.perf_counter()
        elapsed, self._last = now - self._last, now
        if self.steps > 1:
            self._timed_clips += self.clips_per_step
            self._timed_seconds += elapsed
        return elapsed

    def pause_ended(self) -> None:
        """Restart the clock after work that is not training (saving a checkpoint)."""
        self._last = time.perf_counter()

    @property
    def clips_per_s(self) -> float:
        """Clips per second over all processes, steps after the first (nan before step 2)."""
        return self._timed_clips / self._timed_seconds if self._timed_seconds > 0 else float("nan")


def run_epochs(training: Training) -> Progress:
    """Train for ``--epochs`` or until ``--max-steps``; every epoch reshuffles the shards, and
    rank 0 saves ``epoch<N>.safetensors`` every ``--save-every`` epochs but the last."""
    args, run = training.args, training.run
    rng = random.Random(args.seed + run.rank)  # mixup/cutmix draws: each rank its own
    progress = Progress(training.clips_per_step)
    for epoch in range(args.epochs):
        if progress.steps >= training.total_steps:
            break
        training.loader.sampler.set_epoch(epoch)
        for video, target in training.loader:
            if progress.steps >= training.total_steps:
                break
            learning_rates = sorted({group["lr"] for group in training.optimizer.param_groups})
            loss = optimizer_step(training, video, target, rng)
            seconds = progress.record(mean_over_processes(loss, run))
            log_step(training, epoch, progress, learning_rates, seconds)
        last_epoch = progress.steps >= training.total_steps or epoch == args.epochs - 1  # saved as final.safetensors
        if training.output is not None and args.save_every and (epoch + 1) % args.save_every == 0 and not last_epoch:
            save_checkpoint(training.model, training.output / f"epoch{epoch + 1}.safetensors", run, fsdp=args.fsdp)
            progress.pause_ended()  # saving is not training time
    return progress


def optimizer_step(training: Training, video: torch.Tensor, target: torch.Tensor, rng: random.Random) -> float:
    """One step on a batch from the loader (``video (b, T, 3, S, S)``, ``target (b,)``):
    to the device, mixup/CutMix if enabled, :func:`~xclip.train.recipe.train_step`. Returns
    this process's mean loss."""
    args, run = training.args, training.run
    video = video.to(run.device, non_blocking=True)
    target = target.to(run.device, non_blocking=True)
    if args.mixup > 0 or args.cutmix > 0:
        video, target = mix_batch(video, target, len(training.labels), mixup=args.mixup, cutmix=args.cutmix, rng=rng)
    return train_step(
        training.step_module, training.optimizer, video, target, scheduler=training.scheduler, scaler=training.scaler,
        autocast_dtype=training.autocast_dtype, label_smoothing=args.label_smoothing,
        accumulation_steps=args.accumulation_steps, replicated=training.replicated, world_size=run.world_size,
    )


# -- logging (rank 0) -------------------------------------------------------------------------


def log(run: Distributed, message: str) -> None:
    """Print ``message`` on rank 0 (at once: runs under torchrun are followed live)."""
    if run.is_main:
        print(message, flush=True)


def log_start(training: Training) -> None:
    """What is about to run: model, data, processes, wrapping, amp, steps, trainable size."""
    args, run = training.args, training.run
    config = training.model.config
    trainable = sum(p.numel() for group in training.optimizer.param_groups for p in group["params"])
    wrapping = "FSDP2" if args.fsdp else "DDP" if run.world_size > 1 else "single process"
    frozen = f" ({len(training.frozen)} text tensors frozen)" if training.frozen else ""
    log(
        run,
        f"fine-tuning {args.model} (T={config.num_frames}, S={config.image_size}) on {training.clips} clips, "
        f"{len(training.labels)} classes; {run.world_size} process(es) on {run.device.type}, "
        f"{wrapping}, amp {training.amp}, "
        f"{training.total_steps} steps of {training.clips_per_step} clips, {trainable / 1e6:.1f}M trainable parameters"
        f"{frozen}"
        + ("" if training.output is not None else "; no --output: nothing will be saved"),
    )


def log_step(training: Training, epoch: int, progress: Progress, learning_rates: list[float], seconds: float) -> None:
    """The step just recorded in ``progress``, on the first, every ``--log-every``-th and the
    last: loss, the learning rates it used, clips/s, peak CUDA memory."""
    run, step, total = training.run, progress.steps, training.total_steps
    if not (run.is_main and (step % training.args.log_every == 0 or step == 1 or step == total)):
        return
    memory = ""
    if run.device.type == "cuda":
        memory = f" mem {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f}GiB"
    lrs = "/".join(f"{lr:.2e}" for lr in learning_rates)
    rate = progress.clips_per_step / seconds
    log(
        run,
        f"epoch {epoch + 1} step {step}/{total} loss {progress.losses[-1]:.4f} lr {lrs} "
        f"{rate:.1f} clips/s{memory} [{datetime.datetime.now():%H:%M:%S}]",
    )


def skipped_files(training: Training) -> dict[str, str]:
    """The ``--data`` files skipped so far by every process, ``{path: reason}`` (every rank
    must call this in a distributed run: the records are gathered)."""
    mine = training.skipped.items() if training.skipped is not None else {}
    if training.run.world_size == 1:
        return mine
    gathered: list[dict[str, str] | None] = [None] * training.run.world_size
    torch.distributed.all_gather_object(gathered, mine)
    return {path: reason for part in gathered for path, reason in (part or {}).items()}


SKIPPED_LISTED = 20
"""Skipped files named one by one in the summary; the rest are counted."""


def log_skipped(training: Training, skipped: dict[str, str]) -> None:
    """The summary of the skipped ``--data`` files on rank 0 (nothing when none were)."""
    if not skipped:
        return
    lines = [
        f"skipped {len(skipped)} of {training.clips} --data files that could not be loaded (each replaced by "
        "the next file; --strict-data makes them an error):"
    ]
    lines += [f"  {path}: {reason}" for path, reason in sorted(skipped.items())[:SKIPPED_LISTED]]
    if len(skipped) > SKIPPED_LISTED:
        lines.append(f"  ... and {len(skipped) - SKIPPED_LISTED} more")
    log(training.run, "\n".join(lines))


# -- checkpoints (rank 0) ---------------------------------------------------------------------


def write_labels(training: Training) -> None:
    """Create ``--output`` and write ``labels.txt`` (one class label a line, by index) on rank 0,
    before training, so that every checkpoint has its labels beside it."""
    if training.output is not None and training.run.is_main:
        training.output.mkdir(parents=True, exist_ok=True)
        (training.output / "labels.txt").write_text("".join(f"{label}\n" for label in training.labels), encoding="utf-8")


def save_checkpoint(model: XCLIP, path: Path, run: Distributed, *, fsdp: bool) -> None:
    """Write ``model`` with :meth:`XCLIP.save` on rank 0 (FSDP: gathered from every rank
    first, so every rank must call this). Written to a temporary name, then renamed."""
    if fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if not run.is_main:
            return
        with torch.device("meta"):
            plain = XCLIP(model.config)
        plain.load_state_dict(state, assign=True)
    elif run.is_main:
        plain = model
    else:
        return
    tmp = path.with_name(path.name + ".tmp")
    plain.save(str(tmp))
    os.replace(tmp, path)


def save_final_checkpoint(training: Training) -> Path | None:
    """``--output``/final.safetensors (every rank must call this under FSDP); None without
    ``--output``."""
    if training.output is None:
        return None
    checkpoint = training.output / "final.safetensors"
    save_checkpoint(training.model, checkpoint, training.run, fsdp=training.args.fsdp)
    log(training.run, f"saved {checkpoint} (labels in {training.output / 'labels.txt'})")
    return checkpoint
