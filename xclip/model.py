"""The X-CLIP model in the frame-batched layout, with the official checkpoint's parameter names.

Activations are ``(F, L, W)`` with ``F = b * T`` frames, frames of one video adjacent (never
the official sequence-first layout). The two X-CLIP attentions go through ``xclip_kernels``:
cross-frame fusion over the message tokens (:func:`xclip_kernels.message_attention`) and
intra-frame diffusion over each frame's tokens plus its message token
(:func:`xclip_kernels.frame_attention`), so the model runs on any backend. Module and
parameter names are the official checkpoint keys (``docs/xclip-math.md``): an official
``state_dict`` loads with ``strict=True``.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

import xclip_kernels as xk
from xclip_kernels import fused, gemm
from xclip_kernels.backends.reference import quick_gelu
from xclip_kernels.registry import get_backend, preload, preload_automatic
from xclip_kernels.tracing import is_tracing

from . import saved
from .config import XCLIPConfig, resolve_config


class QuickGELU(nn.Module):
    """CLIP's activation, ``x * sigmoid(1.702 x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return quick_gelu(x)


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and names) whose CPU inference GEMM takes the provider
    :mod:`xclip_kernels.gemm` chose for this machine (oneDNN with a prepacked weight where
    that is faster); training and grad mode run ``F.linear`` as usual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gemm.linear(x, self.weight, self.bias)


class DropPath(nn.Module):
    """Stochastic depth on a residual branch (per sample along dim 0); identity in eval."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


def _add_mlp(mlp: nn.Sequential, x: torch.Tensor, owned_residual: torch.Tensor) -> torch.Tensor:
    """``owned_residual + mlp(x)`` for a CLIP MLP on fused epilogues; ``owned_residual`` is a
    tensor the calling block made itself (see :mod:`xclip_kernels.fused` for when it is
    updated in place)."""
    return fused.block_mlp_residual(
        x, owned_residual, mlp.c_fc.weight, mlp.c_fc.bias, mlp.c_proj.weight, mlp.c_proj.bias
    )


def _run_blocks(blocks: nn.Sequential, x: torch.Tensor, checkpointing: bool) -> torch.Tensor:
    """``blocks(x)``; with ``checkpointing``, each block's activations are recomputed in the
    backward pass instead of kept (non-reentrant: works with DDP, FSDP2 and frozen inputs)."""
    if not checkpointing:
        return blocks(x)
    for block in blocks:
        x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
    return x


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict([("c_fc", Linear(width, hidden)), ("gelu", QuickGELU()), ("c_proj", Linear(hidden, width))])
    )


class PackedAttention(nn.Module):
    """The parameters of ``nn.MultiheadAttention`` under its names (``in_proj_weight`` packs
    q, k, v), computed batch-first with SDPA."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = Linear(width, width)

    def forward(self, x: torch.Tensor, causal: bool = False, residual: torch.Tensor | None = None) -> torch.Tensor:
        """x: ``(B, S, W)`` -> ``(B, S, W)``, self-attention, optionally causal, plus ``residual``
        if given (added by the output projection's GEMM, into a fresh tensor)."""
        batch, length, width = x.shape
        qkv = gemm.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        mixed = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(batch, length, width)
        if residual is None:
            return self.out_proj(mixed)
        return fused.linear_residual(mixed, residual, self.out_proj.weight, self.out_proj.bias)


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer layer of CLIP's text tower and of the MIT."""

    def __init__(self, width: int, heads: int, mlp_dim: int, eps: float, causal: bool = False) -> None:
        super().__init__()
        self.causal = causal
        self.attn = PackedAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = _mlp(width, mlp_dim)
        self.ln_2 = nn.LayerNorm(width, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(B, S, W)`` -> ``(B, S, W)``: ``x + attn(ln_1(x))``, then ``+ mlp(ln_2(x))``."""
        x = self.attn(self.ln_1(x), causal=self.causal, residual=x)
        return _add_mlp(self.mlp, self.ln_2(x), x)


class CrossFrameBlock(nn.Module):
    """One cross-frame communication block (the official ``CrossFramelAttentionBlock``).

    Per frame, a message token is made from the class token; the T messages of a video attend
    to each other (CFA); then each frame's L tokens attend over themselves plus the frame's
    message token (IFA). Only the L token rows are queried: the official code's output row
    for the message token is dropped anyway.
    """

    def __init__(self, width: int, heads: int, mlp_dim: int, num_frames: int, eps: float, drop_path: float) -> None:
        super().__init__()
        self.heads = heads
        self.num_frames = num_frames
        self.eps = eps
        self.attention_backend: str | None = None
        self.message_fc = Linear(width, width)
        self.message_ln = nn.LayerNorm(width, eps=eps)
        self.message_attn = PackedAttention(width, heads)
        self.attn = PackedAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width, eps=eps)
        self.mlp = _mlp(width, mlp_dim)
        self.ln_2 = nn.LayerNorm(width, eps=eps)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: ``(F, L, W)`` -> ``(F, L, W)``, ``F = b * num_frames``."""
        # One message token per frame, from its class token; they attend over their video's T (CFA).
        messages = self._cross_frame_fusion(self.message_fc(x[:, 0]))
        # Each frame's L tokens attend over themselves plus the frame's message token (IFA).
        attended = self._intra_frame_diffusion(self.ln_1(x), self.ln_1(messages))
        if self._drops_paths():  # stochastic depth in training: each branch dropped per frame
            x = x + self.drop_path(self.attn.out_proj(attended))
            return x + self.drop_path(self.mlp(self.ln_2(x)))
        # The output projection adds the residual in its GEMM, into a fresh tensor (x, the
        # block's input, is never written); the MLP then adds into that one.
        x = fused.linear_residual(attended, x, self.attn.out_proj.weight, self.attn.out_proj.bias)
        return _add_mlp(self.mlp, self.ln_2(x), x)

    def _cross_frame_fusion(self, messages: torch.Tensor) -> torch.Tensor:
        """``m + message_attn(message_ln(m))`` over each video's T messages: ``(F, W)`` -> ``(F, W)``."""
        attn = self.message_attn
        # Under autocast message_fc gives low-precision messages while the weights stay float32;
        # the op takes one dtype, so the weights follow the messages (no-ops without autocast).
        weights = [
            w.to(messages.dtype)
            for w in (self.message_ln.weight, self.message_ln.bias, attn.in_proj_weight, attn.in_proj_bias,
                      attn.out_proj.weight, attn.out_proj.bias)
        ]
        fused_messages = xk.message_attention(
            messages, *weights, num_frames=self.num_frames, num_heads=self.heads, eps=self.eps,
            backend=self.attention_backend,
        )
        if not self._drops_paths():
            return fused_messages
        return messages + self.drop_path(fused_messages - messages)  # only the attention branch is dropped

    def _intra_frame_diffusion(self, normed: torch.Tensor, normed_messages: torch.Tensor) -> torch.Tensor:
        """Attention of each frame's L tokens over those tokens plus the frame's message token,
        before the output projection: normed ``(F, L, W)`` and normed_messages ``(F, W)`` ->
        ``(F, L, W)``. Only the L token rows are queries: the official code drops the message
        token's output row anyway."""
        frames, tokens, width = normed.shape
        head_dim = width // self.heads
        # q, k, v of the frame tokens from one fused projection (views, no copies); the message
        # token contributes only a key and a value, projected on their own.
        qkv = fused.qkv_projection(normed.view(frames * tokens, width), self.attn.in_proj_weight, self.attn.in_proj_bias)
        q, k, v = qkv.view(frames, tokens, 3, self.heads, head_dim).unbind(dim=2)
        message_kv = gemm.linear(normed_messages, self.attn.in_proj_weight[width:], self.attn.in_proj_bias[width:])
        msg_k, msg_v = message_kv.view(frames, 2, self.heads, head_dim).unbind(dim=1)
        attended = xk.frame_attention(q, k, v, msg_k, msg_v, backend=self.attention_backend)
        return attended.reshape(frames, tokens, width)

    def _drops_paths(self) -> bool:
        """Whether stochastic depth is on: training, with a drop-path rate above 0."""
        return self.training and isinstance(self.drop_path, DropPath)


class CrossFrameTransformer(nn.Module):
    """The stack of cross-frame blocks, under the official name ``visual.transformer``."""

    def __init__(self, config: XCLIPConfig) -> None:
        super().__init__()
        # Linear stochastic-depth schedule over depth, as the official code (plain Python, so the
        # model can be built on the meta device).
        steps = max(config.vision_layers - 1, 1)
        rates = [config.drop_path_rate * i / steps for i in range(config.vision_layers)]
        self.resblocks = nn.Sequential(
            *[
                CrossFrameBlock(
                    config.vision_width, config.vision_heads, config.mlp_dim("vision"),
                    config.num_frames, config.layer_norm_eps, rate,
                )
                for rate in rates
            ]
        )
        self.gradient_checkpointing = False  # set by XCLIP.set_gradient_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        return _run_blocks(self.resblocks, x, checkpointing)


class VideoEncoder(nn.Module):
    """Stem, cross-frame blocks and heads (the official ``CrossFrameCommunicationTransformer``)."""

    def __init__(self, config: XCLIPConfig) -> None:
        super().__init__()
        width = config.vision_width
        self.conv1 = nn.Conv2d(3, width, kernel_size=config.patch_size, stride=config.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.empty(width))
        self.positional_embedding = nn.Parameter(torch.empty(config.frame_tokens, width))
        self.ln_pre = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.transformer = CrossFrameTransformer(config)
        self.ln_post = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.proj = nn.Parameter(torch.empty(width, config.embed_dim))

    def forward(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """frames: ``(F, 3, S, S)`` -> class features ``(F, E)`` and patch tokens ``(F, N, W)``."""
        count, channels, size, _ = frames.shape
        patch = self.conv1.kernel_size[0]
        grid = size // patch
        width = self.conv1.out_channels
        # The stride-p convolution as one GEMM over unfolded patches (a third of the conv's
        # time on the CPU); patch order (row, column) and kernel layout (c, y, x) as conv1.
        patches = frames.reshape(count, channels, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
        embedded = gemm.linear(patches.reshape(count * grid * grid, -1), self.conv1.weight.reshape(width, -1))
        position = self.positional_embedding.to(embedded.dtype)
        cls = (self.class_embedding.to(embedded.dtype) + position[0]).expand(count, 1, width)
        x = torch.cat([cls, embedded.view(count, grid * grid, width) + position[1:]], dim=1)
        x = self.transformer(self.ln_pre(x))
        return gemm.linear(self.ln_post(x[:, 0]), self.proj.t()), x[:, 1:]


class MultiframeIntegrationTransformer(nn.Module):
    """MIT: temporal transformer over the T frame features, outer residual, mean over T."""

    def __init__(self, config: XCLIPConfig) -> None:
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.empty(1, config.num_frames, config.embed_dim))
        self.resblocks = nn.Sequential(
            *[
                ResidualAttentionBlock(config.embed_dim, config.mit_heads, config.mlp_dim("mit"), config.layer_norm_eps)
                for _ in range(config.mit_layers)
            ]
        )

    def forward(self, frame_features: torch.Tensor) -> torch.Tensor:
        """frame_features: ``(b, T, E)`` -> video features ``(b, E)``."""
        x = self.resblocks(frame_features + self.positional_embedding)
        return (x + frame_features).mean(dim=1)


class PromptCrossAttention(nn.Module):
    """Text-to-video cross-attention of the prompt generator (separate q/k/v, no qkv bias)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = Linear(width, width, bias=False)
        self.k_proj = Linear(width, width, bias=False)
        self.v_proj = Linear(width, width, bias=False)
        self.proj = Linear(width, width)

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """text: ``(b, K, E)``, visual: ``(b, N, E)`` -> ``(b, K, E)``."""
        batch, labels, width = text.shape
        head_dim = width // self.heads

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, self.heads, head_dim).transpose(1, 2)

        mixed = F.scaled_dot_product_attention(
            split(self.q_proj(text)), split(self.k_proj(visual)), split(self.v_proj(visual))
        )
        return self.proj(mixed.transpose(1, 2).reshape(batch, labels, width))


class PromptGeneratorLayer(nn.Module):
    def __init__(self, width: int, heads: int, eps: float) -> None:
        super().__init__()
        self.cross_attn = PromptCrossAttention(width, heads)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.norm3 = nn.LayerNorm(width, eps=eps)
        # Indices 0 and 3 hold the weights, as in the official checkpoints.
        self.mlp = nn.Sequential(Linear(width, 4 * width), QuickGELU(), nn.Dropout(0.0), Linear(4 * width, width))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        text = text + self.cross_attn(self.norm1(text), visual)
        return text + self.mlp(self.norm3(text))


class VideoSpecificPrompt(nn.Module):
    """Video-specific prompt generator: label features attend to the video's patch features."""

    def __init__(self, config: XCLIPConfig) -> None:
        super().__init__()
        width = config.embed_dim
        self.norm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.decoder = nn.ModuleList(
            [PromptGeneratorLayer(width, config.prompt_heads, config.layer_norm_eps) for _ in range(config.prompt_layers)]
        )
        self.alpha = nn.Parameter(torch.full((width,), float(config.prompt_alpha)))

    def forward(self, text: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
        """text: ``(b, K, E)``, visual: ``(b, N, E)`` -> prompt ``(b, K, E)``."""
        visual = self.norm(visual)
        for layer in self.decoder:
            text = layer(text, visual)
        return self.alpha * text


class VideoFeatures(NamedTuple):
    """What the video side hands to the logits: ``video`` ``(b, E)`` from the MIT, and
    ``patches`` ``(b, N, E)``, the projected patch tokens averaged over frames (for prompts)."""

    video: torch.Tensor
    patches: torch.Tensor


class XCLIP(nn.Module):
    """X-CLIP: video encoder with cross-frame communication, MIT, video-specific prompts and
    CLIP's text encoder. ``model(video, text) -> logits (b, K)``.

    Build with :func:`build_model` or :func:`xclip.load_checkpoint`.
    """

    def __init__(self, config: XCLIPConfig) -> None:
        super().__init__()
        self.config = config
        self.visual = VideoEncoder(config)
        self.mit = MultiframeIntegrationTransformer(config)
        self.prompts_visual_ln = nn.LayerNorm(config.vision_width, eps=config.layer_norm_eps)
        self.prompts_visual_proj = nn.Parameter(torch.empty(config.vision_width, config.embed_dim))
        self.prompts_generator = VideoSpecificPrompt(config)
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.Sequential(
            *[
                ResidualAttentionBlock(
                    config.text_width, config.text_heads, config.mlp_dim("text"), config.layer_norm_eps, causal=True
                )
                for _ in range(config.text_layers)
            ]
        )
        self.token_embedding = nn.Embedding(config.vocab_size, config.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(config.context_length, config.text_width))
        self.ln_final = nn.LayerNorm(config.text_width, eps=config.layer_norm_eps)
        self.text_projection = nn.Parameter(torch.empty(config.text_width, config.embed_dim))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.reset_parameters()

    # -- set-up -------------------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """CLIP-style random initialisation (``std`` scaled by width and depth)."""
        c = self.config
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, PackedAttention):
                width = module.in_proj_weight.shape[1]
                nn.init.normal_(module.in_proj_weight, std=width**-0.5)
                nn.init.zeros_(module.in_proj_bias)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.visual.class_embedding, std=c.vision_width**-0.5)
        nn.init.normal_(self.visual.positional_embedding, std=c.vision_width**-0.5)
        nn.init.normal_(self.visual.proj, std=c.vision_width**-0.5)
        nn.init.normal_(self.prompts_visual_proj, std=c.vision_width**-0.5)
        nn.init.normal_(self.text_projection, std=c.text_width**-0.5)
        nn.init.trunc_normal_(self.mit.positional_embedding, std=0.02)
        nn.init.kaiming_uniform_(self.visual.conv1.weight, a=math.sqrt(5))
        self.prompts_generator.alpha.fill_(c.prompt_alpha)
        self.logit_scale.fill_(math.log(1 / 0.07))

    def set_attention_backend(self, name: str | None) -> None:
        """Run every cross-frame block's attention on backend ``name`` (``None``: automatic)."""
        if name is not None:
            get_backend(name)  # unknown names fail here, not at the first forward
            preload(name)  # imports happen now, not inside a torch.compile trace
        else:
            # What the automatic choice will take, loaded now: not inside a torch.compile trace,
            # and its FLOP formulas registered before a FlopCounterMode around the first forward.
            preload_automatic()
        for block in self.visual.transformer.resblocks:
            block.attention_backend = name

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each vision and text block in the backward pass instead of storing its
        activations (``torch.utils.checkpoint``, non-reentrant), while training with grad.

        Outputs and gradients are unchanged (drop-path masks are replayed). Only each block's
        input is kept, plus one block's activations at a time during backward, for about one
        extra forward pass of compute. Eval and no-grad runs are unaffected.
        """
        if not isinstance(enabled, bool):
            raise TypeError(f"enabled: expected a bool, got {enabled!r}")
        self.visual.transformer.gradient_checkpointing = enabled

    @property
    def gradient_checkpointing(self) -> bool:
        """Whether :meth:`set_gradient_checkpointing` is on."""
        return self.visual.transformer.gradient_checkpointing

    @property
    def attention_backend(self) -> str | None:
        """The backend the cross-frame blocks are set to (``None``: automatic)."""
        return self.visual.transformer.resblocks[0].attention_backend

    # -- inputs -------------------------------------------------------------------------------

    def _check_video(self, video: object) -> torch.Tensor:
        c = self.config
        if not isinstance(video, torch.Tensor):
            raise TypeError(f"video: expected a torch.Tensor (b, T, 3, S, S), got {type(video).__name__}")
        if not video.is_floating_point():
            raise TypeError(f"video: expected a floating-point tensor, got dtype {video.dtype}")
        if video.dim() != 5:
            raise ValueError(f"video: expected 5 dims (b, T, 3, S, S), got shape {tuple(video.shape)}")
        b, t, ch, h, w = video.shape
        if b < 1:
            raise ValueError(f"video: expected at least one video, got batch size {b}")
        if t != c.num_frames:
            raise ValueError(f"video: expected T = num_frames = {c.num_frames} frames, got {t} (shape {tuple(video.shape)})")
        if ch != 3:
            raise ValueError(f"video: expected 3 channels at dim 2, got {ch} (shape {tuple(video.shape)})")
        if h != c.image_size or w != c.image_size:
            raise ValueError(f"video: expected frames of {c.image_size}x{c.image_size}, got {h}x{w}")
        return video

    def _check_text(self, text: object) -> torch.Tensor:
        c = self.config
        if not isinstance(text, torch.Tensor):
            raise TypeError(f"text: expected a torch.Tensor of token ids (K, {c.context_length}), got {type(text).__name__}")
        if text.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"text: expected int64 token ids (from xclip.tokenize), got dtype {text.dtype}")
        if text.dim() != 2 or text.shape[1] != c.context_length or text.shape[0] < 1:
            raise ValueError(f"text: expected shape (K, {c.context_length}) with K >= 1, got {tuple(text.shape)}")
        if not is_tracing(text):  # a value check needs the data: not while tracing
            low, high = int(text.min()), int(text.max())
            if low < 0 or high >= c.vocab_size:
                raise ValueError(f"text: expected token ids in [0, {c.vocab_size}), got values in [{low}, {high}]")
        return text

    # -- the model ----------------------------------------------------------------------------

    def encode_video_features(self, video: torch.Tensor) -> VideoFeatures:
        """video ``(b, T, 3, S, S)`` -> :class:`VideoFeatures` (MIT output and averaged patches)."""
        video = self._check_video(video)
        b, t = video.shape[:2]
        frames = video.reshape(b * t, *video.shape[2:]).to(self.visual.conv1.weight.dtype)
        cls, patches = self.visual(frames)
        # The official code projects every frame's patches and then averages over T; the
        # projection is linear, so averaging first gives the same features for T times less work.
        patches = self.prompts_visual_ln(patches)
        patches = patches.view(b, t, *patches.shape[1:]).mean(dim=1)
        patches = gemm.linear(patches, self.prompts_visual_proj.t())
        return VideoFeatures(self.mit(cls.view(b, t, -1)), patches)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """video ``(b, T, 3, S, S)`` float -> video features ``(b, E)`` (not normalised)."""
        return self.encode_video_features(video).video

    def encode_text(self, text: torch.Tensor) -> torch.Tensor:
        """text ``(K, context_length)`` token ids -> label features ``(K, E)`` (before prompts)."""
        text = self._check_text(text)
        end = text.argmax(dim=-1)  # the end token has the largest id
        if not is_tracing(text):
            # Attention is causal and the rest is per token, so the tokens after the last end
            # token cannot change any end token's output: skip them (exact, often 10x less work).
            text = text[:, : int(end.max()) + 1]
        x = self.token_embedding(text) + self.positional_embedding[: text.shape[1]]
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        x = self.ln_final(_run_blocks(self.transformer.resblocks, x, checkpointing))
        end_of_text = x[torch.arange(x.shape[0], device=x.device), end]
        return gemm.linear(end_of_text, self.text_projection.t())

    def logits(self, video_features: VideoFeatures, text_features: torch.Tensor) -> torch.Tensor:
        """Logits ``(b, K)`` from :meth:`encode_video_features` and :meth:`encode_text` outputs."""
        video, patches = video_features
        text = text_features.unsqueeze(0).expand(video.shape[0], -1, -1)
        text = text + self.prompts_generator(text, patches)
        video = video / video.norm(dim=-1, keepdim=True)
        text = text / text.norm(dim=-1, keepdim=True)
        return torch.einsum("bd,bkd->bk", video, self.logit_scale.exp() * text)

    def forward(self, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """video ``(b, T, 3, S, S)`` float, text ``(K, 77)`` int64 -> logits ``(b, K)``."""
        return self.logits(self.encode_video_features(video), self.encode_text(text))

    def save(self, path: str | os.PathLike) -> None:
        """Write weights and config to one safetensors file, loadable by :func:`xclip.load_checkpoint`
        (written to a temporary name beside ``path``, then renamed: never half a file)."""
        saved.write(self.state_dict(), self.config, path)


def build_model(
    name_or_config: str | XCLIPConfig, *, num_frames: int | None = None, backend: str | None = None
) -> XCLIP:
    """A randomly initialised X-CLIP.

    Args:
        name_or_config: a variant ("xclip-b32", "xclip-b16", "xclip-l14", "xclip-l14-336")
            or an :class:`XCLIPConfig`.
        num_frames: T; ``None`` keeps the config's (8 for the named variants).
        backend: attention backend of the cross-frame blocks (``None``: automatic).
    """
    config = resolve_config(name_or_config, num_frames)
    model = XCLIP(config)
    model.set_attention_backend(backend)
    return model
