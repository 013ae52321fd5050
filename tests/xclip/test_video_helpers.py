"""The test helper :func:`video_helpers.write_video` refuses frames it cannot encode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from video_helpers import write_video

pytest.importorskip("av")


def test_write_video_refuses_bad_frames(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"frames: expected uint8 \(N >= 1, H, W, 3\)"):
        write_video(tmp_path / "x.mp4", torch.zeros(2, 3, 8, 8, dtype=torch.uint8))
