"""Video transformer baselines with other space-time attention styles.

How they are matched to X-CLIP and counted: ``docs/benchmarking.md#baselines``.

Four plain-PyTorch models to compare X-CLIP against. The first three share ViT-B/16's width
(768), depth (12), heads (12), MLP (3072, GELU) and patching (16x16 on 224x224 frames, N = 196
patches a frame) with X-CLIP-B/16, so only the space-time attention differs:

* :class:`JointSpaceTime` -- ViViT model 1 / the paper's "CLIP-Joint": one sequence of
  T*N + 1 tokens; attention cost grows with (T*N)^2.
* :class:`DividedSpaceTime` -- TimeSformer: temporal attention over T per spatial position
  (own q/k/v, projection and ``temporal_fc``), then spatial attention per frame with that
  frame's copy of the class token, then the MLP.
* :class:`FactorisedEncoder` -- ViViT model 2: a spatial ViT per frame, then a 4-block
  temporal transformer over the frame class tokens.

and :class:`VideoSwin` (3D shifted windows, relative-position bias, head dim 32) with the
published Kinetics-400 configurations :func:`swin_b_k400` and :func:`swin_l_k400`.

Inputs are videos ``(b, T, 3, H, W)``; outputs pooled features ``(b, width)`` (``8 * C`` for
Video Swin), or logits if ``num_classes`` is given. Attention goes through
:func:`torch.nn.functional.scaled_dot_product_attention`: with no mask for the ViT baselines
(flash-eligible), with ``attn_mask`` (bias + region mask) for Video Swin.

:func:`gmacs` counts multiply-accumulates per clip with ``FlopCounterMode`` on the meta device
(no memory, no arithmetic). FLOPs = 2 x MACs.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "JointSpaceTime",
    "DividedSpaceTime",
    "FactorisedEncoder",
    "VideoSwin",
    "SwinConfig",
    "swin_b_k400",
    "swin_l_k400",
    "gmacs",
    "explicit_attention",
    "BASELINES",
]

# --------------------------------------------------------------------------------------------
# Attention primitive
# --------------------------------------------------------------------------------------------

_EXPLICIT_ATTENTION = False


@contextlib.contextmanager
def explicit_attention(enabled: bool = True):
    """Within the block, attention is computed with explicit matmuls + softmax instead of SDPA.

    For FLOP counting on back-ends where ``FlopCounterMode`` has no formula for the SDPA kernel
    that runs (on meta, SDPA is counted, so :func:`gmacs` does not need this by default).
    """
    global _EXPLICIT_ATTENTION
    previous = _EXPLICIT_ATTENTION
    _EXPLICIT_ATTENTION = enabled
    try:
        yield
    finally:
        _EXPLICIT_ATTENTION = previous


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d) + attn_mask) v`` on ``(..., heads, L, d)`` tensors."""
    if _EXPLICIT_ATTENTION:
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
        if attn_mask is not None:
            scores = scores + attn_mask
        return scores.softmax(dim=-1) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)


class MultiHeadAttention(nn.Module):
    """Batch-first self-attention: fused q/k/v linear, SDPA, output projection."""

    def __init__(self, dim: int, heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], attn_mask)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block (attention + MLP)."""

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed2D(nn.Module):
    """Per-frame non-overlapping patches: ``(b, T, 3, H, W)`` -> ``(b, T, N, width)``."""

    def __init__(self, image_size: int, patch_size: int, width: int):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch_size}")
        self.num_patches = (image_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        x = self.proj(video.flatten(0, 1))  # (b*T, width, h, w)
        return x.flatten(2).transpose(1, 2).reshape(b, t, self.num_patches, -1)


def _temporal_embedding(embed: torch.Tensor, frames: int) -> torch.Tensor:
    """``(1, T0, ..., C)`` learned per-frame embeddings resized (linearly) to ``frames``."""
    if embed.shape[1] == frames:
        return embed
    shape = embed.shape
    flat = embed.reshape(1, shape[1], -1).transpose(1, 2)  # (1, rest, T0)
    flat = F.interpolate(flat, size=frames, mode="linear", align_corners=False)
    return flat.transpose(1, 2).reshape(1, frames, *shape[2:])


class _VideoViT(nn.Module):
    """Shared fields of the three ViT-B/16-shaped baselines."""

    def __init__(
        self,
        num_frames: int,
        image_size: int,
        patch_size: int,
        width: int,
        depth: int,
        heads: int,
        mlp_ratio: float,
        num_classes: int,
    ):
        super().__init__()
        self.num_frames = num_frames
        self.image_size = image_size
        self.width = width
        self.mlp_dim = int(width * mlp_ratio)
        self.patch_embed = PatchEmbed2D(image_size, patch_size, width)
        self.num_patches = self.patch_embed.num_patches
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes) if num_classes else nn.Identity()
        self.out_features = num_classes or width

    def _init_embeddings(self) -> None:
        for name, param in self.named_parameters():
            if name.endswith(("cls_token", "pos_embed", "time_embed")) and not param.is_meta:
                nn.init.trunc_normal_(param, std=0.02)


# --------------------------------------------------------------------------------------------
# 1. Joint space-time attention (ViViT model 1, "CLIP-Joint")
# --------------------------------------------------------------------------------------------


class _SpaceTimeViT(_VideoViT):
    """One class token for the whole video, a learned spatial embedding (class token + N
    patches) and a learned temporal embedding per frame; ``depth`` blocks of ``block_type``.
    Shared by the joint and divided baselines."""

    block_type: type[nn.Module]

    def __init__(
        self,
        num_frames: int = 8,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
    ):
        super().__init__(num_frames, image_size, patch_size, width, depth, heads, mlp_ratio, num_classes)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, width))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames, 1, width))
        self.blocks = nn.ModuleList(self.block_type(width, heads, self.mlp_dim) for _ in range(depth))
        self._init_embeddings()

    def _embed(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video ``(b, T, 3, S, S)`` -> class token ``(b, 1, C)`` and patches ``(b, T, N, C)``, embedded."""
        b, t = video.shape[:2]
        x = self.patch_embed(video) + self.pos_embed[:, None, 1:] + _temporal_embedding(self.time_embed, t)
        return (self.cls_token + self.pos_embed[:, :1]).expand(b, -1, -1), x


class JointSpaceTime(_SpaceTimeViT):
    """One sequence of ``T*N + 1`` tokens (class token first) through ``depth`` blocks.

    Position: learned spatial embedding (class token + N patches) plus a learned temporal
    embedding per frame, as CLIP-Joint inflates CLIP's spatial embedding.
    """

    block_type = Block

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        cls, x = self._embed(video)
        x = torch.cat([cls, x.flatten(1, 2)], dim=1)  # (b, 1 + T*N, C)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 0]))


# --------------------------------------------------------------------------------------------
# 2. Divided space-time attention (TimeSformer)
# --------------------------------------------------------------------------------------------


class DividedBlock(nn.Module):
    """TimeSformer block: temporal attention (+ ``temporal_fc``), spatial attention, MLP.

    Tokens are ``cls (b, 1, C)`` and ``x (b, T, N, C)``. Temporal attention runs over the T
    frames for each spatial position (the class token is left out); spatial attention runs per
    frame over that frame's copy of the class token and its N patches; the T class-token
    outputs are averaged back into one.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int):
        super().__init__()
        self.temporal_norm1 = nn.LayerNorm(dim)
        self.temporal_attn = MultiHeadAttention(dim, heads)
        self.temporal_fc = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, mlp_dim)

    def forward(self, cls: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, t, n, c = x.shape
        # Temporal: (b*N, T, C) sequences.
        xt = x.transpose(1, 2).reshape(b * n, t, c)
        res = self.temporal_attn(self.temporal_norm1(xt)).reshape(b, n, t, c).transpose(1, 2)
        x = x + self.temporal_fc(res)
        # Spatial: (b*T, 1 + N, C) sequences, the class token repeated per frame.
        xs = torch.cat([cls[:, None].expand(b, t, 1, c), x], dim=2).reshape(b * t, 1 + n, c)
        res = self.attn(self.norm1(xs)).reshape(b, t, 1 + n, c)
        cls = cls + res[:, :, 0].mean(dim=1, keepdim=True)
        x = x + res[:, :, 1:]
        # MLP over all tokens.
        cls = cls + self.mlp(self.norm2(cls))
        x = x + self.mlp(self.norm2(x))
        return cls, x


class DividedSpaceTime(_SpaceTimeViT):
    """TimeSformer (divided space-time attention) with ViT-B/16 shapes."""

    block_type = DividedBlock

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        cls, x = self._embed(video)
        for block in self.blocks:
            cls, x = block(cls, x)
        return self.head(self.norm(cls[:, 0]))


# --------------------------------------------------------------------------------------------
# 3. Factorised encoder (ViViT model 2)
# --------------------------------------------------------------------------------------------


class FactorisedEncoder(_VideoViT):
    """Spatial ViT per frame (its own class token), then a temporal transformer over the T
    frame class tokens plus a temporal class token."""

    def __init__(
        self,
        num_frames: int = 8,
        image_size: int = 224,
        patch_size: int = 16,
        width: int = 768,
        depth: int = 12,
        heads: int = 12,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        temporal_depth: int = 4,
    ):
        super().__init__(num_frames, image_size, patch_size, width, depth, heads, mlp_ratio, num_classes)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_patches + 1, width))
        self.blocks = nn.ModuleList(Block(width, heads, self.mlp_dim) for _ in range(depth))
        self.spatial_norm = nn.LayerNorm(width)
        self.temporal_cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.time_embed = nn.Parameter(torch.zeros(1, num_frames + 1, width))
        self.temporal_blocks = nn.ModuleList(Block(width, heads, self.mlp_dim) for _ in range(temporal_depth))
        self._init_embeddings()

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        b, t = video.shape[:2]
        x = self.patch_embed(video).flatten(0, 1) + self.pos_embed[:, 1:]  # (b*T, N, C)
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(b * t, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for block in self.blocks:
            x = block(x)
        frames = self.spatial_norm(x[:, 0]).reshape(b, t, -1)
        time_embed = self.time_embed
        frames = frames + _temporal_embedding(time_embed[:, 1:], t)
        z = torch.cat([(self.temporal_cls_token + time_embed[:, :1]).expand(b, -1, -1), frames], dim=1)
        for block in self.temporal_blocks:
            z = block(z)
        return self.head(self.norm(z[:, 0]))


# --------------------------------------------------------------------------------------------
# 4. Video Swin Transformer (3D shifted windows)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SwinConfig:
    """Video Swin hyper-parameters (``embed_dim`` = C of stage 1; stage i has C * 2**i)."""

    embed_dim: int = 128
    depths: tuple[int, ...] = (2, 2, 18, 2)
    heads: tuple[int, ...] = (4, 8, 16, 32)
    window_size: tuple[int, int, int] = (8, 7, 7)
    patch_size: tuple[int, int, int] = (2, 4, 4)
    mlp_ratio: float = 4.0
    num_frames: int = 32
    image_size: int = 224


def swin_b_k400() -> SwinConfig:
    """Video Swin-B, Kinetics-400 (C=128, depths 2-2-18-2, heads 4-8-16-32, window 8x7x7)."""
    return SwinConfig(embed_dim=128, depths=(2, 2, 18, 2), heads=(4, 8, 16, 32))


def swin_l_k400() -> SwinConfig:
    """Video Swin-L, Kinetics-400 (C=192, depths 2-2-18-2, heads 6-12-24-48, window 8x7x7,
    patch 2x4x4, 32 frames at 224). Paper: 604 GFLOPs (= GMACs) per view."""
    return SwinConfig(embed_dim=192, depths=(2, 2, 18, 2), heads=(6, 12, 24, 48))


def effective_window(
    size: tuple[int, ...], window: tuple[int, ...], shift: tuple[int, ...]
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Window and shift shrunk on axes where the feature is no larger than the window."""
    w, s = list(window), list(shift)
    for i, n in enumerate(size):
        if n <= window[i]:
            w[i], s[i] = n, 0
    return tuple(w), tuple(s)


def window_partition(x: torch.Tensor, window: tuple[int, int, int]) -> torch.Tensor:
    """``(B, D, H, W, C)`` -> ``(B, nW, Wd*Wh*Ww, C)`` (windows in D, H, W raster order)."""
    b, d, h, w, c = x.shape
    wd, wh, ww = window
    x = x.reshape(b, d // wd, wd, h // wh, wh, w // ww, ww, c)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(b, -1, wd * wh * ww, c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int, int], size: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B, nW, N, C)`` -> ``(B, D, H, W, C)``."""
    b, c = windows.shape[0], windows.shape[-1]
    d, h, w = size
    wd, wh, ww = window
    x = windows.reshape(b, d // wd, h // wh, w // ww, wd, wh, ww, c)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, d, h, w, c)


def region_labels(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], device=None
) -> torch.Tensor:
    """Region id of each token of a (padded) ``size`` feature after the cyclic shift, ``(D, H, W)``.

    Along each shifted axis the rolled feature has three slices -- ``[0, n - w)``,
    ``[n - w, n - s)`` and ``[n - s, n)`` -- and tokens from different slices are not
    neighbours in the unrolled feature; a region is one combination of slices.
    """
    labels = torch.zeros(size, dtype=torch.long, device=device)
    count = 0
    slices = [
        (slice(0, -w), slice(-w, -s), slice(-s, None)) if s > 0 else (slice(None),) for w, s in zip(window, shift)
    ]
    for sd in slices[0]:
        for sh in slices[1]:
            for sw in slices[2]:
                labels[sd, sh, sw] = count
                count += 1
    return labels


def shifted_window_mask(
    size: tuple[int, int, int], window: tuple[int, int, int], shift: tuple[int, int, int], device=None, dtype=None
) -> torch.Tensor:
    """Additive mask ``(nW, 1, N, N)``: 0 within a region, -inf across regions."""
    labels = region_labels(size, window, shift, device)
    windows = window_partition(labels[None, ..., None], window)[0, ..., 0]  # (nW, N)
    different = windows[:, None, :] != windows[:, :, None]
    mask = torch.zeros(different.shape, dtype=dtype or torch.get_default_dtype(), device=device)
    return mask.masked_fill(different, float("-inf"))[:, None]


def relative_position_index(window: tuple[int, int, int], table_window: tuple[int, int, int]) -> torch.Tensor:
    """``(N, N)`` index into a bias table laid out for ``table_window`` (N = prod(window))."""
    coords = torch.stack(torch.meshgrid(*(torch.arange(w) for w in window), indexing="ij")).flatten(1)  # (3, N)
    rel = coords[:, :, None] - coords[:, None, :]  # (3, N, N)
    wd, wh, ww = table_window
    rel = rel + torch.tensor([wd - 1, wh - 1, ww - 1])[:, None, None]
    return rel[0] * (2 * wh - 1) * (2 * ww - 1) + rel[1] * (2 * ww - 1) + rel[2]


class WindowAttention3D(nn.Module):
    """Multi-head self-attention within 3D windows plus a learned relative-position bias."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int]):
        super().__init__()
        self.heads = heads
        self.window = tuple(window)
        wd, wh, ww = window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * wd - 1) * (2 * wh - 1) * (2 * ww - 1), heads))
        if not self.relative_position_bias_table.is_meta:
            nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self._index_cache: dict[tuple, torch.Tensor] = {}

    def relative_bias(self, window: tuple[int, int, int]) -> torch.Tensor:
        """``(heads, N, N)`` bias for an (possibly shrunk) ``window``."""
        table = self.relative_position_bias_table
        key = (window, table.device)
        index = self._index_cache.get(key)
        if index is None:
            with torch.device("cpu"):
                index = relative_position_index(window, self.window)
            index = self._index_cache[key] = index.to(table.device)
        n = index.shape[0]
        return table[index.reshape(-1)].reshape(n, n, -1).permute(2, 0, 1)

    def forward(self, x: torch.Tensor, window: tuple[int, int, int], mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, nW, N, C)``; ``mask (nW, 1, N, N)`` additive or None."""
        b, nw, n, c = x.shape
        qkv = self.qkv(x).reshape(b * nw, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        bias = self.relative_bias(window).to(x.dtype)[None]  # (1, heads, N, N)
        if mask is None:
            attn_mask = bias
        else:
            # (nW, heads, N, N) per window; repeated over the batch (a copy only when B > 1).
            attn_mask = (mask.to(x.dtype) + bias).expand(b, nw, self.heads, n, n).reshape(b * nw, self.heads, n, n)
        out = attention(qkv[0], qkv[1], qkv[2], attn_mask)  # (B*nW, heads, N, hd)
        return self.proj(out.transpose(1, 2).reshape(b, nw, n, c))


class SwinBlock3D(nn.Module):
    """(Shifted-)window attention block; ``shift`` is (0, 0, 0) or half the window."""

    def __init__(self, dim: int, heads: int, window: tuple[int, int, int], shift: tuple[int, int, int], mlp_ratio: float):
        super().__init__()
        self.window = tuple(window)
        self.shift = tuple(shift)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention3D(dim, heads, window)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self._mask_cache: dict[tuple, torch.Tensor] = {}

    def _mask(self, size, window, shift, device) -> torch.Tensor:
        key = (size, window, shift, str(device))
        mask = self._mask_cache.get(key)
        if mask is None:
            with torch.device("cpu"):
                mask = shifted_window_mask(size, window, shift, dtype=torch.float32)
            mask = self._mask_cache[key] = mask.to(device)
        return mask

    def _attention(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        window, shift = effective_window((d, h, w), self.window, self.shift)
        pad = [(-n) % wn for n, wn in zip((d, h, w), window)]
        if any(pad):
            x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
        size = (d + pad[0], h + pad[1], w + pad[2])
        if any(shift):
            x = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3))
            mask = self._mask(size, window, shift, x.device)
        else:
            mask = None
        out = self.attn(window_partition(x, window), window, mask)
        x = window_reverse(out, window, size)
        if any(shift):
            x = torch.roll(x, shifts=shift, dims=(1, 2, 3))
        return x[:, :d, :h, :w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchMerging(nn.Module):
    """2x2 spatial merge: ``(B, D, H, W, C)`` -> ``(B, D, H/2, W/2, 2C)``."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[2:4]
        if h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2))
        x = torch.cat([x[:, :, 0::2, 0::2], x[:, :, 1::2, 0::2], x[:, :, 0::2, 1::2], x[:, :, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x))


class PatchEmbed3D(nn.Module):
    """``(b, T, 3, H, W)`` -> ``(b, T/pd, H/ph, W/pw, C)`` with a strided Conv3d and LayerNorm."""

    def __init__(self, patch: tuple[int, int, int], dim: int):
        super().__init__()
        self.patch = tuple(patch)
        self.proj = nn.Conv3d(3, dim, kernel_size=patch, stride=patch)
        self.norm = nn.LayerNorm(dim)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = video.transpose(1, 2)  # (b, 3, T, H, W)
        t, h, w = x.shape[2:]
        pd, ph, pw = self.patch
        pad = ((-t) % pd, (-h) % ph, (-w) % pw)
        if any(pad):
            x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]))
        return self.norm(self.proj(x).permute(0, 2, 3, 4, 1))


class VideoSwin(nn.Module):
    """Video Swin Transformer backbone; pooled output ``(b, 8C)`` (or logits)."""

    def __init__(self, config: SwinConfig | None = None, num_classes: int = 0, **overrides):
        super().__init__()
        config = replace(config or swin_b_k400(), **overrides)
        self.config = config
        self.num_frames = config.num_frames
        self.image_size = config.image_size
        self.patch_embed = PatchEmbed3D(config.patch_size, config.embed_dim)
        window = tuple(config.window_size)
        half = tuple(w // 2 for w in window)
        self.stages = nn.ModuleList()
        dim = config.embed_dim
        for i, (depth, heads) in enumerate(zip(config.depths, config.heads)):
            blocks = [
                SwinBlock3D(dim, heads, window, (0, 0, 0) if j % 2 == 0 else half, config.mlp_ratio) for j in range(depth)
            ]
            if i < len(config.depths) - 1:
                blocks.append(PatchMerging(dim))
                dim *= 2
            self.stages.append(nn.Sequential(*blocks))
        self.num_features = dim
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes) if num_classes else nn.Identity()
        self.out_features = num_classes or dim

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(video)
        for stage in self.stages:
            x = stage(x)
        return self.head(self.norm(x).mean(dim=(1, 2, 3)))


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------

BASELINES: dict[str, Callable[..., nn.Module]] = {
    "joint": JointSpaceTime,
    "divided": DividedSpaceTime,
    "factorised": FactorisedEncoder,
    "swin-b": lambda **kw: VideoSwin(swin_b_k400(), **kw),
    "swin-l": lambda **kw: VideoSwin(swin_l_k400(), **kw),
}
"""Name -> constructor (keyword arguments go to the model)."""


def gmacs(
    model: nn.Module | Callable[[], nn.Module], frames: int, batch: int = 1, *, explicit: bool = False
) -> float:
    """Multiply-accumulates per clip, in billions, counted by ``FlopCounterMode`` on meta.

    ``model`` is a module (used as is when its parameters are on meta, else copied to meta;
    the original is untouched) or a zero-argument constructor (called under the meta device).
    The input is ``(batch, frames, 3, S, S)`` with ``S = model.image_size``. ``explicit=True``
    computes attention with explicit matmuls (on meta SDPA is counted either way).
    Convolutions, linears and attention products are counted, as with fvcore.
    """
    if not isinstance(model, nn.Module):
        with torch.device("meta"):
            model = model()
    elif any(not p.is_meta for p in model.parameters()):
        model = copy.deepcopy(model).to("meta")
    size = model.image_size
    video = torch.empty(batch, frames, 3, size, size, device="meta")
    with torch.no_grad(), explicit_attention(explicit), FlopCounterMode(display=False) as counter:
        model(video)
    return counter.get_total_flops() / 2 / 1e9 / batch


def _main() -> int:  # pragma: no cover - a convenience table
    for name, ctor in BASELINES.items():
        row = [f"{gmacs(lambda: ctor(num_frames=t), t):8.1f}" for t in (8, 16, 32)]
        print(f"{name:<12}" + " ".join(row) + "   GMACs at 8/16/32 frames")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
