"""End-to-end benchmark: X-CLIP against the other space-time attention styles, over frames.

``python -m benchmarks.run --preset cpu`` (the main job's default) times, for 8, 16 and 32
frames, X-CLIP on each backend that runs here and the baselines of :mod:`benchmarks.baselines`
(joint space-time, divided space-time, factorised encoder, Video Swin-B), printing GMACs per
clip, clips/s (median of interleaved rounds), peak memory (GPU) and the fraction of a
measured matmul rate (GPU). ``--preset gpu``: B/16 and L/14, bf16, batch 32. ``--preset
paper``: X-CLIP-B/16 8f against the published Video Swin-L 32f. ``--train`` times a forward
and backward step; ``--json PATH`` writes one record per row; ``--plot PATH`` draws clips/s and
GMACs against frames.

GMACs: X-CLIP's are the paper's convention (one video and one label, text encoder included,
:mod:`benchmarks.flops`); the baselines' are counted with FlopCounterMode (vision only).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

import xclip
from xclip_kernels.registry import OPS

from . import baselines
from .backends import runnable_backends
from .flops import xclip_gmacs
from .timing import environment, interleaved, matmul_candidate, write_json


@dataclass(frozen=True)
class Preset:
    variants: tuple[str, ...]  # X-CLIP variants
    baseline_patch: int  # patching of the ViT baselines (matches the first variant)
    swin: Callable[[], baselines.SwinConfig] | None
    frames: tuple[int, ...]
    batch: int
    dtype: torch.dtype
    rounds: int
    include_baselines: bool = True


PRESETS = {
    # B/32-sized so that the whole sweep takes a couple of minutes on two cores.
    "cpu": Preset(("xclip-b32",), 32, baselines.swin_b_k400, (8, 16, 32), 1, torch.float32, 3),
    "gpu": Preset(("xclip-b16", "xclip-l14"), 16, baselines.swin_b_k400, (8, 16, 32), 32, torch.bfloat16, 10),
    # The paper's headline: X-CLIP-B/16 at 8 frames against Video Swin-L at 32 frames.
    "paper": Preset(("xclip-b16",), 16, baselines.swin_l_k400, (8,), 1, torch.float32, 3, include_baselines=False),
}


@dataclass
class Candidate:
    """One model at one frame count, ready to time."""

    model: str
    attention: str
    backend: str
    frames: int
    gmacs: float
    step: Callable[[], object]


def _xclip_candidates(variant: str, frames: int, batch: int, device: str, dtype: torch.dtype, train: bool) -> list[Candidate]:
    torch.manual_seed(0)
    model = xclip.build_model(variant, num_frames=frames).to(device, dtype)
    model.train(train)
    config = model.config
    video = torch.randn(batch, frames, 3, config.image_size, config.image_size, device=device, dtype=dtype)
    text = xclip.tokenize(["archery"]).to(device)
    head_dim = config.vision_width // config.vision_heads
    out = []
    for backend in runnable_backends(OPS, device, dtype, head_dim, train, frames):
        if backend == "reference":
            continue

        def step(backend: str = backend) -> None:
            model.set_attention_backend(backend)
            if train:
                model(video, text).float().logsumexp(-1).sum().backward()
            else:
                with torch.inference_mode():
                    model(video, text)

        out.append(Candidate(variant, "xclip", backend, frames, xclip_gmacs(config), step))
    return out


def _baseline_candidates(preset: Preset, frames: int, device: str, dtype: torch.dtype, train: bool) -> list[Candidate]:
    builders: dict[str, Callable[[], nn.Module]] = {
        "joint": lambda: baselines.JointSpaceTime(num_frames=frames, patch_size=preset.baseline_patch),
        "divided": lambda: baselines.DividedSpaceTime(num_frames=frames, patch_size=preset.baseline_patch),
        "factorised": lambda: baselines.FactorisedEncoder(num_frames=frames, patch_size=preset.baseline_patch),
    }
    if preset.swin is not None:
        builders["swin"] = lambda: baselines.VideoSwin(preset.swin(), num_frames=frames)
    if not preset.include_baselines:
        builders = {"swin": builders["swin"]} if "swin" in builders else {}
    out = []
    for name, build in builders.items():
        macs = baselines.gmacs(build, frames, batch=1)
        torch.manual_seed(0)
        model = build().to(device, dtype).train(train)
        video = torch.randn(preset.batch, frames, 3, model.image_size, model.image_size, device=device, dtype=dtype)

        def step(model: nn.Module = model, video: torch.Tensor = video) -> None:
            if train:
                model(video).float().sum().backward()
            else:
                with torch.inference_mode():
                    model(video)

        label = f"vit-p{preset.baseline_patch}" if name != "swin" else "video-swin"
        out.append(Candidate(label, name, "sdpa", frames, macs, step))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--train", action="store_true", help="time forward + backward")
    parser.add_argument("--frames", type=int, nargs="+", help="override the preset's frame counts")
    parser.add_argument("--batch", type=int, help="override the preset's batch")
    parser.add_argument("--rounds", type=int, help="override the preset's rounds")
    parser.add_argument("--variant", choices=sorted(xclip.VARIANTS),
                        help="override the preset's X-CLIP variant (the ViT baselines take its patching)")
    parser.add_argument("--json", metavar="PATH")
    parser.add_argument("--plot", metavar="PATH", help="PNG of clips/s and GMACs against frames")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    frames_list = tuple(args.frames or preset.frames)
    batch = args.batch or preset.batch
    variants = (args.variant,) if args.variant else preset.variants
    patch = xclip.VARIANTS[args.variant].patch_size if args.variant else preset.baseline_patch
    preset = Preset(variants, patch, preset.swin, frames_list, batch, preset.dtype,
                    args.rounds or preset.rounds, preset.include_baselines)
    dtype = preset.dtype if args.device == "cuda" else torch.float32
    env = environment()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{env['device']} ({env['threads']} threads)"
    mode = "train" if args.train else "inference"
    print(f"benchmarks.run --preset {args.preset}: {mode}, {str(dtype).removeprefix('torch.')}, batch {batch}, "
          f"{device_name}, torch {env['torch']}")
    matmul_rate = None
    if args.device == "cuda":
        matmul, flops = matmul_candidate(8192, dtype, "cuda")
        timing = interleaved({"matmul": matmul}, 5)
        matmul_rate = flops / timing.median("matmul") / 1e9
    rows = []
    for frames in frames_list:
        print(f"  {frames} frames ...", file=sys.stderr)
        candidates = [c for v in preset.variants
                      for c in _xclip_candidates(v, frames, batch, args.device, dtype, args.train)]
        if args.preset != "paper" or frames == frames_list[-1]:
            candidates += _baseline_candidates(preset, 32 if args.preset == "paper" else frames, args.device, dtype, args.train)
        steps = {f"{c.model}/{c.attention}/{c.backend}/{c.frames}": c for c in candidates}

        def synchronized(step: Callable[[], object]) -> Callable[[], None]:
            def call() -> None:
                step()
                if args.device == "cuda":
                    torch.cuda.synchronize()
            return call

        timings = interleaved({key: synchronized(c.step) for key, c in steps.items()}, preset.rounds,
                              progress=lambda r: print(f"\r    round {r}/{preset.rounds}", end="", file=sys.stderr))
        print(file=sys.stderr)
        for key, c in steps.items():
            peak = None
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
                synchronized(c.step)()
                peak = torch.cuda.max_memory_allocated() / 2**20
            clips = batch / timings.median(key)
            achieved = 2 * c.gmacs * clips * (3 if args.train else 1)
            rows.append(dict(
                model=c.model, attention=c.attention, backend=c.backend, frames=c.frames, batch=batch,
                dtype=str(dtype).removeprefix("torch."), device=device_name, mode=mode, gmacs=round(c.gmacs, 2),
                clips_per_s=round(clips, 4), peak_mem_mb=None if peak is None else round(peak, 1),
                matmul_fraction=None if matmul_rate is None else round(achieved / matmul_rate, 3),
                torch=env["torch"], date=env["date"],
            ))
    print(f"{'model':<12} {'attention':<11} {'backend':<8} {'frames':>6} {'GMACs':>8} {'clips/s':>9} {'peak MB':>8} {'of mm':>6}")
    for r in rows:
        peak = f"{r['peak_mem_mb']:>8.0f}" if r["peak_mem_mb"] is not None else f"{'-':>8}"
        frac = f"{r['matmul_fraction']:>6.2f}" if r["matmul_fraction"] is not None else f"{'-':>6}"
        print(f"{r['model']:<12} {r['attention']:<11} {r['backend']:<8} {r['frames']:>6} {r['gmacs']:>8.1f} "
              f"{r['clips_per_s']:>9.3f} {peak} {frac}")
    _print_scaling(rows)
    if args.json:
        write_json(args.json, rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


def _best_per_style(rows: list[dict]) -> dict[str, dict[int, dict]]:
    """For each attention style, the fastest row at each frame count."""
    best: dict[str, dict[int, dict]] = {}
    for r in rows:
        by_frames = best.setdefault(r["attention"], {})
        if r["frames"] not in by_frames or r["clips_per_s"] > by_frames[r["frames"]]["clips_per_s"]:
            by_frames[r["frames"]] = r
    return best


def _print_scaling(rows: list[dict]) -> None:
    for style, by_frames in _best_per_style(rows).items():
        if 8 in by_frames and 32 in by_frames:
            time_ratio = by_frames[8]["clips_per_s"] / by_frames[32]["clips_per_s"]
            macs_ratio = by_frames[32]["gmacs"] / by_frames[8]["gmacs"]
            print(f"scaling {style:<11} time(32f)/time(8f) = {time_ratio:5.2f}   GMACs(32f)/GMACs(8f) = {macs_ratio:5.2f}")
    best = _best_per_style(rows)
    if "xclip" in best and "joint" in best and 32 in best["xclip"] and 32 in best["joint"]:
        ratio = best["xclip"][32]["clips_per_s"] / best["joint"][32]["clips_per_s"]
        print(f"32 frames: X-CLIP at {ratio:.2f}x the clips/s of joint space-time")


def plot(rows: list[dict], path: str) -> None:
    """clips/s and GMACs against frames for each attention style (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (speed, cost) = plt.subplots(1, 2, figsize=(10, 4))
    for style, by_frames in sorted(_best_per_style(rows).items()):
        frames = sorted(by_frames)
        speed.plot(frames, [by_frames[f]["clips_per_s"] for f in frames], marker="o", label=style)
        cost.plot(frames, [by_frames[f]["gmacs"] for f in frames], marker="o", label=style)
    for axis, title in ((speed, "clips/s (higher is better)"), (cost, "GMACs per clip")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("frames")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    speed.legend()
    device = rows[0]["device"] if rows else ""
    fig.suptitle(f"X-CLIP vs other space-time attention ({rows[0]['dtype'] if rows else ''}, {device})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
