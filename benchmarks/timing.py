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
from typing import Callable

import torch


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


def environment() -> dict[str, object]:
    """What a benchmark record must say about where it ran."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "device": cpu,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "0"),
        "date": time.strftime("%Y-%m-%d"),
    }


def write_json(path: str, record: object) -> None:
    """Write a benchmark record to ``path`` as indented JSON, creating its folder if needed."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
