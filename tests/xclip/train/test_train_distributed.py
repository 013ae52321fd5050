"""xclip.train.distributed: two gloo processes under torchrun (DDP and FSDP2) reproduce one
process on the same global batch: losses, gradients and rank 0's checkpoint."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from xclip.train import main
from train_helpers import PLAIN, REPO_ROOT, TEXT_PREFIXES, TORCHRUN_VARIABLES


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 4 clips, 2 steps (2 epochs, reshuffled): one process takes all 4 per step, each of two
# processes 2 of them. DDP/FSDP average per-process mean gradients: equal to the gradient of the
# global mean loss, so losses and gradients must agree up to summation order. In float64, where
# that is ~1e-15 (in float32 the text tower's gradients, sums of cancelling terms, move by ~1e-5
# of their size with the batch split, and would hide a small error).
# name -> (arguments of the two-process run, of the one-process run). "accumulate": two
# micro-batches per step, gradient sync skipped on the first. With the text tower trained,
# FSDP also averages the replicated scalar logit_scale's gradient by hand.
TWO_PROCESS_RUNS = {
    "ddp-accumulate": (["--accumulation-steps", "2"], []),
    "fsdp-accumulate-checkpointing": (
        ["--fsdp", "--accumulation-steps", "2", "--grad-checkpointing"], ["--grad-checkpointing"]
    ),
    "fsdp-frozen-text": (["--fsdp", "--freeze-text"], ["--freeze-text"]),
}


def _common_argv(checkpoint: Path) -> list[str]:
    return ["--model", str(checkpoint), "--synthetic", "4", "--synthetic-classes", "3", "--max-steps", "2",
            "--lr", "1e-4", "--dtype", "float64", *PLAIN]


@pytest.fixture(scope="module")
def two_process_runs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """Every run of TWO_PROCESS_RUNS in one ``torchrun --nproc-per-node 2`` launch on gloo:
    name -> (gathered parameters, gradients and losses; output folder)."""
    root = tmp_path_factory.mktemp("two-processes")
    runs = [
        dict(argv=[*_common_argv(tiny_checkpoint), "--batch-size", "2", "--output", str(root / name), *extra],
             out=str(root / f"{name}.pt"))
        for name, (extra, _) in TWO_PROCESS_RUNS.items()
    ]
    (root / "runs.json").write_text(json.dumps(runs))
    pythonpath = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    for key in TORCHRUN_VARIABLES:
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), str(Path(__file__).with_name("finetune_worker.py")),
        str(root / "runs.json"),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("fine-tuning") == len(runs) and proc.stdout.count("step 2/2") == len(runs)  # rank 0 alone
    return {name: (torch.load(root / f"{name}.pt"), root / name) for name in TWO_PROCESS_RUNS}


@pytest.mark.parametrize("name", list(TWO_PROCESS_RUNS))
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(
    name: str, two_process_runs: dict[str, tuple[dict, Path]], tiny_checkpoint: Path
) -> None:
    two, output = two_process_runs[name]
    extra, single_extra = TWO_PROCESS_RUNS[name]
    assert two["world"] == 2 and two["steps"] == 2
    one = main([*_common_argv(tiny_checkpoint), "--batch-size", "4", *single_extra])
    assert one.steps == 2
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one.losses), rtol=1e-12, atol=0)
    scale = max(float(p.grad.abs().max()) for p in one.model.parameters() if p.grad is not None)
    compared = 0
    for param_name, p in one.model.named_parameters():
        got = two["grads"][param_name]
        if p.grad is None:
            assert got is None and "--freeze-text" in extra and param_name.startswith(TEXT_PREFIXES), param_name
            continue
        want = p.grad.detach()
        assert want.dtype == got.dtype == torch.float64 and float(want.abs().max()) > 0, param_name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * scale, msg=param_name)
        compared += 1
    assert compared >= 40
    # Rank 0's checkpoint holds the gathered parameters (FSDP: every shard), bit for bit.
    saved = safetensors.torch.load_file(output / "final.safetensors")
    assert set(saved) == set(two["params"])
    for param_name, value in two["params"].items():
        assert torch.equal(saved[param_name], value), param_name

