"""xclip.train.data: mixup / CutMix targets, the video folder (classes, labels, samples,
training from it) and its check of what the clip loader returns."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from xclip.train import main
from xclip.train.data import VideoFolder, mix_batch
from train_helpers import PLAIN, TINY, video_tree


def test_mixup_and_cutmix_targets_follow_the_pixels() -> None:
    video = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 2, 3, 16, 16).contiguous()
    target = torch.tensor([0, 1, 2, 3])
    mixed, soft = mix_batch(video, target, 5, mixup=0.8, cutmix=0.0, rng=random.Random(0))
    lam = float(soft[0, 0])
    torch.testing.assert_close(mixed, lam * video + (1 - lam) * video.flip(0))
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))
    mixed, soft = mix_batch(video, target, 5, mixup=0.0, cutmix=1.0, rng=random.Random(1))
    kept = float((mixed[0] == 0).float().mean())  # pixels of video 0 still its own
    assert soft[0, 0] == pytest.approx(kept) and soft[0, 3] == pytest.approx(1 - kept)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))


def _fake_loader(path: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(path.encode()))
    return torch.randn(TINY.num_frames, 3, TINY.image_size, TINY.image_size, generator=g)


def test_video_folder_classes_labels_and_training_from_it(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = video_tree(tmp_path / "videos")
    data = VideoFolder(root, _fake_loader)
    assert data.classes == ["playing_violin", "surfing__water"]
    assert data.labels == ["playing violin", "surfing water"]
    assert [(Path(p).name, k) for p, k in data.samples] == [("a.mp4", 0), ("b.MKV", 0), ("c.avi", 1)]
    clip, label = data[2]
    assert label == 1 and torch.equal(clip, _fake_loader(str(root / "surfing__water" / "c.avi")))
    result = main(
        ["--model", str(tiny_checkpoint), "--data", str(root), "--batch-size", "2", "--max-steps", "1", *PLAIN],
        load_clip=_fake_loader,
    )
    assert result.steps == 1 and result.labels == ["playing violin", "surfing water"]


def test_video_folder_checks_what_load_clip_returns(tmp_path: Path) -> None:
    data = VideoFolder(video_tree(tmp_path / "v"), lambda path: torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match=r"load_clip: expected a float tensor \(T, 3, S, S\).*a\.mp4.*\(2, 32, 32\)"):
        data[0]

