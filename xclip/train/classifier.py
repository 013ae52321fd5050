"""The module a fine-tuning step trains: an X-CLIP together with its class prompts."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import xclip
from xclip.model import XCLIP


class VideoClassifier(nn.Module):
    """An X-CLIP with its class prompts: ``forward(video (b, T, 3, S, S)) -> logits (b, K)``.

    The module that DDP / FSDP wrap, so that one forward covers video and text. With
    ``frozen_text`` the prompts are encoded once, without grad, at the first forward, and
    reused (the official ``use_cache``).
    """

    def __init__(self, model: XCLIP, labels: Sequence[str], *, frozen_text: bool = False) -> None:
        super().__init__()
        self.model = model
        self.frozen_text = frozen_text
        tokens = xclip.tokenize(list(labels), context_length=model.config.context_length)
        self.register_buffer("text", tokens, persistent=False)
        self._text_features: torch.Tensor | None = None

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        if self.frozen_text:
            if self._text_features is None:
                with torch.no_grad():
                    self._text_features = self.model.encode_text(self.text)
            text_features = self._text_features
        else:
            text_features = self.model.encode_text(self.text)
        return self.model.logits(self.model.encode_video_features(video), text_features)
