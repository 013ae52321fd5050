"""xclip.train.data: mixup / CutMix targets, the video folder (classes, labels, samples,
training from it), its check of what the clip loader returns, and files it cannot load
(skipped and counted, or with --strict-data an error naming the file)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from xclip import video as xv
from xclip.train import main
from xclip.train.data import SkippedFiles, VideoFolder, mix_batch
from xclip.video import VideoError
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



# -- files that cannot be loaded -------------------------------------------------------------


def _loader_failing_on(*names: str):
    """``_fake_loader``, except that files named in ``names`` raise as a broken video would."""

    def load(path: str) -> torch.Tensor:
        if Path(path).name in names:
            raise VideoError(f"path: {path} is not a video file that FFmpeg can read (Invalid data)")
        return _fake_loader(path)

    return load


def _tree_with_four(root: Path) -> Path:
    """``video_tree`` plus d.mp4 in the second class: a.mp4, b.MKV | c.avi, d.mp4."""
    video_tree(root)
    (root / "surfing__water" / "d.mp4").write_bytes(b"")
    return root


def test_video_folder_skips_a_bad_file_for_the_next_and_records_it(tmp_path: Path, capsys) -> None:
    root = _tree_with_four(tmp_path / "videos")
    skipped = SkippedFiles()
    data = VideoFolder(root, _loader_failing_on("b.MKV"), argument="--data", skipped=skipped)
    clip, label = data[1]  # b.MKV is bad: c.avi's item instead
    c = str(root / "surfing__water" / "c.avi")
    assert label == 1 and torch.equal(clip, _fake_loader(c))
    b = str(root / "playing_violin" / "b.MKV")
    assert list(skipped.items()) == [b] and "VideoError: path:" in skipped.items()[b]
    assert capsys.readouterr().err == f"warning: --data: skipping {b}: {skipped.items()[b]}\n"
    data.load_clip = lambda path: pytest.fail(f"{path} was loaded again")  # a known bad file is not retried
    with pytest.raises(BaseException, match="c.avi was loaded again"):
        data[1]
    assert capsys.readouterr().err == ""  # warned once

    every = VideoFolder(root, _loader_failing_on("a.mp4", "b.MKV", "c.avi", "d.mp4"), skipped=SkippedFiles())
    with pytest.raises(RuntimeError, match=r"root: none of the 4 video files could be loaded \(e.g. .*c\.avi: VideoError"):
        every[2]


def test_video_folder_without_a_record_raises_naming_the_file(tmp_path: Path) -> None:
    root = _tree_with_four(tmp_path / "videos")
    data = VideoFolder(root, _loader_failing_on("b.MKV"), argument="--data")
    with pytest.raises(RuntimeError, match=r"--data: .*b\.MKV could not be loaded \(VideoError: path: .*Invalid data\)"):
        data[1]
    missing = VideoFolder(root, lambda path: xv.require_decoder() or (_ for _ in ()).throw(ImportError("no av")),
                          skipped=SkippedFiles())
    with pytest.raises(ImportError, match="no av"):  # not a bad file: every file would fail alike
        missing[0]


@pytest.mark.parametrize("workers", [0, 1])
def test_training_skips_and_counts_bad_files_and_strict_data_stops(
    tmp_path: Path, tiny_checkpoint: Path, capfd, workers: int
) -> None:
    """One undecodable file in --data used to end the run; now the run trains on the others,
    lists the file at the end and returns it (gathered from the loader's worker process too)."""
    root = _tree_with_four(tmp_path / "videos")
    argv = ["--model", str(tiny_checkpoint), "--data", str(root), "--batch-size", "4", "--epochs", "2",
            *PLAIN, "--workers", str(workers)]
    result = main(argv, load_clip=_loader_failing_on("c.avi"))
    c = str(root / "surfing__water" / "c.avi")
    assert result.steps == 2 and all(math.isfinite(loss) for loss in result.losses)
    assert list(result.skipped) == [c] and "Invalid data" in result.skipped[c]
    out, err = capfd.readouterr()  # file descriptors: the worker process warns too
    assert "skipped 1 of 4 --data files that could not be loaded" in out and f"  {c}: VideoError" in out
    assert err.count(f"warning: --data: skipping {c}") == 1  # warned once, not every epoch

    with pytest.raises(RuntimeError, match=r"--data: .*c\.avi could not be loaded \(VideoError"):
        main([*argv, "--strict-data"], load_clip=_loader_failing_on("c.avi"))
