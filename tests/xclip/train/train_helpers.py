"""Shared pieces of the xclip.train tests (imported as ``from train_helpers import ...``, as
tests/xclip_kernels does with xk_helpers; fixtures are in conftest.py beside this file)."""

from __future__ import annotations

from pathlib import Path

import torch

import xclip

REPO_ROOT = Path(__file__).resolve().parents[3]

TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=1, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=2, mit_heads=1, prompt_heads=1,
)
TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale")
# Deterministic runs: no mixup/cutmix draws, no loader processes.
PLAIN = ["--mixup", "0", "--cutmix", "0", "--workers", "0", "--device", "cpu", "--seed", "7"]
# torchrun's variables: a test that runs one process in this one removes them, so that a
# launcher around pytest cannot make it distributed.
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tiny_model(seed: int = 0) -> xclip.XCLIP:
    torch.manual_seed(seed)
    return xclip.build_model(TINY)


def video_tree(root: Path) -> Path:
    """Two class folders (``playing_violin``: a.mp4, b.MKV; ``surfing__water``: c.avi) of
    empty files, with a hidden file, a non-video and a hidden folder that must be skipped."""
    for rel in ("playing_violin/a.mp4", "playing_violin/b.MKV", "playing_violin/.hidden.mp4",
                "playing_violin/notes.txt", "surfing__water/c.avi", ".cache/d.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root
