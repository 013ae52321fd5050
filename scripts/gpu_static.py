"""What the CPU can tell about the GPU kernels (``make gpu-static``): compile, count, check.

Every Triton kernel is compiled ahead of time for sm_80 and sm_90a (``triton.compile`` with a
``GPUTarget``; no GPU needed) with the Triton installed here and with any other Triton given by
``--triton DIR`` (the GPU image's 3.6, installed by the Makefile into ``.triton36/``), and every
CUDA kernel with ``nvcc -cubin -Xptxas -v`` for the architectures of csrc/build_flags.json.
For each kernel the table and ``bench-results/gpu-static.json`` give registers, spills,
shared memory, whether tensor-core instructions were emitted and how many blocks fit on one SM.

The Triton configurations are not listed here: the launchers themselves
(``_ifa_forward``, ``_ifa_backward``, ``_cfa_forward``) are called on meta tensors with their
``@triton.jit`` kernels swapped for recorders, so what is compiled is exactly the argument
list, constexprs, ``num_warps`` and grid a real call would launch, specialised by that
Triton's own binder (pointer alignment, integer divisibility). The CUDA kernels are the
instantiations nvcc makes of the real sources (the launchers' dispatch picks them).

Fails (exit status 1, naming each kernel) on a compile error, shared memory above the
architecture's per-block limit, any spill in an fp16/bf16 kernel, an fp16/bf16 Triton kernel
without tensor-core instructions, or an fp16/bf16 CUDA kernel without ``HMMA``/``HGMMA`` in its
SASS (or whose SASS could not be read). fp32 spills are reported, not failed.

Compiled results are cached under ``build/gpu-static/`` keyed by everything that decides them
(sources, toolchain version, flags, arguments), so a second run costs seconds.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Any, Iterable, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROW_KEYS = ("kernel", "source", "arch", "dtype", "head_dim", "toolchain", "registers", "spill_bytes",
            "shared_bytes", "tensor_cores", "blocks_per_sm")
LOW_PRECISION = ("float16", "bfloat16")


# ---------------------------------------------------------------------------------------------
# Architecture limits and occupancy (pure)


@dataclasses.dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block limits of one compute capability (CUDA programming guide, table
    "Technical Specifications per Compute Capability")."""

    name: str
    capability: int
    shared_per_block: int  # the opt-in maximum of dynamic + static shared memory per block
    shared_per_sm: int
    reserved_shared_per_block: int = 1024  # the runtime keeps 1 KB per resident block
    shared_granularity: int = 128
    registers_per_sm: int = 65536
    register_granularity: int = 256  # registers are allocated per warp in units of 256
    max_registers_per_thread: int = 255
    max_threads_per_sm: int = 2048
    max_blocks_per_sm: int = 32


ARCHS: dict[str, ArchLimits] = {
    "sm_80": ArchLimits("sm_80", 80, shared_per_block=163 * 1024, shared_per_sm=164 * 1024),
    "sm_90a": ArchLimits("sm_90a", 90, shared_per_block=227 * 1024, shared_per_sm=228 * 1024),
}


def _round_up(value: int, unit: int) -> int:
    return -(-value // unit) * unit


def blocks_per_sm(arch: str, registers: int, threads: int, shared_bytes: int) -> int:
    """Blocks of ``threads`` threads using ``registers`` registers per thread and
    ``shared_bytes`` of shared memory that can be resident on one SM of ``arch`` at once
    (the occupancy calculator's rule: the least of the register, shared-memory, thread and
    block limits). 0 when one block does not fit at all."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    if threads <= 0 or registers < 0 or shared_bytes < 0:
        raise ValueError(f"threads > 0, registers >= 0, shared_bytes >= 0 expected, got threads={threads}, "
                         f"registers={registers}, shared_bytes={shared_bytes}")
    lim = ARCHS[arch]
    if registers > lim.max_registers_per_thread or shared_bytes > lim.shared_per_block:
        return 0
    warps = -(-threads // 32)
    by_threads = lim.max_threads_per_sm // (warps * 32)
    regs_per_warp = _round_up(max(registers, 1) * 32, lim.register_granularity)
    by_registers = (lim.registers_per_sm // regs_per_warp) // warps
    per_block = _round_up(shared_bytes, lim.shared_granularity) + lim.reserved_shared_per_block
    by_shared = lim.shared_per_sm // per_block
    return max(0, min(lim.max_blocks_per_sm, by_threads, by_registers, by_shared))


def failures(row: dict[str, Any]) -> list[str]:
    """Why ``row`` fails the check (empty when it passes): a compile error, shared memory above
    the architecture's per-block limit, a spill in an fp16/bf16 kernel, an fp16/bf16 kernel
    without tensor-core instructions (Triton: in its PTX or SASS; CUDA: ``HMMA``/``HGMMA`` in its
    SASS, ``tensor_cores`` None when no SASS could be read), or no block fitting on an SM."""
    if row.get("error"):
        return [f"compile error: {row['error']}"]
    found = []
    limit = ARCHS[row["arch"]].shared_per_block
    if row["shared_bytes"] > limit:
        found.append(f"shared memory {row['shared_bytes']} B > {limit} B per block on {row['arch']}")
    if row["dtype"] in LOW_PRECISION and row["spill_bytes"] > 0:
        found.append(f"spills {row['spill_bytes']} B in a {row['dtype']} kernel")
    if row["source"] == "triton" and row["dtype"] in LOW_PRECISION and not row["tensor_cores"]:
        found.append(f"no tensor-core instructions in a {row['dtype']} Triton kernel")
    if row["source"] == "cuda" and row["dtype"] in LOW_PRECISION and not row["tensor_cores"]:
        found.append(f"no HMMA in the SASS of a {row['dtype']} CUDA kernel" if row["tensor_cores"] is False
                     else f"SASS not read (no cuobjdump): cannot check a {row['dtype']} CUDA kernel for HMMA")
    if row["blocks_per_sm"] == 0 and not found:
        found.append(f"no block fits on one SM ({row['registers']} registers, {row['shared_bytes']} B shared)")
    return found


# ---------------------------------------------------------------------------------------------
# Reading compiler output (pure)


@dataclasses.dataclass
class PtxasEntry:
    """What ``ptxas -v`` says about one entry function for one architecture."""

    function: str
    arch: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    stack_frame: int = 0
    static_shared: int = 0


_ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\w+)'")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> list[PtxasEntry]:
    """The entries of a ``ptxas -v`` log (also as nvcc's ``-Xptxas -v`` and Triton's
    ``TRITON_DUMP_PTXAS_LOG`` print it), in order. Lines before the first "Compiling entry
    function" (global memory summaries) are ignored."""
    entries: list[PtxasEntry] = []
    for line in text.splitlines():
        if (m := _ENTRY.search(line)) is not None:
            entries.append(PtxasEntry(function=m.group(1), arch=m.group(2)))
            continue
        if not entries:
            continue
        entry = entries[-1]
        if (m := _SPILLS.search(line)) is not None:
            entry.stack_frame, entry.spill_stores, entry.spill_loads = (int(g) for g in m.groups())
        if (m := _USED.search(line)) is not None:
            entry.registers = int(m.group(1))
            if (s := _SMEM.search(line)) is not None:
                entry.static_shared = int(s.group(1))
    return entries


_PTX_MMA = re.compile(r"^\s*(?:@!?%\w+\s+)?(?:mma|wgmma)\.", re.MULTILINE)
_SASS_MMA = re.compile(r"\b(?:HMMA|HGMMA)\b")


def has_tensor_core_instructions(ptx: str = "", sass: str = "") -> bool:
    """True when the PTX holds ``mma``/``wgmma`` instructions or the SASS ``HMMA``/``HGMMA``."""
    return bool(_PTX_MMA.search(ptx) or _SASS_MMA.search(sass))


def split_sass(sass: str) -> dict[str, str]:
    """``cuobjdump -sass`` output split per function (mangled name -> its instructions)."""
    parts: dict[str, str] = {}
    current = None
    for line in sass.splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            current = m.group(1)
            parts[current] = ""
        elif current is not None:
            parts[current] += line + "\n"
    return parts


# The first template argument: ``scalar_t`` of the FMA kernels, or the 16-bit element tag of the
# tensor-core kernels (csrc/cuda/warp_mma.cuh).
_CUDA_DTYPES = {"float": "float32", "double": "float64", "c10::Half": "float16", "c10::BFloat16": "bfloat16",
                "xclip_ext::warp_mma::F16": "float16", "xclip_ext::warp_mma::BF16": "bfloat16"}
_TEMPLATE = re.compile(r"(\w+)<([^<>]*)>\(")


def cuda_kernel_config(demangled: str) -> tuple[str, str, list[int]]:
    """``void ns::ifa_fwd_kernel<c10::Half, float, 64, 64, 64>(...)`` ->
    ``("ifa_fwd_kernel", "float16", [64, 64, 64])``: name, dtype of the first template argument
    and the integer template arguments (DP first, then the tiles where the template has them;
    ``ifa_mma_fwd_kernel<xclip_ext::warp_mma::BF16, 64>`` -> ``[64]``)."""
    m = _TEMPLATE.search(demangled)
    if m is None:
        raise ValueError(f"demangled: expected a kernel template instantiation, got {demangled!r}")
    args = [a.strip() for a in m.group(2).split(",")]
    if args[0] not in _CUDA_DTYPES:
        raise ValueError(f"demangled: unknown scalar type {args[0]!r} in {demangled!r}")
    return m.group(1), _CUDA_DTYPES[args[0]], [int(a) for a in args[1:] if re.fullmatch(r"-?\d+", a)]


def cuda_tiles(kernel: str, ints: Sequence[int]) -> tuple[int, int]:
    """(query tile rows, key tile rows) of one CUDA instantiation (``ints`` as
    :func:`cuda_kernel_config` gives them): the FMA kernels carry them as template arguments;
    the tensor-core forward's are ``FwdTiles<DP>`` (csrc/cuda/ifa_mma_forward.cuh, mirrored here
    and checked against the header through the host model in tests/xclip_kernels/
    test_cuda_mma_model.py); the message kernels (FMA and tensor-core) have one block per
    (video, head): (1, 1)."""
    if kernel == "ifa_mma_fwd_kernel":
        return 64, 32
    # The tensor-core backward's BwdTiles<DP> (csrc/cuda/ifa_mma_backward.cuh, checked through the
    # host model in tests/xclip_kernels/test_cuda_mma_backward_model.py): dK/dV 64 keys, query
    # tiles 64 / 64 / 32 / 16 at DP = 32 / 64 / 96 / 128; dQ 64 queries, key tiles 64 up to DP = 64.
    if kernel == "ifa_mma_bwd_dkdv_kernel":
        return {32: 64, 64: 64, 96: 32, 128: 16}[ints[0]], 64
    if kernel == "ifa_mma_bwd_dq_kernel":
        return 64, 64 if ints[0] <= 64 else 32
    if kernel in ("ifa_fwd_kernel", "ifa_bwd_dkdv_kernel", "ifa_bwd_dq_kernel"):
        return ints[1], ints[2]
    if kernel in ("cfa_fwd_kernel", "cfa_mma_fwd_kernel"):
        return 1, 1
    raise ValueError(f"kernel: no tiles known for {kernel!r}")


def cuda_shared_bytes(kernel: str, dtype: str, ints: Sequence[int], frames: int | None = None) -> int:
    """Dynamic shared memory the CUDA launchers request for one instantiation, in bytes.

    Mirrors the layouts ``FwdSmem``/``DkdvSmem``/``DqSmem`` (csrc/cuda/frame_attention.cu) and
    ``CfaSmem`` (csrc/cuda/message_attention.cu), counted in the accumulation type (fp32, fp64
    for double), ``FwdTiles`` (csrc/cuda/ifa_mma_forward.cuh: 16-bit Q and double-buffered
    K/V tiles, rows of DP + 8 elements), ``BwdTiles`` (csrc/cuda/ifa_mma_backward.cuh) and
    ``CfaTiles`` (csrc/cuda/cfa_mma.cuh: 16-bit A and B k-chunk double buffers, fp32 q/k/v;
    checked against the header through the host model in tests/xclip_kernels/
    test_cuda_cfa_model.py). The kernels declare only ``extern __shared__`` memory, so ptxas
    cannot report it. ``ints`` are the template's integer arguments (DP, BM, BN; DP alone for
    the tensor-core kernels); ``frames`` is T (message path).
    """
    if kernel == "ifa_mma_fwd_kernel":
        (dp,) = ints
        bm, bn = cuda_tiles(kernel, ints)
        return (bm + 4 * bn) * (dp + 8) * 2
    if kernel == "ifa_mma_bwd_dkdv_kernel":  # K, V; Q, dO double-buffered; lse, delta (2 x BM floats)
        (dp,) = ints
        bm, bn = cuda_tiles(kernel, ints)
        return (2 * bn + 4 * bm) * (dp + 8) * 2 + 4 * bm * 4
    if kernel == "ifa_mma_bwd_dq_kernel":  # Q, dO; K, V double-buffered; msg_k, msg_v (DP), p, dS (BM)
        (dp,) = ints
        bm, bn = cuda_tiles(kernel, ints)
        return (2 * bm + 4 * bn) * (dp + 8) * 2 + 2 * dp * 4 + 2 * bm * 4
    if kernel == "cfa_mma_fwd_kernel":
        if frames is None:
            raise ValueError("frames: the message kernel's shared memory depends on T; got None")
        (dp,) = ints
        k_bk, k_max_t = 32, 64
        stride, parts = k_bk + 8, 3 if dp <= 64 else 1
        t16, t8 = _round_up(frames, 16), _round_up(frames, 8)
        staging = max(2 * t16 * stride * 2 + 2 * parts * dp * stride * 2, t8 * (k_max_t + 16) * 4)
        return _round_up(staging + 3 * t8 * (dp + 1) * 4 + 2 * t8 * 4, 16)
    acc = 8 if dtype == "float64" else 4
    if kernel == "cfa_fwd_kernel":
        if frames is None:
            raise ValueError("frames: the message kernel's shared memory depends on T; got None")
        (dp,) = ints
        k_bk, k_max_t, k_ty = 16, 64, 8
        tp = _round_up(frames, k_ty)
        xs, s, ps = k_bk + 1, dp + 1, k_max_t + 16
        return (tp * xs + dp * xs + 3 * tp * s + tp * ps + 2 * tp) * acc
    dp, bm, bn = ints
    s = dp + 1
    if kernel == "ifa_fwd_kernel":
        return (bm * s + 2 * bn * s + bm * (bn + 16) + 2 * dp) * acc
    if kernel == "ifa_bwd_dkdv_kernel":
        return (2 * bn * s + 2 * bm * s + 2 * bn * (bm + 16) + 2 * bm) * acc
    if kernel == "ifa_bwd_dq_kernel":
        return (2 * bm * s + 2 * bn * s + bm * (bn + 16) + 2 * dp + 4 * bm) * acc
    raise ValueError(f"kernel: no shared-memory layout known for {kernel!r}")


# ---------------------------------------------------------------------------------------------
# Triton: trace the launchers, compile what they launch (runs in a worker process, so that
# each Triton version is imported on its own)

# Shapes handed to the launchers: X-CLIP-B/16, 8 frames, 32 clips (F = 256, N = 197, H = 12),
# q/k/v as views of one (F, N, 3, H, D) projection output, as the model passes them. The
# head dims the launchers must handle: X-CLIP's 64, the largest (128) and one that is not a
# power of two (80). The message path at every T the issue names, W = 768, 12 heads.
IFA_SHAPE = (256, 197, 12)
HEAD_DIMS = (64, 128, 80)
CFA_FRAMES = (8, 16, 32, 64)
CFA_SHAPE = (32, 768, 12)  # videos, width, heads
TRITON_DTYPES = ("float32", "float16", "bfloat16")


def _trace_triton_launches() -> list[dict[str, Any]]:
    """Every launch the Triton launchers make for the shapes above: kernel, grid, args, kwargs."""
    import torch
    from triton.runtime.jit import JITFunction

    from xclip_kernels.backends.triton import frame_attention as fa
    from xclip_kernels.backends.triton import message_attention as ma

    launches: list[dict[str, Any]] = []
    context: dict[str, Any] = {}

    class Recorder:
        def __init__(self, fn: JITFunction) -> None:
            self.fn = fn

        def __getitem__(self, grid: tuple[int, ...]):  # noqa: ANN204
            def record(*args: Any, **kwargs: Any) -> None:
                launches.append(dict(context, fn=self.fn, grid=tuple(grid), args=args, kwargs=kwargs))
            return record

    saved = {(mod, name): value for mod in (fa, ma) for name, value in vars(mod).items()
             if isinstance(value, JITFunction)}
    if not saved:
        raise RuntimeError("gpu-static: found no @triton.jit kernels in the Triton backend's modules")
    try:
        for (mod, name), fn in saved.items():
            setattr(mod, name, Recorder(fn))
        frames, tokens, heads = IFA_SHAPE
        for dtype_name in TRITON_DTYPES:
            dtype = getattr(torch, dtype_name)
            meta = dict(dtype=dtype, device="meta")
            for head_dim in HEAD_DIMS:
                context.update(dtype=dtype_name, head_dim=head_dim, frames=None)
                q, k, v = torch.empty(frames, tokens, 3, heads, head_dim, **meta).unbind(2)
                msg_k, msg_v = (torch.empty(frames, heads, head_dim, **meta) for _ in range(2))
                out, lse = fa._ifa_forward(q, k, v, msg_k, msg_v, head_dim**-0.5)
                fa._ifa_backward(torch.empty_like(out), q, k, v, msg_k, msg_v, out, lse, head_dim**-0.5)
            videos, width, cfa_heads = CFA_SHAPE
            for t in CFA_FRAMES:
                context.update(dtype=dtype_name, head_dim=width // cfa_heads, frames=t)
                vec = torch.empty(width, **meta)
                ma._cfa_forward(torch.empty(videos * t, width, **meta), vec, vec, torch.empty(3 * width, width, **meta),
                                torch.empty(3 * width, **meta), torch.empty(width, width, **meta), vec, t, cfa_heads,
                                1e-5)
    finally:
        for (mod, name), fn in saved.items():
            setattr(mod, name, fn)
    return launches


def _compile_request(launch: dict[str, Any], arch: str) -> dict[str, Any]:
    """What the JIT would hand to ``triton.compile`` for this launch on ``arch``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch["fn"]
    target = GPUTarget("cuda", ARCHS[arch].capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch["args"], **launch["kwargs"])
    options, signature, constexprs, attrs = fn._pack_args(backend, launch["kwargs"], bound, specialization, options)
    return dict(fn=fn, target=target, options=options, signature=signature, constexprs=constexprs, attrs=attrs)


def _triton_tool(name: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _compile_triton(request: dict[str, Any]) -> dict[str, Any]:
    """Compile one request; registers and spills from the ptxas log Triton itself prints."""
    import triton
    from triton.compiler.compiler import ASTSource

    fn = request["fn"]
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(fn, request["signature"], request["constexprs"], request["attrs"]),
                                      target=request["target"], options=request["options"].__dict__)
    except Exception as exc:  # noqa: BLE001 - any compiler failure is a result to report
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    entries = [e for e in parse_ptxas_log(log.getvalue()) if e.function == fn.__name__]
    if len(entries) != 1:
        return {"error": f"expected one ptxas report for {fn.__name__}, found {len(entries)}"}
    entry = entries[0]
    sass = ""
    cuobjdump = _triton_tool("cuobjdump")
    if os.path.isfile(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            sass = subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return {
        "registers": entry.registers,
        "spill_bytes": entry.spill_stores,
        "shared_bytes": int(compiled.metadata.shared),
        "tensor_cores": has_tensor_core_instructions(compiled.asm["ptx"], sass),
        "threads": 32 * int(compiled.metadata.num_warps),
        "error": None,
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _triton_cache_key(request: dict[str, Any], toolchain: str) -> str:
    fn = request["fn"]
    parts = [toolchain, fn.__name__, fn.cache_key, str(request["target"]), repr(sorted(request["signature"].items())),
             repr(sorted(request["constexprs"].items(), key=str)), repr(sorted(request["attrs"].items(), key=str)),
             repr(sorted(request["options"].__dict__.items()))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def triton_worker(archs: Sequence[str], shard: int, shards: int, cache: str | None,
                  dtypes: Sequence[str] = TRITON_DTYPES) -> list[dict[str, Any]]:
    """Rows for the share ``shard`` of ``shards`` of this Triton's compiles (worker process)."""
    import triton

    toolchain = f"triton {triton.__version__}"
    rows: list[dict[str, Any]] = []
    jobs: dict[str, list[dict[str, Any]]] = {}
    # fp32 last: its ieee-precision kernels take the longest to compile.
    launches = sorted((x for x in _trace_triton_launches() if x["dtype"] in dtypes), key=lambda x: x["dtype"] == "float32")
    for launch in launches:
        for arch in archs:
            request = _compile_request(launch, arch)
            key = _triton_cache_key(request, toolchain)
            jobs.setdefault(key, []).append(dict(launch=launch, arch=arch, request=request))
    for index, (key, group) in enumerate(jobs.items()):
        if index % shards != shard:
            continue
        path = os.path.join(cache, f"triton-{key}.json") if cache else None
        result = None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                result = json.load(f)
        if result is None:
            result = _compile_triton(group[0]["request"])
            if path and result["error"] is None:
                with open(path, "w", encoding="utf-8") as f:
                    json.dump(result, f)
        for item in group:
            launch, request = item["launch"], item["request"]
            config = {k: v for k, v in request["constexprs"].items()}
            names = [p.name for p in launch["fn"].params]
            config = {names[k[0]] if isinstance(k, tuple) and len(k) == 1 else str(k): v for k, v in config.items()}
            config.update(num_warps=request["options"].num_warps, num_stages=request["options"].num_stages)
            rows.append(dict(
                kernel=launch["fn"].__name__.strip("_"), source="triton", arch=item["arch"], dtype=launch["dtype"],
                head_dim=launch["head_dim"], frames=launch["frames"], toolchain=toolchain,
                grid=list(launch["grid"]), config=_jsonable(config), **result,
            ))
    return rows


# ---------------------------------------------------------------------------------------------
# CUDA: nvcc -cubin -Xptxas -v per source and architecture


def _nvcc() -> str | None:
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.isfile(candidate):
            return candidate
    return None


def _build_flags() -> dict[str, Any]:
    with open(os.path.join(ROOT, "csrc", "build_flags.json"), encoding="utf-8") as f:
        return json.load(f)


def _nvcc_command(nvcc: str, source: str, arch: str, out: str, stub_dir: str) -> list[str]:
    """Device code only (-cubin: no host compile of torch's headers), with the defines and
    include paths of scripts/cuda_compile.py (the flags csrc/build_flags.json gives)."""
    import sysconfig

    import torch
    from torch.utils import cpp_extension

    build = _build_flags()
    number = arch.removeprefix("sm_")
    includes = [*cpp_extension.include_paths(), sysconfig.get_paths()["include"]]
    return [
        nvcc, f"-std=c++{build['cmake_cxx_standard']['value']}", *build["nvcc_flags"]["value"], "-DXCLIP_WITH_CUDA",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", "-D__CUDA_NO_HALF_OPERATORS__",
        "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
        *(arg for path in includes for arg in ("-isystem", path)), f"-I{os.path.join(ROOT, 'csrc')}",
        f"-I{os.path.join(os.path.dirname(os.path.dirname(nvcc)), 'include')}", f"-I{stub_dir}",
        f"-gencode=arch=compute_{number},code=sm_{number}", "-cubin", "-Xptxas", "-v", source, "-o", out,
    ]


def _cuda_threads() -> int:
    with open(os.path.join(ROOT, "csrc", "cuda", "common.cuh"), encoding="utf-8") as f:
        m = re.search(r"constexpr int kThreads = (\d+);", f.read())
    if m is None:
        raise RuntimeError("gpu-static: kThreads not found in csrc/cuda/common.cuh")
    return int(m.group(1))


def _cuda_cache_key(command: Sequence[str], nvcc_version: str) -> str:
    digest = hashlib.sha256(nvcc_version.encode())
    # The command without nvcc's path, the temporary stub folder and the output path.
    digest.update("\0".join(arg for arg in command[1:-2] if not arg.startswith("-I" + tempfile.gettempdir())).encode())
    for path in sorted({*_build_flags()["cuda_sources"]["value"], "csrc/xclip_ops.h",
                        *(os.path.relpath(p, ROOT) for p in _glob_cuh())}):
        with open(os.path.join(ROOT, path), "rb") as f:
            digest.update(path.encode() + f.read())
    return digest.hexdigest()[:32]


def _glob_cuh() -> list[str]:
    folder = os.path.join(ROOT, "csrc", "cuda")
    return [os.path.join(folder, name) for name in os.listdir(folder) if name.endswith(".cuh")]


def cuda_rows(source: str, arch: str, cache: str | None) -> list[dict[str, Any]]:
    """Rows for every kernel instantiated by one .cu file for one architecture."""
    nvcc = _nvcc()
    if nvcc is None:
        raise RuntimeError("gpu-static: nvcc not found (set NVCC or put it on PATH)")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    release = re.search(r"release ([\d.]+)", version)
    toolchain = f"nvcc {release.group(1) if release else '?'}"
    with tempfile.TemporaryDirectory() as tmp:
        stub = os.path.join(tmp, "stub")
        # A CPU build of torch lacks the generated header that c10/cuda includes (as in
        # scripts/cuda_compile.py); CUDA builds of torch have it, so this stand-in comes last.
        os.makedirs(os.path.join(stub, "c10", "cuda", "impl"))
        with open(os.path.join(stub, "c10", "cuda", "impl", "cuda_cmake_macros.h"), "w", encoding="utf-8") as f:
            f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        cubin = os.path.join(tmp, "out.cubin")
        command = _nvcc_command(nvcc, os.path.join(ROOT, source), arch, cubin, stub)
        key = _cuda_cache_key(command, version)
        path = os.path.join(cache, f"cuda-{key}.json") if cache else None
        if path and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            return [dict(kernel=os.path.basename(source), source="cuda", arch=arch, dtype=None, head_dim=None,
                         frames=None, toolchain=toolchain, registers=0, spill_bytes=0, shared_bytes=0,
                         tensor_cores=False, threads=0, error="nvcc failed: " + " | ".join(tail))]
        entries = parse_ptxas_log(result.stdout + result.stderr)
        cuobjdump = shutil.which("cuobjdump") or _venv_cuobjdump()
        sass = None  # None: no SASS read, so tensor_cores is unknown (None) below
        if cuobjdump:
            sass = split_sass(subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True,
                                             check=True).stdout)
        names = subprocess.run(["c++filt"], input="\n".join(e.function for e in entries), capture_output=True,
                               text=True, check=True).stdout.splitlines()
    threads = _cuda_threads()
    rows = []
    for entry, demangled in zip(entries, names):
        kernel, dtype, ints = cuda_kernel_config(demangled)
        for frames in (CFA_FRAMES if kernel in ("cfa_fwd_kernel", "cfa_mma_fwd_kernel") else (None,)):
            rows.append(dict(
                kernel=kernel, source="cuda", arch=arch, dtype=dtype, head_dim=ints[0], frames=frames,
                toolchain=toolchain, registers=entry.registers, spill_bytes=entry.spill_stores,
                shared_bytes=entry.static_shared + cuda_shared_bytes(kernel, dtype, ints, frames),
                tensor_cores=(None if sass is None
                              else has_tensor_core_instructions(sass=sass.get(entry.function, ""))),
                threads=threads, config={"template": demangled[demangled.index("<"):demangled.index(">(") + 1],
                                         "tiles": list(cuda_tiles(kernel, ints))},
                error=None,
            ))
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    return rows


def _venv_cuobjdump() -> str | None:
    # CUDA's own cuobjdump may be missing (a compiler-only install); Triton bundles one.
    try:
        path = _triton_tool("cuobjdump")
    except ImportError:
        return None
    return path if os.path.isfile(path) else None


# ---------------------------------------------------------------------------------------------
# Driver


def finish_row(row: dict[str, Any]) -> dict[str, Any]:
    """Add ``blocks_per_sm`` and ``failures`` to a compiled row."""
    if row.get("error"):
        row["blocks_per_sm"] = 0
    else:
        row["blocks_per_sm"] = blocks_per_sm(row["arch"], row["registers"], row["threads"], row["shared_bytes"])
    row["failures"] = failures(row)
    return row


def _yes_no(value: bool | None) -> str:
    return "?" if value is None else "yes" if value else "no"


def format_table(rows: Iterable[dict[str, Any]]) -> str:
    """One line per kernel configuration, failures marked."""
    header = (f"{'kernel':<20} {'source':<6} {'arch':<6} {'dtype':<8} {'D':>3} {'T':>3} {'toolchain':<12} "
              f"{'regs':>4} {'spill':>5} {'shared':>7} {'TC':>3} {'blk/SM':>6}  result")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['kernel']:<20} {r['source']:<6} {r['arch']:<6} {str(r['dtype']):<8} {str(r['head_dim']):>3} "
            f"{str(r['frames'] or ''):>3} {r['toolchain']:<12} {r['registers']:>4} {r['spill_bytes']:>5} "
            f"{r['shared_bytes']:>7} {_yes_no(r['tensor_cores']):>3} {r['blocks_per_sm']:>6}  "
            + ("FAIL: " + "; ".join(r["failures"]) if r["failures"] else "ok"))
    return "\n".join(lines)


def markdown_report(rows: Sequence[dict[str, Any]], arch: str = "sm_90a", triton: str = "triton 3.6",
                    dtypes: Sequence[str] = ("bfloat16", "float32")) -> str:
    """Markdown for BENCHMARKS.md: the rows on ``arch`` of the ``triton`` toolchain (the GPU
    image's) and of nvcc (its D = 64 and 128 instantiations), for ``dtypes``; then every
    failing row, any architecture, toolchain or dtype."""
    head = "| kernel | source | toolchain | dtype | D | T | registers | spill B | shared B | tensor cores | blocks/SM |"
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        if r["arch"] != arch or r["dtype"] not in dtypes or r.get("error"):
            continue
        if not (r["toolchain"].startswith(triton) or (r["source"] == "cuda" and r["head_dim"] in (64, 128))):
            continue
        lines.append(f"| {r['kernel']} | {r['source']} | {r['toolchain']} | {r['dtype']} | {r['head_dim']} | "
                     f"{r['frames'] or ''} | {r['registers']} | {r['spill_bytes']} | {r['shared_bytes']} | "
                     f"{_yes_no(r['tensor_cores'])} | {r['blocks_per_sm']} |")
    failed = [r for r in rows if r["failures"]]
    lines += ["", f"Failing ({len(failed)} of {len(rows)} rows, all architectures):", ""]
    lines += [f"- {r['kernel']} ({r['source']}, {r['toolchain']}, {r['arch']}, {r['dtype']}, D = {r['head_dim']}"
              + (f", T = {r['frames']}" if r["frames"] else "") + "): " + "; ".join(r["failures"]) for r in failed]
    return "\n".join(lines)


def _sort_key(row: dict[str, Any]) -> tuple:
    return (row["source"], row["toolchain"], row["kernel"], row["arch"], str(row["dtype"]), row["head_dim"] or 0,
            row["frames"] or 0)


def _run_triton_worker(python_path: str, archs: Sequence[str], shard: int, shards: int, cache: str,
                       dtypes: str) -> list[dict]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (python_path, ROOT) if p))
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        command = [sys.executable, os.path.abspath(__file__), "--worker", out.name, "--archs", ",".join(archs),
                   "--shard", f"{shard}/{shards}", "--cache", cache, "--dtypes", dtypes]
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"gpu-static: Triton worker ({python_path or 'this environment'}) failed:\n"
                               f"{result.stderr[-4000:]}")
        with open(out.name, encoding="utf-8") as f:
            return json.load(f)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--triton", action="append", default=[], metavar="DIR",
                        help="another Triton to compile with: a folder holding its package (pip install --target)")
    parser.add_argument("--json", default=os.path.join(ROOT, "bench-results", "gpu-static.json"))
    parser.add_argument("--cache", default=os.path.join(ROOT, "build", "gpu-static"),
                        help="folder of cached compile results ('' for none)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--no-cuda", action="store_true", help="skip the CUDA sources (no nvcc here)")
    parser.add_argument("--dtypes", default=",".join(TRITON_DTYPES),
                        help="Triton dtypes to compile, comma-separated (CUDA: every instantiation, always)")
    parser.add_argument("--markdown", metavar="JSON",
                        help="compile nothing: print the Markdown tables of BENCHMARKS.md from a gpu-static.json")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--archs", default=",".join(ARCHS), help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    archs = args.archs.split(",")
    unknown = set(args.dtypes.split(",")) - set(TRITON_DTYPES)
    if unknown:
        parser.error(f"--dtypes: expected some of {','.join(TRITON_DTYPES)}, got {args.dtypes!r}")
    if args.markdown:
        with open(args.markdown, encoding="utf-8") as f:
            print(markdown_report(json.load(f)))
        return 0
    if args.cache:
        os.makedirs(args.cache, exist_ok=True)

    if args.worker:
        # Triton's own on-disk cache would skip ptxas and with it the log read here.
        os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpu-static-")
        os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
        # FP fusion on: the default of every Triton release so far (3.9 warns it may change).
        os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
        shard, shards = (int(x) for x in args.shard.split("/"))
        try:
            rows = triton_worker(archs, shard, shards, args.cache or None, args.dtypes.split(","))
        finally:
            shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
        with open(args.worker, "w", encoding="utf-8") as f:
            json.dump(rows, f)
        return 0

    for folder in args.triton:
        if not os.path.isdir(os.path.join(folder, "triton")):
            parser.error(f"--triton: expected a folder holding a 'triton' package, got {folder!r}")
    nvcc = None if args.no_cuda else _nvcc()
    if not args.no_cuda and nvcc is None:
        parser.error("nvcc not found (set NVCC, put it on PATH, or pass --no-cuda)")
    jobs = max(1, args.jobs)
    tasks = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        if nvcc:
            for source in _build_flags()["cuda_sources"]["value"]:
                for arch in archs:
                    tasks.append(pool.submit(cuda_rows, source, arch, args.cache or None))
        for python_path in ["", *(os.path.abspath(p) for p in args.triton)]:
            for shard in range(jobs):
                tasks.append(pool.submit(_run_triton_worker, python_path, archs, shard, jobs, args.cache, args.dtypes))
        rows = [finish_row(row) for task in tasks for row in task.result()]
    rows.sort(key=_sort_key)
    print(format_table(rows))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(rows, f, indent=1)
    failed = [r for r in rows if r["failures"]]
    toolchains = sorted({r["toolchain"] for r in rows})
    print(f"\ngpu-static: {len(rows)} kernel configurations ({', '.join(toolchains)}; {', '.join(archs)}); "
          f"{len(failed)} failing; wrote {os.path.relpath(args.json, ROOT)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
