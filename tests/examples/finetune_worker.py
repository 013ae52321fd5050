"""One rank of a torchrun launch for tests/examples/test_finetune.py (not a test module).

    torchrun --nproc-per-node 2 tests/examples/finetune_worker.py RUNS.json

``RUNS.json`` lists runs, ``[{"argv": [...finetune.py arguments], "out": "x.pt"}, ...]``, done
one after another in this one launch (starting processes is most of the cost). The worker
joins the gloo group itself, so ``finetune.main`` runs on the existing group and leaves it up;
after each run it gathers every parameter and gradient in full (FSDP2 shards them) and rank 0
writes them, with the per-step losses, to ``out``.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

REPO_ROOT = Path(__file__).resolve().parents[2]


def _full(t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if isinstance(t, DTensor):
        t = t.full_tensor()
    return t.detach().cpu().clone()


def main() -> None:
    runs = json.loads(Path(sys.argv[1]).read_text())
    spec = importlib.util.spec_from_file_location("finetune", REPO_ROOT / "examples" / "finetune.py")
    finetune = importlib.util.module_from_spec(spec)
    sys.modules["finetune"] = finetune  # dataclasses look their module up there
    spec.loader.exec_module(finetune)
    dist.init_process_group("gloo")
    try:
        for run in runs:
            result = finetune.main(run["argv"])
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
