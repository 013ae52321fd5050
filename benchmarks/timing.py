"""Timing on a shared, noisy CPU: interleaved rounds, medians, paired ratios.

Each round runs every candidate once, in an order rotated every round, so drifts in clock
speed or neighbours' load hit all candidates alike. Ratios are taken per round and then
their median, never from absolute times measured at different moments.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from xclip_kernels import gemm


@dataclass
class Timings:
    """Seconds per call of each candidate, one entry per round."""

    seconds: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def quantile(self, name: str, q: float) -> float:
        values = sorted(self.seconds[name])
        return values[min(len(values) - 1, max(0, round(q * (len(values) - 1))))]

    def speedup(self, name: str, baseline: str) -> float:
        """Median over rounds of ``time(baseline) / time(name)``: > 1 means ``name`` is faster."""
        return statistics.median(b / a for a, b in zip(self.seconds[name], self.seconds[baseline]))


def interleaved(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    warmup: int = 1,
    progress: Callable[[int], None] | None = None,
    min_sample_s: float = 0.0,
) -> Timings:
    """Time each callable once per round for ``rounds`` rounds after ``warmup`` untimed rounds.

    With ``min_sample_s``, a sample is a run of back-to-back calls, as many as make the
    slowest callable's warm-up call last that long (the same count for every callable), and
    the time recorded is per call: single calls of a sub-millisecond op mostly time thread
    wake-up and the caches the previous candidate left.
    """
    names = list(candidates)
    slowest = 0.0
    for _ in range(warmup):
        for name in names:
            start = time.perf_counter()
            candidates[name]()
            slowest = max(slowest, time.perf_counter() - start)
    number = max(1, round(min_sample_s / slowest)) if min_sample_s > 0 and slowest > 0 else 1
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(number):
                candidates[name]()
            seconds[name].append((time.perf_counter() - start) / number)
        if progress is not None:
            progress(r + 1)
    return Timings(seconds)


MATMUL_SIZE = 2048


def matmul_candidate(
    size: int = MATMUL_SIZE, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[Callable[[], object], float]:
    """A ``size``³ matmul to time beside the models, and its FLOPs (``2 size³``)."""
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)

    def call() -> None:
        torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()

    return call, 2.0 * size**3


ONEDNN_DTYPES = (torch.float32, torch.bfloat16)
"""Dtypes of oneDNN's CPU linear."""

WIDENED_DTYPES = gemm.WIDENED_DTYPES
"""Dtypes whose CPU limit includes the product widened to float32 (our "float32" provider)."""


def limit_candidates(
    size: int = MATMUL_SIZE, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[dict[str, Callable[[], torch.Tensor]], float]:
    """The machine's GEMM limit, to time beside the models: the same ``size``³ product ``a @ b``
    on every provider a model could run on here, and the FLOPs of one call (``2 size³``).

    "matmul" is ``torch.mm`` (MKL on the CPU, cuBLAS on a GPU); on a CPU with oneDNN, "onednn"
    is oneDNN's linear with its weight prepacked once (what Inductor's freezing runs; on some
    CPUs far above MKL's rate); for bf16/fp16 on the CPU, "float32" is the product widened to
    float32, ``a`` widened into a float32 buffer, ``@ b32``, rounded back to ``dtype``, with ``b``'s float32 copy made once
    like the packed weight (conversion of ``a`` and of the output included: on CPUs without AMX
    it beats both native bf16 GEMMs, and our ``xclip_kernels.gemm`` may run the model that way).
    The limit of a round is its fastest provider (:func:`limit_gflops`).
    """
    a = torch.randn(size, size, dtype=dtype, device=device)
    b = torch.randn(size, size, dtype=dtype, device=device)
    out = torch.empty(size, size, dtype=dtype, device=device)

    def matmul() -> torch.Tensor:
        torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    candidates: dict[str, Callable[[], torch.Tensor]] = {"matmul": matmul}
    if device == "cpu" and dtype in ONEDNN_DTYPES and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), size)  # linear takes (out, in)

        def onednn() -> torch.Tensor:
            return torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")

        candidates["onednn"] = onednn
    if device == "cpu" and dtype in WIDENED_DTYPES:
        b32 = b.float()
        # Buffers made once, as for the other providers' outputs: a fresh 16 MB float32 copy of
        # ``a`` per call ran this GEMM at half its rate with THP_MEM_ALLOC_ENABLE=1 (huge-page
        # faults on every call), which would understate the limit.
        a32, wide = torch.empty(size, size), torch.empty(size, size)

        def widened() -> torch.Tensor:
            a32.copy_(a)
            torch.mm(a32, b32, out=wide)
            return out.copy_(wide)

        candidates["float32"] = widened
    return candidates, 2.0 * size**3


def limit_gflops(timings: Timings, providers: Sequence[str], flops: float) -> list[float]:
    """Per round, the GFLOP/s of the fastest of ``providers`` (timed in the same rounds)."""
    rounds = zip(*(timings.seconds[name] for name in providers))
    return [flops / min(seconds) / 1e9 for seconds in rounds]


def environment() -> dict[str, object]:
    """What a benchmark record must say about where it ran."""
    cpu = platform.processor() or platform.machine()
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            fields = dict(line.split(":", 1) for line in f.read().split("\n\n")[0].splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        cpu = fields.get("model name", cpu)
        flags = set(fields.get("flags", "").split())
    except OSError:
        pass
    return {
        "device": cpu,
        # bf16 is fast only with these instructions; without them it runs hundreds of times slower.
        "native_bf16": sorted(flags & {"avx512_bf16", "amx_bf16"}),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        # Which engine our CPU inference GEMMs take here (xclip_kernels.gemm; measured once).
        "gemm_provider": {str(dtype).removeprefix("torch."): gemm.provider(dtype) for dtype in gemm.PACKED_DTYPES},
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(path: str, record: object) -> None:
    """Write a benchmark record to ``path`` as indented JSON, creating its folder if needed."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
