"""Fine-tune X-CLIP on a folder of labelled videos with the official recipe.

    python examples/finetune.py --model k400_16_8.pth --data videos/ --output runs/ft
    torchrun --nproc-per-node 8 examples/finetune.py --model k400_16_8.pth --data videos/ --output runs/ft
    torchrun --nproc-per-node 8 examples/finetune.py --model xclip-l14 --fsdp --grad-checkpointing ...

Data: ``root/<class_name>/<video files>``; the label text of a class is its folder name with
underscores as spaces (``playing_violin`` -> "playing violin"), the raw class name that X-CLIP
uses as its prompt. ``--synthetic N`` replaces the folder by N random clips (smoke tests,
benchmarks).

The recipe is the official one (``X-CLIP/main.py`` and ``utils/optimizer.py`` of
microsoft/VideoX): the loss is cross-entropy of each video's logits against all class prompts
(target = class index; label smoothing 0.1; mixup 0.8 / cutmix 1.0 switched half and half);
AdamW with betas (0.9, 0.98), eps 1e-8, lr 8e-6, weight decay 0.001; ten times the learning
rate for the modules X-CLIP adds to CLIP (message tokens, MIT, video-specific prompts); linear
warm-up for 5 of 30 epochs, then cosine decay to lr / 100, updated every step. Weight decay
skips biases, norm gains, embeddings and the logit scale (one-dimensional parameters and
everything named ``*embedding*``; the official code also skips 1-D parameters and positional
embeddings, but decays the token embedding and the scalar logit scale). ``--freeze-text``
freezes the text tower as the official ``FIX_TEXT`` (on by default there) and encodes the
class prompts once.

Scale: under ``torchrun`` (``WORLD_SIZE > 1``) every process takes one device and a
``DistributedSampler`` shard; DistributedDataParallel averages gradients (nccl on CUDA, gloo on
CPU); ``--fsdp`` shards parameters, gradients and optimizer state with FSDP2
(``torch.distributed.fsdp.fully_shard``, one unit per transformer block). ``--batch-size`` is
per process. bf16 autocast on GPU by default (``--amp fp16`` adds a GradScaler);
``--grad-checkpointing`` recomputes block activations in the backward pass. Only rank 0 logs
and saves; checkpoints are :meth:`xclip.XCLIP.save` files that :func:`xclip.load_checkpoint`
reads, with the class labels beside them in ``labels.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

import xclip
from xclip.model import XCLIP

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts")
"""File name endings (case-insensitive) that count as videos in a class folder."""

NEW_MODULE_MARKERS = ("message_", "mit.", "prompts_")
"""A parameter whose name contains one of these belongs to a module X-CLIP adds to CLIP
(cross-frame message tokens, MIT, video-specific prompt generator and its visual inputs); as
in the official ``build_optimizer``, these train at ``new_lr_scale`` times the learning rate."""

TEXT_TOWER_PREFIXES = (
    "transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale",
)
"""Parameter-name prefixes of the text side that ``--freeze-text`` freezes: the official
``fix_text`` freezes everything outside ``visual.``, ``mit`` and ``prompts``."""

ClipLoader = Callable[[str], torch.Tensor]


# -- data -------------------------------------------------------------------------------------


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


class VideoFolder(Dataset):
    """Labelled videos in ``root/<class_name>/<video files>``.

    Classes are the sub-folders of ``root`` in sorted order (index = position); their label
    texts are :func:`label_text` of the folder names. Items are ``(clip (T, 3, S, S) float,
    class index)``; ``load_clip(path)`` makes the clip.

    Raises:
        FileNotFoundError / NotADirectoryError: ``root`` is missing or not a folder.
        ValueError: fewer than two class folders, or a class folder without video files.
    """

    def __init__(self, root: str | os.PathLike, load_clip: ClipLoader, *, argument: str = "root") -> None:
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
        path, label = self.samples[index]
        clip = self.load_clip(path)
        if not isinstance(clip, torch.Tensor) or clip.dim() != 4 or clip.shape[1] != 3 or not clip.is_floating_point():
            got = tuple(clip.shape) if isinstance(clip, torch.Tensor) else type(clip).__name__
            raise ValueError(f"load_clip: expected a float tensor (T, 3, S, S) for {path!r}, got {got}")
        return clip, label


class SyntheticVideos(Dataset):
    """``count`` random clips in ``num_classes`` classes, for smoke tests and benchmarks.

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


# -- model and optimizer ----------------------------------------------------------------------


def is_new_parameter(name: str) -> bool:
    """Whether parameter ``name`` (an :class:`xclip.XCLIP` name) belongs to a module X-CLIP
    adds to CLIP (see :data:`NEW_MODULE_MARKERS`)."""
    return any(marker in name for marker in NEW_MODULE_MARKERS)


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Whether parameter ``name`` is exempt from weight decay: biases, norm gains, the
    prompt ``alpha`` and the logit scale (all with fewer than 2 dims) and embeddings."""
    return param.dim() < 2 or name.endswith("bias") or "embedding" in name


def freeze_text_tower(model: XCLIP) -> list[str]:
    """Stop gradients to the text tower (as the official ``FIX_TEXT``); returns the names frozen."""
    frozen = []
    for name, param in model.named_parameters():
        if name.startswith(TEXT_TOWER_PREFIXES):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def param_groups(
    model: XCLIP, *, lr: float, weight_decay: float, new_lr_scale: float = 10.0
) -> list[dict[str, object]]:
    """AdamW parameter groups of the official recipe for the trainable parameters of ``model``.

    Four groups, empty ones left out, each with a ``name``: ``clip`` (lr, decay), ``clip
    no-decay`` (lr, no decay), ``new`` (``new_lr_scale * lr``, decay), ``new no-decay``.
    See :func:`is_new_parameter` and :func:`is_no_decay`. Parameters with
    ``requires_grad=False`` are left out.
    """
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((is_new_parameter(name), is_no_decay(name, param)), []).append(param)
    groups = []
    for new in (False, True):
        for no_decay in (False, True):
            params = buckets.get((new, no_decay))
            if params:
                groups.append(
                    dict(
                        name=("new" if new else "clip") + (" no-decay" if no_decay else ""),
                        params=params,
                        lr=lr * (new_lr_scale if new else 1.0),
                        weight_decay=0.0 if no_decay else weight_decay,
                    )
                )
    return groups


def warmup_cosine(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float = 0.01) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): linear from 0 to 1 over
    ``warmup_steps`` (the first step gets ``1 / warmup_steps``), then cosine from 1 down to
    ``min_ratio`` at ``total_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class VideoClassifier(nn.Module):
    """An X-CLIP with its class prompts: ``forward(video (b, T, 3, S, S)) -> logits (b, K)``.

    The module that DDP / FSDP wrap, so that one forward covers video and text. With
    ``frozen_text`` the prompts are encoded once, without grad, at the first forward, and
    reused (the official ``use_cache``).
    """

    def __init__(self, model: XCLIP, labels: Sequence[str], *, frozen_text: bool = False) -> None:
        super().__init__()
        self.model = model
        self.frozen_text = frozen_text
        tokens = xclip.tokenize(list(labels), context_length=model.config.context_length)
        self.register_buffer("text", tokens, persistent=False)
        self._text_features: torch.Tensor | None = None

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.frozen_text:
            if self._text_features is None:
                with torch.no_grad():
                    self._text_features = self.model.encode_text(self.text)
            text_features = self._text_features
        else:
            text_features = self.model.encode_text(self.text)
        return self.model.logits(self.model.encode_video_features(video), text_features)


# -- distributed ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Distributed:
    """Where this process stands: ``rank`` of ``world_size``, its ``device``, whether it set
    up the process group (and so tears it down)."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}: expected an integer, got {value!r}") from None


def setup_distributed(device: str | None, *, fsdp: bool = False) -> Distributed:
    """Join the process group described by torchrun's environment variables.

    A group is started when ``WORLD_SIZE > 1`` (or with ``fsdp`` under torchrun at any size):
    nccl on CUDA, gloo on the CPU, ``init_method="env://"``. A group that already exists is
    used as it is (and left for its owner to destroy). On CUDA each process takes device
    ``LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device_type = torch.device(device).type
    if device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"--device: expected a device that exists here, got {device!r} (torch.cuda.is_available() is False)"
        )
    initialized = dist.is_available() and dist.is_initialized()
    under_torchrun = "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ
    wanted = world_size > 1 or (fsdp and under_torchrun)
    if fsdp and not (initialized or wanted):
        raise ValueError(
            "--fsdp: expected a distributed run (launch with torchrun), got a single process without WORLD_SIZE"
        )
    if device_type == "cuda" and (initialized or wanted) and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))
    owns = False
    if not initialized and wanted:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo", init_method="env://")
        owns = True
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
    else:
        rank, world_size = 0, 1
    torch_device = torch.device(device)
    if device_type == "cuda" and torch_device.index is None:
        torch_device = torch.device("cuda", torch.cuda.current_device())  # LOCAL_RANK when distributed
    return Distributed(rank, world_size, torch_device, owns)


def apply_fsdp(classifier: VideoClassifier, *, param_dtype: torch.dtype | None) -> list[nn.Parameter]:
    """Shard ``classifier`` with FSDP2: one unit per vision and text block, the rest at the
    root. Returns the parameters left replicated (the scalar ``logit_scale``, which
    ``fully_shard`` cannot shard), whose gradients :func:`sync_replicated_grads` averages."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if param_dtype is not None:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    model = classifier.model
    for block in [*model.visual.transformer.resblocks, *model.transformer.resblocks]:
        fully_shard(block, **kwargs)
    replicated = [p for p in model.parameters() if p.dim() == 0]
    fully_shard(classifier, ignored_params=set(replicated), **kwargs)
    return replicated


def sync_replicated_grads(params: Sequence[torch.Tensor], world_size: int) -> None:
    """Average the gradients of ``params`` over the process group (for parameters that no
    wrapper reduces)."""
    if world_size == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world_size)


@contextlib.contextmanager
def _gradient_sync(classifier: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of DDP / reduce-scatter of FSDP2 while ``enabled`` is False
    (accumulation micro-batches before the last)."""
    if enabled:
        yield
    elif isinstance(classifier, nn.parallel.DistributedDataParallel):
        with classifier.no_sync():
            yield
    elif hasattr(classifier, "set_requires_gradient_sync"):  # FSDP2
        classifier.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            classifier.set_requires_gradient_sync(True)
    else:
        yield


# -- training ---------------------------------------------------------------------------------


def train_step(
    classifier: nn.Module,
    optimizer: torch.optim.Optimizer,
    video: torch.Tensor,
    target: torch.Tensor,
    *,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    scaler: torch.amp.GradScaler | None = None,
    autocast_dtype: torch.dtype | None = None,
    label_smoothing: float = 0.0,
    accumulation_steps: int = 1,
    replicated: Sequence[torch.Tensor] = (),
    world_size: int = 1,
) -> float:
    """One optimizer step on one batch; returns this process's mean loss.

    Args:
        classifier: a :class:`VideoClassifier`, possibly wrapped by DDP or FSDP2, in train mode.
        video: ``(b, T, 3, S, S)`` on the classifier's device.
        target: ``(b,)`` class indices, or ``(b, K)`` class probabilities (mixup).
        scheduler: stepped once after the optimizer.
        scaler: a GradScaler for fp16 autocast.
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype (None: off).
        label_smoothing: as :func:`torch.nn.functional.cross_entropy`.
        accumulation_steps: split the batch into this many equal micro-batches, one backward
            each, gradients synchronised only after the last (``b`` must be a multiple).
        replicated: parameters whose gradients no wrapper averages (see :func:`apply_fsdp`).
        world_size: processes in the group, for ``replicated``.

    The loss is the mean over the batch of cross-entropy of each video's logits against all
    class prompts; DDP/FSDP average gradients over processes, so equal per-process batches give
    the gradient of the mean over the global batch.
    """
    batch = video.shape[0]
    if accumulation_steps < 1 or batch % accumulation_steps:
        raise ValueError(
            f"accumulation_steps: expected a divisor of the batch size {batch}, got {accumulation_steps}"
        )
    optimizer.zero_grad(set_to_none=True)
    device_type = video.device.type
    total = torch.zeros((), dtype=torch.float64, device=video.device)
    chunks = zip(video.chunk(accumulation_steps), target.chunk(accumulation_steps))
    for index, (video_part, target_part) in enumerate(chunks):
        with _gradient_sync(classifier, index == accumulation_steps - 1):
            with torch.autocast(device_type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
                logits = classifier(video_part)
            # The loss in at least float32 (autocast logits are bf16/fp16; float64 stays).
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits, target_part, label_smoothing=label_smoothing) / accumulation_steps
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    sync_replicated_grads(replicated, world_size)
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return float(total)


# -- command line -----------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface (``--help``)."""
    parser = argparse.ArgumentParser(
        prog="finetune.py",
        description="Fine-tune X-CLIP on root/<class_name>/<videos> with the official recipe; "
        "runs as is under torchrun.",
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="root/<class_name>/<video files>; labels = folder names, _ -> space")
    data.add_argument("--synthetic", type=int, metavar="N", help="instead of --data: N random clips (smoke tests)")
    data.add_argument("--synthetic-classes", type=int, default=4, metavar="K", help="classes of --synthetic (%(default)s)")
    data.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank (%(default)s)")

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
    """Refuse bad arguments before any work, naming the flag, the expectation and the value."""
    if (args.data is None) == (args.synthetic is None):
        got = "both" if args.data is not None else "neither"
        raise ValueError(f"--data / --synthetic: expected exactly one of --data DIR or --synthetic N, got {got}")
    positive = dict(
        synthetic=args.synthetic, synthetic_classes=args.synthetic_classes, epochs=args.epochs,
        batch_size=args.batch_size, accumulation_steps=args.accumulation_steps, max_steps=args.max_steps,
        num_frames=args.num_frames, log_every=args.log_every,
    )
    for name, value in positive.items():
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 1, got {value}")
    if args.synthetic is not None and args.synthetic_classes < 2:
        raise ValueError(f"--synthetic-classes: expected at least 2 classes, got {args.synthetic_classes}")
    for name in ("workers", "save_every"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')}: expected an integer >= 0, got {getattr(args, name)}")
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


def load_model(args: argparse.Namespace) -> XCLIP:
    """The starting model of ``--model`` at ``--num-frames``, on the CPU, in float32."""
    if args.model in xclip.VARIANTS:
        return xclip.build_model(args.model, num_frames=args.num_frames)
    return xclip.load_checkpoint(args.model, num_frames=args.num_frames, interpolate_frames=args.num_frames is not None)


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


@dataclasses.dataclass
class FinetuneResult:
    """What :func:`main` returns: the trained ``model`` (sharded under FSDP), the global
    mean loss of every step, ``steps`` taken, throughput in clips/s over all processes
    (steps after the first), the class ``labels`` and the final checkpoint (or None)."""

    model: XCLIP
    losses: list[float]
    steps: int
    clips_per_s: float
    labels: list[str]
    checkpoint: Path | None


def main(argv: Sequence[str] | None = None, *, load_clip: ClipLoader | None = None) -> FinetuneResult:
    """Run fine-tuning from command-line arguments (see ``--help``).

    Args:
        argv: the arguments (default ``sys.argv[1:]``).
        load_clip: ``path -> (T, 3, S, S)`` float clip for ``--data`` (default
            :func:`default_clip_loader`, i.e. :func:`xclip.video.load_clip`).

    Bad arguments raise ``ValueError`` / ``FileNotFoundError`` naming the flag. Under torchrun
    every process runs this; only rank 0 logs and saves. The process group is destroyed at the
    end if this call created it.
    """
    args = build_parser().parse_args(argv)
    check_args(args)
    run = setup_distributed(args.device, fsdp=args.fsdp)
    try:
        return _train(args, run, load_clip)
    finally:
        if run.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _no_loader(path: str) -> torch.Tensor:
    raise RuntimeError("VideoFolder.load_clip was not set")


def _log(run: Distributed, message: str) -> None:
    if run.is_main:
        print(message, flush=True)


def _train(args: argparse.Namespace, run: Distributed, load_clip: ClipLoader | None) -> FinetuneResult:
    # The folder is checked before the (possibly large) model is read; the clip loader, which
    # needs the model's T and S, is set after.
    folder = VideoFolder(args.data, _no_loader, argument="--data") if args.data is not None else None
    torch.manual_seed(args.seed)  # the same random initial weights on every rank
    model = load_model(args).to(getattr(torch, args.dtype))
    config = model.config
    if args.backend is not None:
        try:
            model.set_attention_backend(args.backend)
        except ValueError as exc:
            raise ValueError(f"--backend: {exc}") from exc
    if folder is not None:
        folder.load_clip = load_clip if load_clip is not None else default_clip_loader(config.num_frames, config.image_size)
        dataset: VideoFolder | SyntheticVideos = folder
    else:
        dataset = SyntheticVideos(
            args.synthetic, args.synthetic_classes, config.num_frames, config.image_size, seed=args.seed
        )
    per_step = args.batch_size * run.world_size
    if len(dataset) < per_step:
        raise ValueError(
            f"--batch-size: expected at most {len(dataset) // run.world_size} clips per process "
            f"({len(dataset)} clips over {run.world_size} processes), got {args.batch_size}"
        )
    labels = dataset.labels

    amp = args.amp
    if amp == "auto":
        amp = "bf16" if run.device.type == "cuda" and args.dtype == "float32" else "off"
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
    frozen = freeze_text_tower(model) if args.freeze_text else []
    model.set_gradient_checkpointing(args.grad_checkpointing)
    classifier = VideoClassifier(model, labels, frozen_text=args.freeze_text).to(run.device).train()
    replicated: list[nn.Parameter] = []
    wrapped: nn.Module = classifier
    if args.fsdp:
        replicated = apply_fsdp(classifier, param_dtype=autocast_dtype)
    elif run.world_size > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        wrapped = nn.parallel.DistributedDataParallel(classifier, device_ids=device_ids, broadcast_buffers=False)
    # After sharding: FSDP2 replaces the parameters with sharded ones (same names).
    groups = param_groups(model, lr=args.lr, weight_decay=args.weight_decay, new_lr_scale=args.new_lr_scale)
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.98), eps=1e-8)

    # Equal, disjoint shards; drop_last keeps every batch full, so per-rank means average to
    # the global mean.
    sampler = DistributedSampler(
        dataset, num_replicas=run.world_size, rank=run.rank, shuffle=True, seed=args.seed, drop_last=True
    )
    loader = DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True, num_workers=args.workers,
        pin_memory=run.device.type == "cuda", persistent_workers=args.workers > 0,
    )
    steps_per_epoch = len(loader)
    total_steps = args.epochs * steps_per_epoch
    if args.max_steps is not None:
        total_steps = min(total_steps, args.max_steps)
    warmup_steps = min(int(args.warmup_epochs * steps_per_epoch), total_steps)
    schedule = functools.partial(warmup_cosine, warmup_steps=warmup_steps, total_steps=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler(run.device.type) if amp == "fp16" else None
    rng = random.Random(args.seed + run.rank)
    mixing = args.mixup > 0 or args.cutmix > 0

    output = Path(args.output) if args.output is not None else None
    if output is not None and run.is_main:
        output.mkdir(parents=True, exist_ok=True)
        (output / "labels.txt").write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
    trainable = sum(p.numel() for group in groups for p in group["params"])
    _log(
        run,
        f"fine-tuning {args.model} (T={config.num_frames}, S={config.image_size}) on {len(dataset)} clips, "
        f"{len(labels)} classes; {run.world_size} process(es) on {run.device.type}, "
        f"{'FSDP2' if args.fsdp else 'DDP' if run.world_size > 1 else 'single process'}, amp {amp}, "
        f"{total_steps} steps of {per_step} clips, {trainable / 1e6:.1f}M trainable parameters"
        f"{f' ({len(frozen)} text tensors frozen)' if frozen else ''}"
        + ("" if output is not None else "; no --output: nothing will be saved"),
    )

    losses: list[float] = []
    step = 0
    timed_clips, timed_seconds = 0, 0.0
    checkpoint: Path | None = None
    last = time.perf_counter()
    for epoch in range(args.epochs):
        if step >= total_steps:
            break
        sampler.set_epoch(epoch)
        for video, target in loader:
            if step >= total_steps:
                break
            video = video.to(run.device, non_blocking=True)
            target = target.to(run.device, non_blocking=True)
            lrs = "/".join(f"{lr:.2e}" for lr in sorted({group["lr"] for group in optimizer.param_groups}))
            if mixing:
                video, target = mix_batch(video, target, len(labels), mixup=args.mixup, cutmix=args.cutmix, rng=rng)
            loss = train_step(
                wrapped, optimizer, video, target, scheduler=scheduler, scaler=scaler, autocast_dtype=autocast_dtype,
                label_smoothing=args.label_smoothing, accumulation_steps=args.accumulation_steps,
                replicated=replicated, world_size=run.world_size,
            )
            loss_t = torch.tensor([loss], dtype=torch.float64, device=run.device)
            if run.world_size > 1:
                dist.all_reduce(loss_t)
            losses.append(float(loss_t) / run.world_size)  # .item() waits for the step to finish
            now = time.perf_counter()
            elapsed, last = now - last, now  # the whole step, waiting for data included
            step += 1
            if step > 1:
                timed_clips += per_step
                timed_seconds += elapsed
            if run.is_main and (step % args.log_every == 0 or step == 1 or step == total_steps):
                memory = ""
                if run.device.type == "cuda":
                    memory = f" mem {torch.cuda.max_memory_allocated(run.device) / 2**30:.1f}GiB"
                rate = per_step / elapsed
                _log(
                    run,
                    f"epoch {epoch + 1} step {step}/{total_steps} loss {losses[-1]:.4f} lr {lrs} "
                    f"{rate:.1f} clips/s{memory} [{datetime.datetime.now():%H:%M:%S}]",
                )
        last_epoch = step >= total_steps or epoch == args.epochs - 1  # saved as final.safetensors
        if output is not None and args.save_every and (epoch + 1) % args.save_every == 0 and not last_epoch:
            save_checkpoint(model, output / f"epoch{epoch + 1}.safetensors", run, fsdp=args.fsdp)
            last = time.perf_counter()  # saving is not training time
    if output is not None:
        checkpoint = output / "final.safetensors"
        save_checkpoint(model, checkpoint, run, fsdp=args.fsdp)
        _log(run, f"saved {checkpoint} (labels in {output / 'labels.txt'})")
    clips_per_s = timed_clips / timed_seconds if timed_seconds > 0 else float("nan")
    if step > 1:
        _log(run, f"done: {step} steps, {clips_per_s:.1f} clips/s after the first step")
    return FinetuneResult(model, losses, step, clips_per_s, list(labels), checkpoint if run.is_main else None)


if __name__ == "__main__":
    main(sys.argv[1:])
