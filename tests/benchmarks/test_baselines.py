"""The attention-style baselines: tiny forwards, Video Swin's shifted-window mask, MAC counts."""

import pytest
import torch

from benchmarks.baselines import (
    DividedSpaceTime,
    FactorisedEncoder,
    JointSpaceTime,
    SwinBlock3D,
    SwinConfig,
    VideoSwin,
    explicit_attention,
    gmacs,
    shifted_window_mask,
    swin_b_k400,
    swin_l_k400,
    window_partition,
)
from benchmarks.flops import xclip_gmacs

TINY_VIT = dict(image_size=32, patch_size=16, width=32, depth=2, heads=2)
TINY_SWIN = SwinConfig(embed_dim=16, depths=(2, 2), heads=(1, 2), window_size=(2, 3, 3), num_frames=4, image_size=28)


def _count(cls, frames: int) -> float:
    return gmacs(lambda: cls(num_frames=frames), frames)


@pytest.fixture(scope="module")
def vit_counts() -> dict[str, dict[int, float]]:
    return {
        cls.__name__: {t: _count(cls, t) for t in (8, 32)}
        for cls in (JointSpaceTime, DividedSpaceTime, FactorisedEncoder)
    }


@pytest.fixture(scope="module")
def swin_l_32f() -> float:
    return gmacs(lambda: VideoSwin(swin_l_k400()), 32)


@pytest.mark.parametrize("cls", [JointSpaceTime, DividedSpaceTime, FactorisedEncoder])
@pytest.mark.parametrize("frames", [2, 3])  # built for 2; 3 resizes the temporal embedding
def test_vit_baselines_forward(cls, frames):
    torch.manual_seed(0)
    _check_forward(cls(num_frames=2, **TINY_VIT).eval(), torch.randn(2, frames, 3, 32, 32))


def _check_forward(model: torch.nn.Module, video: torch.Tensor) -> None:
    """Two clips -> (2, 32) finite features, equal to the explicit-attention path, and the
    clips independent of each other."""
    with torch.no_grad():
        out = model(video)
        with explicit_attention():
            ref = model(video)
        assert out.shape == (2, 32) and torch.isfinite(out).all()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(video[1:]), out[1:], atol=1e-5, rtol=1e-5)


def test_classifier_head():
    model = JointSpaceTime(num_frames=2, num_classes=5, **TINY_VIT)
    assert model(torch.randn(1, 2, 3, 32, 32)).shape == (1, 5)


def test_video_swin_forward():
    torch.manual_seed(0)
    # 2x7x7 tokens: padded to the 3x3 windows, temporal window shrunk.
    _check_forward(VideoSwin(TINY_SWIN).eval(), torch.randn(2, 4, 3, 28, 28))


def test_swin_configs():
    large, base = swin_l_k400(), swin_b_k400()
    assert (large.embed_dim, large.depths, large.heads) == (192, (2, 2, 18, 2), (6, 12, 24, 48))
    assert (base.embed_dim, base.depths, base.heads) == (128, (2, 2, 18, 2), (4, 8, 16, 32))
    for config in (large, base):
        assert config.window_size == (8, 7, 7) and config.patch_size == (2, 4, 4)
        assert all(config.embed_dim * 2**i // h == 32 for i, h in enumerate(config.heads))  # head dim 32


@pytest.mark.parametrize(("size", "window"), [((4, 4, 4), (2, 2, 2)), ((4, 8, 6), (2, 4, 3))])
def test_shifted_window_mask_matches_brute_force(size, window):
    """Two tokens of one shifted window may attend iff they were within a window's reach of
    each other on every axis before the cyclic shift (no wrap-around)."""
    shift = tuple(w // 2 for w in window)
    mask = shifted_window_mask(size, window, shift)[:, 0]  # (nW, N, N)
    grid = torch.stack(torch.meshgrid(*(torch.arange(n) for n in size), indexing="ij"), dim=-1)  # rolled coords
    coords = window_partition(grid[None], window)[0]  # (nW, N, 3)
    original = (coords + torch.tensor(shift)) % torch.tensor(size)
    reach = (original[:, :, None] - original[:, None, :]).abs() < torch.tensor(window)
    allowed = reach.all(dim=-1)
    assert torch.equal(mask == 0, allowed)
    assert torch.isneginf(mask[~allowed]).all()
    assert not allowed.all()  # the shifted windows do contain several regions


def test_shifted_block_does_not_mix_regions():
    """Through a real block: after the shift, the token at (0, 0, 0) shares its window with the
    token at the far corner, but the mask keeps them apart; tokens in one region do interact."""
    torch.manual_seed(0)
    block = SwinBlock3D(8, 2, (2, 2, 2), (1, 1, 1), 4.0)

    def grad_at(x, src, dst):
        x = x.clone().requires_grad_(True)
        block(x)[(0, *dst)].sum().backward()
        return x.grad[(0, *src)].abs().sum().item()

    x = torch.randn(1, 4, 4, 4, 8)
    far, near = (3, 3, 3), (1, 1, 1)
    assert grad_at(x, far, (0, 0, 0)) == 0.0  # same shifted window, different region
    assert grad_at(x, near, (2, 2, 2)) > 0.0  # same window, same region
    block._mask = lambda *args: None  # control: without the mask the far token leaks in
    assert grad_at(x, far, (0, 0, 0)) > 0.0


def test_sdpa_is_counted_on_meta():
    """FlopCounterMode counts SDPA on meta, so the explicit-attention path gives the same total."""
    for ctor in (lambda: JointSpaceTime(num_frames=2, **TINY_VIT), lambda: VideoSwin(TINY_SWIN)):
        assert gmacs(ctor, 4) == pytest.approx(gmacs(ctor, 4, explicit=True), rel=1e-9)
    # A real module is copied to meta and left untouched; batch is divided out.
    model = JointSpaceTime(num_frames=2, **TINY_VIT)
    assert gmacs(model, 2, batch=3) == pytest.approx(gmacs(model, 2))
    assert not next(model.parameters()).is_meta


def test_joint_near_clip_joint(vit_counts):
    joint = vit_counts["JointSpaceTime"][8]
    assert abs(joint - 184) / 184 < 0.10, joint


def test_swin_l_k400_near_paper(swin_l_32f):
    assert abs(swin_l_32f - 604) / 604 < 0.05, swin_l_32f


def test_xclip_at_least_4x_cheaper_than_swin_l(swin_l_32f):
    xclip = xclip_gmacs("xclip-b16", 8)
    assert swin_l_32f / xclip >= 4.0, (swin_l_32f, xclip)


def test_growth_in_frames(vit_counts):
    ratio = {name: counts[32] / counts[8] for name, counts in vit_counts.items()}
    assert ratio["JointSpaceTime"] > 4.4, ratio
    assert ratio["DividedSpaceTime"] < 4.4, ratio
    assert ratio["FactorisedEncoder"] < 4.4, ratio
