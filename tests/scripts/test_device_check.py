"""scripts/device_check.sh: the device check's control flow, rehearsed on the CPU.

``rehearse`` runs every step of the GPU phases ``quick`` and ``full`` with CPU stand-ins (CPU
backends, a tiny X-CLIP); ``DEVICE_CHECK_FAIL_STEP`` makes one step fail on purpose. The GPU
phases' commands and time budget are checked without running them.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Iterator

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "device_check.sh"


@pytest.fixture(scope="module")
def dc() -> Iterator[ModuleType]:
    """scripts/device_check.py as a module (scripts/ is no package)."""
    spec = importlib.util.spec_from_file_location("device_check", REPO_ROOT / "scripts" / "device_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _device_check(*args: str, fail_step: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("DEVICE_CHECK_FAIL_STEP", None)
    if fail_step is not None:
        env["DEVICE_CHECK_FAIL_STEP"] = fail_step
    # Generous: the rehearsal's own per-step timeouts stop a hung step long before this.
    return subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=900)


def _summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text(encoding="utf-8"))


def test_rehearse_runs_every_step_of_both_gpu_phases_and_passes(dc, tmp_path):
    out = tmp_path / "out"
    result = _device_check("rehearse", str(out))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = _summary(out)
    assert summary["phase"] == "rehearse" and summary["ok"] and summary["complete"] and summary["failed"] == []
    names = [s["name"] for s in summary["steps"]]
    assert names == list(dict.fromkeys(n for n in dc.PHASES["quick"] + dc.PHASES["full"] if n != "report")) + ["report"]
    for step in summary["steps"]:
        assert step["status"] == "passed" and step["exit_code"] == 0 and step["seconds"] > 0, step
    notes = {s["name"]: s["note"] for s in summary["steps"]}
    # The pytest steps ran tests, none skipped: a skipped parity test must not pass for a check.
    for name in ("parity", "compile_hf"):
        assert notes[name].endswith(", 0 failed, 0 errors, 0 skipped") and not notes[name].startswith("0 tests"), notes
    assert summary["environment"]["device"] == "cpu (rehearsal)"
    for name in ("kernels.json", "vs_hf.json", "run_gpu.json", "run_gpu.png", "parity.xml", "compile_hf.xml",
                 "check.log", "summary.txt", dc.BUILD_STAMP.name, dc._extension_path().name):
        assert (out / name).is_file(), name
    assert not (out / "environment.json").exists()  # folded into summary.json
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert text.startswith("device_check rehearse: passed")
    # The report: one Markdown table per benchmark, under the command that measured it.
    for header in ("| op | mode | variant | backend | ms | TFLOP/s | GB/s |", "| model | clips/s | of the GEMM limit |",
                   "| model | attention | backend | frames | GMACs | clips/s | peak MB | of matmul |"):
        assert header in text
    assert "benchmarks.kernels" in text and "benchmarks.vs_hf" in text and "benchmarks.run" in text
    kernels = json.loads((out / "kernels.json").read_text(encoding="utf-8"))
    assert {r["backend"] for r in kernels} >= {"sdpa", "reference"} and {r["op"] for r in kernels} == {
        "frame_attention", "message_attention"}


def test_a_step_forced_to_fail_is_recorded_and_the_others_still_run(tmp_path):
    out = tmp_path / "out"
    # compile_hf: a step in the middle, with steps after it (and the most expensive stand-in).
    result = _device_check("rehearse", str(out), fail_step="compile_hf")
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-2000:]
    summary = _summary(out)
    assert not summary["ok"] and summary["complete"] and summary["failed"] == ["compile_hf"]
    assert summary["forced_failure"] == "compile_hf"
    by_name = {s["name"]: s for s in summary["steps"]}
    assert by_name["compile_hf"]["status"] == "failed" and by_name["compile_hf"]["exit_code"] == 1
    assert "DEVICE_CHECK_FAIL_STEP" in by_name["compile_hf"]["note"]
    assert all(s["status"] == "passed" for name, s in by_name.items() if name != "compile_hf"), by_name
    text = (out / "summary.txt").read_text(encoding="utf-8")
    assert text.startswith("device_check rehearse: 1 step(s) did not pass: compile_hf")
    assert "fails on purpose" in text  # the failed step's last lines
    assert "device_check rehearse: did not pass: compile_hf" in result.stdout


def test_an_unknown_fail_step_is_a_usage_error_before_anything_runs(tmp_path):
    result = _device_check("quick", str(tmp_path / "out"), fail_step="parityy")
    assert result.returncode == 2
    assert "DEVICE_CHECK_FAIL_STEP: expected one of the steps of quick (wheels, environment, build, parity, " \
           "kernels, report), got 'parityy'" in result.stderr
    assert not (tmp_path / "out").exists()


def test_no_output_folder_is_a_usage_error(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    result = subprocess.run(["bash", str(SCRIPT), "quick"], env={**env, "PYTHON": sys.executable},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "output folder" in result.stderr


def test_each_gpu_phase_fits_one_device_command_with_room(dc):
    for phase in ("quick", "full"):
        total = sum(dc.STEPS[name].timeout_s for name in dc.PHASES[phase])
        assert total <= dc.PHASE_BUDGET_S < dc.DEADLINE_S < dc.COMMAND_LIMIT_S == 600, (phase, total)
        assert dc.PHASES[phase][-1] == "report"
        # What comes back from OUT: at most 8 files (the device tool's limit).
        files = {"summary.json", "summary.txt", "check.log"}
        files |= {name for step in dc.PHASES[phase] for name in dc.STEPS[step].outputs} - {"environment.json"}
        if "--copy-extension" in dc.STEPS["build"].command(_gpu_context(dc, Path("/out"), phase)).argv:
            files |= {"_C.so", "device-check-ext.json"}
        assert len(files) <= 8, (phase, sorted(files))


def _gpu_context(dc, tmp_path: Path, phase: str) -> object:
    return dc.Context(phase=phase, out=tmp_path, python="python3", jobs=16, xdist=True, pytest_timeout=True)


def test_gpu_commands_build_for_sm90a_and_spread_tests_over_workers(dc, tmp_path):
    ctx = _gpu_context(dc, tmp_path, "quick")
    build = dc.STEPS["build"].command(ctx)
    assert build.env["XCLIP_CUDA_ARCHS"] == "90a" and build.argv[0] == "python3" and "--cpu" not in build.argv
    # quick brings the built extension back (to carry into a later full); full has no room for it.
    assert "--copy-extension" in build.argv
    assert "--copy-extension" not in dc.STEPS["build"].command(_gpu_context(dc, tmp_path, "full")).argv
    parity = dc.STEPS["parity"].command(ctx).argv
    assert parity[:3] == ["python3", "-m", "pytest"]
    assert dc.TRITON_CUDA_TESTS in parity and f"--deselect={dc.WHOLE_MODEL_COMPILE_TEST}" in parity
    assert parity[parity.index("-n") + 1] == "8" and "--timeout=90" in parity and "--timeout-method=thread" in parity
    assert dc.STEPS["parity"].command(ctx).env["TORCHINDUCTOR_COMPILE_THREADS"] == "1"
    assert f"--junitxml={tmp_path / 'parity.xml'}" in parity
    compile_hf = dc.STEPS["compile_hf"].command(_gpu_context(dc, tmp_path, "full")).argv
    assert dc.WHOLE_MODEL_COMPILE_TEST in compile_hf and "tests/xclip/test_compile.py" in compile_hf
    kernels = dc.STEPS["kernels"].command(ctx)
    # As the report prints it above the table, for BENCHMARKS.md.
    assert dc.shown_command(kernels, ctx) == ("python -m benchmarks.kernels --json $OUT/kernels.json --device cuda "
                                              "--variants xclip-b16 --batch 32 --dtype bfloat16")
    vs_hf = " ".join(dc.STEPS["vs_hf"].command(ctx).argv)
    assert "--device cuda --dtype bfloat16 --variant xclip-b16 --batch 32" in vs_hf and "--compile" in vs_hf
    run = " ".join(dc.STEPS["run_gpu"].command(ctx).argv)
    assert "-m benchmarks.run" in run and "--preset gpu --device cuda" in run
    # Without the plugins (not in the dev venv) the flags are left out rather than breaking pytest.
    bare = dc.Context(phase="quick", out=tmp_path, python="python3", jobs=16, xdist=False, pytest_timeout=False)
    argv = dc.STEPS["parity"].command(bare).argv
    assert "-n" not in argv and not any(a.startswith("--timeout") for a in argv)


def test_a_step_that_times_out_is_stopped_with_the_processes_it_started(dc, tmp_path):
    child_pid = tmp_path / "child.pid"
    # The step starts a grandchild (as pytest-xdist does) and hangs; both must be ended.
    code = ("import subprocess, sys, time\n"
            "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
            f"open({str(child_pid)!r}, 'w').write(str(p.pid))\n"
            "print('started', flush=True)\n"
            "time.sleep(120)\n")
    with open(tmp_path / "log", "w", encoding="utf-8") as log:
        t0 = time.monotonic()
        status, code_, tail = dc.run_command(dc.Command([sys.executable, "-c", code]), 3, log, dict(os.environ))
        elapsed = time.monotonic() - t0
    assert (status, code_) == ("timeout", None) and "started" in tail
    assert elapsed < 30
    pid = int(child_pid.read_text())
    for _ in range(50):  # the killed grandchild is reaped by init; give it a moment
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the step's child process {pid} survived the timeout")


def test_a_step_gets_its_budget_plus_what_the_steps_before_it_left(dc, monkeypatch):
    budgets = [15, 25, 180, 110]
    assert dc.step_timeout(budgets, 0, 0) == 15
    assert dc.step_timeout(budgets, 3, 15 + 25 + 180) == 110  # every step used its whole budget
    assert dc.step_timeout(budgets, 3, 15 + 25 + 120) == 110 + 60  # the build took 120 s of its 180
    assert dc.step_timeout(budgets, 3, 3 + 8 + 5) == 2 * 110  # at most twice its own budget
    assert dc.step_timeout(budgets, 2, 15 + 25 + 20) == 160  # an earlier step overran by 20 s
    monkeypatch.setattr(dc, "DEADLINE_S", 100)
    assert dc.step_timeout(budgets, 3, 10) == 90


def test_steps_are_skipped_not_run_past_the_deadline(dc, tmp_path, monkeypatch):
    monkeypatch.setattr(dc, "DEADLINE_S", 0)
    monkeypatch.delenv("DEVICE_CHECK_FAIL_STEP", raising=False)
    (tmp_path / "vs_hf.json").write_text("{}")  # an earlier run's: must not be reported as this one's
    assert dc.run_phase("full", tmp_path) == 1
    assert not (tmp_path / "vs_hf.json").exists()
    summary = _summary(tmp_path)
    assert [s["status"] for s in summary["steps"]] == ["skipped"] * len(dc.PHASES["full"])
    assert not summary["ok"] and summary["failed"] == list(dc.PHASES["full"])
    assert "no time left" in summary["steps"][0]["note"]


def test_build_compiles_only_when_the_sources_changed(dc, tmp_path, monkeypatch):
    so = tmp_path / "xclip_kernels" / "_C.so"
    so.parent.mkdir()
    so.write_bytes(b"built")
    calls = []

    class Done:
        returncode = 0

    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "kernel.cu").write_text("// v1\n")
    (tmp_path / "setup.py").write_text("# setup\n")
    monkeypatch.setattr(dc, "ROOT", tmp_path)  # the sources the fingerprint reads
    monkeypatch.setattr(dc, "_extension_path", lambda: so)
    monkeypatch.setattr(dc, "BUILD_STAMP", tmp_path / "build" / "device-check-ext.json")
    monkeypatch.setattr(dc, "_backend_problems", lambda cpu: [])
    monkeypatch.setattr(dc.subprocess, "run", lambda argv, **kwargs: calls.append(argv) or Done())
    monkeypatch.setenv("XCLIP_CUDA_ARCHS", "90a")
    out = tmp_path / "out"
    out.mkdir()
    assert dc.build(out, cpu=False, copy_extension=False) == 0 and list(out.iterdir()) == []
    assert len(calls) == 1 and calls[0][1:] == ["setup.py", "--quiet", "build_ext", "--inplace"]
    assert dc.build(out, cpu=False) == 0 and len(calls) == 1  # same sources, same .so: not compiled again
    assert (out / "_C.so").read_bytes() == b"built" and (out / "device-check-ext.json").is_file()
    monkeypatch.setenv("XCLIP_CUDA_ARCHS", "80;90a")
    assert dc.build(out, cpu=False) == 0 and len(calls) == 2  # other architectures
    so.write_bytes(b"another")
    assert dc.build(out, cpu=False) == 0 and len(calls) == 3  # a .so the stamp does not describe
    assert dc.build(out, cpu=False) == 0 and len(calls) == 3
    (tmp_path / "csrc" / "kernel.cu").write_text("// v2\n")
    assert dc.build(out, cpu=False) == 0 and len(calls) == 4  # a source changed


def test_a_pytest_step_whose_tests_all_skip_does_not_pass(dc, tmp_path, monkeypatch):
    # What the GPU parity step would report on a machine where CUDA or a backend is missing.
    tests = tmp_path / "test_skipped.py"
    tests.write_text("import pytest\n\ndef test_needs_a_gpu():\n    pytest.skip('needs a CUDA device')\n")
    out = tmp_path / "out"

    def command(ctx):
        return dc.pytest_command(ctx, [str(tests)], "parity.xml", per_test_s=60)

    monkeypatch.setitem(dc.STEPS, "parity", dc.Step("parity", "all skipped", 60, command, ("parity.xml",)))
    monkeypatch.setitem(dc.PHASES, "rehearse", ("parity",))
    monkeypatch.delenv("DEVICE_CHECK_FAIL_STEP", raising=False)
    assert dc.run_phase("rehearse", out) == 1
    (step,) = _summary(out)["steps"]
    assert step["status"] == "failed" and step["exit_code"] == 0
    assert step["note"] == "1 tests: 0 passed, 0 failed, 0 errors, 1 skipped; no test passed"


def test_report_prints_gpu_records_as_markdown_under_their_commands(dc, tmp_path):
    line = "device: NVIDIA H200  torch 2.11.0+cu130  triton 3.6.0  CUDA 13.0  python 3.12.3  transformers 5.17.0"
    command = "python -m benchmarks.kernels --json $OUT/kernels.json --device cuda --variants xclip-b16"
    (tmp_path / "summary.json").write_text(json.dumps({"environment": {"line": line},
                                                       "steps": [{"name": "kernels", "command": command}]}))
    row = dict(op="frame_attention", mode="forward", variant="xclip-b16", frames=8, batch=32, dtype="bfloat16",
               date="2026-12-03")
    records = [{**row, "backend": "sdpa", "ms": 2.0, "ms_p20": 1.9, "ms_p80": 2.1, "tflops": 100.0, "gbps": 900.4},
               {**row, "backend": "triton", "ms": 1.0, "ms_p20": 0.95, "ms_p80": 1.05, "tflops": 200.0, "gbps": 1800.6}]
    (tmp_path / "kernels.json").write_text(json.dumps(records))
    text = dc.report(tmp_path)
    assert text.splitlines() == [
        f"`{command}` (bfloat16, batch 32, 8 frames; {line}; 2026-12-03): median ms (20th–80th percentile)",
        "",
        "| op | mode | variant | backend | ms | TFLOP/s | GB/s |",
        "|---|---|---|---|---|---|---|",
        "| frame_attention | forward | xclip-b16 | sdpa | 2.000 (1.900–2.100) | 100.0 | 900 |",
        "| frame_attention | forward | xclip-b16 | triton | 1.000 (0.950–1.050) | 200.0 | 1801 |",
        "",
        "- frame_attention forward: triton is 2.00× sdpa",
    ]
    assert dc.report(tmp_path / "nothing") == f"no measurements in {tmp_path / 'nothing'} (kernels.json, vs_hf.json, " \
                                              "run_gpu.json)"
