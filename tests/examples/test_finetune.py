"""examples/finetune.py: the official optimizer recipe, training steps that learn, two gloo
processes (DDP and FSDP2) that reproduce one process on the same global batch, the video
folder and refusals of bad arguments."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

import xclip

REPO_ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("finetune", REPO_ROOT / "examples" / "finetune.py")
finetune = importlib.util.module_from_spec(_spec)
sys.modules["finetune"] = finetune  # dataclasses look their module up there
_spec.loader.exec_module(finetune)

TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=16, vision_width=64, vision_layers=2, vision_heads=1, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=2, mit_heads=1, prompt_heads=1,
)
TEXT_PREFIXES = ("transformer.", "token_embedding.", "positional_embedding", "ln_final.", "text_projection", "logit_scale")
# Deterministic runs: no mixup/cutmix draws, no loader processes.
PLAIN = ["--mixup", "0", "--cutmix", "0", "--workers", "0", "--device", "cpu", "--seed", "7"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models here are all overhead: one thread is several times faster than two
    fighting over shared cores (the two-process runs also get one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> xclip.XCLIP:
    torch.manual_seed(seed)
    return xclip.build_model(TINY)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model written with ``model.save()``, the starting point of every run."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    tiny_model().save(str(path))
    return path


# -- (a) the optimizer recipe ------------------------------------------------------------------


def test_param_groups_new_modules_get_10x_lr_and_no_decay_is_right() -> None:
    model = tiny_model()
    groups = finetune.param_groups(model, lr=1e-4, weight_decay=0.05)
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
    result = finetune.main(
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
    f = finetune.warmup_cosine
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
    finetune.freeze_text_tower(model)
    data = finetune.SyntheticVideos(8, 4, TINY.num_frames, TINY.image_size, seed=3)
    classifier = finetune.VideoClassifier(model, data.labels, frozen_text=True).train()
    video = torch.stack([data[i][0] for i in range(8)])
    target = torch.tensor([data[i][1] for i in range(8)])
    optimizer = torch.optim.AdamW(finetune.param_groups(model, lr=1e-3, weight_decay=0.001), betas=(0.9, 0.98), eps=1e-8)

    def loss_now() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.cross_entropy(classifier(video), target))

    before = loss_now()
    losses = [finetune.train_step(classifier, optimizer, video, target, accumulation_steps=2) for _ in range(8)]
    after = loss_now()
    assert after < 0.5 * before, (before, losses, after)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_steps_train_float32_weights(amp: str, tiny_checkpoint: Path) -> None:
    # bf16 / fp16 (with a GradScaler) autocast, as on a GPU; frozen prompts are encoded under it.
    start = xclip.load_checkpoint(tiny_checkpoint).state_dict()
    result = finetune.main(
        ["--model", str(tiny_checkpoint), "--synthetic", "4", "--batch-size", "2", "--max-steps", "2",
         "--lr", "1e-3", "--amp", amp, "--freeze-text", *PLAIN]
    )
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    weight = result.model.visual.conv1.weight
    assert weight.dtype == torch.float32 and not torch.equal(weight.detach(), start["visual.conv1.weight"])


def test_accumulation_gives_the_gradient_of_the_whole_batch() -> None:
    # In float64, so that summation order (1e-16) cannot hide a real difference; in float32 the
    # text tower's gradients, sums of cancelling terms over videos, differ by ~1e-5 of their size.
    data = finetune.SyntheticVideos(4, 2, TINY.num_frames, TINY.image_size, seed=1)
    video = torch.stack([data[i][0] for i in range(4)]).double()
    target = torch.tensor([data[i][1] for i in range(4)])
    grads = []
    for steps in (1, 4):
        model = tiny_model().double()
        classifier = finetune.VideoClassifier(model, data.labels).train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        finetune.train_step(classifier, optimizer, video, target, accumulation_steps=steps, label_smoothing=0.1)
        grads.append({n: p.grad for n, p in model.named_parameters()})
    scale = max(float(g.abs().max()) for g in grads[0].values())
    for name, g in grads[0].items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(grads[1][name], g, rtol=1e-10, atol=1e-12 * scale, msg=name)


def test_mixup_and_cutmix_targets_follow_the_pixels() -> None:
    video = torch.arange(4.0).view(4, 1, 1, 1, 1).expand(4, 2, 3, 16, 16).contiguous()
    target = torch.tensor([0, 1, 2, 3])
    mixed, soft = finetune.mix_batch(video, target, 5, mixup=0.8, cutmix=0.0, rng=random.Random(0))
    lam = float(soft[0, 0])
    torch.testing.assert_close(mixed, lam * video + (1 - lam) * video.flip(0))
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))
    mixed, soft = finetune.mix_batch(video, target, 5, mixup=0.0, cutmix=1.0, rng=random.Random(1))
    kept = float((mixed[0] == 0).float().mean())  # pixels of video 0 still its own
    assert soft[0, 0] == pytest.approx(kept) and soft[0, 3] == pytest.approx(1 - kept)
    torch.testing.assert_close(soft.sum(dim=1), torch.ones(4))


# -- (c) two processes reproduce one -----------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# 4 clips, 2 steps (2 epochs, reshuffled): one process takes all 4 per step, each of two
# processes 2 of them. DDP/FSDP average per-process mean gradients: equal to the gradient of the
# global mean loss, so losses and gradients must agree up to summation order. In float64, where
# that is ~1e-15 (in float32 the text tower's gradients, sums of cancelling terms, move by ~1e-5
# of their size with the batch split, and would hide a small error).
# name -> (arguments of the two-process run, of the one-process run). "accumulate": two
# micro-batches per step, gradient sync skipped on the first. With the text tower trained,
# FSDP also averages the replicated scalar logit_scale's gradient by hand.
TWO_PROCESS_RUNS = {
    "ddp-accumulate": (["--accumulation-steps", "2"], []),
    "fsdp-accumulate-checkpointing": (
        ["--fsdp", "--accumulation-steps", "2", "--grad-checkpointing"], ["--grad-checkpointing"]
    ),
    "fsdp-frozen-text": (["--fsdp", "--freeze-text"], ["--freeze-text"]),
}


def _common_argv(checkpoint: Path) -> list[str]:
    return ["--model", str(checkpoint), "--synthetic", "4", "--synthetic-classes", "3", "--max-steps", "2",
            "--lr", "1e-4", "--dtype", "float64", *PLAIN]


@pytest.fixture(scope="module")
def two_process_runs(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """Every run of TWO_PROCESS_RUNS in one ``torchrun --nproc-per-node 2`` launch on gloo:
    name -> (gathered parameters, gradients and losses; output folder)."""
    root = tmp_path_factory.mktemp("two-processes")
    runs = [
        dict(argv=[*_common_argv(tiny_checkpoint), "--batch-size", "2", "--output", str(root / name), *extra],
             out=str(root / f"{name}.pt"))
        for name, (extra, _) in TWO_PROCESS_RUNS.items()
    ]
    (root / "runs.json").write_text(json.dumps(runs))
    pythonpath = os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=pythonpath, OMP_NUM_THREADS="1")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
        "--master-port", str(_free_port()), str(REPO_ROOT / "tests" / "examples" / "finetune_worker.py"),
        str(root / "runs.json"),
    ]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.stdout.count("fine-tuning") == len(runs) and proc.stdout.count("step 2/2") == len(runs)  # rank 0 alone
    return {name: (torch.load(root / f"{name}.pt"), root / name) for name in TWO_PROCESS_RUNS}


@pytest.mark.parametrize("name", list(TWO_PROCESS_RUNS))
def test_two_gloo_processes_match_one_process_on_the_same_global_batch(
    name: str, two_process_runs: dict[str, tuple[dict, Path]], tiny_checkpoint: Path
) -> None:
    two, output = two_process_runs[name]
    extra, single_extra = TWO_PROCESS_RUNS[name]
    assert two["world"] == 2 and two["steps"] == 2
    one = finetune.main([*_common_argv(tiny_checkpoint), "--batch-size", "4", *single_extra])
    assert one.steps == 2
    torch.testing.assert_close(torch.tensor(two["losses"]), torch.tensor(one.losses), rtol=1e-12, atol=0)
    scale = max(float(p.grad.abs().max()) for p in one.model.parameters() if p.grad is not None)
    compared = 0
    for param_name, p in one.model.named_parameters():
        got = two["grads"][param_name]
        if p.grad is None:
            assert got is None and "--freeze-text" in extra and param_name.startswith(TEXT_PREFIXES), param_name
            continue
        want = p.grad.detach()
        assert want.dtype == got.dtype == torch.float64 and float(want.abs().max()) > 0, param_name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12 * scale, msg=param_name)
        compared += 1
    assert compared >= 40
    # Rank 0's checkpoint holds the gathered parameters (FSDP: every shard), bit for bit.
    saved = safetensors.torch.load_file(output / "final.safetensors")
    assert set(saved) == set(two["params"])
    for param_name, value in two["params"].items():
        assert torch.equal(saved[param_name], value), param_name


# -- (e) the data folder and bad arguments -----------------------------------------------------


def _video_tree(root: Path) -> Path:
    for rel in ("playing_violin/a.mp4", "playing_violin/b.MKV", "playing_violin/.hidden.mp4",
                "playing_violin/notes.txt", "surfing__water/c.avi", ".cache/d.mp4"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"")
    return root


def _fake_loader(path: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(path.encode()))
    return torch.randn(TINY.num_frames, 3, TINY.image_size, TINY.image_size, generator=g)


def test_video_folder_classes_labels_and_training_from_it(tmp_path: Path, tiny_checkpoint: Path) -> None:
    root = _video_tree(tmp_path / "videos")
    data = finetune.VideoFolder(root, _fake_loader)
    assert data.classes == ["playing_violin", "surfing__water"]
    assert data.labels == ["playing violin", "surfing water"]
    assert [(Path(p).name, k) for p, k in data.samples] == [("a.mp4", 0), ("b.MKV", 0), ("c.avi", 1)]
    clip, label = data[2]
    assert label == 1 and torch.equal(clip, _fake_loader(str(root / "surfing__water" / "c.avi")))
    result = finetune.main(
        ["--model", str(tiny_checkpoint), "--data", str(root), "--batch-size", "2", "--max-steps", "1", *PLAIN],
        load_clip=_fake_loader,
    )
    assert result.steps == 1 and result.labels == ["playing violin", "surfing water"]


def test_video_folder_checks_what_load_clip_returns(tmp_path: Path) -> None:
    data = finetune.VideoFolder(_video_tree(tmp_path / "v"), lambda path: torch.zeros(2, 32, 32))
    with pytest.raises(ValueError, match=r"load_clip: expected a float tensor \(T, 3, S, S\).*a\.mp4.*\(2, 32, 32\)"):
        data[0]


def _bad_trees(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "empty").mkdir()
    one = tmp_path / "one"
    (one / "only_class").mkdir(parents=True)
    (one / "only_class" / "x.mp4").write_bytes(b"")
    hollow = _video_tree(tmp_path / "hollow")
    (hollow / "no_videos_here").mkdir()
    (hollow / "no_videos_here" / "readme.txt").write_bytes(b"")
    (tmp_path / "file.mp4").write_bytes(b"")
    return dict(missing=tmp_path / "nope", empty=tmp_path / "empty", one=one, hollow=hollow, file=tmp_path / "file.mp4")


@pytest.mark.parametrize(
    "argv, error, match",
    [
        (["--data", "{missing}"], FileNotFoundError, r"--data: expected a folder of class folders .*nope.*does not exist"),
        (["--data", "{file}"], NotADirectoryError, r"--data: .*file\.mp4.*not a folder"),
        (["--data", "{empty}"], ValueError, r"--data: expected at least 2 class folders .*got 0"),
        (["--data", "{one}"], ValueError, r"--data: expected at least 2 class folders .*got 1 \('only_class'\)"),
        (["--data", "{hollow}"], ValueError, r"--data: class folder .*no_videos_here.* has no video files"),
        ([], ValueError, r"--data / --synthetic: expected exactly one .* got neither"),
        (["--data", "{empty}", "--synthetic", "4"], ValueError, r"--data / --synthetic: .* got both"),
        (["--synthetic", "0"], ValueError, r"--synthetic: expected an integer >= 1, got 0"),
        (["--synthetic", "4", "--synthetic-classes", "1"], ValueError, r"--synthetic-classes: expected at least 2"),
        (["--synthetic", "4", "--batch-size", "3", "--accumulation-steps", "2"], ValueError,
         r"--accumulation-steps: expected a divisor of --batch-size 3, got 2"),
        (["--synthetic", "4", "--lr", "-1"], ValueError, r"--lr: expected a positive number, got -1"),
        (["--synthetic", "4", "--weight-decay", "nan"], ValueError, r"--weight-decay: expected a number >= 0, got nan"),
        (["--synthetic", "4", "--label-smoothing", "1"], ValueError,
         r"--label-smoothing: expected a number in \[0, 1\), got 1"),
        (["--synthetic", "4", "--model", "xclip-b8"], FileNotFoundError,
         r"--model: expected a checkpoint path or one of xclip-b32.*'xclip-b8'"),
        (["--synthetic", "4", "--fsdp"], ValueError, r"--fsdp: expected a distributed run \(launch with torchrun\)"),
        (["--synthetic", "4", "--fsdp", "--amp", "fp16"], ValueError, r"--amp: .*expected bf16 or off, got fp16"),
        (["--synthetic", "4", "--output", "{file}"], NotADirectoryError, r"--output: expected a folder.*file\.mp4"),
        (["--synthetic", "3", "--model", "{ckpt}", "--batch-size", "4"], ValueError,
         r"--batch-size: expected at most 3 clips per process \(3 clips over 1 processes\), got 4"),
        (["--synthetic", "4", "--model", "{ckpt}", "--backend", "nope"], ValueError, r"--backend: .*nope"),
    ],
)
def test_bad_arguments_name_the_flag(
    argv: list[str], error: type, match: str, tmp_path: Path, tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    paths = {k: str(v) for k, v in _bad_trees(tmp_path).items()}
    paths["ckpt"] = str(tiny_checkpoint)
    argv = [a.format(**paths) for a in argv]
    with pytest.raises(error, match=match):
        finetune.main([*argv, "--workers", "0", "--device", "cpu"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal of a CUDA device on a machine without one")
def test_missing_cuda_device_names_the_flag() -> None:
    with pytest.raises(ValueError, match=r"--device: expected a device that exists here, got 'cuda'"):
        finetune.main(["--synthetic", "4", "--device", "cuda"])


def test_help_lists_the_flags() -> None:
    text = finetune.build_parser().format_help()
    for flag in ("--data", "--synthetic", "--freeze-text", "--grad-checkpointing", "--fsdp", "--amp", "--lr",
                 "--new-lr-scale", "--weight-decay", "--warmup-epochs", "--accumulation-steps", "--output"):
        assert flag in text, flag
