"""The collection pipeline's decode stage alone: videos/s with 0 (in process), 1, 2... decode
workers, no model (issue 17's decode-only benchmark).

    python -m benchmarks.collection                      # 64 synthetic 320x240 3 s videos, 0/1/2 workers
    python -m benchmarks.collection --folder DIR --videos 128 --workers 0,1,2,4 --json bench-results/decode.json

Each pass decodes every video of the folder through exactly what ``classify --output`` and
``embed`` run before the model: :class:`xclip.collection.ViewsDataset` (PyAV decode, sampling,
resize, crop, normalise) behind :func:`xclip.collection.decode_loader` (the DataLoader, its
collate and worker settings), the samples consumed and dropped. A pass includes starting and
stopping its workers, as every run pays them. Passes of all worker counts run in interleaved
rounds in this one process (``benchmarks.timing.interleaved``), the ratios taken per round.

The control: the same decoding (``xclip.video.load_views``, one FFmpeg and one torch thread, as
in a worker) in N independent processes started the same way (fork), each taking every N-th
file, no DataLoader, nothing sent back. Its N/1 ratio is what this machine gives a second
decoder at all (two virtual cores need not run two decoders at twice the rate of one: shared
caches, memory bandwidth, clock, a hypervisor's neighbours); the pipeline's N workers against
the control's N processes is what the pipeline itself loses. Passes of the control run in the
same interleaved rounds.

Synthetic videos (random frames, MPEG-4, 10 fps, as the tests write them) are written into
``--folder`` on first use, named by their size and length, and reused by later runs.

Printed: a table per worker count (seconds per pass, videos/s, CPU seconds per video summed
over every process and the main process's part, decode seconds per video inside the
dataset), the videos/s ratios (``N workers / 1 worker``, the issue's goal ``>= 1.7x`` from the
second worker on 2 cores; ``1 worker / in process``), the CPU model, core count, versions, and
how busy the machine was with other work just before and just after (``/proc/stat`` over one idle second, and the load
average; "LOADED" above a quarter of a core): on a loaded machine the ratios mean little.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch

from benchmarks.backends import positive_int
from benchmarks.timing import environment, interleaved, write_json
from xclip import collection
from xclip.video import load_views

FPS = 10
"""Frame rate of the synthetic videos (the tests' ``write_video`` default)."""


def parse_size(text: str) -> tuple[int, int]:
    """argparse type: ``WIDTHxHEIGHT``, both even (4:2:0 video) and positive."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT such as 320x240, got {text!r}") from None
    if width < 2 or height < 2 or width % 2 or height % 2:
        raise argparse.ArgumentTypeError(f"expected an even width and height of at least 2, got {text!r}")
    return width, height


def parse_workers(text: str) -> list[int]:
    """argparse type: comma-separated worker counts (0 = decode in this process), distinct."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 0,1,2, got {text!r}") from None
    if any(n < 0 for n in counts) or len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"expected distinct integers >= 0, got {text!r}")
    return counts


def synthetic_videos(folder: str, count: int, size: tuple[int, int], seconds: int, seed: int = 0) -> list[str]:
    """Paths of ``count`` synthetic videos of ``size`` (width, height) and ``seconds`` at
    :data:`FPS` in ``folder``, writing those not there yet (random RGB frames, MPEG-4 4:2:0).

    The names carry size and length, so one folder can hold several sets; video ``i`` has the
    same frames in every run (a generator seeded with ``seed + i``).
    """
    import av

    width, height = size
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"synthetic-{width}x{height}-{seconds}s-{i:04d}.mp4")
        paths.append(path)
        if os.path.exists(path):
            continue
        generator = torch.Generator().manual_seed(seed + i)
        frames = torch.randint(0, 256, (seconds * FPS, height, width, 3), generator=generator, dtype=torch.uint8)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp.mp4")  # renamed when whole: no torn video reused
        with av.open(tmp, mode="w") as container:
            stream = container.add_stream("mpeg4", rate=FPS)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for image in frames.numpy():
                container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
            container.mux(stream.encode())  # the encoder's delayed frames
        os.replace(tmp, path)
    return paths


def busy_cores(interval: float = 1.0) -> float:
    """Cores kept busy by all processes over the next ``interval`` seconds while this one
    sleeps (from ``/proc/stat``; time stolen by the hypervisor counts as busy); NaN where
    ``/proc/stat`` cannot be read."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields[:8]), idle  # user nice system idle iowait irq softirq steal (guest is in user)

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return float("nan")
    total = total1 - total0
    return (total - (idle1 - idle0)) / total * (os.cpu_count() or 1) if total > 0 else 0.0


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds (user + system) of this process and its waited-for children (a DataLoader
    joins its workers when a pass ends), and of this process alone."""
    t = os.times()
    own = t.user + t.system
    return own + t.children_user + t.children_system, own


def _decode_share(paths: Sequence[str], num_frames: int, image_size: int) -> None:
    # One control process: a worker's settings (one torch thread, one FFmpeg thread), no
    # DataLoader, the views dropped. A file that fails is skipped (the timed table counts errors).
    torch.set_num_threads(1)
    for path in paths:
        try:
            load_views(path, num_frames, image_size, threads=1)
        except Exception:  # noqa: BLE001, S112 - the control times decoding, not error handling
            continue


def independent_pass(paths: Sequence[str], processes: int, *, num_frames: int = 8, image_size: int = 224) -> None:
    """The control: decode ``paths`` in ``processes`` forked processes, process i taking
    ``paths[i::processes]``; returns when all have exited."""
    context = multiprocessing.get_context("fork")  # how a DataLoader on Linux starts its workers
    started = [context.Process(target=_decode_share, args=(list(paths[i::processes]), num_frames, image_size))
               for i in range(processes)]
    for process in started:
        process.start()
    for process in started:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"control decode process exited with status {process.exitcode}")


def measure(
    paths: Sequence[str], workers: Sequence[int], *, rounds: int, warmup: int = 1, num_frames: int = 8,
    image_size: int = 224, num_clips: int = 1, num_crops: int = 1, control: Sequence[int] = (),
) -> tuple[list[dict[str, Any]], dict[int, list[float]]]:
    """Decode every path once per pass, per worker count, in interleaved rounds.

    Returns one row per worker count, in ``workers`` order: ``{"workers", "seconds"
    (per round), "videos_per_s" (per round), "cpu_seconds_per_video" (all processes),
    "main_cpu_seconds_per_video" (this process: with workers, receiving their views, the CPU
    a run's model loses to decoding), "decode_seconds_per_video" (medians over rounds),
    "errors"}``. A file that fails to decode counts as an error (and a
    video done, as in a run). Also returns the control's seconds per round for each process
    count in ``control`` (:func:`independent_pass`), timed in the same rounds.
    """
    items = collection.collect_inputs(paths)
    dataset = collection.ViewsDataset(items, num_frames, image_size, num_clips=num_clips, num_crops=num_crops)
    # Per pass: CPU s of all processes, CPU s of this one, decode s, errors.
    stats: dict[int, list[tuple[float, float, float, int]]] = {n: [] for n in workers}

    def one_pass(n: int) -> None:
        cpu, own = _cpu_seconds()
        decode, errors = 0.0, 0
        for sample in collection.decode_loader(dataset, workers=n, pin_memory=False):
            decode += sample["seconds"]
            errors += sample["error"] is not None
        cpu_after, own_after = _cpu_seconds()
        stats[n].append((cpu_after - cpu, own_after - own, decode, errors))

    candidates = {str(n): (lambda n=n: one_pass(n)) for n in workers}
    paths_in_order = [item.path for item in items]
    for n in control:
        candidates[f"control-{n}"] = lambda n=n: independent_pass(
            paths_in_order, n, num_frames=num_frames, image_size=image_size)
    timings = interleaved(candidates, rounds=rounds, warmup=warmup)
    rows = []
    for n in workers:
        timed = stats[n][warmup:]  # the warm-up passes are not timed
        seconds = timings.seconds[str(n)]
        rows.append({
            "workers": n,
            "seconds": seconds,
            "videos_per_s": [len(items) / s for s in seconds],
            "cpu_seconds_per_video": statistics.median(c for c, _, _, _ in timed) / len(items),
            "main_cpu_seconds_per_video": statistics.median(m for _, m, _, _ in timed) / len(items),
            "decode_seconds_per_video": statistics.median(d for _, _, d, _ in timed) / len(items),
            "errors": max(e for _, _, _, e in timed),
        })
    return rows, {n: timings.seconds[f"control-{n}"] for n in control}


def control_ratios(rows: Sequence[dict[str, Any]], control: dict[int, list[float]]) -> dict[str, float]:
    """Median over rounds of per-round ratios: ``"N/1"`` the control's N processes against its
    one (what the machine gives an N-th decoder), and ``"pipeline N/control N"`` the pipeline's N
    workers against the control's N processes (what the pipeline loses), for N >= 1 where both
    ran."""
    out: dict[str, float] = {}
    if 1 in control:
        for n in sorted(control):
            if n >= 2:
                out[f"{n}/1"] = statistics.median(b / a for a, b in zip(control[n], control[1]))
    pipeline = {row["workers"]: row["seconds"] for row in rows}
    for n in sorted(control):
        if n in pipeline:
            out[f"pipeline {n}/control {n}"] = statistics.median(c / p for p, c in zip(pipeline[n], control[n]))
    return out


def ratios(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Median over rounds of the per-round videos/s ratios: ``"N/1"`` for every N >= 2 workers
    against 1 worker, and ``"1/0"`` (1 worker against decoding in process), where both ran."""
    by_workers = {row["workers"]: row["seconds"] for row in rows}
    pairs = [(n, 1) for n in sorted(by_workers) if n >= 2] + [(1, 0)]
    return {
        f"{n}/{base}": statistics.median(b / a for a, b in zip(by_workers[n], by_workers[base]))
        for n, base in pairs
        if n in by_workers and base in by_workers
    }


def _name(workers: int) -> str:
    return "0 (in process)" if workers == 0 else str(workers)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--folder", default=os.path.join("bench-results", "collection-videos"),
                        help="where the synthetic videos are written (kept and reused; default %(default)s)")
    parser.add_argument("--videos", type=positive_int, default=64, help="number of videos (default %(default)s)")
    parser.add_argument("--size", type=parse_size, default=(320, 240), metavar="WxH",
                        help="frame size (default 320x240)")
    parser.add_argument("--seconds", type=positive_int, default=3,
                        help="length of each video at 10 fps (default %(default)s)")
    parser.add_argument("--workers", type=parse_workers, default=[0, 1, 2], metavar="N,N,...",
                        help="decode worker counts to compare, 0 = in process (default 0,1,2)")
    parser.add_argument("--rounds", type=positive_int, default=3,
                        help="timed rounds after one warm-up (default %(default)s)")
    parser.add_argument("--frames", type=positive_int, default=8, help="frames per clip, T (default %(default)s)")
    parser.add_argument("--image-size", type=positive_int, default=224, help="crop size, S (default %(default)s)")
    parser.add_argument("--no-control", action="store_true",
                        help="skip the control (the same decoding in 1 and 2 independent processes)")
    parser.add_argument("--json", metavar="PATH", help="also write the record as JSON")
    args = parser.parse_args(argv)

    import av  # noqa: F401 - a missing PyAV fails here, before any video is written

    busy_before = busy_cores()  # before writing videos: other work only
    load_before = os.getloadavg()
    width, height = args.size
    paths = synthetic_videos(args.folder, args.videos, args.size, args.seconds)
    control_counts = [] if args.no_control else [n for n in (1, 2) if n in args.workers]
    rows, control = measure(paths, args.workers, rounds=args.rounds, num_frames=args.frames,
                            image_size=args.image_size, control=control_counts)
    load_after = os.getloadavg()
    busy_after = busy_cores()
    env = environment()
    cores = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    speedups = ratios(rows)
    control_speedups = control_ratios(rows, control)
    loaded = max(busy_before, busy_after) > 0.25

    print("Decode stage of the collection pipeline (xclip.collection ViewsDataset + decode_loader, no model)")
    rounds = f"{args.rounds} timed round{'s' if args.rounds > 1 else ''}"
    print(f"{len(paths)} videos {width}x{height}, {args.seconds} s at {FPS} fps (MPEG-4, random frames) in "
          f"{args.folder}; {args.frames} frames, {args.image_size} px, 1 view each; {rounds} after 1 warm-up round")
    print(f"CPU: {env['device']}, {cores} cores ({usable} usable by this process); torch {env['torch']}, "
          f"PyAV {av.__version__}, Python {env['python']}; {env['date']}")
    print(f"other work: {busy_before:.2f} cores busy just before, {busy_after:.2f} just after "
          f"({'LOADED: ratios are unreliable' if loaded else 'quiet'}); load average (1, 5, 15 min) "
          f"before {' '.join(f'{x:.2f}' for x in load_before)}, after {' '.join(f'{x:.2f}' for x in load_after)}")
    print()
    print("| workers | s per pass (median) | videos/s (median) | videos/s (min-max) | CPU s per video "
          "| of it in the main process | decode s per video | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        rates = row["videos_per_s"]
        print(f"| {_name(row['workers'])} | {statistics.median(row['seconds']):.2f} | {statistics.median(rates):.1f} | "
              f"{min(rates):.1f}-{max(rates):.1f} | {row['cpu_seconds_per_video']:.3f} | "
              f"{row['main_cpu_seconds_per_video']:.3f} | "
              f"{row['decode_seconds_per_video']:.3f} | {row['errors']} |")
    print()
    for pair, value in speedups.items():
        n, base = pair.split("/")
        goal = "; goal >= 1.7x from the second worker" if pair == "2/1" else ""
        what = "in process" if base == "0" else f"{base} worker"
        print(f"{n} worker{'s' if n != '1' else ''} / {what}: {value:.2f}x videos/s (median of per-round ratios{goal})")
    print("CPU s per video: this process and its workers, user + system (in the main process: with workers, "
          "receiving the views); decode s per video: wall time inside the dataset, summed over workers")
    if control:
        print()
        print("Control, the same decoding in independent processes (no DataLoader, nothing sent back):")
        for n, seconds in control.items():
            rates = [len(paths) / s for s in seconds]
            print(f"  {n} process{'es' if n > 1 else ''}: {statistics.median(rates):.1f} videos/s "
                  f"({min(rates):.1f}-{max(rates):.1f})")
        for pair, value in control_speedups.items():
            what = ("what this machine gives a second decoder" if "pipeline" not in pair
                    else "the pipeline against the control")
            print(f"  {pair}: {value:.2f}x ({what})")

    if args.json:
        write_json(args.json, {
            "benchmark": "collection-decode",
            "environment": {**env, "cores": cores, "usable_cores": usable, "av": av.__version__},
            "load": {"busy_cores_before": busy_before, "busy_cores_after": busy_after,
                     "loadavg_before": list(load_before), "loadavg_after": list(load_after), "loaded": loaded},
            "videos": {"count": len(paths), "width": width, "height": height, "seconds": args.seconds, "fps": FPS,
                       "folder": args.folder},
            "frames": args.frames, "image_size": args.image_size, "rounds": args.rounds,
            "rows": rows, "ratios": speedups,
            "control": {"seconds": {str(n): seconds for n, seconds in control.items()}, "ratios": control_speedups},
        })
    return 1 if any(row["errors"] for row in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
