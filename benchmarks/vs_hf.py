"""X-CLIP against Hugging Face ``XCLIPModel`` on the same weights, in one process.

A random-weight Hugging Face XCLIPModel (attention "sdpa") of the chosen size is saved with
``save_pretrained`` and loaded by ``xclip.load_checkpoint``; both then run interleaved
rounds beside the machine's GEMM limit in the run's dtype (2048³ on torch's matmul and on
oneDNN's prepacked linear, the faster per round). Printed: clips/s of each, the speed-up
(median over rounds of the paired ratio), achieved GFLOP/s (paper-convention MACs x 2 x
clips/s) as a fraction of the limit, and max |logits difference|.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile

import torch

import xclip

from .backends import DTYPES, add_model_arguments, model_inputs
from .flops import xclip_gmacs
from .timing import environment, interleaved, limit_candidates, limit_gflops, write_json


def hf_model(variant: str, num_frames: int):  # noqa: ANN201 - transformers is optional
    """A random-weight ``transformers.XCLIPModel`` with the sizes of ``variant``."""
    from transformers import XCLIPConfig as HFConfig
    from transformers import XCLIPModel

    c = xclip.VARIANTS[variant].replace(num_frames=num_frames)
    config = HFConfig(
        projection_dim=c.embed_dim,
        prompt_layers=c.prompt_layers,
        prompt_num_attention_heads=c.prompt_heads,
        vision_config=dict(
            hidden_size=c.vision_width, intermediate_size=c.mlp_dim("vision"), num_hidden_layers=c.vision_layers,
            num_attention_heads=c.vision_heads, image_size=c.image_size, patch_size=c.patch_size,
            num_frames=num_frames, mit_hidden_size=c.embed_dim, mit_intermediate_size=c.mlp_dim("mit"),
            mit_num_hidden_layers=c.mit_layers, mit_num_attention_heads=c.mit_heads,
        ),
        text_config=dict(
            hidden_size=c.text_width, intermediate_size=c.mlp_dim("text"), num_hidden_layers=c.text_layers,
            num_attention_heads=c.text_heads,
        ),
    )
    config._attn_implementation = "sdpa"
    return XCLIPModel(config).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, rounds=15)
    parser.add_argument("--backend", default=None, help="our backend (default: automatic)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--compile", action="store_true", help="torch.compile our model (HF stays eager)")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    hf = hf_model(args.variant, args.frames)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        ours = xclip.load_checkpoint(tmp, backend=args.backend, map_location=args.device).to(dtype)
    hf = hf.to(args.device, dtype)
    config = ours.config
    video, text = model_inputs(config, args.batch, args.labels, args.device, dtype)
    model = torch.compile(ours) if args.compile else ours

    def synchronized(out: torch.Tensor) -> torch.Tensor:
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out

    def run_ours() -> torch.Tensor:
        with torch.inference_mode():
            return synchronized(model(video, text))

    def run_hf() -> torch.Tensor:
        with torch.inference_mode():
            return synchronized(hf(input_ids=text, pixel_values=video).logits_per_video)

    diff = (run_ours().float() - run_hf().float()).abs().max().item()
    providers, gemm_flops = limit_candidates(8192 if args.device == "cuda" else 2048, dtype, args.device)
    env = environment()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else f"{env['device']}, {env['threads']} threads"
    env["device"] = device_name
    print(
        f"{args.variant} {args.frames}f, batch {args.batch}, {args.labels} label(s), {args.dtype}, {device_name}, "
        f"torch {env['torch']}, compile={args.compile}, THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}"
    )
    timings = interleaved(
        {"ours": run_ours, "hf": run_hf, **providers}, args.rounds,
        progress=lambda r: print(f"\r  round {r}/{args.rounds}", end="", file=sys.stderr),
    )
    print(file=sys.stderr)
    gmacs = xclip_gmacs(config)
    limits = limit_gflops(timings, list(providers), gemm_flops)
    limit_rate = statistics.median(limits)
    result: dict[str, object] = dict(env, variant=args.variant, frames=args.frames, batch=args.batch, labels=args.labels,
                                     dtype=args.dtype, compile=args.compile,
                                     backend=ours.attention_backend or "auto", gmacs=round(gmacs, 2),
                                     limit_gflops=round(limit_rate, 1), max_abs_logit_diff=diff,
                                     **{f"{name}_gflops": round(gemm_flops / timings.median(name) / 1e9, 1)
                                        for name in providers})
    for name in ("ours", "hf"):
        clips = args.batch / timings.median(name)
        frac = 2 * gmacs * clips / limit_rate
        # Per-round fraction of that round's limit, so that clock drift cancels out.
        paired = statistics.median(2 * gmacs * args.batch / t / limit for t, limit in zip(timings.seconds[name], limits))
        result[name] = dict(clips_per_s=round(clips, 3), limit_fraction=round(frac, 3),
                            limit_fraction_paired_median=round(paired, 3))
        print(f"{name:<5} {clips:7.3f} clips/s  {2 * gmacs * clips:7.1f} GFLOP/s  "
              f"{frac:5.2f} of the limit (paired per round: {paired:.2f})")
    result["speedup"] = round(timings.speedup("ours", "hf"), 3)
    rates = ", ".join(f"{name} {result[f'{name}_gflops']}" for name in providers)
    print(f"{args.dtype} limit {limit_rate:.1f} GFLOP/s (fastest per round of: {rates}); ours / hf = "
          f"{result['speedup']:.3f}x (median of paired rounds); max |logits diff| = {diff:.2e}")
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
