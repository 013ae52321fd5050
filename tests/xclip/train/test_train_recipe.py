"""xclip.train.recipe: the official optimizer recipe (parameter groups, text freezing, the
schedule) and training steps that learn (autocast, gradient accumulation)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import xclip
from xclip.train import main
from xclip.train.data import SyntheticVideos
from xclip.train.classifier import VideoClassifier
from xclip.train.recipe import freeze_text_tower, param_groups, train_step, warmup_cosine
from train_helpers import PLAIN, TEXT_PREFIXES, TINY, tiny_model


# -- (a) the optimizer recipe ------------------------------------------------------------------


def test_param_groups_new_modules_get_10x_lr_and_no_decay_is_right() -> None:
    model = tiny_model()
    groups = param_groups(model, lr=1e-4, weight_decay=0.05)
    where = {id(p): g for g in groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert len(where) == len(names) == sum(len(g["params"]) for g in groups)  # each parameter once
    assert {g["name"] for g in groups} == {"clip", "clip no-decay", "new", "new no-decay"}

    new = {n for n in names if "message_" in n or n.startswith(("mit.", "prompts_"))}
    assert "visual.transformer.resblocks.1.message_attn.in_proj_weight" in new
    assert {"prompts_visual_proj", "prompts_visual_ln.weight", "prompts_generator.alpha", "mit.positional_embedding"} <= new
    norms = {
        f"{m}.{p}" for m, mod in model.named_modules() if isinstance(mod, torch.nn.LayerNorm) for p in ("weight", "bias")
    }
    no_decay = norms | {
        n for n in names if n.endswith("bias") or "embedding" in n or n in ("logit_scale", "prompts_generator.alpha")
    }
    assert {"visual.class_embedding", "token_embedding.weight", "positional_embedding", "visual.positional_embedding",
            "visual.ln_pre.weight", "ln_final.weight", "prompts_generator.decoder.0.norm1.weight",
            "visual.transformer.resblocks.0.message_ln.weight", "mit.positional_embedding"} <= no_decay
    for name, p in names.items():
        group = where[id(p)]
        assert group["lr"] == pytest.approx(1e-3 if name in new else 1e-4), name
        assert group["weight_decay"] == (0.0 if name in no_decay else 0.05), name
    # Every matrix outside the embeddings decays, the convolution and projections included.
    decayed = {n for n, p in names.items() if where[id(p)]["weight_decay"] > 0}
    assert {"visual.conv1.weight", "visual.proj", "text_projection", "prompts_visual_proj",
            "visual.transformer.resblocks.0.attn.in_proj_weight", "mit.resblocks.0.mlp.c_fc.weight"} <= decayed


def test_frozen_text_tower_gets_no_grads_and_no_updates(tiny_checkpoint: Path, tmp_path: Path) -> None:
    start = xclip.load_checkpoint(tiny_checkpoint).state_dict()
    result = main(
        ["--model", str(tiny_checkpoint), "--synthetic", "4", "--batch-size", "2", "--max-steps", "2",
         "--lr", "1e-3", "--freeze-text", "--output", str(tmp_path / "out"), *PLAIN]
    )
    model = result.model
    text = [n for n, _ in model.named_parameters() if n.startswith(TEXT_PREFIXES)]
    assert "transformer.resblocks.1.mlp.c_proj.weight" in text and "logit_scale" in text
    for name, p in model.named_parameters():
        if name.startswith(TEXT_PREFIXES):
            assert not p.requires_grad and p.grad is None, name
            assert torch.equal(p.detach(), start[name]), name
        else:
            assert p.requires_grad and p.grad is not None, name
    assert not torch.equal(model.visual.conv1.weight.detach(), start["visual.conv1.weight"])
    assert not torch.equal(model.mit.resblocks[0].attn.in_proj_weight.detach(), start["mit.resblocks.0.attn.in_proj_weight"])
    # The checkpoint is the trained model, readable by load_checkpoint; labels beside it.
    assert result.checkpoint == tmp_path / "out" / "final.safetensors"
    saved = xclip.load_checkpoint(result.checkpoint).state_dict()
    assert all(torch.equal(saved[n], p.detach()) for n, p in model.state_dict().items())
    assert (tmp_path / "out" / "labels.txt").read_text().splitlines() == ["class 0", "class 1", "class 2", "class 3"]


def test_warmup_then_cosine_schedule() -> None:
    f = warmup_cosine
    assert [f(s, warmup_steps=4, total_steps=12) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4, warmup_steps=4, total_steps=12) == 1.0
    assert f(8, warmup_steps=4, total_steps=12) == pytest.approx(0.01 + 0.99 * 0.5)
    assert f(12, warmup_steps=4, total_steps=12) == pytest.approx(0.01)
    assert f(0, warmup_steps=0, total_steps=10) == 1.0


# -- (b) training learns -----------------------------------------------------------------------


def test_a_few_steps_reduce_the_loss() -> None:
    # Frozen text (the official default): random text features of "class k" stay put and the
    # video side learns to point at them.
    model = tiny_model()
    freeze_text_tower(model)
    data = SyntheticVideos(8, 4, TINY.num_frames, TINY.image_size, seed=3)
    classifier = VideoClassifier(model, data.labels, frozen_text=True).train()
    video = torch.stack([data[i][0] for i in range(8)])
    target = torch.tensor([data[i][1] for i in range(8)])
    optimizer = torch.optim.AdamW(param_groups(model, lr=1e-3, weight_decay=0.001), betas=(0.9, 0.98), eps=1e-8)

    def loss_now() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(classifier(video), target))

    before = loss_now()
    losses = [train_step(classifier, optimizer, video, target, accumulation_steps=2) for _ in range(8)]
    after = loss_now()
    assert after < 0.5 * before, (before, losses, after)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_steps_train_float32_weights(amp: str, tiny_checkpoint: Path) -> None:
    # bf16 / fp16 (with a GradScaler) autocast, as on a GPU; frozen prompts are encoded under it.
    start = xclip.load_checkpoint(tiny_checkpoint).state_dict()
    result = main(
        ["--model", str(tiny_checkpoint), "--synthetic", "4", "--batch-size", "2", "--max-steps", "2",
         "--lr", "1e-3", "--amp", amp, "--freeze-text", *PLAIN]
    )
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    weight = result.model.visual.conv1.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight.detach(), start["visual.conv1.weight"])


def test_accumulation_gives_the_gradient_of_the_whole_batch() -> None:
    # In float64, so that summation order (1e-16) cannot hide a real difference; in float32 the
    # text tower's gradients, sums of cancelling terms over videos, differ by ~1e-5 of their size.
    data = SyntheticVideos(4, 2, TINY.num_frames, TINY.image_size, seed=1)
    video = torch.stack([data[i][0] for i in range(4)]).double()
    target = torch.tensor([data[i][1] for i in range(4)])
    grads = []
    for steps in (1, 4):
        model = tiny_model().double()
        classifier = VideoClassifier(model, data.labels).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        train_step(classifier, optimizer, video, target, accumulation_steps=steps, label_smoothing=0.1)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    scale = max(float(g.abs().max()) for g in grads[0].values())
    for name, g in grads[0].items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-10, atol=1e-12 * scale, msg=name)
