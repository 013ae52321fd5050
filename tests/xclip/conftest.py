"""Shared fixtures for the xclip tests: a tiny X-CLIP config, a tiny Hugging Face XCLIPModel
with non-trivial random weights, and checkpoints of every supported format written from it.

Sizes are small and non-default so that every test is fast and a size read from the wrong
place shows. Tests reach all of this through fixtures (``tiny_config``, ``hf_model_factory``,
...), never ``from conftest import``: tests/xclip_kernels has a conftest.py too, and both are
the module "conftest". Widths are multiples of 64 with heads = width // 64 wherever the official
format (which infers heads that way) is involved.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

import xclip

# Our config matching TINY_HF below; explicit MLP sizes that are not 4x the width, so that
# an MLP size taken from the width instead of the checkpoint shows.
TINY = xclip.XCLIPConfig(
    image_size=32,
    patch_size=8,
    vision_width=128,
    vision_layers=2,
    vision_heads=2,
    vision_mlp_dim=192,
    embed_dim=64,
    context_length=77,
    vocab_size=49408,
    text_width=64,
    text_layers=2,
    text_heads=1,
    text_mlp_dim=96,
    num_frames=3,
    mit_layers=1,
    mit_heads=1,
    mit_mlp_dim=80,
    prompt_layers=2,
    prompt_heads=1,
    prompt_alpha=0.1,
)

LABELS = ["archery", "bowling", "playing the violin"]


def make_hf_config(
    *,
    vision_heads: int = TINY.vision_heads,
    text_heads: int = TINY.text_heads,
    mit_heads: int = TINY.mit_heads,
    prompt_heads: int = TINY.prompt_heads,
    num_frames: int = TINY.num_frames,
    attn_implementation: str = "sdpa",
):
    """A Hugging Face ``XCLIPConfig`` of the TINY sizes (heads overridable)."""
    from transformers import XCLIPConfig as HFConfig

    config = HFConfig(
        text_config=dict(
            hidden_size=TINY.text_width,
            intermediate_size=TINY.text_mlp_dim,
            num_hidden_layers=TINY.text_layers,
            num_attention_heads=text_heads,
        ),
        vision_config=dict(
            hidden_size=TINY.vision_width,
            intermediate_size=TINY.vision_mlp_dim,
            num_hidden_layers=TINY.vision_layers,
            num_attention_heads=vision_heads,
            image_size=TINY.image_size,
            patch_size=TINY.patch_size,
            num_frames=num_frames,
            mit_hidden_size=TINY.embed_dim,  # must equal projection_dim
            mit_intermediate_size=TINY.mit_mlp_dim,
            mit_num_hidden_layers=TINY.mit_layers,
            mit_num_attention_heads=mit_heads,
        ),
        projection_dim=TINY.embed_dim,
        prompt_layers=TINY.prompt_layers,
        prompt_num_attention_heads=prompt_heads,
        prompt_alpha=TINY.prompt_alpha,
    )
    # The XCLIPModel constructor takes no attn_implementation; it reads it from the config.
    config._attn_implementation = attn_implementation
    return config


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Give every parameter non-trivial random values, so that a bias, LayerNorm, transpose
    or q/k/v-order slip in a conversion changes the logits. Matrices get std 1/sqrt(fan_in)
    (activations keep their scale, the model is far from linear); LayerNorm weights
    1 + N(0, 0.1); biases N(0, 0.05); embeddings N(0, 0.5); alpha U(0.5, 1). ``logit_scale``
    keeps its initial value."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return mean + std * torch.randn(shape, generator=g)

    for name, p in model.named_parameters():
        if name == "logit_scale":
            continue
        if name.endswith("alpha"):
            p.copy_(0.5 + 0.5 * torch.rand(p.shape, generator=g))
        elif name.endswith("bias"):
            p.copy_(normal(p.shape, 0.05))
        elif p.dim() == 1 and "embedding" not in name:  # LayerNorm weights
            p.copy_(normal(p.shape, 0.1, 1.0))
        elif "embedding" in name and "patch" not in name:  # class, position, token embeddings
            p.copy_(normal(p.shape, 0.5))
        elif name == "prompts_visual_projection":  # used as x @ P: fan-in is dim 0
            p.copy_(normal(p.shape, p.shape[0] ** -0.5))
        else:  # Linear / conv weights (out, in, ...)
            p.copy_(normal(p.shape, math.prod(p.shape[1:]) ** -0.5))
    return model


def make_hf_model(seed: int = 0, **config_overrides):
    """A tiny HF ``XCLIPModel`` in eval mode with random weights."""
    from transformers import XCLIPModel

    return randomize_(XCLIPModel(make_hf_config(**config_overrides)), seed).eval()


@torch.no_grad()
def hf_logits(hf_model, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=text, pixel_values=video).logits_per_video


@pytest.fixture(scope="session")
def tiny_config() -> xclip.XCLIPConfig:
    return TINY


@pytest.fixture(scope="session")
def hf_model_factory():
    """``make_hf_model(seed=0, **heads)``: a fresh tiny HF model with random weights."""
    pytest.importorskip("transformers")
    return make_hf_model


@pytest.fixture(scope="session")
def text() -> torch.Tensor:
    """(3, 77) token ids of three labels."""
    return xclip.tokenize(LABELS)


@pytest.fixture(scope="session")
def video() -> torch.Tensor:
    """(2, T, 3, S, S) float32, two random videos at the TINY size."""
    g = torch.Generator().manual_seed(1234)
    return torch.randn(2, TINY.num_frames, 3, TINY.image_size, TINY.image_size, generator=g)


@pytest.fixture(scope="session")
def hf_model():
    """The tiny HF model (heads = width // 64, so it is also expressible as an official checkpoint).
    Session-wide: tests must not modify it."""
    pytest.importorskip("transformers")
    return make_hf_model(seed=0)


@pytest.fixture(scope="session")
def hf_reference_logits(hf_model, video, text) -> torch.Tensor:
    """(2, 3) logits of the HF model: the ground truth every format must reproduce."""
    return hf_logits(hf_model, video, text)


@pytest.fixture(scope="session")
def hf_dir(hf_model, tmp_path_factory) -> Path:
    """``save_pretrained`` directory (config.json + model.safetensors) of the tiny HF model."""
    path = tmp_path_factory.mktemp("hf") / "xclip-tiny"
    hf_model.save_pretrained(str(path))
    assert (path / "model.safetensors").is_file() and (path / "config.json").is_file()
    return path


@pytest.fixture(scope="session")
def hf_bin_dir(hf_model, hf_dir, tmp_path_factory) -> Path:
    """The same model as config.json + pytorch_model.bin (this transformers version has no
    ``safe_serialization=False``, so the .bin is written with ``torch.save``). The legacy
    ``position_ids`` buffer that older HF checkpoints carry is included: it must be ignored."""
    path = tmp_path_factory.mktemp("hf-bin") / "xclip-tiny"
    path.mkdir()
    shutil.copy(hf_dir / "config.json", path / "config.json")
    state = dict(hf_model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(TINY.context_length).unsqueeze(0)
    state["vision_model.embeddings.position_ids"] = torch.arange(TINY.grid_size**2 + 1).unsqueeze(0)
    torch.save(state, path / "pytorch_model.bin")
    return path


@pytest.fixture(scope="session")
def loaded(hf_dir) -> xclip.XCLIP:
    """Our model loaded from ``hf_dir``. Session-wide: tests must not modify it."""
    return xclip.load_checkpoint(hf_dir)


@pytest.fixture(scope="session")
def official_state(loaded) -> dict[str, torch.Tensor]:
    """The official-key state dict of the tiny model (a fresh copy per session)."""
    return {k: v.detach().clone() for k, v in loaded.state_dict().items()}


@pytest.fixture(scope="session")
def official_pth(official_state, tmp_path_factory) -> Path:
    """An official-style training checkpoint: ``{"model": sd, "optimizer": {}, "epoch": 3}``."""
    path = tmp_path_factory.mktemp("official") / "ckpt_epoch_3.pth"
    torch.save({"model": official_state, "optimizer": {}, "epoch": 3}, path)
    return path


@pytest.fixture(scope="session")
def ours_safetensors(loaded, tmp_path_factory) -> Path:
    """Our own format, written by ``XCLIP.save``."""
    path = tmp_path_factory.mktemp("ours") / "tiny.safetensors"
    loaded.save(str(path))
    return path


@pytest.fixture(scope="session")
def checkpoint_paths(hf_dir, hf_bin_dir, official_pth, ours_safetensors) -> dict[str, Path]:
    """One checkpoint of the tiny model per format, by format name."""
    return {"hf": hf_dir, "hf-bin": hf_bin_dir, "official": official_pth, "ours": ours_safetensors}
