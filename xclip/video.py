"""Video files to model input: decoding (PyAV), the official frame sampling, resizing, cropping
and normalisation of the X-CLIP evaluation pipeline.

The official evaluation (``X-CLIP/datasets/build.py`` of microsoft/VideoX) does, per video:

1. **Sampling** (``SampleFrames``, ``test_mode=True``): split the video's ``n`` frames into
   ``T`` equal segments and take the centre frame of each, index ``floor((i + 1/2) * n / T)``.
   A video shorter than ``T`` frames gets repeated frames. :func:`segment_indices`.
2. **Resize** the short side (``Resize(scale=(-1, s))``, bilinear, aspect kept, long side
   rounded half up) to ``s = int(256 / 224 * S)`` for one crop, or to ``S`` for three crops.
3. **Crop** ``S x S``: the centre (``CenterCrop``), or three crops spaced equally along the long
   side (``ThreeCrop``: left/top, centre, right/bottom).
4. **Normalise** RGB values in 0..255 with ``MEAN`` and ``STD`` (ImageNet's, times 255).

Multi-view evaluation averages the softmaxes of ``clips x crops`` views (the paper's
``4 x 3``). The official code draws the extra clips at random offsets inside each segment
(the training sampler); here clip ``k`` of ``K`` takes the frame at fraction ``(k + 1/2) / K``
of every segment, deterministic and evenly spread, which is the centre frame when ``K = 1``.

Differences from the official pipeline, on purpose: the resize is ``torch.nn.functional.
interpolate`` (bilinear) with ``antialias=True`` (the official cv2 resize does not antialias;
without it a large downscale, e.g. 1080p to 256, aliases), and the resized frames stay float
instead of being rounded to uint8. Sampling indices are computed in exact integer arithmetic;
they equal the official float formula for every ``T`` in {1..6, 8, 16, 32, 64} (the released
checkpoints use 8, 16, 32), and differ from it only where its float rounding misses an exact
tie.

Decoding reads the stream once, front to back, and keeps only the sampled frames (already
resized and cropped), so memory does not grow with the video's length. Each frame is resized
and cropped by its own size, so a stream whose resolution changes mid-way (legal in MPEG
streams, e.g. concatenated or adaptive-bitrate ones) gives views like any other. The frame count is the container's
when it declares one; otherwise (or when the stream ends before it) the frames are counted by
decoding. PyAV (``pip install av``) is imported only when a file is decoded.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from xclip_kernels import checks

MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
"""Per-channel RGB mean of the official configs (``img_norm_cfg``), on the 0..255 scale."""
STD: tuple[float, float, float] = (58.395, 57.12, 57.375)
"""Per-channel RGB standard deviation of the official configs, on the 0..255 scale."""

SINGLE_CROP_RESIZE_RATIO = 256 / 224
"""One-crop evaluation resizes the short side to ``int(ratio * S)`` before the centre crop."""

CROP_COUNTS = (1, 3)


class VideoError(ValueError):
    """A file that cannot be used as a video: not decodable, no video stream, too few frames."""


# -- sampling -----------------------------------------------------------------------------------


def segment_indices(num_frames_in_video: int, num_segments: int, clip_index: int = 0, num_clips: int = 1) -> list[int]:
    """Frame indices of one clip by the official segment scheme.

    The video's ``n = num_frames_in_video`` frames are split into ``T = num_segments`` equal
    segments; clip ``k = clip_index`` of ``K = num_clips`` takes, in every segment ``i``, the
    frame at ``floor((i + (k + 1/2) / K) * n / T)``. With ``K = 1`` that is the centre frame of
    each segment (the official test-time sampler). When ``n < T`` frames repeat, as in the
    official sampler.

    Returns:
        ``T`` non-decreasing indices in ``[0, n)``.
    """
    n = checks.integer("num_frames_in_video", num_frames_in_video)
    t = checks.integer("num_segments", num_segments)
    k_count = checks.integer("num_clips", num_clips)
    k = checks.integer("clip_index", clip_index, 0)
    if k >= k_count:
        raise ValueError(f"clip_index: expected 0 <= clip_index < num_clips = {k_count}, got {k}")
    # (i + (2k+1)/(2K)) * n / T, exactly: numerator < 2KT * n, so every index is < n.
    denominator = 2 * k_count * t
    return [((2 * k_count * i + 2 * k + 1) * n) // denominator for i in range(t)]


# -- preprocessing ------------------------------------------------------------------------------


def _check_frames(frames: object, name: str = "frames") -> torch.Tensor:
    if not isinstance(frames, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor (..., 3, H, W), got {type(frames).__name__}")
    if frames.dim() < 3 or frames.shape[-3] != 3:
        raise ValueError(f"{name}: expected shape (..., 3, H, W) with 3 RGB channels, got {tuple(frames.shape)}")
    if frames.dtype != torch.uint8 and not frames.is_floating_point():
        raise TypeError(f"{name}: expected uint8 or floating-point values in 0..255, got dtype {frames.dtype}")
    return frames


def resized_shape(height: int, width: int, short_side: int) -> tuple[int, int]:
    """``(h, w)`` after scaling ``height x width`` so that its short side is ``short_side``;
    the long side is rounded half up (as the official resize)."""
    checks.integer("height", height)
    checks.integer("width", width)
    checks.integer("short_side", short_side)
    if height <= width:
        return short_side, (2 * width * short_side + height) // (2 * height)
    return (2 * height * short_side + width) // (2 * width), short_side


def resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Resize so that the short side is ``size``, keeping the aspect ratio.

    Args:
        frames: ``(..., 3, H, W)`` uint8 or float, values in 0..255.
        size: the new short side.

    Returns:
        float32 ``(..., 3, h, w)`` with ``min(h, w) == size`` (:func:`resized_shape`), bilinear
        with antialiasing, values still in 0..255.
    """
    frames = _check_frames(frames)
    height, width = frames.shape[-2:]
    new_h, new_w = resized_shape(height, width, checks.integer("size", size))
    lead = frames.shape[:-3]
    x = frames.reshape(-1, 3, height, width).to(torch.float32)
    if (new_h, new_w) != (height, width):
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
    return x.reshape(*lead, 3, new_h, new_w)


def crop_boxes(height: int, width: int, size: int, num_crops: int = 1) -> list[tuple[int, int]]:
    """Top-left corners ``(top, left)`` of ``size x size`` crops of a ``height x width`` frame.

    ``num_crops=1``: the centre. ``num_crops=3``: three crops spaced equally along the long
    side (left, centre, right; or top, centre, bottom), which needs the short side to equal
    ``size`` (resize first).
    """
    checks.integer("size", size)
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"num_crops: expected one of {CROP_COUNTS}, got {num_crops!r}")
    if size > height or size > width:
        raise ValueError(f"size: expected a crop no larger than the frame {height}x{width}, got {size}")
    if num_crops == 1:
        return [((height - size) // 2, (width - size) // 2)]
    if min(height, width) != size:
        raise ValueError(
            f"size: three crops need a frame whose short side is the crop size {size}, got {height}x{width}"
        )
    if width >= height:
        step = (width - size) // 2
        return [(0, 0), (0, step), (0, 2 * step)]
    step = (height - size) // 2
    return [(0, 0), (step, 0), (2 * step, 0)]


def spatial_crops(frames: torch.Tensor, size: int, num_crops: int = 1) -> torch.Tensor:
    """``num_crops`` square crops (see :func:`crop_boxes`) of every frame.

    Args:
        frames: ``(..., 3, H, W)``.

    Returns:
        ``(num_crops, ..., 3, size, size)`` (copies).
    """
    frames = _check_frames(frames)
    height, width = frames.shape[-2:]
    boxes = crop_boxes(height, width, size, num_crops)
    return torch.stack([frames[..., top : top + size, left : left + size] for top, left in boxes])


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """``(frames - MEAN) / STD`` per RGB channel; frames ``(..., 3, H, W)`` in 0..255 ->
    float32 of the same shape."""
    return _normalize_(_check_frames(frames).to(torch.float32, copy=True))


def _normalize_(frames: torch.Tensor) -> torch.Tensor:
    """:func:`normalize` in place on a float32 ``(..., 3, H, W)`` tensor (the same two roundings)."""
    mean = torch.tensor(MEAN, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=torch.float32, device=frames.device).view(3, 1, 1)
    return frames.sub_(mean).div_(std)


def resize_for_crops(image_size: int, num_crops: int = 1) -> int:
    """The short side the official pipeline resizes to before cropping ``image_size``:
    ``int(256 / 224 * image_size)`` for one crop, ``image_size`` for three."""
    checks.integer("image_size", image_size)
    if num_crops not in CROP_COUNTS:
        raise ValueError(f"num_crops: expected one of {CROP_COUNTS}, got {num_crops!r}")
    return int(SINGLE_CROP_RESIZE_RATIO * image_size) if num_crops == 1 else image_size


def preprocess(frames: torch.Tensor, image_size: int, num_crops: int = 1) -> torch.Tensor:
    """The official test transform of decoded frames: resize the short side
    (:func:`resize_for_crops`), crop (:func:`spatial_crops`), normalise (:func:`normalize`).

    Args:
        frames: ``(T, 3, H, W)`` RGB, uint8 or float in 0..255.

    Returns:
        float32 ``(num_crops, T, 3, image_size, image_size)``.
    """
    resized = resize_short_side(frames, resize_for_crops(image_size, num_crops))
    return normalize(spatial_crops(resized, image_size, num_crops))


# -- decoding -----------------------------------------------------------------------------------


def _import_av() -> Any:
    try:
        import av
    except ImportError as exc:
        raise ImportError(
            "decoding video files needs PyAV: install it with `pip install av` "
            "(the pinned version is in requirements.txt)"
        ) from exc
    return av


def require_decoder() -> None:
    """Import PyAV now: an ``ImportError`` with the install command when it is missing (a command
    checks this once, before its first file, instead of failing every file alike)."""
    _import_av()


def _open(path: str) -> Any:
    """An open PyAV input container of ``path`` with at least one video stream."""
    av = _import_av()
    if not os.path.exists(path):
        raise FileNotFoundError(f"path: no such file: {path}")
    if os.path.isdir(path):
        raise VideoError(f"path: expected a video file, got a directory: {path}")
    try:
        container = av.open(path, mode="r")
    except av.FFmpegError as exc:
        raise VideoError(f"path: {path} is not a video file that FFmpeg can read ({exc.strerror or exc})") from exc
    if not container.streams.video:
        container.close()
        raise VideoError(f"path: {path} has no video stream")
    return container


def _decode(
    path: str, wanted: Sequence[int], transform: Callable[[torch.Tensor], torch.Tensor] | None, count_all: bool,
    threads: int = 0,
) -> tuple[dict[int, torch.Tensor], int]:
    """Decode ``path`` front to back, keeping frames whose index is in ``wanted``
    (as ``transform`` of a ``(3, H, W)`` uint8 RGB tensor). Stops after the last wanted index
    unless ``count_all``. ``threads``: FFmpeg decoder threads (0: its choice, one per core).
    Returns the kept frames by index and the number of frames decoded."""
    av = _import_av()
    wanted_set = set(wanted)
    last = max(wanted_set, default=-1)
    kept: dict[int, torch.Tensor] = {}
    decoded = 0
    container = _open(path)
    try:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"  # frame and slice threads: decoding dominates for long videos
        stream.thread_count = threads
        try:
            for frame in container.decode(stream):
                if decoded in wanted_set:
                    rgb = torch.from_numpy(frame.to_ndarray(format="rgb24")).permute(2, 0, 1)
                    kept[decoded] = transform(rgb) if transform is not None else rgb.contiguous()
                decoded += 1
                if decoded > last and not count_all:
                    break
        except av.FFmpegError as exc:
            raise VideoError(f"path: {path}: decoding failed after {decoded} frames ({exc.strerror or exc})") from exc
    finally:
        container.close()
    return kept, decoded


def declared_frame_count(path: str | os.PathLike) -> int:
    """The frame count the container declares for the first video stream (0: unknown)."""
    container = _open(os.fspath(path))
    try:
        return int(container.streams.video[0].frames or 0)
    finally:
        container.close()


def count_frames(path: str | os.PathLike) -> int:
    """The number of frames of the first video stream, counted by decoding all of them."""
    return _decode(os.fspath(path), (), None, count_all=True)[1]


def read_frames(
    path: str | os.PathLike,
    indices: Sequence[int],
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Decode the frames at ``indices`` (any order, repeats allowed) of the first video stream.

    Args:
        path: a video file.
        indices: frame indices, counted from 0 in presentation order (as the decoder outputs them).
        transform: applied to each distinct decoded frame as it is decoded (e.g. a resize),
            so that full-size frames are not kept; ``None`` keeps them as they are.

    Returns:
        One tensor per entry of ``indices``: ``transform`` of the ``(3, H, W)`` uint8 RGB frame.
        Raises :class:`VideoError` if the stream ends before an index.
    """
    path = os.fspath(path)
    for position, index in enumerate(indices):
        checks.integer(f"indices[{position}]", index, 0)
    kept, decoded = _decode(path, indices, transform, count_all=False)
    missing = sorted(set(indices) - set(kept))
    if missing:
        raise VideoError(f"indices: {path} has {decoded} decodable frames, asked for frame {missing[0]}")
    return [kept[i] for i in indices]


def _too_short(path: str, count: int, num_frames: int) -> VideoError:
    return VideoError(
        f"path: {path} has {count} frames, fewer than the model's num_frames = {num_frames} "
        "(allow_short=True / --allow-short repeats frames as the official sampler does)"
    )


def load_views(
    path: str | os.PathLike,
    num_frames: int,
    image_size: int,
    *,
    num_clips: int = 1,
    num_crops: int = 1,
    allow_short: bool = False,
    threads: int = 0,
    shared_memory: bool = False,
) -> torch.Tensor:
    """Decode, sample and preprocess ``num_clips x num_crops`` views of a video file.

    Args:
        path: a video file PyAV can decode.
        num_frames: T, frames per clip (the model's ``config.num_frames``).
        image_size: S, the model's ``config.image_size``.
        num_clips: temporal clips (:func:`segment_indices` with ``clip_index`` 0..K-1).
        num_crops: 1 (centre) or 3 (along the long side); see :func:`preprocess`.
        allow_short: a video with fewer than T frames raises :class:`VideoError` unless this is
            set; then frames repeat as in the official sampler. A video with no decodable frame
            always raises.
        threads: FFmpeg decoder threads; 0 (default) lets FFmpeg choose (one per core), 1
            decodes in the calling thread (a decode worker process meant to use one core).
        shared_memory: build the views in a shared-memory segment (``is_shared()``), so that a
            DataLoader worker hands them to the main process without a copy: torch sends a
            tensor that is already shared as a handle, while any other tensor is first copied
            into a new segment (4.8 MB for one 8-frame 224 px view).

    Returns:
        float32 ``(num_clips * num_crops, T, 3, S, S)``, normalised; view ``clip * num_crops +
        crop``. Raises ``FileNotFoundError`` for a missing path and :class:`VideoError` for a
        file that is not a usable video.
    """
    path = os.fspath(path)
    num_frames = checks.integer("num_frames", num_frames)
    image_size = checks.integer("image_size", image_size)
    num_clips = checks.integer("num_clips", num_clips)
    threads = checks.integer("threads", threads, 0)
    short_side = resize_for_crops(image_size, num_crops)

    def resize_and_crop(frame: torch.Tensor) -> torch.Tensor:
        # Each frame by its own size: a stream may change resolution mid-way (a new sequence
        # header, e.g. concatenated or adaptive-bitrate streams), so the frames of one clip can
        # differ in size until they are cropped. (3, H, W) -> (num_crops, 3, S, S).
        return spatial_crops(resize_short_side(frame, short_side), image_size, num_crops)

    count = declared_frame_count(path)
    if count <= 0:
        count = _decode(path, (), None, count_all=True, threads=threads)[1]
    for _ in range(2):
        if count == 0:
            raise VideoError(f"path: {path} has no decodable video frames")
        if count < num_frames and not allow_short:
            raise _too_short(path, count, num_frames)
        clips = [segment_indices(count, num_frames, k, num_clips) for k in range(num_clips)]
        wanted = sorted({i for clip in clips for i in clip})
        kept, decoded = _decode(path, wanted, resize_and_crop, count_all=False, threads=threads)
        if len(kept) == len(wanted):
            break
        # The declared count was too large: the stream ended after `decoded` frames. Sample
        # again from the true count (a second pass, only for such files).
        count = decoded
    else:  # pragma: no cover - the second pass samples only indices below the decoded count
        raise VideoError(f"path: {path}: frame count changed between two decoding passes")
    shape = (num_clips * num_crops, num_frames, 3, image_size, image_size)
    views = _empty_shared(shape) if shared_memory else torch.empty(shape)
    for k, clip in enumerate(clips):  # (crops, T, 3, S, S) per clip, straight into its rows of views
        torch.stack([kept[i] for i in clip], dim=1, out=views[k * num_crops : (k + 1) * num_crops])
    return _normalize_(views)


def _empty_shared(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float32 tensor of ``shape`` in a new shared-memory segment (what
    ``share_memory_()`` would give, without first allocating and then copying the data)."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape) * 4)
    return torch.empty(0, dtype=torch.float32).set_(storage, 0, shape)


def load_clip(path: str | os.PathLike, num_frames: int, image_size: int, *, allow_short: bool = False) -> torch.Tensor:
    """One view of a video file as the official single-view evaluation prepares it: T centre
    frames of equal segments, short side resized to ``int(256/224 * S)``, centre crop ``S``,
    normalised with :data:`MEAN` / :data:`STD`.

    Returns:
        float32 ``(T, 3, S, S)`` (add a batch dim for the model: ``clip[None]``). Raises
        ``FileNotFoundError`` / :class:`VideoError` as :func:`load_views`.
    """
    return load_views(path, num_frames, image_size, allow_short=allow_short)[0]
