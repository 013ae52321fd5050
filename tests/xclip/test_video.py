"""xclip.video: the official segment sampling, the official test-time resize / crop / normalise,
and decoding real files written with PyAV (lossless, so decoded frames must equal the encoded
ones exactly; and a lossy mpeg4 file, identified frame by frame by colour)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from video_helpers import write_resolution_change, write_video
from xclip import video as xv

av = pytest.importorskip("av")

REPO_ROOT = Path(__file__).resolve().parents[2]
H, W, N = 48, 64, 20  # the synthetic videos: 20 frames of 64x48


def random_frames(n: int = N, seed: int = 0) -> torch.Tensor:
    """(n, H, W, 3) uint8 noise: every frame and pixel distinct, so a wrong index, crop or
    channel order shows."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, H, W, 3), generator=g, dtype=torch.uint8)


def flat_colours(n: int = N) -> torch.Tensor:
    """(n, 3) distinct flat colours, at least 9 levels apart in some channel for every pair."""
    i = torch.arange(n)
    return torch.stack([(37 * i) % 256, (91 * i + 40) % 256, (200 - 9 * i) % 256], dim=1).to(torch.uint8)


def write_lossless(path: Path, frames: torch.Tensor) -> Path:
    write_video(path, frames, codec="libx264rgb", pix_fmt="rgb24", options={"crf": "0"})
    return path


@pytest.fixture(scope="module")
def noise_frames() -> torch.Tensor:
    return random_frames()


@pytest.fixture(scope="module")
def lossless_mp4(tmp_path_factory, noise_frames) -> Path:
    """Lossless RGB H.264 in MP4: the container declares its frame count."""
    return write_lossless(tmp_path_factory.mktemp("video") / "noise.mp4", noise_frames)


@pytest.fixture(scope="module")
def lossless_mkv(tmp_path_factory, noise_frames) -> Path:
    """The same frames in Matroska, which declares no frame count (counted by decoding)."""
    return write_lossless(tmp_path_factory.mktemp("video") / "noise.mkv", noise_frames)


def hwc(frame: torch.Tensor) -> torch.Tensor:
    return frame.permute(1, 2, 0)


# -- sampling -----------------------------------------------------------------------------------


def test_segment_indices_are_the_centres_of_equal_segments() -> None:
    assert xv.segment_indices(80, 8) == [5, 15, 25, 35, 45, 55, 65, 75]
    assert xv.segment_indices(20, 4) == [2, 7, 12, 17]
    assert xv.segment_indices(7, 1) == [3]
    assert xv.segment_indices(1, 1) == [0]


@pytest.mark.parametrize("t", [1, 2, 3, 4, 5, 6, 8, 16, 32])
def test_segment_indices_equal_the_official_test_sampler(t: int) -> None:
    # The official SampleFrames(clip_len=1, num_clips=T, test_mode=True) in float64 numpy;
    # exact integer arithmetic agrees with it for these T (the released ones are 8, 16, 32).
    for n in range(1, 700):
        interval = n / float(t)
        official = (np.arange(t) * interval + interval / 2.0).astype(np.int64).tolist()
        assert xv.segment_indices(n, t) == official, (n, t)


def test_segment_indices_of_short_videos_repeat_frames() -> None:
    assert xv.segment_indices(3, 8) == [0, 0, 0, 1, 1, 2, 2, 2]
    assert xv.segment_indices(1, 4) == [0, 0, 0, 0]
    assert xv.segment_indices(8, 8) == list(range(8))


def test_segment_indices_of_several_clips_spread_evenly_inside_each_segment() -> None:
    # Segments of 10 frames; clip k of 4 at (k + 1/2)/4 of each: offsets 1.25, 3.75, 6.25, 8.75.
    clips = [xv.segment_indices(80, 8, k, 4) for k in range(4)]
    for k, offset in enumerate([1, 3, 6, 8]):
        assert clips[k] == [10 * i + offset for i in range(8)]
    assert xv.segment_indices(80, 8, 0, 1) == xv.segment_indices(80, 8)
    # Always in range, also for odd sizes and short videos.
    for n in (1, 2, 5, 17, 101):
        for k in range(3):
            got = xv.segment_indices(n, 7, k, 3)
            assert len(got) == 7 and all(0 <= i < n for i in got) and got == sorted(got)


@pytest.mark.parametrize(
    "args, error, name",
    [((0, 8), ValueError, "num_frames_in_video"), ((10, 0), ValueError, "num_segments"),
     ((10, 8, 2, 2), ValueError, "clip_index"), ((10, 8, 0, 0), ValueError, "num_clips"),
     ((10, 8, -1, 2), ValueError, "clip_index"), ((10.0, 8), TypeError, "num_frames_in_video: expected an int, got float")],
)
def test_segment_indices_refuse_bad_arguments_by_name(args: tuple, error: type, name: str) -> None:
    with pytest.raises(error, match=name):
        xv.segment_indices(*args)


# -- preprocessing ------------------------------------------------------------------------------


def test_resized_shape_scales_the_short_side_and_rounds_the_long_side_half_up() -> None:
    assert xv.resized_shape(48, 64, 36) == (36, 48)
    assert xv.resized_shape(64, 48, 36) == (48, 36)  # portrait
    assert xv.resized_shape(240, 320, 256) == (256, 341)  # 341.33
    assert xv.resized_shape(2, 3, 3) == (3, 5)  # 4.5 rounds up, as the official resize
    assert xv.resized_shape(50, 50, 32) == (32, 32)


def test_resize_short_side_shape_dtype_and_values() -> None:
    frames = torch.full((2, 3, 48, 64), 77, dtype=torch.uint8)
    out = xv.resize_short_side(frames, 36)
    assert out.shape == (2, 3, 36, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, torch.full_like(out, 77.0))
    same = torch.rand(1, 3, 36, 48) * 255
    assert torch.equal(xv.resize_short_side(same, 36), same)  # already the size: untouched


def test_resize_is_antialiased() -> None:
    # A one-pixel checkerboard shrunk 3x: an antialiased resize averages it to grey; plain
    # bilinear sampling lands on pixel centres (3i + 1) and keeps pure black and white.
    board = ((torch.arange(48).view(-1, 1) + torch.arange(48).view(1, -1)) % 2 * 255).float()
    out = xv.resize_short_side(board.expand(1, 3, 48, 48), 16)
    assert out.shape == (1, 3, 16, 16)
    assert float((out - 127.5).abs().max()) < 5.0


def test_crop_boxes_centre_and_three_along_the_long_side() -> None:
    assert xv.crop_boxes(36, 48, 32) == [(2, 8)]
    assert xv.crop_boxes(32, 48, 32, 3) == [(0, 0), (0, 8), (0, 16)]  # landscape: left, centre, right
    assert xv.crop_boxes(48, 32, 32, 3) == [(0, 0), (8, 0), (16, 0)]  # portrait: top, centre, bottom
    assert xv.crop_boxes(32, 32, 32, 3) == [(0, 0)] * 3
    with pytest.raises(ValueError, match="num_crops"):
        xv.crop_boxes(32, 48, 32, 2)
    with pytest.raises(ValueError, match="size"):
        xv.crop_boxes(36, 48, 32, 3)  # three crops need the short side resized to the crop
    with pytest.raises(ValueError, match="size"):
        xv.crop_boxes(30, 48, 32)


def test_spatial_crops_cut_the_right_pixels() -> None:
    frames = torch.arange(2 * 3 * 32 * 48, dtype=torch.float32).view(2, 3, 32, 48)
    crops = xv.spatial_crops(frames, 32, 3)
    assert crops.shape == (3, 2, 3, 32, 32)
    for crop, left in zip(crops, (0, 8, 16)):
        assert torch.equal(crop, frames[..., :, left : left + 32])
    centre = xv.spatial_crops(frames[..., :30, :], 20)
    assert torch.equal(centre[0], frames[..., 5:25, 14:34])


def test_normalisation_constants_are_the_official_ones() -> None:
    assert xv.MEAN == (123.675, 116.28, 103.53)
    assert xv.STD == (58.395, 57.12, 57.375)
    mean = torch.tensor(xv.MEAN).view(3, 1, 1).expand(3, 4, 5)
    std = torch.tensor(xv.STD).view(3, 1, 1).expand(3, 4, 5)
    torch.testing.assert_close(xv.normalize(mean), torch.zeros(3, 4, 5))
    torch.testing.assert_close(xv.normalize(mean + std), torch.ones(3, 4, 5))
    # Channel order is RGB: a pure red frame moves only channel 0 above its mean.
    red = torch.zeros(3, 2, 2, dtype=torch.uint8)
    red[0] = 255
    out = xv.normalize(red)
    assert out.dtype == torch.float32
    expected = torch.tensor([(255 - 123.675) / 58.395, -116.28 / 57.12, -103.53 / 57.375])
    torch.testing.assert_close(out[:, 0, 0], expected)


def test_preprocess_resizes_by_the_official_ratio_then_crops() -> None:
    assert xv.resize_for_crops(224) == 256 and xv.resize_for_crops(336) == 384
    assert xv.resize_for_crops(224, 3) == 224
    frames = torch.randint(0, 256, (4, 3, 48, 64), dtype=torch.uint8)
    one = xv.preprocess(frames, 32)
    assert one.shape == (1, 4, 3, 32, 32)
    expected = xv.normalize(xv.resize_short_side(frames, 36)[..., 2:34, 8:40])
    torch.testing.assert_close(one[0], expected)
    three = xv.preprocess(frames, 32, 3)
    assert three.shape == (3, 4, 3, 32, 32)
    resized = xv.resize_short_side(frames, 32)  # (4, 3, 32, 43): lefts 0, 5, 10
    for crop, left in zip(three, (0, 5, 10)):
        torch.testing.assert_close(crop, xv.normalize(resized[..., left : left + 32]))


def test_preprocessing_refuses_bad_frames_by_name() -> None:
    with pytest.raises(ValueError, match=r"frames: expected shape \(\.\.\., 3, H, W\)"):
        xv.resize_short_side(torch.zeros(2, 4, 8, 8), 4)
    with pytest.raises(TypeError, match="frames"):
        xv.normalize(torch.zeros(3, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="frames"):
        xv.normalize([[0.0]])


# -- decoding -----------------------------------------------------------------------------------


def test_frame_counts_declared_or_counted(lossless_mp4: Path, lossless_mkv: Path) -> None:
    assert xv.declared_frame_count(lossless_mp4) == N
    assert xv.declared_frame_count(lossless_mkv) == 0  # Matroska: unknown
    assert xv.count_frames(lossless_mp4) == N and xv.count_frames(lossless_mkv) == N


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_read_frames_returns_exactly_the_encoded_frames(
    container: str, lossless_mp4, lossless_mkv, noise_frames
) -> None:
    path = lossless_mp4 if container == "mp4" else lossless_mkv
    indices = [19, 0, 7, 7, 12]
    frames = xv.read_frames(path, indices)
    for index, frame in zip(indices, frames):
        assert frame.dtype == torch.uint8 and frame.shape == (3, H, W)
        assert torch.equal(hwc(frame), noise_frames[index]), index
    with pytest.raises(xv.VideoError, match=r"20 decodable frames, asked for frame 20"):
        xv.read_frames(path, [3, 20])


@pytest.mark.parametrize("container", ["mp4", "mkv"])
def test_load_clip_is_the_official_single_view(container: str, lossless_mp4, lossless_mkv, noise_frames) -> None:
    path = lossless_mp4 if container == "mp4" else lossless_mkv
    clip = xv.load_clip(path, 4, 32)
    assert clip.shape == (4, 3, 32, 32) and clip.dtype == torch.float32
    picked = noise_frames[xv.segment_indices(N, 4)].permute(0, 3, 1, 2)  # frames 2, 7, 12, 17
    torch.testing.assert_close(clip, xv.preprocess(picked, 32)[0])


def test_load_views_clips_times_crops(lossless_mp4, noise_frames) -> None:
    views = xv.load_views(lossless_mp4, 4, 32, num_clips=2, num_crops=3)
    assert views.shape == (6, 4, 3, 32, 32)
    for clip in range(2):
        picked = noise_frames[xv.segment_indices(N, 4, clip, 2)].permute(0, 3, 1, 2)
        expected = xv.preprocess(picked, 32, 3)  # (3, T, 3, S, S)
        torch.testing.assert_close(views[clip * 3 : clip * 3 + 3], expected)
    # The two clips sample different frames.
    assert xv.segment_indices(N, 4, 0, 2) == [1, 6, 11, 16] and xv.segment_indices(N, 4, 1, 2) == [3, 8, 13, 18]
    # One decoder thread (a decode worker's setting) decodes the same frames.
    torch.testing.assert_close(xv.load_views(lossless_mp4, 4, 32, num_clips=2, num_crops=3, threads=1), views, rtol=0, atol=0)
    with pytest.raises(ValueError, match="threads: expected an int >= 0, got -1"):
        xv.load_views(lossless_mp4, 4, 32, threads=-1)


def test_load_views_in_shared_memory_are_the_same_views(lossless_mp4) -> None:
    # A decode worker builds its views in shared memory so the DataLoader sends a handle, not
    # a copy: the same bits as the ordinary tensor, in a segment another process can map.
    views = xv.load_views(lossless_mp4, 4, 32, num_clips=2, num_crops=3)
    shared = xv.load_views(lossless_mp4, 4, 32, num_clips=2, num_crops=3, shared_memory=True)
    assert shared.is_shared() and not views.is_shared()
    assert shared.shape == views.shape and shared.is_contiguous()
    torch.testing.assert_close(shared, views, rtol=0, atol=0)


def test_normalize_leaves_a_float_input_unchanged() -> None:
    frames = torch.rand(2, 3, 4, 4) * 255
    before = frames.clone()
    out = xv.normalize(frames)
    torch.testing.assert_close(frames, before, rtol=0, atol=0)
    mean = torch.tensor(xv.MEAN).view(3, 1, 1)
    std = torch.tensor(xv.STD).view(3, 1, 1)
    torch.testing.assert_close(out, (before - mean) / std, rtol=0, atol=0)


@pytest.mark.parametrize("crops", [1, 3])
def test_a_stream_whose_resolution_changes_gives_views_like_any_other(tmp_path: Path, crops: int) -> None:
    """Landscape 64x48 frames, then portrait 48x64 ones in the same stream: every sampled frame
    is resized and cropped by its own size (it used to end the call with a torch.stack size
    error, and with it a classify batch)."""
    first = random_frames(9, seed=1)  # (9, 48, 64, 3)
    second = random_frames(11, seed=2).reshape(11, W, H, 3)  # portrait: 48 wide, 64 high
    path = tmp_path / "changes.ts"
    write_resolution_change(path, [first, second])
    frames = list(first) + list(second)
    decoded = xv.read_frames(path, range(len(frames)))
    assert [tuple(f.shape) for f in decoded] == [(3, H, W)] * 9 + [(3, W, H)] * 11  # the control
    views = xv.load_views(path, 4, 32, num_clips=2, num_crops=crops)
    assert views.shape == (2 * crops, 4, 3, 32, 32)
    for clip in range(2):
        indices = xv.segment_indices(len(frames), 4, clip, 2)
        assert any(i < 9 for i in indices) and any(i >= 9 for i in indices)  # both sizes in the clip
        expected = torch.cat([xv.preprocess(frames[i].permute(2, 0, 1)[None], 32, crops) for i in indices], dim=1)
        torch.testing.assert_close(views[clip * crops : (clip + 1) * crops], expected)


def test_lossy_mpeg4_frames_decode_close_to_the_encoded_colours(tmp_path: Path) -> None:
    colours = flat_colours()
    frames = colours.view(N, 1, 1, 3).expand(N, H, W, 3).contiguous()
    path = tmp_path / "flat.mp4"
    write_video(path, frames, codec="mpeg4")
    indices = xv.segment_indices(N, 8)
    decoded = xv.read_frames(path, indices)
    for index, frame in zip(indices, decoded):
        mean = frame.float().mean(dim=(1, 2))
        distances = (colours.float() - mean).abs().amax(dim=1)
        assert int(distances.argmin()) == index  # it is this frame, not a neighbour
        # 8-bit RGB -> 4:2:0 limited-range YUV -> RGB loses up to ~4 levels on flat colours.
        assert float(distances[index]) <= 4.5, (index, mean, colours[index])


def test_a_wrong_declared_count_is_corrected_by_decoding(monkeypatch, lossless_mp4, noise_frames) -> None:
    # A container that claims more frames than it has: the first pass runs out early, the
    # indices are sampled again from the true count.
    monkeypatch.setattr(xv, "declared_frame_count", lambda path: 30)
    clip = xv.load_clip(lossless_mp4, 4, 32)
    picked = noise_frames[xv.segment_indices(N, 4)].permute(0, 3, 1, 2)
    torch.testing.assert_close(clip, xv.preprocess(picked, 32)[0])


def test_short_videos_are_an_error_unless_allowed(tmp_path: Path) -> None:
    frames = random_frames(2, seed=1)
    path = write_lossless(tmp_path / "two.mp4", frames)
    with pytest.raises(xv.VideoError, match=r"has 2 frames, fewer than the model's num_frames = 3"):
        xv.load_clip(path, 3, 32)
    clip = xv.load_clip(path, 3, 32, allow_short=True)  # frames 0, 1, 1 as the official sampler
    picked = frames[[0, 1, 1]].permute(0, 3, 1, 2)
    torch.testing.assert_close(clip, xv.preprocess(picked, 32)[0])


def test_bad_files_raise_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="path: no such file: .*missing.mp4"):
        xv.load_clip(tmp_path / "missing.mp4", 3, 32)
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 20)
    with pytest.raises(xv.VideoError, match=r"notes.mp4 is not a video file that FFmpeg can read"):
        xv.load_clip(text, 3, 32)
    with pytest.raises(xv.VideoError, match="expected a video file, got a directory"):
        xv.load_clip(tmp_path, 3, 32)
    # An AVI with a video stream but no frame.
    empty = tmp_path / "empty.avi"
    container = av.open(str(empty), mode="w")
    stream = container.add_stream("mpeg4", rate=10)
    stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
    container.start_encoding()
    container.close()
    with pytest.raises(xv.VideoError, match="has no decodable video frames"):
        xv.load_clip(empty, 3, 32, allow_short=True)
    with pytest.raises(ValueError, match="num_crops"):
        xv.load_views(empty, 3, 32, num_crops=2)


def test_missing_pyav_gives_an_install_hint(monkeypatch, lossless_mp4) -> None:
    monkeypatch.setitem(sys.modules, "av", None)  # makes `import av` raise ImportError
    with pytest.raises(ImportError, match="pip install av"):
        xv.load_clip(lossless_mp4, 3, 32)


def test_importing_xclip_does_not_import_av() -> None:
    modules = "xclip, xclip.video, xclip.labels, xclip.text_cache, xclip.classify, xclip.cli, xclip.__main__"
    code = f"import sys, {modules}; assert 'av' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
