"""Where X-CLIP's inference time goes, by kind of op: ``python -m benchmarks.profile``.

Runs the model (random weights) under ``torch.profiler`` for a few calls after a warm-up and
prints the self CPU time of every aten / custom op, grouped into GEMMs (matmul and oneDNN
linears), attention (our ops, SDPA), LayerNorm, elementwise and softmax, and copies / casts /
allocation, with each group's share of the total. The GEMM share is the one to keep high: the
rest is the "non-GEMM" work issue-level fusion aims at.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict

import torch

import xclip
from xclip_kernels import gemm

from .backends import DTYPES, add_model_arguments, model_inputs
from .timing import environment, write_json

# First matching pattern wins; names are profiler event names (aten::..., xclip_ext::..., mkldnn::...).
GROUPS = [
    ("GEMM", re.compile(r"(addmm|::mm$|::bmm|::matmul|::linear$|_linear_pointwise|baddbmm)")),
    ("attention", re.compile(r"(xclip_ext::|scaled_dot_product|_flash_attention|_efficient_attention|softmax)")),
    ("LayerNorm", re.compile(r"(layer_norm)")),
    ("copies, casts, allocation", re.compile(r"(copy_|::to$|_to_copy|clone|contiguous|::cat|::empty|::zeros|"
                                             r"::stack|::reshape|::view|::permute|::transpose|::expand|::select|"
                                             r"::slice|::unbind|::as_strided|::narrow|::t$|::detach)")),
    ("elementwise", re.compile(r"(::add|::mul|::div|::sub|silu|sigmoid|gelu|::exp|::norm|::mean|::sum|"
                               r"::einsum|::argmax|::index|::embedding|::arange|::linalg_vector_norm)")),
]


def group_of(name: str) -> str:
    """The group of a profiler event name (see :data:`GROUPS`), or "other"."""
    for group, pattern in GROUPS:
        if pattern.search(name):
            return group
    return "other"


def shares(events: dict[str, float]) -> list[tuple[str, float, float]]:
    """``(group, seconds, fraction of total)`` from per-op self seconds, largest first."""
    totals: dict[str, float] = defaultdict(float)
    for name, seconds in events.items():
        totals[group_of(name)] += seconds
    whole = sum(totals.values()) or 1.0
    return sorted(((g, s, s / whole) for g, s in totals.items()), key=lambda row: -row[1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, rounds=3)
    parser.add_argument("--backend", default=None, help="attention backend (default: automatic)")
    parser.add_argument("--gemm", choices=("auto", *gemm.PROVIDERS), default="auto")
    parser.add_argument("--top", type=int, default=12, help="also list this many ops by self time")
    parser.add_argument("--json", metavar="PATH", help="also write the groups and ops as JSON")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    gemm.set_provider(args.gemm)
    model = xclip.build_model(args.variant, num_frames=args.frames, backend=args.backend).eval().to(dtype=dtype)
    video, text = model_inputs(model.config, args.batch, args.labels, "cpu", dtype)
    env = environment()
    with torch.inference_mode():
        model(video, text)  # warm-up: packing, scratch buffers, primitive caches
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.rounds):
                model(video, text)
    events = {e.key: e.self_cpu_time_total / 1e6 / args.rounds for e in prof.key_averages()}
    print(f"X-CLIP {args.variant} {args.frames}f, batch {args.batch}, {args.labels} label(s), {args.dtype}, "
          f"{env['device']} ({env['threads']} threads), torch {env['torch']}, GEMM provider "
          f"{gemm.provider(dtype)}, attention {args.backend or 'automatic'}; self CPU time per call:")
    groups = shares(events)
    for group, seconds, fraction in groups:
        print(f"  {group:<28} {seconds * 1e3:>9.1f} ms  {fraction:>6.1%}")
    top = sorted(events.items(), key=lambda item: -item[1])[: args.top]
    print("top ops:")
    for name, seconds in top:
        print(f"  {name:<40} {seconds * 1e3:>9.2f} ms  ({group_of(name)})")
    if args.json:
        write_json(args.json, {"environment": env, "groups": groups, "ops": top, "args": vars(args)})
    gemm.set_provider(None)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
