"""The device check: CUDA parity tests and GPU benchmarks in phases that each fit one command on
a GPU machine with room to rerun, and a rehearsal of the same control flow on the CPU.

    device_check.py quick OUT      # GPU: build for sm_90a, parity fp32/fp16/bf16 forward and
                                   #      backward (triton, cuda, sdpa), the kernel benchmark
    device_check.py full OUT       # GPU: torch.compile/Inductor and the patched Hugging Face
                                   #      model on triton/cuda, vs_hf, benchmarks.run --preset gpu
    device_check.py rehearse OUT   # CPU: every step of both, with CPU stand-ins (make test runs it)
    device_check.py report OUT     # the numbers measured into OUT as Markdown for BENCHMARKS.md

``scripts/device_check.sh`` is the entry point (it picks the interpreter: ``PYTHON``, default
``python3``); its header says how to run it on the device machine. Every step is a subprocess
with its own timeout, run in its own process group so that a timeout also ends what it started
(pytest-xdist workers, Inductor's compile workers). A failed or timed-out step is recorded and
the next step still runs. ``OUT/summary.json`` (``{"phase", "ok", "failed", "steps": [{"name",
"status", "seconds", ...}]}``) and ``OUT/summary.txt`` are rewritten after every step, so they
exist even if the command itself is cut off; ``OUT/check.log`` holds every step's output. Exit
status: 0 when every step passed, 1 when any failed, 2 for a usage error.

``DEVICE_CHECK_FAIL_STEP=<step>`` replaces that step's command by one that fails, to check that
the failure is recorded, the other steps still run and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parent.parent
FAIL_STEP_VARIABLE = "DEVICE_CHECK_FAIL_STEP"
# One device command may run 600 s. The per-step budgets of a GPU phase sum to at most
# PHASE_BUDGET_S; a step's timeout is its budget plus what the steps before it left unused
# (step_timeout), and no step runs past DEADLINE_S after the start, so the summary is always
# written inside the command's limit, even when every step runs to its timeout.
COMMAND_LIMIT_S = 600
PHASE_BUDGET_S = 540
DEADLINE_S = 580
# A rehearsal's stand-ins take seconds; this only stops one that hangs.
REHEARSE_STEP_TIMEOUT_S = 150
# Where the wheels of .whl/ are installed on the GPU machine (it has no network; see
# `make device-wheels`); every later step has it on PYTHONPATH.
SITE = Path("/tmp/xclip-device-site")
# The extension built by the build step and the record of what it was built from: both go to
# OUT, so a later `full` on a fresh machine can carry them instead of compiling again.
BUILD_STAMP = ROOT / "build" / "device-check-ext.json"
GPU_ARCHS = "90a"  # H100/H200 only: one architecture for nvcc instead of the default "80;90a"
MAX_OUT_FILE_BYTES = 16 * 2**20  # the device tool brings back files up to 16 MiB
LOG_TAIL_LINES = 40


@dataclasses.dataclass(frozen=True)
class Context:
    """What the step commands depend on: the phase, the output folder and the interpreter."""

    phase: str
    out: Path
    python: str
    jobs: int  # parallel jobs on this machine (nvcc, pytest-xdist workers)
    xdist: bool  # pytest-xdist importable
    pytest_timeout: bool  # pytest-timeout importable

    @property
    def rehearse(self) -> bool:
        return self.phase == "rehearse"


class Command(NamedTuple):
    argv: list[str]
    env: dict[str, str] = {}


@dataclasses.dataclass(frozen=True)
class Step:
    """One step: a name, what it checks, its timeout on the GPU and how to build its command."""

    name: str
    about: str
    timeout_s: int
    command: Callable[[Context], Command]
    outputs: tuple[str, ...] = ()  # files it writes into OUT: removed before it runs, never stale


# ---- The steps ------------------------------------------------------------------------------


def _this_script(ctx: Context, *args: str) -> list[str]:
    return [ctx.python, str(Path(__file__).resolve()), *args]


# The rehearsal's benchmarks run their own main() at a tiny size: an X-CLIP variant of
# 32-pixel frames and two layers per tower, 128 wide (about the tests' tiny config), and a
# benchmarks.run preset of that variant alone, both registered only in the rehearsal's process.
TINY_VARIANT = "xclip-tiny"
TINY_PRESET = "tiny"
TINY_SIZES = dict(image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
                  text_width=64, text_layers=2, text_heads=1)


def _tiny(ctx: Context, module: str, *args: str) -> list[str]:
    return _this_script(ctx, "tiny", module, *args)


def run_tiny(module: str, args: list[str]) -> int:
    """``module``'s main(args) with the tiny variant (and, for benchmarks.run, the tiny preset) added."""
    import torch

    import xclip

    xclip.VARIANTS[TINY_VARIANT] = xclip.XCLIPConfig(**TINY_SIZES)
    if module == "benchmarks.run":
        from benchmarks import run

        run.PRESETS[TINY_PRESET] = run.Preset(variants=(TINY_VARIANT,), baseline_patch=TINY_SIZES["patch_size"],
                                              swin=None, frames=(2,), batch=1, dtype=torch.float32, rounds=1,
                                              include_baselines=False)
    return importlib.import_module(module).main(args)


def _wheels(ctx: Context) -> Command:
    wheels = sorted(glob.glob(str(ROOT / ".whl" / "*.whl")))
    if not wheels:
        return Command([ctx.python, "-c", "print('no wheels in .whl/: nothing to install')"])
    if ctx.rehearse:
        # The wheels are for the GPU image's Python (make device-wheels), not this one: only
        # check that each is a readable wheel.
        code = ("import sys, zipfile\n"
                "for path in sys.argv[1:]:\n"
                "    names = zipfile.ZipFile(path).namelist()\n"
                "    assert any(n.endswith('.dist-info/METADATA') for n in names), f'{path}: no METADATA'\n"
                "    print('would install', path)\n")
        return Command([ctx.python, "-c", code, *wheels])
    return Command([ctx.python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--no-cache-dir", "--upgrade", "--target", str(SITE), *wheels])


def _environment(ctx: Context) -> Command:
    return Command(_this_script(ctx, "probe", str(ctx.out), *(["--cpu"] if ctx.rehearse else [])))


def _build(ctx: Context) -> Command:
    env = {"XCLIP_CUDA_ARCHS": GPU_ARCHS, "MAX_JOBS": str(ctx.jobs)}
    # The .so and its stamp come back from quick only: full's own outputs fill the 8 files the
    # device tool returns.
    flags = (["--cpu"] if ctx.rehearse else []) + ([] if ctx.phase == "full" else ["--copy-extension"])
    return Command(_this_script(ctx, "build", str(ctx.out), *flags), env)


def pytest_command(ctx: Context, targets: list[str], junit: str, per_test_s: int) -> Command:
    """pytest on ``targets`` writing ``OUT/junit``. On the GPU, Triton's and Inductor's cold
    compiles spread over pytest-xdist workers, and every test runs under pytest-timeout's limit."""
    argv = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={ctx.out / junit}", *targets]
    env = {}
    if not ctx.rehearse:
        if ctx.xdist:
            argv += ["-n", str(max(1, min(8, ctx.jobs)))]
            # Each worker compiles in its own process: a pool of compile processes per worker
            # (Inductor's default, one per core) would start 8 x 16 Python processes.
            env["TORCHINDUCTOR_COMPILE_THREADS"] = "1"
        if ctx.pytest_timeout:
            # A kernel that hangs blocks in C, where the default SIGALRM never lands: the
            # thread method ends the worker, and pytest-xdist starts another for the next tests.
            argv += [f"--timeout={per_test_s}", f"--timeout-method={'thread' if ctx.xdist else 'signal'}"]
    return Command(argv, env)


TRITON_CUDA_TESTS = "tests/xclip_kernels/backends/test_triton_cuda.py"
# Two cold Inductor compiles of a whole model: the full phase runs them with the other compiles.
WHOLE_MODEL_COMPILE_TEST = f"{TRITON_CUDA_TESTS}::test_model_compiles_fullgraph"


def _parity(ctx: Context) -> Command:
    if ctx.rehearse:
        # The CPU parity backends (sdpa, cpp) forward and backward at one small odd shape.
        targets = ["tests/xclip_kernels/test_frame_attention.py", "-k", "F3-N17-H12-D64-fp32"]
    else:
        targets = [TRITON_CUDA_TESTS, f"--deselect={WHOLE_MODEL_COMPILE_TEST}",
                   "tests/xclip/test_checkpoint.py::test_map_location_cuda"]
    return pytest_command(ctx, targets, "parity.xml", per_test_s=90)


def _kernels(ctx: Context) -> Command:
    args = ("--json", str(ctx.out / "kernels.json"))
    if ctx.rehearse:
        return Command(_tiny(ctx, "benchmarks.kernels", *args, "--device", "cpu", "--variants", TINY_VARIANT,
                             "--batch", "1", "--frames", "2", "--rounds", "1", "--dtype", "float32"))
    return Command([ctx.python, "-m", "benchmarks.kernels", *args, "--device", "cuda", "--variants", "xclip-b16",
                    "--batch", "32", "--dtype", "bfloat16"])


def _compile_hf(ctx: Context) -> Command:
    if ctx.rehearse:
        # Inductor on the CPU compiles C++ (minutes on two cores): the patched Hugging Face
        # model's parity on a CPU backend stands in.
        targets = ["tests/xclip_kernels/integrations/test_hf.py", "-k",
                   "test_patched_logits_and_grads_match_hf and cpu-sdpa"]
    else:
        targets = ["-m", "cuda", "tests/xclip/test_compile.py", "tests/xclip_kernels/integrations/test_hf.py",
                   WHOLE_MODEL_COMPILE_TEST]
    return pytest_command(ctx, targets, "compile_hf.xml", per_test_s=100)


def _vs_hf(ctx: Context) -> Command:
    args = ("--json", str(ctx.out / "vs_hf.json"))
    if ctx.rehearse:
        return Command(_tiny(ctx, "benchmarks.vs_hf", *args, "--device", "cpu", "--dtype", "float32", "--variant",
                             TINY_VARIANT, "--frames", "2", "--batch", "1", "--labels", "2", "--rounds", "1"))
    return Command([ctx.python, "-m", "benchmarks.vs_hf", *args, "--device", "cuda", "--dtype", "bfloat16",
                    "--variant", "xclip-b16", "--batch", "32", "--rounds", "10", "--compile"])


def _run_gpu(ctx: Context) -> Command:
    args = ("--json", str(ctx.out / "run_gpu.json"), "--plot", str(ctx.out / "run_gpu.png"))
    if ctx.rehearse:
        return Command(_tiny(ctx, "benchmarks.run", *args, "--preset", TINY_PRESET, "--device", "cpu"))
    # 8 frames: every end-to-end goal of issue 3 is stated there; the sweep over frames would
    # not fit beside the other steps.
    return Command([ctx.python, "-m", "benchmarks.run", *args, "--preset", "gpu", "--device", "cuda", "--frames", "8",
                    "--rounds", "5"])


def _report(ctx: Context) -> Command:
    return Command(_this_script(ctx, "report", str(ctx.out)))


STEPS = {step.name: step for step in (
    Step("wheels", "install the wheels of .whl/ (make device-wheels)", 15, _wheels),
    Step("environment", "the packages, the GPU and the versions", 25, _environment, ("environment.json",)),
    Step("build", f"the extension for sm_{GPU_ARCHS} (not recompiled when built from these sources); the backends",
         180, _build),
    Step("parity", "fp32/fp16/bf16 forward and backward of triton, cuda, sdpa against the reference", 210, _parity,
         ("parity.xml",)),
    Step("kernels", "benchmarks.kernels at X-CLIP-B/16, 8 frames, batch 32, bf16", 100, _kernels, ("kernels.json",)),
    Step("compile_hf", "torch.compile (dynamic batch) and the patched Hugging Face model, triton and cuda", 110,
         _compile_hf, ("compile_hf.xml",)),
    Step("vs_hf", "end to end against Hugging Face XCLIPModel, B/16, batch 32, bf16, compiled", 110, _vs_hf,
         ("vs_hf.json",)),
    Step("run_gpu", "benchmarks.run --preset gpu: B/16 and L/14 against the baselines, 8 frames", 90, _run_gpu,
         ("run_gpu.json", "run_gpu.png")),
    Step("report", "the measured numbers as Markdown for BENCHMARKS.md", 10, _report),
)}
PHASES = {
    "quick": ("wheels", "environment", "build", "parity", "kernels", "report"),
    "full": ("wheels", "environment", "build", "compile_hf", "vs_hf", "run_gpu", "report"),
}
# Every step of quick, then the rest of full, with CPU stand-ins; the report last.
PHASES["rehearse"] = tuple(dict.fromkeys(n for n in PHASES["quick"] + PHASES["full"] if n != "report")) + ("report",)


# ---- Running the steps ----------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    name: str
    status: str = "not run"  # passed, failed, timeout, skipped, not run
    seconds: float = 0.0
    timeout_s: float = 0.0
    exit_code: int | None = None
    command: str = ""
    note: str = ""
    tail: list[str] = dataclasses.field(default_factory=list)


def _stop_group(process: subprocess.Popen) -> None:
    """End the step's whole process group: SIGTERM, 5 s to exit, then SIGKILL for whatever is
    left (pytest-xdist workers, compile workers), so nothing holds the GPU in the next step."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            break
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass


def run_command(command: Command, timeout_s: float, log, env: dict[str, str]) -> tuple[str, int | None, list[str]]:
    """Run ``command`` from the repository root, its output to ``log`` and stdout.

    Returns the status ("passed", "failed" or "timeout"), the exit code (None after a timeout)
    and the last lines of its output.
    """
    tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    try:
        process = subprocess.Popen(command.argv, cwd=ROOT, env={**env, **command.env}, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    except OSError as exc:
        line = f"device_check: could not start {command.argv[0]}: {exc}\n"
        log.write(line)
        sys.stdout.write(line)
        return "failed", None, [line.rstrip("\n")]

    def copy_output() -> None:
        for raw in iter(process.stdout.readline, b""):
            line = raw.decode("utf-8", "replace")
            log.write(line)
            log.flush()
            sys.stdout.write(line)
            sys.stdout.flush()
            tail.append(line.rstrip("\n").rsplit("\r", 1)[-1])

    reader = threading.Thread(target=copy_output, daemon=True)
    reader.start()
    try:
        code = process.wait(timeout_s)
        status = "passed" if code == 0 else "failed"
        try:  # what the step started and left running
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    except subprocess.TimeoutExpired:
        _stop_group(process)
        code, status = None, "timeout"
    # A process that left the group could hold the pipe open: do not wait on it for ever.
    reader.join(10)
    return status, code, list(tail)


def shown_command(command: Command, ctx: Context) -> str:
    """The command as someone would type it in the repository root: ``python`` for the
    interpreter, ``$OUT`` for the output folder, paths relative to the root."""
    words = []
    for i, arg in enumerate(command.argv):
        if i == 0 and arg == ctx.python:
            arg = "python"
        arg = arg.replace(str(ctx.out), "$OUT").replace(str(ROOT) + os.sep, "")
        words.append(arg if arg.startswith("$OUT") or "=$OUT" in arg else shlex.quote(arg))
    return " ".join([*(f"{k}={v}" for k, v in command.env.items()), *words])


def _junit_counts(path: Path) -> dict[str, int]:
    """tests, passed, failures, errors and skipped of a pytest JUnit XML file; {} if unreadable."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts


def _junit_note(counts: dict[str, int]) -> str:
    return (f"{counts['tests']} tests: {counts['passed']} passed, {counts['failures']} failed, "
            f"{counts['errors']} errors, {counts['skipped']} skipped")


def _write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def write_summary(ctx: Context, results: list[Result], started: float, environment: dict, forced: str | None) -> None:
    """OUT/summary.json and OUT/summary.txt, from the results so far."""
    failed = [r.name for r in results if r.status not in ("passed", "not run")]
    done = all(r.status != "not run" for r in results)
    summary = {
        "phase": ctx.phase,
        "ok": done and not failed,
        "complete": done,
        "failed": failed,
        "seconds": round(time.monotonic() - started, 3),
        "forced_failure": forced,
        "environment": environment,
        "steps": [{key: value for key, value in dataclasses.asdict(r).items() if key != "tail"} for r in results],
    }
    _write_atomically(ctx.out / "summary.json", json.dumps(summary, indent=1) + "\n")
    report_text = ""
    if any(r.name == "report" and r.status == "passed" for r in results):
        try:
            report_text = report(ctx.out)
        except Exception as exc:  # noqa: BLE001 - a malformed record must not cost the summary
            report_text = f"report: {type(exc).__name__}: {exc}"
    _write_atomically(ctx.out / "summary.txt", summary_text(summary, results, report_text))


def summary_text(summary: dict, results: list[Result], report_text: str) -> str:
    """The step table, the last lines of every step that did not pass, and the report."""
    state = "passed" if summary["ok"] else (
        f"{len(summary['failed'])} step(s) did not pass: {', '.join(summary['failed'])}" if summary["failed"]
        else "incomplete")
    lines = [f"device_check {summary['phase']}: {state} ({summary['seconds']:.0f} s)"]
    if summary["environment"].get("line"):
        lines.append(summary["environment"]["line"])
    lines += ["", f"{'step':<12} {'status':<8} {'seconds':>8} {'timeout':>8}  note"]
    for r in results:
        lines.append(f"{r.name:<12} {r.status:<8} {r.seconds:>8.1f} {r.timeout_s:>8.0f}  {r.note}")
    for r in results:
        if r.status not in ("passed", "not run") and r.tail:
            lines += ["", f"--- {r.name}: {r.status}; {r.command}", *r.tail]
    if report_text:
        lines += ["", report_text]
    return "\n".join(lines) + "\n"


def step_timeout(budgets: list[float], index: int, elapsed: float) -> float:
    """The timeout of step ``index`` of a GPU phase whose steps have ``budgets``, ``elapsed``
    seconds after the phase began: its own budget plus what the steps before it left unused
    (a build that finds the extension already built gives its time to a slow compile after
    it), at most twice its budget (a hung step must not eat the session's few minutes), while
    every later step keeps its whole budget; never past DEADLINE_S."""
    allotted_until_now = sum(budgets[: index + 1])
    return min(allotted_until_now - elapsed, 2 * budgets[index], DEADLINE_S - elapsed)


def forced_step(phase: str) -> str | None:
    """The step named by DEVICE_CHECK_FAIL_STEP, or None; a name that is no step of the phase
    is a ValueError naming the steps (a typo must not pass silently)."""
    name = os.environ.get(FAIL_STEP_VARIABLE, "").strip()
    if not name:
        return None
    if name not in PHASES[phase]:
        raise ValueError(f"{FAIL_STEP_VARIABLE}: expected one of the steps of {phase} ({', '.join(PHASES[phase])}), "
                         f"got {name!r}")
    return name


def run_phase(phase: str, out: Path) -> int:
    """Run the steps of ``phase`` (quick, full or rehearse), writing into ``out``; 0 when all passed."""
    forced = forced_step(phase)
    out.mkdir(parents=True, exist_ok=True)
    ctx = Context(phase=phase, out=out.resolve(), python=sys.executable, jobs=os.cpu_count() or 1,
                  xdist=importlib.util.find_spec("xdist") is not None,
                  pytest_timeout=importlib.util.find_spec("pytest_timeout") is not None)
    paths = [str(ROOT)] + ([] if ctx.rehearse else [str(SITE)]) + [p for p in [os.environ.get("PYTHONPATH")] if p]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONUNBUFFERED": "1"}
    env.pop(FAIL_STEP_VARIABLE, None)
    if ctx.rehearse:
        # Every step is a new process, and each would time CPU GEMMs to pick a provider for
        # CPU inference (xclip_kernels.gemm), which the GPU steps stand for do not use.
        env["XCLIP_KERNELS_GEMM"] = "matmul"
    started = time.monotonic()
    results = [Result(name) for name in PHASES[phase]]
    environment: dict = {}
    write_summary(ctx, results, started, environment, forced)
    with open(ctx.out / "check.log", "a", encoding="utf-8") as log:
        log.write(f"device_check {phase}, {time.strftime('%Y-%m-%d %H:%M:%S')}, {sys.executable}\n")
        for result in results:
            step = STEPS[result.name]
            command = step.command(ctx)
            if result.name == forced:
                command = Command([ctx.python, "-c", f"import sys; sys.exit('device_check: step {result.name} fails on "
                                   f"purpose ({FAIL_STEP_VARIABLE}={result.name})')"])
                result.note = f"forced to fail by {FAIL_STEP_VARIABLE}"
            result.command = shown_command(command, ctx)
            for name in step.outputs:
                (ctx.out / name).unlink(missing_ok=True)
            if ctx.rehearse:
                result.timeout_s = REHEARSE_STEP_TIMEOUT_S
            else:
                budgets = [STEPS[r.name].timeout_s for r in results]
                result.timeout_s = round(step_timeout(budgets, results.index(result), time.monotonic() - started), 1)
            if result.timeout_s < 1:
                result.status, result.note = "skipped", f"no time left before the {DEADLINE_S} s deadline"
                write_summary(ctx, results, started, environment, forced)
                continue
            header = f"\n== {result.name}: {step.about} (timeout {result.timeout_s:.0f} s)\n$ {result.command}\n"
            log.write(header)
            log.flush()
            print(header, end="", flush=True)
            t0 = time.monotonic()
            result.status, result.exit_code, result.tail = run_command(command, result.timeout_s, log, env)
            result.seconds = round(time.monotonic() - t0, 3)  # ms: a quick step must not read 0
            if result.status == "timeout":
                result.note = (result.note + "; " if result.note else "") + f"stopped after {result.timeout_s:.0f} s"
            junit = next((name for name in step.outputs if name.endswith(".xml")), None)
            if junit and result.name != forced:
                counts = _junit_counts(ctx.out / junit)
                if counts:
                    result.note = "; ".join(n for n in (result.note, _junit_note(counts)) if n)
                if result.status == "passed" and (not counts or counts["passed"] == 0):
                    # Every test skipped (no CUDA, a backend missing) is no check at all.
                    result.status = "failed"
                    result.note = "; ".join(n for n in (result.note, "no test passed") if n)
            if result.name == "environment":
                environment = _take_environment(ctx.out)
            line = f"== {result.name}: {result.status} in {result.seconds:.1f} s\n"
            log.write(line)
            print(line, end="", flush=True)
            write_summary(ctx, results, started, environment, forced)
    failed = [r.name for r in results if r.status != "passed"]
    print(f"\ndevice_check {phase}: {'all steps passed' if not failed else 'did not pass: ' + ', '.join(failed)} "
          f"in {time.monotonic() - started:.0f} s; summary in {ctx.out / 'summary.txt'}", flush=True)
    return 1 if failed else 0


def _take_environment(out: Path) -> dict:
    """The probe's OUT/environment.json, removed once read: it goes into summary.json, and the
    device tool brings back at most 8 files."""
    path = out / "environment.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    path.unlink()
    return data


# ---- The environment probe ------------------------------------------------------------------

REQUIRED = ("torch", "triton", "safetensors", "instant_clip_tokenizer", "transformers", "pytest")
# What the GPU phases use from the GPU image (per-test timeouts, compiles spread over workers).
REQUIRED_ON_GPU = ("xdist", "pytest_timeout")


def probe(out: Path, cpu: bool) -> int:
    """Check the packages (and, unless ``cpu``, the CUDA device); write OUT/environment.json."""
    missing = [m for m in REQUIRED + (() if cpu else REQUIRED_ON_GPU) if importlib.util.find_spec(m) is None]
    if missing:
        print(f"device_check: missing Python packages: {', '.join(missing)} "
              "(carry them as wheels: make device-wheels here, carry .whl)", file=sys.stderr)
        return 1
    import torch
    import triton

    info: dict[str, object] = {
        "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
        "python": sys.version.split()[0], "transformers": importlib.metadata.version("transformers"),
        "date": time.strftime("%Y-%m-%d"),
    }
    if cpu:
        info["device"] = "cpu (rehearsal)"  # its stand-ins run on the CPU, GPU or not
    elif not torch.cuda.is_available():
        print(f"device_check: torch {torch.__version__} sees no CUDA device", file=sys.stderr)
        return 1
    else:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, capability=f"{props.major}.{props.minor}", sms=props.multi_processor_count,
                    memory_gib=round(props.total_memory / 2**30, 1))
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
        info["nvcc"] = version[-1] if version else "?"
    info["line"] = (f"device: {info['device']}  torch {info['torch']}  triton {info['triton']}  CUDA {info['cuda']}  "
                    f"python {info['python']}  transformers {info['transformers']}")
    print(info["line"])
    (out / "environment.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    return 0


# ---- The build ------------------------------------------------------------------------------


def _extension_path() -> Path:
    return ROOT / "xclip_kernels" / ("_C" + sysconfig.get_config_var("EXT_SUFFIX"))


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_fingerprint() -> dict[str, str]:
    """What the extension depends on: every file under csrc/, setup.py, torch, Python and the
    architectures. Content hashes, not times: the device tool's copy of the tree is new each call."""
    digest = hashlib.sha256()
    for path in sorted(p for p in (ROOT / "csrc").rglob("*") if p.is_file()) + [ROOT / "setup.py"]:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return {"sources_sha256": digest.hexdigest(), "torch": importlib.metadata.version("torch"),
            "python": sys.version.split()[0], "archs": os.environ.get("XCLIP_CUDA_ARCHS", "")}


def build(out: Path, cpu: bool, copy_extension: bool = True) -> int:
    """Build the extension in place unless BUILD_STAMP says this .so was built from these
    sources; then require the backends that stand for it (cuda and triton on the GPU, cpp on
    the CPU) and, with ``copy_extension``, copy the .so and its stamp to ``out``."""
    so, wanted = _extension_path(), build_fingerprint()
    try:
        stamp = json.loads(BUILD_STAMP.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = {}
    current = so.is_file() and stamp.get("so_sha256") == _sha256(so) and \
        all(stamp.get(key) == value for key, value in wanted.items())
    if current:
        print(f"{_shown(so)} was built from these sources ({_shown(BUILD_STAMP)}): not compiling")
    else:
        print(f"building {_shown(so)} (XCLIP_CUDA_ARCHS={wanted['archs'] or 'default'})", flush=True)
        code = subprocess.run([sys.executable, "setup.py", "--quiet", "build_ext", "--inplace"], cwd=ROOT).returncode
        if code != 0:
            print("device_check: building the extension failed", file=sys.stderr)
            return 1
        BUILD_STAMP.parent.mkdir(parents=True, exist_ok=True)
        BUILD_STAMP.write_text(json.dumps({**wanted, "so_sha256": _sha256(so)}, indent=1) + "\n", encoding="utf-8")
    problems = _backend_problems(cpu)  # prints the backend table first
    if problems:
        for problem in problems:
            print(f"device_check: {problem}", file=sys.stderr)
        return 1
    for path in (so, BUILD_STAMP) if copy_extension else ():
        if path.stat().st_size <= MAX_OUT_FILE_BYTES:
            shutil.copy2(path, out / path.name)
        else:
            print(f"{path.name} is over {MAX_OUT_FILE_BYTES >> 20} MiB: not copied to {out}")
    return 0


def _backend_problems(cpu: bool) -> list[str]:
    """Why the backends this machine is checked on cannot run: a parity test of one of them
    would skip, and a skip must not pass for a check."""
    import torch

    from xclip_kernels.__main__ import main as print_backends
    from xclip_kernels.registry import OpInputs, get_backend

    print_backends()
    wanted = ("cpp",) if cpu else ("triton", "cuda")
    device, dtype = ("cpu", torch.float32) if cpu else ("cuda", torch.bfloat16)
    problems = []
    for name in wanted:
        reasons = get_backend(name).not_supported_reasons(OpInputs("frame_attention", device, dtype, 64, True))
        if reasons:
            problems.append(f"backend {name} cannot run on {device}: {'; '.join(reasons)}")
    return problems


# ---- The report -----------------------------------------------------------------------------


def _load(path: Path) -> object | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def report(out: Path) -> str:
    """The measurements in ``out`` (kernels.json, vs_hf.json, run_gpu.json) as Markdown, each
    table under the command that produced it, the device and the versions."""
    summary = _load(out / "summary.json") or {}
    commands = {s["name"]: s.get("command", "") for s in summary.get("steps", [])}
    env = summary.get("environment", {})
    where = env.get("line", "device: unknown")
    sections = []
    kernels = _load(out / "kernels.json")
    if kernels:
        first = kernels[0]
        rows = [f"| {r['op']} | {r['mode']} | {r['variant']} | {r['backend']} | {r['ms']:.3f} "
                f"({r['ms_p20']:.3f}–{r['ms_p80']:.3f}) | "
                + (f"{r['tflops']:.1f} | {r['gbps']:.0f} |" if "tflops" in r else "– | – |") for r in kernels]
        ratios = []
        for op in dict.fromkeys(r["op"] for r in kernels):
            for mode in ("forward", "forward+backward"):
                by = {r["backend"]: r["ms"] for r in kernels if r["op"] == op and r["mode"] == mode}
                peers = ("sdpa", "reference") if op == "message_attention" else ("sdpa",)
                for fused in ("triton", "cuda", "cpp"):
                    found = [f"{by[p] / by[fused]:.2f}× {p}" for p in peers if fused in by and p in by]
                    if found:
                        ratios.append(f"- {op} {mode}: {fused} is {', '.join(found)}")
        sections.append("\n".join([
            f"`{commands.get('kernels', 'python -m benchmarks.kernels')}` ({first['dtype']}, batch {first['batch']}, "
            f"{first['frames']} frames; {where}; {first.get('date', '')}): median ms (20th–80th percentile)",
            "", "| op | mode | variant | backend | ms | TFLOP/s | GB/s |", "|---|---|---|---|---|---|---|", *rows,
            "", *ratios]))
    vs_hf = _load(out / "vs_hf.json")
    if vs_hf:
        rows = [f"| {name} | {vs_hf[key]['clips_per_s']:.1f} | {vs_hf[key]['limit_fraction']:.2f} |"
                for name, key in (("ours", "ours"), ("Hugging Face", "hf"))]
        sections.append("\n".join([
            f"`{commands.get('vs_hf', 'python -m benchmarks.vs_hf')}` ({vs_hf['variant']} {vs_hf['frames']}f, batch "
            f"{vs_hf['batch']}, {vs_hf['dtype']}, compile={vs_hf['compile']}, backend {vs_hf['backend']}; {where}; "
            f"{vs_hf.get('date', '')})", "", "| model | clips/s | of the GEMM limit |", "|---|---|---|", *rows, "",
            f"ours / Hugging Face {vs_hf['speedup']:.2f}× (median of paired rounds); GEMM limit "
            f"{vs_hf['limit_gflops'] / 1e3:.1f} TFLOP/s; max |logits difference| {vs_hf['max_abs_logit_diff']:.2e}"]))
    run = _load(out / "run_gpu.json")
    if run:
        rows = [f"| {r['model']} | {r['attention']} | {r['backend']} | {r['frames']} | {r['gmacs']:.1f} | "
                f"{r['clips_per_s']:.1f} | " + ("–" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}")
                + " | " + ("–" if r.get("matmul_fraction") is None else f"{r['matmul_fraction']:.2f}") + " |"
                for r in run]
        sections.append("\n".join([
            f"`{commands.get('run_gpu', 'python -m benchmarks.run')}` ({run[0]['dtype']}, batch {run[0]['batch']}, "
            f"{run[0]['mode']}; {where}; {run[0].get('date', '')})", "",
            "| model | attention | backend | frames | GMACs | clips/s | peak MB | of matmul |",
            "|---|---|---|---|---|---|---|---|", *rows]))
    if not sections:
        return f"no measurements in {out} (kernels.json, vs_hf.json, run_gpu.json)"
    return "\n\n".join(sections)


# ---- Command line ---------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["tiny"]:  # the rehearsal's benchmark runs: the rest is the module's own arguments
        if len(argv) < 2:
            print("device_check: tiny: expected a module name, then its arguments", file=sys.stderr)
            return 2
        return run_tiny(argv[1], argv[2:])
    parser.add_argument("what", choices=[*PHASES, "report", "probe", "build"],
                        help="a phase, report (Markdown of OUT's measurements), or one of the steps' helpers")
    parser.add_argument("out", nargs="?", help="output folder (default: $OUT)")
    parser.add_argument("--cpu", action="store_true", help="probe, build: the rehearsal's CPU variant")
    parser.add_argument("--copy-extension", action="store_true", help="build: copy the .so and its stamp to OUT")
    args = parser.parse_args(argv)
    out_arg = args.out or os.environ.get("OUT")
    if not out_arg:
        parser.error("give the output folder as the second argument or in $OUT")
    out = Path(out_arg)
    if args.what in PHASES:
        try:
            return run_phase(args.what, out)
        except ValueError as exc:
            print(f"device_check: {exc}", file=sys.stderr)
            return 2
    if args.what == "report":
        print(report(out))
        return 0
    out.mkdir(parents=True, exist_ok=True)
    return probe(out, args.cpu) if args.what == "probe" else build(out, args.cpu, args.copy_extension)


if __name__ == "__main__":
    raise SystemExit(main())
