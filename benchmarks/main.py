"""The main job (``make bench``): X-CLIP-B/32 on every backend that runs here.

Builds X-CLIP with random weights and prints, for each available backend: GMACs per clip
(paper convention, analytic: one video and one label, text included), clips/s (median of
interleaved rounds), achieved GFLOP/s (= 2 x GMACs x clips/s) as a fraction of the machine's
GEMM limit in that dtype (the fastest of torch's matmul, oneDNN's prepacked linear and, for
bf16/fp16, the product widened to float32, on 2048³, timed in the same rounds; per round, then
the median), and max |logits - reference backend|. ``--gemm both`` runs every backend on each
CPU GEMM provider of ``xclip_kernels.gemm`` (torch's matmul, oneDNN prepacked, widened to
float32) in the same rounds; the default takes the provider chosen here.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch

import xclip
from xclip_kernels import gemm
from xclip_kernels.registry import OPS

from .backends import DTYPES, add_model_arguments, model_inputs, runnable_backends
from .flops import xclip_gmacs
from .timing import environment, interleaved, limit_candidates, limit_gflops, write_json


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, rounds=7)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument("--gemm", choices=("auto", *gemm.PROVIDERS, "both"), default="auto",
                        help="CPU inference GEMM provider (default: the one chosen on this machine)")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    model = xclip.build_model(args.variant, num_frames=args.frames).eval().to(args.device, dtype)
    config = model.config
    video, text = model_inputs(config, args.batch, args.labels, args.device, dtype)
    backends = runnable_backends(OPS, args.device, dtype, config.vision_width // config.vision_heads)
    gmacs = xclip_gmacs(config)

    providers_run = list(gemm.PROVIDERS) if args.gemm == "both" else [args.gemm]
    runs = {
        (name if args.gemm != "both" else f"{name}+{provider}"): (name, provider)
        for name in backends for provider in providers_run
    }

    def run(label: str):  # noqa: ANN202 - a closure per (backend, provider)
        name, provider = runs[label]

        def call() -> torch.Tensor:
            model.set_attention_backend(name)
            gemm.set_provider(provider)
            with torch.inference_mode():
                out = model(video, text)
            if args.device == "cuda":
                torch.cuda.synchronize()
            return out

        return call

    env = environment()
    print(
        f"X-CLIP {args.variant} {args.frames}f, batch {args.batch}, {args.labels} label(s), {args.dtype}, "
        f"{args.device} ({env['device']}, {env['threads']} threads, native bf16: {','.join(env['native_bf16']) or 'none'}), "
        f"torch {env['torch']}, "
        f"THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}, "
        f"GEMM provider chosen here: {env['gemm_provider'].get(args.dtype, 'matmul')}"
    )
    logits = {label: run(label)() for label in runs}
    candidates = {label: run(label) for label in runs}
    providers, gemm_flops = limit_candidates(dtype=dtype) if args.device == "cpu" else ({}, 0.0)
    timings = interleaved(
        {**candidates, **providers}, args.rounds,
        progress=lambda r: print(f"\r  round {r}/{args.rounds}", end="", file=sys.stderr),
    )
    print(file=sys.stderr)
    limits = limit_gflops(timings, list(providers), gemm_flops) if providers else None
    reference = logits.get("reference", logits.get("reference+matmul"))
    rows = []
    header = f"{'backend':<16} {'GMACs/clip':>10} {'clips/s':>8} {'GFLOP/s':>8} {'of limit':>9} {'max|d logits|':>13}"
    print(header)
    for name in runs:
        clips_per_s = args.batch / timings.median(name)
        achieved = 2 * gmacs * clips_per_s
        # Per round against that round's limit, so that clock drift cancels out; then the median.
        fraction = statistics.median(
            2 * gmacs * args.batch / t / limit for t, limit in zip(timings.seconds[name], limits)
        ) if limits else None
        diff = (logits[name].float() - reference.float()).abs().max().item() if reference is not None else float("nan")
        rows.append(
            dict(
                model=f"{args.variant}", attention="xclip", backend=runs[name][0], gemm=runs[name][1], frames=args.frames, batch=args.batch,
                labels=args.labels, dtype=args.dtype, device=env["device"] if args.device == "cpu" else torch.cuda.get_device_name(),
                gmacs=round(gmacs, 2), clips_per_s=round(clips_per_s, 4), gflops=round(achieved, 1),
                limit_fraction=None if fraction is None else round(fraction, 3), max_abs_logit_diff=diff,
                limit_gflops=None if limits is None else round(statistics.median(limits), 1),
                torch=env["torch"], date=env["date"],
            )
        )
        frac = f"{fraction:>9.2f}" if fraction is not None else f"{'-':>9}"
        print(f"{name:<16} {gmacs:>10.2f} {clips_per_s:>8.3f} {achieved:>8.1f} {frac} {diff:>13.2e}")
    if limits:
        rates = ", ".join(f"{name} {gemm_flops / timings.median(name) / 1e9:.1f}" for name in providers)
        print(f"{args.dtype} limit in the same rounds: {statistics.median(limits):.1f} GFLOP/s "
              f"(the fastest per round of 2048^3 GEMMs: {rates} GFLOP/s)")
    gemm.set_provider(None)
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
