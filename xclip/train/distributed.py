"""Running on several processes: joining torchrun's process group, wrapping the model with
DDP or FSDP2, and the gradient and loss reductions that the wrappers do not do.

FSDP2 (``torch.distributed.fsdp``) and the distributed checkpoint helpers are imported where
they are used, not here: a single-process run never loads them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .classifier import VideoClassifier


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
        """Rank 0: the process that logs and saves."""
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
    ``LOCAL_RANK``. ``device`` is ``--device`` (None: cuda if available, else cpu).

    Raises:
        ValueError: ``--device`` names CUDA on a machine without it; ``--fsdp`` in a single
            process outside torchrun; a torchrun variable that is not an integer.
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


def teardown_distributed(run: Distributed) -> None:
    """Destroy the process group if :func:`setup_distributed` created it (a group made by the
    caller stays up for the caller)."""
    if run.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def apply_fsdp(classifier: VideoClassifier, *, param_dtype: torch.dtype | None) -> list[nn.Parameter]:
    """Shard ``classifier`` with FSDP2: one unit per vision and text block, the rest at the
    root. Returns the parameters left replicated (the scalar ``logit_scale``, which
    ``fully_shard`` cannot shard), whose gradients :func:`sync_replicated_grads` averages.

    ``param_dtype`` (the autocast dtype, or None) is the dtype FSDP2 gathers parameters in;
    gradients are still reduced in float32.
    """
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


def wrap_for_training(
    classifier: VideoClassifier, run: Distributed, *, fsdp: bool, param_dtype: torch.dtype | None
) -> tuple[nn.Module, list[nn.Parameter]]:
    """The module a training step calls, and the parameters no wrapper averages.

    ``fsdp``: ``classifier`` itself, sharded in place by :func:`apply_fsdp` (its parameters
    become sharded ones of the same names). Several processes without ``fsdp``:
    DistributedDataParallel around it. One process: ``classifier`` unchanged.
    """
    if fsdp:
        return classifier, apply_fsdp(classifier, param_dtype=param_dtype)
    if run.world_size > 1:
        device_ids = [run.device.index] if run.device.type == "cuda" else None
        # The only buffer is the prompt tokens, the same on every rank: nothing to broadcast.
        return nn.parallel.DistributedDataParallel(classifier, device_ids=device_ids, broadcast_buffers=False), []
    return classifier, []


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
def gradient_sync(classifier: nn.Module, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce of DDP / reduce-scatter of FSDP2 while ``enabled`` is False
    (accumulation micro-batches before the last); a plain module is left alone."""
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


def mean_over_processes(value: float, run: Distributed) -> float:
    """The mean of ``value`` over all processes (a collective: every rank must call it).

    Summed in float64, then divided, so one process returns ``value`` exactly. Reading the
    result waits for the device, i.e. for the step that produced ``value`` to finish.
    """
    total = torch.tensor([value], dtype=torch.float64, device=run.device)
    if run.world_size > 1:
        dist.all_reduce(total)
    return float(total) / run.world_size
