"""A GPU-time model of the custom kernels: a roofline discounted by occupancy. Not a measurement.

``python -m benchmarks.gpu_model`` reads ``bench-results/gpu-static.json`` (``make gpu-static``:
registers, shared memory and blocks per SM of every kernel compiled for sm_90a) and, for each
Triton and CUDA kernel at X-CLIP-B/16 and L/14, 8 frames, batch 32, gives:

- **FLOPs**: the matrix products the kernel executes (2 per multiply-accumulate; softmax,
  LayerNorm and exponentials are not counted). IFA forward ``4·F·H·N·(N+1)·D`` (the CUDA
  backend's fp16/bf16 forward is the tensor-core ``ifa_mma_fwd_kernel``, same work); the backward
  kernels recompute the scores: dK/dV ``8·F·H·N²·D`` (QKᵀ, PᵀdO, dOVᵀ, dSᵀQ), dQ
  ``6·F·H·N²·D`` (QKᵀ, dOVᵀ, dS·K) (the CUDA backend's fp16/bf16 ones are the tensor-core
  ``ifa_mma_bwd_dkdv_kernel`` and ``ifa_mma_bwd_dq_kernel``, same work); the message kernel the
  q/k/v projection ``6·F·W²`` plus attention over T ``4·F·T·W`` (the CUDA backend's fp16/bf16
  one is the tensor-core ``cfa_mma_fwd_kernel``, same work).
- **bytes**: compulsory HBM traffic, every input read once and every output written once
  (re-reads of a frame's keys hit L2, which holds them many times over).
- **arithmetic intensity** and the **roofline** time ``max(FLOPs / peak, bytes / bandwidth)``,
  where the peak is the tensor-core rate for kernels with tensor-core instructions and the
  CUDA-core fp32 rate otherwise (the CUDA kernels do their products in fp32 on CUDA cores).
- **occupancy discount**: the grid runs in waves of ``SMs × blocks_per_sm`` blocks; a partial
  last wave leaves SMs idle, so the estimate is ``roofline / (waves / ceil(waves))``. A kernel
  of which no block fits on an SM has no estimate.

What it leaves out: launch latency (which dominates the message path's microsecond-sized
kernels), the latency hiding that few resident warps may lack, L2 misses on re-reads. It is a
floor for what a kernel can reach, to compare with measured times when a GPU run comes
(:func:`estimates` gives rows keyed for that), never a number to quote as measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
from typing import Any, Sequence

import xclip

STATIC_JSON = os.path.join("bench-results", "gpu-static.json")


@dataclasses.dataclass(frozen=True)
class Gpu:
    """Machine constants of the model (inputs, not measurements of ours)."""

    name: str
    tensor_flops: float  # bf16 dense tensor-core rate, FLOP/s
    cuda_core_flops: float  # fp32 FMA rate on CUDA cores, FLOP/s
    bandwidth: float  # HBM, bytes/s
    sms: int


GPUS = {
    # bf16 dense ≈ 790 TFLOP/s: the rate issue 14 quotes as measured on an 8192³ bf16 matmul;
    # fp32 on CUDA cores 67 TFLOP/s and the HBM rates: NVIDIA's H100 SXM / H200 datasheets.
    "H100": Gpu("H100", tensor_flops=790e12, cuda_core_flops=67e12, bandwidth=3.35e12, sms=132),
    "H200": Gpu("H200", tensor_flops=790e12, cuda_core_flops=67e12, bandwidth=4.8e12, sms=132),
}

VARIANTS = ("xclip-b16", "xclip-l14")
FRAMES = 8
BATCH = 32


@dataclasses.dataclass(frozen=True)
class Shape:
    """The attention shapes of one variant at ``FRAMES`` frames and ``BATCH`` clips."""

    variant: str
    frames: int  # F = batch · T frames through IFA
    tokens: int  # N
    heads: int  # H
    head_dim: int  # D
    width: int  # W, the message path's width
    videos: int  # b
    t: int  # T, messages per video


def shape_of(variant: str, frames: int = FRAMES, batch: int = BATCH) -> Shape:
    """The IFA and message-path shapes of ``variant`` (``xclip.VARIANTS``)."""
    if variant not in xclip.VARIANTS:
        raise ValueError(f"variant: expected one of {sorted(xclip.VARIANTS)}, got {variant!r}")
    config = xclip.VARIANTS[variant]
    heads = config.vision_heads
    return Shape(variant, batch * frames, config.frame_tokens, heads, config.vision_width // heads,
                 config.vision_width, batch, frames)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def kernel_work(kernel: str, s: Shape, tiles: tuple[int, int], dtype_bytes: int = 2) -> tuple[int, int, int]:
    """FLOPs, compulsory bytes and grid size (blocks) of one kernel at shape ``s``.

    ``kernel`` is a name shared by both backends (``ifa_fwd_kernel``, ``ifa_bwd_dkdv_kernel``,
    ``ifa_bwd_dq_kernel``, ``cfa_fwd_kernel``) or a CUDA tensor-core kernel
    (``ifa_mma_fwd_kernel``, ``ifa_mma_bwd_dkdv_kernel``, ``ifa_mma_bwd_dq_kernel``,
    ``cfa_mma_fwd_kernel``: the work of the kernel without ``mma_``); ``tiles`` its (query tile,
    key tile) rows.
    """
    f, n, h, d = s.frames, s.tokens, s.heads, s.head_dim
    block_m, block_n = tiles
    rows = f * n * h * d  # elements of one (F, N, H, D) tensor
    vecs = f * h * d  # elements of one (F, H, D) tensor
    stats = 4 * f * h * n  # one fp32 value per (frame, head, query): lse or delta
    if kernel in ("ifa_fwd_kernel", "ifa_mma_fwd_kernel"):
        flops = 4 * f * h * n * (n + 1) * d
        moved = dtype_bytes * (4 * rows + 2 * vecs) + stats
        blocks = _cdiv(n, block_m) * f * h
    elif kernel in ("ifa_bwd_dkdv_kernel", "ifa_mma_bwd_dkdv_kernel"):
        flops = 8 * f * h * n * n * d
        moved = dtype_bytes * 6 * rows + 2 * stats  # q, k, v, dO in; dK, dV out
        blocks = _cdiv(n, block_n) * f * h
    elif kernel in ("ifa_bwd_dq_kernel", "ifa_mma_bwd_dq_kernel"):
        m_tiles = _cdiv(n, block_m)
        flops = 6 * f * h * n * n * d + 8 * f * h * n * d  # plus the message column as vectors
        moved = dtype_bytes * (5 * rows + 2 * vecs) + 2 * stats + 2 * 4 * f * h * m_tiles * d
        blocks = m_tiles * f * h
    elif kernel in ("cfa_fwd_kernel", "cfa_mma_fwd_kernel"):
        w, r = s.width, s.videos * s.t
        flops = 2 * r * w * 3 * w + 4 * r * s.t * w
        moved = dtype_bytes * (r * w + 3 * w * w + 3 * w + 3 * w + 2 * r * w)  # messages, W_in, biases, LN in; 2 out
        blocks = s.videos * h
    else:
        raise ValueError(f"kernel: expected one of ifa_fwd_kernel, ifa_mma_fwd_kernel, ifa_bwd_dkdv_kernel, "
                         f"ifa_mma_bwd_dkdv_kernel, ifa_bwd_dq_kernel, ifa_mma_bwd_dq_kernel, cfa_fwd_kernel, "
                         f"cfa_mma_fwd_kernel; got {kernel!r}")
    return flops, moved, blocks


def roofline_seconds(flops: int, moved: int, gpu: Gpu, tensor_cores: bool) -> tuple[float, str]:
    """The roofline time and which bound sets it ("compute" or "memory")."""
    compute = flops / (gpu.tensor_flops if tensor_cores else gpu.cuda_core_flops)
    memory = moved / gpu.bandwidth
    return max(compute, memory), "compute" if compute >= memory else "memory"


def wave_efficiency(blocks: int, sms: int, blocks_per_sm: int) -> float:
    """Fraction of the SMs' block slots the grid keeps busy over its waves (1.0 = no idle tail)."""
    if blocks_per_sm <= 0:
        raise ValueError(f"blocks_per_sm: expected > 0, got {blocks_per_sm}")
    if blocks <= 0 or sms <= 0:
        raise ValueError(f"blocks and sms: expected > 0, got blocks={blocks}, sms={sms}")
    waves = blocks / (sms * blocks_per_sm)
    return waves / math.ceil(waves)


def _tiles(row: dict[str, Any]) -> tuple[int, int]:
    config = row.get("config") or {}
    if row["kernel"] in ("cfa_fwd_kernel", "cfa_mma_fwd_kernel"):
        return (1, 1)  # one block per (video, head): no tiles in its grid
    if row["source"] == "triton":
        return int(config["BLOCK_M"]), int(config.get("BLOCK_N", config["BLOCK_M"]))
    if "tiles" in config:  # CUDA rows: scripts/gpu_static.py's cuda_tiles
        block_m, block_n = config["tiles"]
        return int(block_m), int(block_n)
    ints = [int(x) for x in re.findall(r"\b\d+\b", config.get("template", ""))]
    return (ints[1], ints[2]) if len(ints) >= 3 else (1, 1)


def _pick(static: Sequence[dict[str, Any]], kernel: str, source: str, arch: str, dtype: str, head_dim: int,
          frames: int | None, prefer_toolchain: str) -> dict[str, Any] | None:
    """The static row of a kernel as it runs at this head dim (CUDA: its padded instantiation)."""
    candidates = [r for r in static if r["kernel"] == kernel and r["source"] == source and r["arch"] == arch
                  and r["dtype"] == dtype and not r.get("error")]
    if source == "cuda":
        padded = min((r["head_dim"] for r in candidates if r["head_dim"] >= head_dim), default=None)
        candidates = [r for r in candidates if r["head_dim"] == padded]
    else:
        candidates = [r for r in candidates if r["head_dim"] == head_dim]
    if kernel in ("cfa_fwd_kernel", "cfa_mma_fwd_kernel"):
        candidates = [r for r in candidates if r.get("frames") == frames]
    preferred = [r for r in candidates if prefer_toolchain in r["toolchain"]]
    return (preferred or candidates or [None])[0]


def estimates(static: Sequence[dict[str, Any]], variants: Sequence[str] = VARIANTS, dtype: str = "bfloat16",
              arch: str = "sm_90a", prefer_toolchain: str = "triton 3.6") -> list[dict[str, Any]]:
    """One row per (variant, backend, kernel, GPU): work, roofline and discounted estimate.

    ``static``: the rows of ``gpu-static.json``. Triton rows of ``prefer_toolchain`` (the GPU
    image's Triton) are used where present. Times are in microseconds."""
    out = []
    for variant in variants:
        s = shape_of(variant)
        for source in ("triton", "cuda"):
            # The CUDA backend's fp16/bf16 IFA and message path run the *_mma_* kernels (no bf16
            # ifa_fwd/bwd_* or cfa_fwd_kernel is built), its fp32 ones the FMA kernels: each dtype
            # finds the ones that run it.
            kernels = ("ifa_fwd_kernel", "ifa_mma_fwd_kernel", "ifa_bwd_dkdv_kernel", "ifa_mma_bwd_dkdv_kernel",
                       "ifa_bwd_dq_kernel", "ifa_mma_bwd_dq_kernel", "cfa_fwd_kernel", "cfa_mma_fwd_kernel")
            for kernel in kernels:
                row = _pick(static, kernel, source, arch, dtype, s.head_dim, s.t, prefer_toolchain)
                if row is None:
                    continue
                flops, moved, blocks = kernel_work(kernel, s, _tiles(row))
                for gpu in GPUS.values():
                    roof, bound = roofline_seconds(flops, moved, gpu, bool(row["tensor_cores"]))
                    fits = row["blocks_per_sm"] > 0
                    eff = wave_efficiency(blocks, gpu.sms, row["blocks_per_sm"]) if fits else None
                    est = roof / eff if fits else None
                    out.append(dict(
                        variant=variant, source=source, kernel=kernel, gpu=gpu.name, dtype=dtype,
                        toolchain=row["toolchain"], flops=flops, bytes=moved, intensity=flops / moved, bound=bound,
                        roofline_us=roof * 1e6, blocks=blocks, blocks_per_sm=row["blocks_per_sm"],
                        wave_efficiency=eff, estimate_us=None if est is None else est * 1e6,
                        tflops=None if est is None else flops / est / 1e12,
                        gbps=None if est is None else moved / est / 1e9,
                    ))
    return out


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = False) -> str:
    """The estimates as a text or Markdown table."""
    head = ["variant", "backend", "kernel", "GPU", "GFLOP", "MB", "FLOP/B", "bound", "roofline µs", "blk/SM",
            "waves eff.", "model µs", "TFLOP/s", "GB/s"]
    lines = []
    for r in rows:
        fits = r["estimate_us"] is not None
        lines.append([r["variant"], r["source"], r["kernel"], r["gpu"], f"{r['flops'] / 1e9:.2f}",
                      f"{r['bytes'] / 1e6:.1f}", f"{r['intensity']:.0f}", r["bound"], f"{r['roofline_us']:.1f}",
                      str(r["blocks_per_sm"]), f"{r['wave_efficiency']:.2f}" if fits else "-",
                      f"{r['estimate_us']:.1f}" if fits else "does not fit",
                      f"{r['tflops']:.0f}" if fits else "-", f"{r['gbps']:.0f}" if fits else "-"])
    if markdown:
        return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
                         + ["| " + " | ".join(line) + " |" for line in lines])
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in [head, *lines])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="GPU-time model of the kernels (roofline x occupancy; a model)")
    parser.add_argument("--static", default=STATIC_JSON, help="gpu-static.json from make gpu-static")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    args = parser.parse_args(argv)
    if not os.path.isfile(args.static):
        parser.error(f"--static: {args.static} not found; run `make gpu-static` first")
    with open(args.static, encoding="utf-8") as f:
        static = json.load(f)
    rows = estimates(static, dtype=args.dtype)
    print(f"MODEL, not measured: roofline x wave occupancy, {args.dtype}, {FRAMES} frames x {BATCH} clips, "
          f"sm_90a registers/shared memory from {args.static}")
    print(format_table(rows, markdown=args.markdown))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
