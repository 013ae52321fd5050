"""X-CLIP eager against ``torch.compile`` with Inductor freezing on the CPU, compile time included.

One random-weight model (``xclip.build_model``) at the run's dtype is the eager baseline
(automatic backend). Each compiled variant is a copy of it with its attention backend set
("reference", "sdpa", "cpp", or "auto": the automatic choice, made while Dynamo traces),
wrapped in ``torch.compile(model)`` (Inductor, default mode, static shapes) and compiled with
``torch._inductor.config.freezing = True``: parameters become constants, so Inductor folds
them and prepacks the linear weights for oneDNN. Every call, eager or compiled, runs under
``torch.no_grad()`` (freezing applies only to graphs that need no gradient).

Compile time is what a user waits for: the first call of the compiled model (Dynamo trace,
AOTAutograd, freezing, Inductor's code generation and C++ build, and one forward), timed on
its own, each variant with a fresh, empty Inductor cache (``torch._inductor.utils.fresh_cache``)
so that no variant reuses kernels another one built. Then eager and every compiled variant run
in interleaved rounds. Printed per row: compile seconds, clips/s (median, 20th/80th
percentiles), compiled / eager (median over rounds of eager time / compiled time: above 1
means the compiled model is faster), the break-even point (clips after which compiling has
paid for its compile time) and max |logits - eager logits|.

A variant that fails to compile or to run is a one-line row saying why, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import copy
import math
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

import xclip
from xclip_kernels.registry import OPS, OpInputs, get_backend, select_backend

from .backends import DTYPES, add_model_arguments, model_inputs
from .peers import cpu_bf16_flags
from .timing import Timings, environment, interleaved, write_json

COMPILED = ("reference", "sdpa", "cpp", "auto")
"""Backends a compiled variant can run on ("auto": the automatic choice)."""

DEFAULT_COMPILED = ("sdpa", "auto")
"""Compiled variants of a default run: the portable backend, and what ``backend=None`` picks."""

COMPILER = "inductor"
"""The ``torch.compile`` backend (the tests substitute ``"aot_eager"``, which builds no C++)."""


@dataclass
class Variant:
    """One row of the table: how to call it, or why it does not run."""

    name: str
    backend: str  # the backend the variant was asked for ("auto" for the automatic choice)
    status: str = "ok"  # "ok", "not run: ...", "failed: ..."
    call: Callable[[], torch.Tensor] | None = None
    compile_s: float | None = None  # first call of a compiled variant; None for eager
    chosen: dict[str, str] = field(default_factory=dict)  # op -> backend that runs it

    @property
    def runs(self) -> bool:
        return self.call is not None


def chosen_backends(config: xclip.XCLIPConfig, dtype: torch.dtype, backend: str) -> dict[str, str]:
    """Which backend runs each op of ``config`` at ``dtype`` on the CPU when the model is set to
    ``backend`` ("auto": the registry's choice); raises the registry's report if it cannot run."""
    head_dim = config.vision_width // config.vision_heads
    forced = None if backend == "auto" else backend
    return {op: select_backend(OpInputs(op, "cpu", dtype, head_dim, False, config.num_frames), forced).name
            for op in OPS}


def break_even_clips(compile_s: float, eager_s_per_clip: float, compiled_s_per_clip: float) -> float:
    """Clips after which compiling has paid off: ``compile_s`` over the seconds saved per clip;
    ``math.inf`` when the compiled model saves nothing per clip.

    The compile's first call also computes one batch, which this ignores (it slightly
    overstates the break-even point).
    """
    for name, value in (("compile_s", compile_s), ("eager_s_per_clip", eager_s_per_clip),
                        ("compiled_s_per_clip", compiled_s_per_clip)):
        if not (value >= 0 and math.isfinite(value)):
            raise ValueError(f"{name}: expected a finite number >= 0, got {value}")
    saved = eager_s_per_clip - compiled_s_per_clip
    return compile_s / saved if saved > 0 else math.inf


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``values`` by nearest rank (as :meth:`Timings.quantile`)."""
    if not values:
        raise ValueError("values: expected at least one number, got none")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def summarize(timings: Timings, name: str, batch: int, baseline: str = "eager") -> dict[str, object]:
    """clips/s of ``name`` (median and 20th/80th percentiles over rounds), its speed-up over
    ``baseline`` (median of per-round ``baseline time / name time``) and the per-round seconds."""
    seconds = timings.seconds[name]
    clips = [batch / s for s in seconds]
    return dict(clips_per_s=round(batch / statistics.median(seconds), 3),
                clips_per_s_p20=round(percentile(clips, 0.2), 3),
                clips_per_s_p80=round(percentile(clips, 0.8), 3),
                over_eager=round(timings.speedup(name, baseline), 3),
                seconds=[round(s, 5) for s in seconds])


HEADER = (f"{'variant':<18} {'compile s':>9} {'clips/s':>8} {'[p20, p80]':>17} {'vs eager':>9} "
          f"{'break-even':>12} {'max|Δ logits|':>13}  backends")


def format_row(name: str, row: dict[str, object]) -> str:
    """One line of the table for a row of the record (a status line when it did not run)."""
    if "clips_per_s" not in row:
        return f"{name:<18} {row['status']}"
    compile_s = "-" if row.get("compile_s") is None else f"{row['compile_s']:.1f}"
    clips = row.get("break_even_clips")
    even = "-" if clips is None else ("never" if clips == math.inf else f"{clips:.0f} clips")
    chosen = ", ".join(f"{op}={backend}" for op, backend in row["chosen"].items())
    return (f"{name:<18} {compile_s:>9} {row['clips_per_s']:8.3f} [{row['clips_per_s_p20']:7.3f}, "
            f"{row['clips_per_s_p80']:7.3f}] {row['over_eager']:8.3f}x {even:>12} "
            f"{row['max_abs_logit_diff']:13.2e}  {chosen}")


def _first_line(exc: Exception) -> str:
    """``Type: first line of the message``: compiler errors run to pages, and a row is one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; bad values stop with the flag named."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, rounds=10)
    parser.add_argument("--compiled", nargs="+", default=list(DEFAULT_COMPILED), metavar="BACKEND",
                        help=f"backends of the compiled variants, among {', '.join(COMPILED)} "
                             f"(default: {' '.join(DEFAULT_COMPILED)})")
    parser.add_argument("--json", metavar="PATH", help="also write the record as JSON")
    args = parser.parse_args(argv)
    if args.dtype not in ("float32", "bfloat16"):
        parser.error(f"--dtype: expected float32 or bfloat16 (the CPU precisions benchmarked), got {args.dtype}")
    unknown = [b for b in args.compiled if b not in COMPILED]
    if unknown:
        parser.error(f"--compiled: expected backends among {', '.join(COMPILED)}, got {', '.join(unknown)}")
    args.compiled = [b for b in COMPILED if b in args.compiled]  # table order, no repeats
    return args


def compile_variant(model: xclip.XCLIP, backend: str, video: torch.Tensor, text: torch.Tensor,
                    config: xclip.XCLIPConfig, dtype: torch.dtype) -> tuple[Variant, torch.Tensor | None]:
    """A copy of ``model`` on ``backend``, compiled with freezing by its first call on ``video``
    ``(b, T, 3, S, S)`` and ``text`` ``(K, 77)``; the row and that call's logits ``(b, K)``."""
    name = f"compiled {backend}"
    head_dim = config.vision_width // config.vision_heads
    if backend != "auto":
        reasons: list[str] = []
        for op in OPS:
            probe = OpInputs(op, "cpu", dtype, head_dim, False, config.num_frames)
            reasons += [r for r in get_backend(backend).not_supported_reasons(probe) if r not in reasons]
        if reasons:
            return Variant(name, backend, status=f"not run: {backend}: {'; '.join(reasons)}"), None
    chosen = chosen_backends(config, dtype, backend)
    print(f"compiling on {backend} (Inductor, freezing) ...", file=sys.stderr)
    import torch._inductor.config  # noqa: F401 - here, not at import: importing Inductor takes seconds
    import torch._inductor.utils

    try:
        copied = copy.deepcopy(model)
        copied.set_attention_backend(None if backend == "auto" else backend)
        compiled = torch.compile(copied, backend=COMPILER)
        # Each variant from an empty cache: what a user's first compile costs, not a reuse of
        # kernels the previous variant built.
        with torch._inductor.utils.fresh_cache(), torch._inductor.config.patch(freezing=True), torch.no_grad():
            start = time.perf_counter()
            logits = compiled(video, text)
            compile_s = time.perf_counter() - start
    except Exception as exc:  # noqa: BLE001 - one variant that does not compile must not hide the others
        return Variant(name, backend, status=f"failed: {_first_line(exc)}"), None

    def call() -> torch.Tensor:
        with torch.no_grad():
            return compiled(video, text)

    return Variant(name, backend, call=call, compile_s=compile_s, chosen=chosen), logits


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every variant ran, 1 when one failed."""
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.compiled", *(sys.argv[1:] if argv is None else argv)])
    dtype = DTYPES[args.dtype]
    torch.manual_seed(0)
    model = xclip.build_model(args.variant, num_frames=args.frames).eval().to(dtype)
    config = model.config
    video, text = model_inputs(config, args.batch, args.labels, "cpu", dtype)

    def run_eager() -> torch.Tensor:
        with torch.no_grad():
            return model(video, text)

    automatic = chosen_backends(config, dtype, "auto")
    variants = {"eager": Variant("eager", "auto", call=run_eager, chosen=automatic)}
    outputs: dict[str, torch.Tensor] = {"eager": run_eager()}
    for backend in args.compiled:
        name = f"compiled {backend}"
        same = next((v for v in variants.values() if backend == "auto" and v.compile_s is not None
                     and v.chosen == automatic), None)
        if same is not None:
            # The automatic choice is made while tracing: compiling it again would build that row's graph.
            variants[name] = Variant(name, backend, status=f"not run: the automatic choice at {args.dtype} is "
                                     f"{same.backend}, the row '{same.name}'")
            continue
        variant, logits = compile_variant(model, backend, video, text, config, dtype)
        variants[name] = variant
        if logits is not None:
            outputs[name] = logits
    return _measure(args, command, variants, outputs)


def _measure(args: argparse.Namespace, command: str, variants: dict[str, Variant],
             outputs: dict[str, torch.Tensor]) -> int:
    """Parity with eager, interleaved rounds, the table and the record."""
    env = environment()
    flags = cpu_bf16_flags()
    print(f"{args.variant} {args.frames}f, batch {args.batch}, {args.labels} label(s), {args.dtype}, torch.no_grad, "
          f"{env['device']} (native bf16: {', '.join(flags) or 'no'}), {env['threads']} threads, "
          f"torch {env['torch']}, THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}")
    expected = outputs["eager"].float()
    diffs: dict[str, float] = {}
    for name, logits in outputs.items():
        diff = (logits.float() - expected).abs().max().item() if logits.shape == expected.shape else math.nan
        if not math.isfinite(diff):
            variants[name] = Variant(name, variants[name].backend, status=(
                f"failed: logits {tuple(logits.shape)} against eager {tuple(expected.shape)}, or not finite"))
            continue
        diffs[name] = diff

    running = {name: v.call for name, v in variants.items() if v.runs}
    timings = interleaved(running, args.rounds,
                          progress=lambda r: print(f"\r  round {r}/{args.rounds}", end="", file=sys.stderr))
    print(file=sys.stderr)

    eager_s_per_clip = timings.median("eager") / args.batch
    rows: dict[str, dict[str, object]] = {}
    print(HEADER)
    for name, variant in variants.items():
        row: dict[str, object] = dict(status=variant.status, backend=variant.backend, chosen=variant.chosen,
                                      compile_s=None if variant.compile_s is None else round(variant.compile_s, 2))
        if name in running:
            row.update(summarize(timings, name, args.batch), max_abs_logit_diff=diffs[name])
            if variant.compile_s is not None:
                row["break_even_clips"] = break_even_clips(variant.compile_s, eager_s_per_clip,
                                                           timings.median(name) / args.batch)
        rows[name] = row
        print(format_row(name, row))
    failed = [name for name, row in rows.items() if str(row["status"]).startswith("failed")]

    if args.json:
        record = dict(env, command=command, variant=args.variant, frames=args.frames, batch=args.batch,
                      labels=args.labels, dtype=args.dtype, rounds=args.rounds, mode="torch.no_grad",
                      compiler=COMPILER, freezing=True, cpu_bf16_flags=flags, native_bf16=bool(flags),
                      rows={name: {k: (None if v == math.inf else v) for k, v in row.items()}
                            for name, row in rows.items()},
                      ratio="over_eager: median over rounds of eager time / variant time (> 1: variant faster); "
                            "break_even_clips: compile seconds / seconds saved per clip (null: never)")
        write_json(args.json, record)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
