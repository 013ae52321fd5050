"""X-CLIP against the CPU inference engines a user could pick instead, on the same weights.

A random-weight Hugging Face ``XCLIPModel`` of the chosen size (``benchmarks.vs_hf.hf_model``)
is saved with ``save_pretrained`` and loaded by ``xclip.load_checkpoint`` (ours), and exported
once with ``torch.onnx.export(..., dynamo=True)`` at the benchmark's static shapes (fp32) into
a temporary folder; ONNX Runtime and OpenVINO run that file. Every engine then runs in
interleaved rounds in this one process. Printed per engine: clips/s (median, 20th/80th
percentiles), ours / engine (median over rounds of the paired ratio engine time / our time:
above 1 means ours is faster) and max |logits - ours|.

Engines: ours (automatic backend, ``torch.inference_mode``), Hugging Face eager (sdpa),
ONNX Runtime (CPU execution provider, all graph optimizations, intra-op threads = torch's),
OpenVINO (CPU, latency hint, threads = torch's, inference precision f32 or bf16 set
explicitly: on CPUs with native bf16 its default is bf16 even for an fp32 model). With
``--dtype bfloat16`` ours and Hugging Face run in bf16 and OpenVINO with its bf16 precision
hint; ONNX Runtime has no bf16 path on the CPU, and its row says so.

The peer packages are optional (``pip install .[peers]``, or ``-r requirements-peers.txt``):
an engine whose package is missing gets a "not installed" row and the others run.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import shlex
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Callable, Sequence

import numpy as np
import torch

import xclip
from xclip_kernels.registry import OPS, OpInputs, select_backend

from .backends import DTYPES, add_model_arguments, model_inputs
from .timing import environment, interleaved, write_json
from .vs_hf import hf_model

PEERS = ("hf", "onnxruntime", "openvino")
"""Engines timed against ours, in table order (``--peers`` picks a subset)."""

MODULES: dict[str, tuple[str, ...]] = {
    "hf": ("transformers",),
    # Both ONNX engines run the file torch.onnx's dynamo exporter writes, which needs onnx and
    # onnxscript; OpenVINO reads ONNX with a reader of its own.
    "onnxruntime": ("onnxruntime", "onnx", "onnxscript"),
    "openvino": ("openvino", "onnx", "onnxscript"),
}
"""Python modules each engine needs; their pip names are the same."""

VERSIONED = ("torch", "transformers", "onnx", "onnxscript", "onnxruntime", "openvino")
"""Distributions whose versions the record states (None: not installed)."""

BF16_FLAGS = ("avx512_bf16", "amx_bf16")
"""/proc/cpuinfo flags that mean native bf16 arithmetic (without them CPU bf16 is emulated)."""

ONNX_INPUTS = ("input_ids", "pixel_values")


@dataclass
class Engine:
    """One row of the table: how to call the engine, or why it does not run."""

    name: str
    status: str = "ok"  # "ok", "not installed (pip install ...)", "not run: ...", "failed: ..."
    call: Callable[[], object] | None = None
    settings: dict[str, object] = field(default_factory=dict)
    version: str | None = None

    @property
    def runs(self) -> bool:
        return self.call is not None


def cpu_bf16_flags(path: str = "/proc/cpuinfo") -> list[str]:
    """Which of :data:`BF16_FLAGS` the CPU reports (empty where there are none, or no /proc)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    present = set(line.split(":", 1)[1].split())
                    return [flag for flag in BF16_FLAGS if flag in present]
    except OSError:
        pass
    return []


def versions() -> dict[str, str | None]:
    """Installed versions of :data:`VERSIONED`, read from package metadata (nothing imported)."""
    found: dict[str, str | None] = {}
    for name in VERSIONED:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def import_modules(names: Sequence[str]) -> tuple[dict[str, ModuleType], list[str]]:
    """Import ``names``; return the modules that imported and the names that did not."""
    modules, missing = {}, []
    for name in names:
        try:
            modules[name] = importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return modules, missing


class _LogitsOnly(torch.nn.Module):
    """``XCLIPModel`` with positional inputs and one output, ``logits_per_video``: the graph
    the ONNX engines run computes exactly what the other rows are compared on."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, pixel_values=pixel_values).logits_per_video


def export_onnx(hf: torch.nn.Module, text: torch.Tensor, video: torch.Tensor, folder: Path) -> Path:
    """Export ``hf`` (fp32) at the static shapes of ``text`` and ``video`` to ``folder/xclip.onnx``."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "xclip.onnx"
    program = torch.onnx.export(
        _LogitsOnly(hf).eval(), (text, video), dynamo=True, input_names=list(ONNX_INPUTS),
        output_names=["logits_per_video"], verbose=False,
    )
    program.save(str(path))
    return path


def onnxruntime_engine(ort: ModuleType, path: Path, feeds: dict[str, np.ndarray], threads: int) -> Engine:
    """An ONNX Runtime session on the CPU execution provider, every graph optimization on,
    ``threads`` intra-op threads (one graph runs at a time: no inter-op parallelism)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def call() -> np.ndarray:
        return session.run(None, feeds)[0]

    settings = dict(provider="CPUExecutionProvider", graph_optimization_level="ORT_ENABLE_ALL",
                    intra_op_num_threads=threads, inter_op_num_threads=1, precision="fp32")
    return Engine("onnxruntime", call=call, settings=settings, version=ort.__version__)


def openvino_engine(ov: ModuleType, path: Path, feeds: dict[str, np.ndarray], threads: int, precision: str) -> Engine:
    """The ONNX file compiled by OpenVINO for the CPU with the latency hint, ``threads`` inference
    threads and inference precision ``precision`` ("f32" or "bf16"), set explicitly because its
    default on a CPU with native bf16 is bf16."""
    core = ov.Core()
    compiled = core.compile_model(core.read_model(str(path)), "CPU", {
        "PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": precision,
    })
    request = compiled.create_infer_request()

    def call() -> np.ndarray:
        # share_inputs: the request reads the numpy arrays in place instead of copying them per call.
        return request.infer(feeds, share_inputs=True)[0]

    settings = dict(device="CPU", performance_hint=str(compiled.get_property("PERFORMANCE_HINT")),
                    inference_num_threads=int(compiled.get_property("INFERENCE_NUM_THREADS")),
                    inference_precision=compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name())
    return Engine("openvino", call=call, settings=settings, version=ov.get_version())


def _logits(out: object) -> torch.Tensor:
    """An engine's output as an fp32 torch tensor."""
    return (out if isinstance(out, torch.Tensor) else torch.from_numpy(np.asarray(out))).float()


def _first_line(exc: Exception) -> str:
    """``Type: first line of the message``: exporter and compiler errors run to pages, and a row is one line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; bad values stop with the flag named."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(parser, rounds=10)
    parser.add_argument("--peers", nargs="+", default=list(PEERS), metavar="ENGINE",
                        help=f"engines timed against ours (default: all of {', '.join(PEERS)})")
    parser.add_argument("--json", metavar="PATH", help="also write the record as JSON")
    args = parser.parse_args(argv)
    if args.dtype not in ("float32", "bfloat16"):
        parser.error(f"--dtype: expected float32 or bfloat16 (the peers' CPU precisions), got {args.dtype}")
    unknown = [p for p in args.peers if p not in PEERS]
    if unknown:
        parser.error(f"--peers: expected engines among {', '.join(PEERS)}, got {', '.join(unknown)}")
    args.peers = [p for p in PEERS if p in args.peers]  # table order, no repeats
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; 0 when every installed engine ran, 1 when one failed."""
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "benchmarks.peers", *(sys.argv[1:] if argv is None else argv)])
    dtype = DTYPES[args.dtype]
    bf16 = dtype == torch.bfloat16
    threads = torch.get_num_threads()
    if import_modules(MODULES["hf"])[1]:
        # Not a row like the peers: every engine's weights come from the Hugging Face model.
        raise SystemExit("benchmarks.peers: the weights come from a Hugging Face XCLIPModel, and transformers is "
                         "not installed (pip install -r requirements-test.txt)")
    torch.manual_seed(0)

    hf = hf_model(args.variant, args.frames)  # fp32: saved, exported, then cast
    engines: dict[str, Engine] = {}
    # The exported file (and OpenVINO's view of its weights) must outlive the runs: one folder
    # for the whole benchmark.
    with tempfile.TemporaryDirectory(prefix="xclip-peers-") as tmp:
        hf.save_pretrained(tmp)
        ours = xclip.load_checkpoint(tmp, map_location="cpu").eval().to(dtype)
        config = ours.config
        video, text = model_inputs(config, args.batch, args.labels, "cpu", dtype)
        # The ONNX engines take fp32 pixels: the same values as ours sees (bf16 ones, widened).
        feeds = {"input_ids": text.numpy(), "pixel_values": video.float().numpy()}
        head_dim = config.vision_width // config.vision_heads
        chosen = {op: select_backend(OpInputs(op, "cpu", dtype, head_dim, False, config.num_frames)).name
                  for op in OPS}

        def run_ours() -> torch.Tensor:
            with torch.inference_mode():
                return ours(video, text)

        engines["ours"] = Engine("ours", call=run_ours, version=torch.__version__,
                                 settings=dict(backend="automatic", chosen=chosen, mode="torch.inference_mode"))

        ready: dict[str, dict[str, ModuleType]] = {}
        for name in args.peers:
            modules, missing = import_modules(MODULES[name])
            if missing:
                engines[name] = Engine(name, status=f"not installed (pip install {' '.join(missing)})")
            elif name == "onnxruntime" and bf16:
                engines[name] = Engine(name, status="not run: ONNX Runtime has no bf16 path on the CPU "
                                       "(its CPU execution provider computes in fp32)",
                                       version=modules["onnxruntime"].__version__)
            else:
                ready[name] = modules

        # Exported before Hugging Face is cast to the benchmark's dtype: the ONNX file is fp32.
        onnx_path: Path | None = None
        export_error: str | None = None
        if "onnxruntime" in ready or "openvino" in ready:
            print("exporting to ONNX (torch.onnx.export, dynamo=True) ...", file=sys.stderr)
            try:
                onnx_path = export_onnx(hf, text, video.float(), Path(tmp) / "onnx")
            except Exception as exc:  # noqa: BLE001 - reported in both ONNX engines' rows
                export_error = f"ONNX export failed: {_first_line(exc)}"

        for name, modules in ready.items():
            try:
                if name == "hf":
                    engines[name] = _hf_engine(hf, modules["transformers"], dtype, video, text)
                elif export_error is not None:
                    engines[name] = Engine(name, status=f"failed: {export_error}")
                elif name == "onnxruntime":
                    engines[name] = onnxruntime_engine(modules["onnxruntime"], onnx_path, feeds, threads)
                else:
                    engines[name] = openvino_engine(modules["openvino"], onnx_path, feeds, threads,
                                                    "bf16" if bf16 else "f32")
            except Exception as exc:  # noqa: BLE001 - one broken peer must not hide the others' rows
                engines[name] = Engine(name, status=f"failed: {_first_line(exc)}")
        engines = {name: engines[name] for name in ("ours", *args.peers)}  # table order

        return _measure(args, command, engines, threads)


def _hf_engine(hf: torch.nn.Module, transformers: ModuleType, dtype: torch.dtype, video: torch.Tensor,
               text: torch.Tensor) -> Engine:
    """Hugging Face ``XCLIPModel`` in eager mode with sdpa attention, at ``dtype``."""
    model = hf.to(dtype)

    def call() -> torch.Tensor:
        with torch.inference_mode():
            return model(input_ids=text, pixel_values=video).logits_per_video

    return Engine("hf", call=call, version=transformers.__version__,
                  settings=dict(attention=model.config._attn_implementation, mode="eager, torch.inference_mode"))


def _measure(args: argparse.Namespace, command: str, engines: dict[str, Engine], threads: int) -> int:
    """Parity, interleaved rounds, the table and the record."""
    env = environment()
    flags = cpu_bf16_flags()
    print(f"{args.variant} {args.frames}f, batch {args.batch}, {args.labels} label(s), {args.dtype}, "
          f"{env['device']} (native bf16: {', '.join(flags) or 'no'}), {threads} threads, torch {env['torch']}, "
          f"THP_MEM_ALLOC_ENABLE={env['THP_MEM_ALLOC_ENABLE']}")

    reference = _logits(engines["ours"].call())
    diffs: dict[str, float] = {}
    for name, engine in list(engines.items()):
        if not engine.runs:
            continue
        try:
            diffs[name] = (_logits(engine.call()) - reference).abs().max().item()
        except Exception as exc:  # noqa: BLE001 - a peer that cannot run is a row, not a crash
            engines[name] = Engine(name, status=f"failed: {_first_line(exc)}", version=engine.version)

    running = {name: engine.call for name, engine in engines.items() if engine.runs}
    timings = interleaved(running, args.rounds,
                          progress=lambda r: print(f"\r  round {r}/{args.rounds}", end="", file=sys.stderr))
    print(file=sys.stderr)

    rows: dict[str, dict[str, object]] = {}
    print(f"{'engine':<12} {'clips/s':>8} {'[p20, p80]':>17} {'ours/engine':>11} {'max|Δ logits|':>13}  settings")
    for name, engine in engines.items():
        row: dict[str, object] = dict(status=engine.status, version=engine.version, settings=engine.settings)
        if name in running:
            seconds = timings.seconds[name]
            clips = [args.batch / s for s in seconds]
            row.update(clips_per_s=round(args.batch / statistics.median(seconds), 3),
                       clips_per_s_p20=round(_percentile(clips, 0.2), 3),
                       clips_per_s_p80=round(_percentile(clips, 0.8), 3),
                       seconds=[round(s, 5) for s in seconds],
                       ours_over_engine=round(timings.speedup("ours", name), 3),
                       max_abs_logit_diff=diffs[name])
            print(f"{name:<12} {row['clips_per_s']:8.3f} [{row['clips_per_s_p20']:7.3f}, {row['clips_per_s_p80']:7.3f}] "
                  f"{row['ours_over_engine']:10.3f}x {diffs[name]:13.2e}  {_describe(engine.settings)}")
        else:
            print(f"{name:<12} {engine.status}")
        rows[name] = row
    failed = [name for name, row in rows.items() if str(row["status"]).startswith("failed")]

    if args.json:
        record = dict(env, command=command, variant=args.variant, frames=args.frames, batch=args.batch,
                      labels=args.labels, dtype=args.dtype, rounds=args.rounds, cpu_bf16_flags=flags,
                      native_bf16=bool(flags), versions=versions(), engines=rows,
                      ratio="ours_over_engine: median over rounds of engine time / our time (> 1: ours faster)")
        write_json(args.json, record)
    return 1 if failed else 0


def _describe(settings: dict[str, object]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items())


if __name__ == "__main__":
    raise SystemExit(main())
