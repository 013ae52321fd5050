"""Smoke test of one built ``xclip_kernels._C`` file, wherever it lies (``make cmake-check``).

    python scripts/check_extension.py build/cmake [--tiles yes|no]

(the module file itself, or the folder holding the ``_C`` module of this Python version).

Loads the file as ``xclip_kernels._C`` in this fresh process (so nothing else can load
another build of the ops first), then checks what a build can get wrong without the test
suite noticing: that it was compiled against the torch running it, that it calls into
OpenMP (without it at::parallel_for silently runs on one thread), whether it has the x86-64
tile kernels, the instruction-set switch, and both forward ops against
``xclip_kernels.backends.reference`` on small random inputs (tile and BLAS paths). Prints what it
checked; exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import sysconfig
import time

import torch


def module_file(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, "_C" + sysconfig.get_config_var("EXT_SUFFIX"))
    if not os.path.isfile(path):
        sys.exit(f"check_extension: no built module at {path}")
    return path


def load(path: str):  # noqa: ANN201
    spec = importlib.util.spec_from_file_location("xclip_kernels._C", path)
    if spec is None or spec.loader is None:
        sys.exit(f"check_extension: {path} is not a loadable extension module")
    module = importlib.util.module_from_spec(spec)
    # Registered first, so a later `import xclip_kernels._C` finds this build, not another one.
    sys.modules["xclip_kernels._C"] = module
    spec.loader.exec_module(module)
    return module


def check(condition: bool, what: str) -> None:
    if not condition:
        sys.exit(f"check_extension: FAILED: {what}")
    print(f"  ok: {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", help="the built module (.so), or its folder")
    parser.add_argument("--tiles", choices=("yes", "no"), help="whether the build must have the CPU tile kernels")
    args = parser.parse_args()
    start = time.perf_counter()
    args.path = module_file(args.path)
    print(f"check_extension: {args.path} ({os.path.getsize(args.path) / 1e6:.1f} MB)")
    module = load(args.path)
    from xclip_kernels.backends import reference  # after the load above: the package must see this build

    running = torch.__version__.split("+")[0]
    check(module.torch_version() == running, f"compiled against torch {module.torch_version()}, running {running}")
    with open(args.path, "rb") as f:
        check(b"GOMP_parallel" in f.read(), "calls into OpenMP (GOMP_parallel among its imported symbols)")
    tiles = module.has_cpu_tiles()
    if args.tiles is not None:
        check(tiles == (args.tiles == "yes"), f"has_cpu_tiles() is {tiles}, as asked ({args.tiles})")
    check(module.has_blas(), "torch's BLAS entry points resolved (has_blas)")
    module.set_cpu_isa("avx2")
    check(module.cpu_isa() == ("avx2" if tiles else "none"), f"set_cpu_isa('avx2') gives cpu_isa() = {module.cpu_isa()}")
    module.set_cpu_isa("auto")
    print(f"  cpu_isa() = {module.cpu_isa()} after set_cpu_isa('auto')")
    try:
        module.set_cpu_isa("sse")
        check(False, "set_cpu_isa('sse') raises ValueError")
    except ValueError as exc:
        check("name" in str(exc) and '"sse"' in str(exc), f"set_cpu_isa('sse') raises ValueError: {exc}")

    gen = torch.Generator().manual_seed(0)
    # D = 64: the tile path on float32 where the tiles are built; float64: always the BLAS path.
    for dtype, shape in ((torch.float32, (2, 17, 2, 64)), (torch.float64, (2, 5, 2, 16))):
        q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
        msg_k, msg_v = (torch.randn(shape[0], shape[2], shape[3], generator=gen, dtype=torch.float64) for _ in range(2))
        inputs = [t.to(dtype) for t in (q, k, v, msg_k, msg_v)]
        out, lse = torch.ops.xclip_ext.frame_attention(*inputs, shape[3] ** -0.5)
        truth = reference.frame_attention(*(t.double() for t in inputs))
        error = (out.double() - truth).abs().max().item()
        check(error < (1e-5 if dtype == torch.float32 else 1e-10) and lse.shape == (shape[0], shape[2], shape[1]),
              f"frame_attention {tuple(shape)} {dtype}: max error {error:.1e} against the reference")
    videos, frames, width, heads = 2, 4, 64, 2
    for dtype in (torch.float32, torch.float64):
        tensors = [
            torch.randn(videos * frames, width, generator=gen, dtype=torch.float64),
            1 + 0.1 * torch.randn(width, generator=gen, dtype=torch.float64),
            0.1 * torch.randn(width, generator=gen, dtype=torch.float64),
            torch.randn(3 * width, width, generator=gen, dtype=torch.float64) / width**0.5,
            0.1 * torch.randn(3 * width, generator=gen, dtype=torch.float64),
            torch.randn(width, width, generator=gen, dtype=torch.float64) / width**0.5,
            0.1 * torch.randn(width, generator=gen, dtype=torch.float64),
        ]
        inputs = [t.to(dtype) for t in tensors]
        out = torch.ops.xclip_ext.message_attention(*inputs, frames, heads, 1e-5)
        truth = reference.message_attention(*(t.double() for t in inputs), frames, heads)
        error = (out.double() - truth).abs().max().item()
        check(error < (1e-4 if dtype == torch.float32 else 1e-10),
              f"message_attention ({videos * frames}, {width}) {dtype}: max error {error:.1e} against the reference")
    print(f"check_extension: passed in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
