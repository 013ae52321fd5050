"""Fine-tune X-CLIP on a folder of labelled videos with the official recipe.

    python -m xclip.train --model k400_16_8.pth --data videos/ --output runs/ft
    torchrun --nproc-per-node 8 -m xclip.train --model k400_16_8.pth --data videos/ --output runs/ft
    torchrun --nproc-per-node 8 -m xclip.train --model xclip-l14 --fsdp --grad-checkpointing ...

or from Python, ``xclip.train.main(["--model", ..., "--data", ...])`` (returns a
:class:`FinetuneResult`); ``examples/finetune.py`` is the same run as a script. ``import xclip``
does not import this package.

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

Modules, by job:

- :mod:`xclip.train.data`: the video folder (skipping files it cannot load), synthetic clips, mixup / CutMix,
  the sharded loader;
- :mod:`xclip.train.classifier`: the module a step trains (X-CLIP with its class prompts);
- :mod:`xclip.train.recipe`: parameter groups, text freezing, the schedule, one step;
- :mod:`xclip.train.distributed`: the process group, DDP / FSDP2 wrapping, gradient and loss sync;
- :mod:`xclip.train.cli`: the flags and their checks;
- :mod:`xclip.train.finetune`: the run (:func:`main`): building, the epoch loop, logging, checkpoints.
"""

from .cli import build_parser, check_args, parse_args
from .data import (
    VIDEO_EXTENSIONS,
    ClipLoader,
    SkippedFiles,
    SyntheticVideos,
    VideoFolder,
    default_clip_loader,
    label_text,
    mix_batch,
    sharded_loader,
)
from .distributed import (
    Distributed,
    apply_fsdp,
    gradient_sync,
    setup_distributed,
    sync_replicated_grads,
    teardown_distributed,
    wrap_for_training,
)
from .classifier import VideoClassifier
from .finetune import FinetuneResult, load_model, main, save_checkpoint, train
from .recipe import (
    NEW_MODULE_MARKERS,
    TEXT_TOWER_PREFIXES,
    build_optimizer,
    freeze_text_tower,
    is_new_parameter,
    is_no_decay,
    param_groups,
    train_step,
    warmup_cosine,
    warmup_cosine_scheduler,
)

__all__ = [
    "NEW_MODULE_MARKERS",
    "TEXT_TOWER_PREFIXES",
    "VIDEO_EXTENSIONS",
    "ClipLoader",
    "Distributed",
    "FinetuneResult",
    "SkippedFiles",
    "SyntheticVideos",
    "VideoClassifier",
    "VideoFolder",
    "apply_fsdp",
    "build_optimizer",
    "build_parser",
    "check_args",
    "default_clip_loader",
    "freeze_text_tower",
    "gradient_sync",
    "is_new_parameter",
    "is_no_decay",
    "label_text",
    "load_model",
    "main",
    "mix_batch",
    "param_groups",
    "parse_args",
    "save_checkpoint",
    "setup_distributed",
    "sharded_loader",
    "sync_replicated_grads",
    "teardown_distributed",
    "train",
    "train_step",
    "warmup_cosine",
    "warmup_cosine_scheduler",
    "wrap_for_training",
]
