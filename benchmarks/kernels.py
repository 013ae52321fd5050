"""Kernel benchmark: IFA and the message path on each backend, forward and forward+backward.

``python -m benchmarks.kernels`` times every backend that runs on the device at the shapes of
the chosen variants (``F = batch * frames`` frames), and prints median and 20/80 percentiles (on the CPU, of samples of back-to-back calls
lasting at least 20 ms),
TFLOP/s (IFA forward ``4 F H N (N+1) D``, backward 2.5x that) and GB/s (each input read
once, the output written once). On a GPU it uses ``triton.testing.do_bench``; on the CPU,
interleaved rounds. ``--json PATH`` writes one record per row.

bfloat16 on the CPU adds two rows to the IFA's, timed in the same rounds: ``cpp-native`` (the
opt-in ``vdpbf16ps`` forward, where the CPU has ``avx512_bf16``) and ``cpp-fp32`` (the float32
kernels on float32 copies of the inputs), so the bf16 paths are compared with each other and
with float32 in one process.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable

import torch

import xclip
import xclip_kernels as xk
from xclip_kernels.flop_formulas import frame_attention_flops
from xclip_kernels.registry import OPS

from xclip_kernels.backends import cpp

from .backends import DTYPES, runnable_backends
from .timing import environment, interleaved, write_json


def _time(fns: dict[str, Callable[[], object]], device: str, rounds: int) -> dict[str, tuple[float, float, float]]:
    """Median, 20th and 80th percentile seconds per call of each function."""
    if device == "cuda":
        from triton.testing import do_bench

        return {name: tuple(t / 1e3 for t in do_bench(fn, quantiles=[0.5, 0.2, 0.8])) for name, fn in fns.items()}
    # Samples of at least 20 ms: the message path is a sub-millisecond op (see interleaved).
    timings = interleaved(fns, rounds, warmup=1, min_sample_s=0.02)
    return {name: (timings.median(name), timings.quantile(name, 0.2), timings.quantile(name, 0.8)) for name in fns}


def _cpp_bf16_companions(
    inputs: list[torch.Tensor], leaves: list[torch.Tensor], grad_out: torch.Tensor, grad: bool
) -> dict[str, Callable[[], None]]:
    """The ``cpp-native`` and ``cpp-fp32`` rows of a bf16 CPU run (module docstring)."""

    def native() -> None:
        cpp.set_cpu_isa("avx512_bf16")
        try:
            if grad:
                torch.autograd.grad(xk.frame_attention(*leaves, backend="cpp"), leaves, grad_out)
            else:
                with torch.no_grad():
                    xk.frame_attention(*inputs, backend="cpp")
        finally:
            cpp.set_cpu_isa("auto")

    qkv32 = torch.stack([t.float() for t in inputs[:3]], dim=2)  # q, k, v as views of one tensor, as in bf16
    inputs32 = [*qkv32.unbind(2), inputs[3].float(), inputs[4].float()]
    leaves32 = [t.detach().clone().requires_grad_(True) for t in inputs32]
    grad_out32 = grad_out.float()

    def fp32() -> None:
        if grad:
            torch.autograd.grad(xk.frame_attention(*leaves32, backend="cpp"), leaves32, grad_out32)
        else:
            with torch.no_grad():
                xk.frame_attention(*inputs32, backend="cpp")

    companions = {"cpp-fp32": fp32}
    if cpp.bf16_path() == "convert" and _cpu_has_native_bf16():
        companions["cpp-native"] = native
    return companions


def _cpu_has_native_bf16() -> bool:
    from xclip_kernels.backends import _extension

    return _extension.extension().cpu_has_native_bf16()


def bench_ifa(variant: str, batch: int, frames: int, device: str, dtype: torch.dtype, rounds: int) -> list[dict]:
    config = xclip.VARIANTS[variant]
    count, tokens, heads = batch * frames, config.frame_tokens, config.vision_heads
    head_dim = config.vision_width // heads
    qkv = torch.randn(count, tokens, 3, heads, head_dim, device=device, dtype=dtype)
    q, k, v = qkv.unbind(2)  # strided views of one fused QKV tensor, as in the model
    msg_k = torch.randn(count, heads, head_dim, device=device, dtype=dtype)
    msg_v = torch.randn(count, heads, head_dim, device=device, dtype=dtype)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, msg_k, msg_v)]
    grad_out = torch.randn(count, tokens, heads, head_dim, device=device, dtype=dtype)
    rows = []
    flops = frame_attention_flops((count, tokens, heads, head_dim))
    size = torch.finfo(dtype).bits // 8
    moved = size * (4 * count * tokens * heads * head_dim + 2 * count * heads * head_dim)
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"
        fns = {}
        for name in runnable_backends(("frame_attention",), device, dtype, head_dim, grad):
            if grad:
                def fn(name: str = name) -> None:
                    out = xk.frame_attention(*leaves, backend=name)
                    torch.autograd.grad(out, leaves, grad_out)
            else:
                def fn(name: str = name) -> None:
                    with torch.no_grad():
                        xk.frame_attention(q, k, v, msg_k, msg_v, backend=name)
            fns[name] = fn
        if device == "cpu" and dtype == torch.bfloat16 and "cpp" in fns:
            fns.update(_cpp_bf16_companions([q, k, v, msg_k, msg_v], leaves, grad_out, grad))
        times = _time(fns, device, rounds)
        total = flops * (3.5 if grad else 1.0)
        for name, (median, p20, p80) in times.items():
            rows.append(dict(op="frame_attention", mode=mode, backend=name, variant=variant, frames=frames, batch=batch,
                             shape=[count, tokens, heads, head_dim], dtype=str(dtype).removeprefix("torch."),
                             ms=median * 1e3, ms_p20=p20 * 1e3, ms_p80=p80 * 1e3, tflops=total / median / 1e12,
                             gbps=(moved * (3 if grad else 1)) / median / 1e9))
    return rows


def bench_message(variant: str, batch: int, frames: int, device: str, dtype: torch.dtype, rounds: int) -> list[dict]:
    config = xclip.VARIANTS[variant]
    width, heads = config.vision_width, config.vision_heads
    torch.manual_seed(0)
    tensors = [
        torch.randn(batch * frames, width), 1 + 0.1 * torch.randn(width), 0.1 * torch.randn(width),
        torch.randn(3 * width, width) / width**0.5, 0.1 * torch.randn(3 * width),
        torch.randn(width, width) / width**0.5, 0.1 * torch.randn(width),
    ]
    tensors = [t.to(device, dtype) for t in tensors]
    leaves = [t.clone().requires_grad_(True) for t in tensors]
    grad_out = torch.randn(batch * frames, width, device=device, dtype=dtype)
    rows = []
    for mode in ("forward", "forward+backward"):
        grad = mode != "forward"
        fns = {}
        for name in runnable_backends(("message_attention",), device, dtype, width // heads, grad, frames):
            kwargs = dict(num_frames=frames, num_heads=heads, backend=name)
            if grad:
                def fn(kwargs: dict = kwargs) -> None:
                    torch.autograd.grad(xk.message_attention(*leaves, **kwargs), leaves, grad_out)
            else:
                def fn(kwargs: dict = kwargs) -> None:
                    with torch.no_grad():
                        xk.message_attention(*tensors, **kwargs)
            fns[name] = fn
        for name, (median, p20, p80) in _time(fns, device, rounds).items():
            rows.append(dict(op="message_attention", mode=mode, backend=name, variant=variant, frames=frames,
                             batch=batch, shape=[batch, frames, width, heads], dtype=str(dtype).removeprefix("torch."),
                             ms=median * 1e3, ms_p20=p20 * 1e3, ms_p80=p80 * 1e3))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    parser.add_argument("--device", default=default_device)
    parser.add_argument("--dtype", default="bfloat16" if default_device == "cuda" else "float32", choices=sorted(DTYPES))
    parser.add_argument("--variants", nargs="+", default=None, help="default: b16 on GPU, b32 on CPU")
    parser.add_argument("--batch", type=int, default=None, help="clips (default 32 on GPU, 2 on CPU)")
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=9, help="CPU rounds")
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    dtype = DTYPES[args.dtype]
    variants = args.variants or (["xclip-b16"] if args.device == "cuda" else ["xclip-b32"])
    batch = args.batch or (32 if args.device == "cuda" else 2)
    env = environment()
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else env["device"]
    print(f"kernels on {device_name}, {args.dtype}, batch {batch}, {args.frames} frames, torch {env['torch']}")
    rows = []
    for variant in variants:
        print(f"  {variant} ...", file=sys.stderr)
        rows += bench_ifa(variant, batch, args.frames, args.device, dtype, args.rounds)
        rows += bench_message(variant, batch, args.frames, args.device, dtype, args.rounds)
    for row in rows:
        row.update(device=device_name, torch=env["torch"], date=env["date"])
    print(f"{'op':<18} {'mode':<17} {'variant':<14} {'backend':<10} {'ms':>8} {'p20':>8} {'p80':>8} {'TFLOP/s':>8} {'GB/s':>7}")
    for r in rows:
        extra = f"{r['tflops']:>8.2f} {r['gbps']:>7.1f}" if "tflops" in r else f"{'':>8} {'':>7}"
        print(f"{r['op']:<18} {r['mode']:<17} {r['variant']:<14} {r['backend']:<10} {r['ms']:>8.3f} "
              f"{r['ms_p20']:>8.3f} {r['ms_p80']:>8.3f} {extra}")
    for op in OPS:
        for mode in ("forward", "forward+backward"):
            for variant in variants:
                by = {r["backend"]: r["ms"] for r in rows if r["op"] == op and r["mode"] == mode and r["variant"] == variant}
                # The message path's goals are stated against unfused PyTorch (the reference), the
                # IFA's against sdpa (and in bf16 the faster of the two); cpp-fp32 is there in bf16.
                peers = ("sdpa", "reference", "cpp-fp32")
                for fused in ("triton", "cuda", "cpp", "cpp-native"):
                    ratios = [f"{by[peer] / by[fused]:.2f}x {peer}" for peer in peers if fused in by and peer in by]
                    if ratios:
                        print(f"{op} {mode} {variant}: {fused} is {', '.join(ratios)}")
    if args.json:
        write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
