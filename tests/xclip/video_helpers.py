"""Shared helpers of the xclip tests that need video files: :func:`write_video` encodes
synthetic frames with PyAV.

Imported as ``from video_helpers import write_video`` (pytest puts this folder on
``sys.path``, as for tests/xclip_kernels/xk_helpers.py). PyAV is imported only when a video is
written, so a test module can import this before its ``pytest.importorskip("av")``.
"""

from __future__ import annotations

import os

import torch

from xclip_kernels import checks


def write_video(
    path: str | os.PathLike,
    frames: torch.Tensor,
    *,
    fps: int = 10,
    codec: str = "mpeg4",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
) -> None:
    """Encode RGB frames into a video file with PyAV (small synthetic clips).

    Args:
        frames: uint8 ``(N, H, W, 3)`` RGB (numpy arrays work too).
        codec: an FFmpeg encoder in the PyAV wheel, e.g. "mpeg4", "libx264", "libx264rgb"
            (with ``pix_fmt="rgb24"`` and ``options={"crf": "0"}``: lossless RGB).
        pix_fmt: the stream's pixel format; 4:2:0 formats need even H and W.
        options: encoder options (strings).
    """
    import av

    frames = torch.as_tensor(frames)
    if frames.dtype != torch.uint8 or frames.dim() != 4 or frames.shape[-1] != 3 or frames.shape[0] < 1:
        raise ValueError(f"frames: expected uint8 (N >= 1, H, W, 3) RGB, got {frames.dtype} {tuple(frames.shape)}")
    checks.integer("fps", fps)
    with av.open(os.fspath(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = int(frames.shape[1]), int(frames.shape[2])
        stream.pix_fmt = pix_fmt
        if options:
            stream.options = dict(options)
        for image in frames.numpy():
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():  # flush the encoder's delayed frames
            container.mux(packet)
