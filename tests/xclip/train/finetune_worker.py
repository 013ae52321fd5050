"""One rank of a torchrun launch for tests/xclip/train/test_train_distributed.py (not a test module).

    torchrun --nproc-per-node 2 tests/xclip/train/finetune_worker.py RUNS.json

``RUNS.json`` lists runs, ``[{"argv": [...xclip.train arguments], "out": "x.pt"}, ...]``, done
one after another in this one launch (starting processes is most of the cost). The worker
joins the gloo group itself, so ``xclip.train.main`` runs on the existing group and leaves it
up; after each run it gathers every parameter and gradient in full (FSDP2 shards them) and
rank 0 writes them, with the per-step losses, to ``out``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

import xclip.train


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    dist.init_process_group("gloo")
    try:
        for run in runs:
            result = xclip.train.main(run["argv"])
            params, grads = {}, {}
            for name, p in result.model.named_parameters():  # collective under FSDP: every rank
                params[name] = _full(p)
                grads[name] = _full(p.grad)
            if dist.get_rank() == 0:
                record = dict(
                    params=params, grads=grads, losses=result.losses, steps=result.steps, world=dist.get_world_size()
                )
                torch.save(record, run["out"])
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
