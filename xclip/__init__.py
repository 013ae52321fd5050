"""xclip: a drop-in X-CLIP model (video encoder, MIT, video-specific prompts, text encoder)
that loads the official and Hugging Face checkpoints and runs on any ``xclip_kernels`` backend.

    import xclip
    model = xclip.load_checkpoint("k400_32_8.pth")           # or xclip.build_model("xclip-b32")
    logits = model(video, xclip.tokenize(["archery", "bowling"]))   # (b, K)
"""

from .checkpoint import CheckpointError, load_checkpoint
from .collection import classify_collection, embed
from .config import VARIANTS, XCLIPConfig
from .model import XCLIP, VideoFeatures, build_model
from .tokenizer import tokenize

__all__ = [
    "VARIANTS",
    "XCLIP",
    "CheckpointError",
    "VideoFeatures",
    "XCLIPConfig",
    "build_model",
    "classify_collection",
    "embed",
    "load_checkpoint",
    "tokenize",
]
