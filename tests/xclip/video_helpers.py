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


def write_resolution_change(
    path: str | os.PathLike, segments: list[torch.Tensor], *, codec: str = "libx264rgb", pix_fmt: str = "rgb24",
    options: dict[str, str] | None = None,
) -> None:
    """One MPEG-TS stream whose frame size changes between ``segments`` (each uint8
    ``(N, H, W, 3)`` RGB, sizes free): each is encoded alone, then the transport streams are
    concatenated byte for byte, which is a valid stream with a new sequence header at each
    change (as FFmpeg's concat protocol makes). Lossless RGB H.264 by default (``crf`` 0)."""
    if not str(path).endswith(".ts"):
        raise ValueError(f"path: expected a .ts file (MPEG transport streams concatenate), got {str(path)!r}")
    if options is None and codec == "libx264rgb":
        options = {"crf": "0"}
    data = b""
    for index, frames in enumerate(segments):
        part = f"{os.fspath(path)}.part{index}.ts"
        write_video(part, frames, codec=codec, pix_fmt=pix_fmt, options=options)
        with open(part, "rb") as f:
            data += f.read()
        os.remove(part)
    with open(path, "wb") as f:
        f.write(data)
