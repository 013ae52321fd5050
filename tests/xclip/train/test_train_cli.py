"""xclip.train.cli and the entry points: refusals of bad arguments (naming the flag), ``--help``,
``examples/finetune.py`` and ``python -m xclip.train`` as scripts, and ``import xclip``
leaving the training package alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from xclip.train import main
from xclip.train.cli import build_parser
from train_helpers import PLAIN, REPO_ROOT, TORCHRUN_VARIABLES, video_tree


def _bad_trees(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty").mkdir()
    one = tmp_path / "one"
    (one / "only_class").mkdir(parents=True)
    (one / "only_class" / "x.mp4").write_bytes(b"")
    hollow = video_tree(tmp_path / "hollow")
    (hollow / "no_videos_here").mkdir()
    (hollow / "no_videos_here" / "readme.txt").write_bytes(b"")
    (tmp_path / "file.mp4").write_bytes(b"")
    return dict(missing=tmp_path / "nope", empty=tmp_path / "empty", one=one, hollow=hollow, file=tmp_path / "file.mp4")


@pytest.mark.parametrize(
    "argv, error, match",
    [
        (["--data", "{missing}"], FileNotFoundError, r"--data: expected a folder of class folders .*nope.*does not exist"),
        (["--data", "{file}"], NotADirectoryError, r"--data: .*file\.mp4.*not a folder"),
        (["--data", "{empty}"], ValueError, r"--data: expected at least 2 class folders .*got 0"),
        (["--data", "{one}"], ValueError, r"--data: expected at least 2 class folders .*got 1 \('only_class'\)"),
        (["--data", "{hollow}"], ValueError, r"--data: class folder .*no_videos_here.* has no video files"),
        ([], ValueError, r"--data / --synthetic: expected exactly one .* got neither"),
        (["--data", "{empty}", "--synthetic", "4"], ValueError, r"--data / --synthetic: .* got both"),
        (["--synthetic", "0"], ValueError, r"--synthetic: expected an int >= 1, got 0"),
        (["--synthetic", "4", "--synthetic-classes", "1"], ValueError, r"--synthetic-classes: expected at least 2"),
        (["--synthetic", "4", "--batch-size", "3", "--accumulation-steps", "2"], ValueError,
         r"--accumulation-steps: expected a divisor of --batch-size 3, got 2"),
        (["--synthetic", "4", "--lr", "-1"], ValueError, r"--lr: expected a positive number, got -1"),
        (["--synthetic", "4", "--weight-decay", "nan"], ValueError, r"--weight-decay: expected a number >= 0, got nan"),
        (["--synthetic", "4", "--label-smoothing", "1"], ValueError,
         r"--label-smoothing: expected a number in \[0, 1\), got 1"),
        (["--synthetic", "4", "--model", "xclip-b8"], FileNotFoundError,
         r"--model: expected a checkpoint path or one of xclip-b32.*'xclip-b8'"),
        (["--synthetic", "4", "--fsdp"], ValueError, r"--fsdp: expected a distributed run \(launch with torchrun\)"),
        (["--synthetic", "4", "--fsdp", "--amp", "fp16"], ValueError, r"--amp: .*expected bf16 or off, got fp16"),
        (["--synthetic", "4", "--output", "{file}"], NotADirectoryError, r"--output: expected a folder.*file\.mp4"),
        (["--synthetic", "3", "--model", "{ckpt}", "--batch-size", "4"], ValueError,
         r"--batch-size: expected at most 3 clips per process \(3 clips over 1 processes\), got 4"),
        (["--synthetic", "4", "--model", "{ckpt}", "--backend", "nope"], ValueError, r"--backend: .*nope"),
    ],
)
def test_bad_arguments_name_the_flag(
    argv: list[str], error: type, match: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in TORCHRUN_VARIABLES:
        monkeypatch.delenv(key, raising=False)
    paths = {k: str(v) for k, v in _bad_trees(tmp_path).items()}
    paths["ckpt"] = str(tiny_checkpoint)
    argv = [a.format(**paths) for a in argv]
    with pytest.raises(error, match=match):
        main([*argv, "--workers", "0", "--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CUDA device on a machine without one")
def test_missing_cuda_device_names_the_flag() -> None:
    with pytest.raises(ValueError, match=r"--device: expected a device that exists here, got 'cuda'"):
        main(["--synthetic", "4", "--device", "cuda"])


def test_help_lists_the_flags() -> None:
    text = build_parser().format_help()
    for flag in ("--data", "--synthetic", "--freeze-text", "--grad-checkpointing", "--fsdp", "--amp", "--lr",
                 "--new-lr-scale", "--weight-decay", "--warmup-epochs", "--accumulation-steps", "--output"):
        assert flag in text, flag


# -- the entry points --------------------------------------------------------------------------


def _script_env() -> dict[str, str]:
    """A single process of this repository's code: the repository first on the path, no
    torchrun variables, one thread (as the runs in this process) and 80-column help."""
    pythonpath = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1", COLUMNS="80")
    for key in TORCHRUN_VARIABLES:
        env.pop(key, None)
    return env


def test_examples_driver_runs_the_library_run(tiny_checkpoint: Path, tmp_path: Path) -> None:
    # examples/finetune.py as users run it, against xclip.train.main in this process: the same
    # labels and the same trained weights, bit for bit (same code, same single thread).
    argv = ["--model", str(tiny_checkpoint), "--synthetic", "4", "--batch-size", "2", "--max-steps", "2",
            "--lr", "1e-3", *PLAIN]
    command = [sys.executable, str(REPO_ROOT / "examples" / "finetune.py"), *argv, "--output", str(tmp_path / "script")]
    proc = subprocess.run(command, env=_script_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.startswith("fine-tuning ") and "step 2/2" in proc.stdout, proc.stdout
    assert f"saved {tmp_path / 'script' / 'final.safetensors'}" in proc.stdout, proc.stdout
    here = main([*argv, "--output", str(tmp_path / "here")])
    labels = (tmp_path / "script" / "labels.txt").read_text()
    assert labels == (tmp_path / "here" / "labels.txt").read_text() == "class 0\nclass 1\nclass 2\nclass 3\n"
    script_state = safetensors.torch.load_file(tmp_path / "script" / "final.safetensors")
    here_state = safetensors.torch.load_file(here.checkpoint)
    start = safetensors.torch.load_file(tiny_checkpoint)
    assert set(script_state) == set(here_state) == set(start)
    for name, value in here_state.items():
        assert torch.equal(script_state[name], value), name
    assert not torch.equal(script_state["visual.conv1.weight"], start["visual.conv1.weight"])


def test_python_m_xclip_train_has_the_same_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "xclip.train", "--help"], env=_script_env(), capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    monkeypatch.setenv("COLUMNS", "80")
    assert proc.stdout == build_parser("python -m xclip.train").format_help()
    assert build_parser().format_help().startswith("usage: finetune.py ")


def test_import_xclip_leaves_the_training_package_alone() -> None:
    # `import xclip` (inference) must not pay for training; `import xclip.train` must not load
    # FSDP2 or distributed checkpointing, which only their runs use.
    heavy = ("xclip.train", "torch.distributed.fsdp", "torch.distributed.checkpoint", "torch.distributed.tensor")
    code = (
        "import sys\n"
        f"heavy = {heavy!r}\n"
        "import xclip\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
        "import xclip.train\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy[1:])))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == ["[]", "[]"]
