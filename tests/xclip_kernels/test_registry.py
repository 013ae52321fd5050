"""The backend registry: declared capabilities, automatic choice, forced backends, the report."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xclip_kernels as xk
from xclip_kernels import registry
from xclip_kernels.backends import base, reference, sdpa
from xclip_kernels.registry import Backend, BackendNotSupportedError, OpInputs, get_backend, select_backend
from xk_helpers import automatic_cpu_backend, frame_inputs, message_inputs

REPO_ROOT = Path(__file__).resolve().parents[2]


def _frame_call_inputs(dtype=torch.float32, requires_grad=False):
    tensors = frame_inputs(2, 5, 3, 8, dtype)
    if requires_grad:
        tensors[0].requires_grad_(True)
    return tensors


def _frame_op_inputs(dtype=torch.float32, requires_grad=False):
    return OpInputs.of("frame_attention", *_frame_call_inputs(dtype, requires_grad), head_dim=8)


@pytest.fixture
def spies(monkeypatch):
    """Record which backend module's implementation ran, by wrapping reference and sdpa."""
    calls: list[str] = []
    # The registry caches the functions it resolved: start from an empty cache so the spies are found.
    monkeypatch.setattr(base, "_IMPLEMENTATIONS", {})
    for name, module in (("reference", reference), ("sdpa", sdpa)):
        for op in registry.OPS:
            original = getattr(module, op)

            def spy(*args, _original=original, _name=name, **kwargs):
                calls.append(_name)
                return _original(*args, **kwargs)

            monkeypatch.setattr(module, op, spy)
    return calls


# --------------------------------------------------------------------------- names


def test_backend_names():
    assert xk.BACKENDS == ("reference", "sdpa", "xformers", "triton", "cuda", "cpp")
    assert [get_backend(name).name for name in xk.BACKENDS] == list(xk.BACKENDS)


def test_every_priority_list_names_known_backends():
    assert set(xk.PRIORITY) >= {"cpu", "cuda"}
    for names in xk.PRIORITY.values():
        assert set(names) <= set(xk.BACKENDS)


@pytest.mark.parametrize("name", ["flash", "SDPA", "", None, 3], ids=["flash", "uppercase", "empty", "None", "int"])
def test_unknown_backend_name_raises_value_error_listing_the_names(name):
    with pytest.raises(ValueError, match=r"^backend: expected one of reference, sdpa, xformers, triton, cuda, cpp") as info:
        get_backend(name)
    assert repr(name) in str(info.value)


def test_unknown_backend_name_through_the_ops(spies):
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'flash'"):
        xk.frame_attention(*_frame_call_inputs(), backend="flash")
    with pytest.raises(ValueError, match=r"backend: expected one of .*got 'flash'"):
        xk.message_attention(*message_inputs(1, 2, 8, torch.float32), num_frames=2, num_heads=2, backend="flash")
    assert spies == []


# --------------------------------------------------------------------------- automatic choice


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
def test_automatic_choice_on_cpu_is_the_first_available_in_priority(dtype, requires_grad):
    expected = automatic_cpu_backend()
    assert expected in ("cpp", "sdpa")
    assert select_backend(_frame_op_inputs(dtype, requires_grad)).name == expected
    messages = message_inputs(2, 3, 16, dtype)
    assert select_backend(OpInputs.of("message_attention", *messages, head_dim=8)).name == expected


def test_automatic_choice_runs_sdpa_for_both_ops(spies, monkeypatch):
    monkeypatch.setitem(registry.PRIORITY, "cpu", ("sdpa", "reference"))
    xk.frame_attention(*_frame_call_inputs())
    xk.message_attention(*message_inputs(2, 3, 16, torch.float32), num_frames=3, num_heads=2)
    assert spies == ["sdpa", "sdpa"]


def test_env_var_makes_backend_none_use_reference(monkeypatch, spies):
    monkeypatch.setenv("XCLIP_KERNELS_BACKEND", "reference")
    assert select_backend(_frame_op_inputs()).name == "reference"
    xk.frame_attention(*_frame_call_inputs())
    xk.message_attention(*message_inputs(2, 3, 16, torch.float32), num_frames=3, num_heads=2)
    assert spies == ["reference", "reference"]


def test_explicit_backend_wins_over_env_var(monkeypatch, spies):
    monkeypatch.setenv("XCLIP_KERNELS_BACKEND", "reference")
    assert select_backend(_frame_op_inputs(), "sdpa").name == "sdpa"
    xk.frame_attention(*_frame_call_inputs(), backend="sdpa")
    assert spies == ["sdpa"]


def test_blank_env_var_means_automatic(monkeypatch):
    monkeypatch.setenv("XCLIP_KERNELS_BACKEND", "  ")
    assert select_backend(_frame_op_inputs()).name == automatic_cpu_backend()


def test_env_var_naming_an_unavailable_backend_raises_and_does_not_fall_back(monkeypatch, spies):
    monkeypatch.setenv("XCLIP_KERNELS_BACKEND", "cuda")
    with pytest.raises(BackendNotSupportedError, match=r"cuda: .*device 'cpu' not supported"):
        xk.frame_attention(*_frame_call_inputs())
    assert spies == []


def test_env_var_naming_an_unknown_backend_raises(monkeypatch):
    monkeypatch.setenv("XCLIP_KERNELS_BACKEND", "flash")
    with pytest.raises(ValueError, match=r"expected one of reference, sdpa.*got 'flash'"):
        select_backend(_frame_op_inputs())


def test_inference_does_not_count_as_requires_grad():
    inputs = _frame_call_inputs(requires_grad=True)
    assert OpInputs.of("frame_attention", *inputs, head_dim=8).requires_grad
    with torch.no_grad():
        assert not OpInputs.of("frame_attention", *inputs, head_dim=8).requires_grad
    with torch.inference_mode():
        assert not OpInputs.of("frame_attention", *inputs, head_dim=8).requires_grad
    assert not OpInputs.of("frame_attention", *_frame_call_inputs(), head_dim=8).requires_grad


def test_op_inputs_describe_the_call():
    described = OpInputs.of("frame_attention", *_frame_call_inputs(torch.float64), head_dim=8)
    assert described == OpInputs("frame_attention", "cpu", torch.float64, 8, False)


# --------------------------------------------------------------------------- forced backends


@pytest.mark.parametrize(
    "name, reason",
    [
        ("cuda", r"device 'cpu' not supported \(supports cuda\)"),
        ("xformers", r"device 'cpu' not supported \(supports cuda\)"),
    ],
)
def test_forcing_a_backend_that_cannot_run_raises_and_never_falls_back(spies, name, reason):
    with pytest.raises(BackendNotSupportedError) as info:
        xk.frame_attention(*_frame_call_inputs(), backend=name)
    message = str(info.value)
    assert message.startswith("no backend can run frame_attention on cpu float32, head dim 8:")
    lines = message.splitlines()[1:]
    assert len(lines) == 1 and lines[0].startswith(f"  {name}: "), message
    assert re.search(reason, lines[0]), message
    assert spies == []


def test_forcing_triton_on_cpu_without_the_interpreter(monkeypatch, spies):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendNotSupportedError, match=r"triton: .*TRITON_INTERPRET=1"):
        xk.frame_attention(*_frame_call_inputs(), backend="triton")
    assert spies == []


def test_forcing_a_backend_that_lacks_the_op():
    messages = message_inputs(1, 2, 8, torch.float32)
    with pytest.raises(BackendNotSupportedError, match=r"xformers: .*does not implement message_attention"):
        xk.message_attention(*messages, num_frames=2, num_heads=2, backend="xformers")


def test_forced_error_is_a_runtime_error():
    # Callers catching RuntimeError (as for other torch dispatch failures) also catch this.
    assert issubclass(BackendNotSupportedError, RuntimeError)


def test_when_nothing_fits_one_error_lists_every_candidate(monkeypatch, spies):
    # float16 is outside cpp's declared dtypes however far its build gets, so this stays true.
    monkeypatch.setitem(registry.PRIORITY, "cpu", ("cpp", "xformers"))
    with pytest.raises(BackendNotSupportedError) as info:
        xk.frame_attention(*_frame_call_inputs(torch.float16))
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == "no backend can run frame_attention on cpu float16, head dim 8:"
    assert lines[1].startswith("  cpp: ") and "dtype float16 not supported (supports float32, float64, bfloat16)" in lines[1]
    assert lines[2].startswith("  xformers: ") and "device 'cpu' not supported" in lines[2]
    assert len(lines) == 3
    assert spies == []


def test_only_cpp_on_cpu_lists_cpps_reason(monkeypatch):
    monkeypatch.setitem(registry.PRIORITY, "cpu", ("cpp",))
    inputs = _frame_op_inputs(torch.float16)
    with pytest.raises(BackendNotSupportedError, match=r"\n  cpp: .*dtype float16 not supported"):
        select_backend(inputs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report on a machine without CUDA")
def test_cuda_tensors_without_cuda_report_every_candidate():
    inputs = OpInputs("frame_attention", "cuda", torch.float16, 64, False)
    with pytest.raises(BackendNotSupportedError) as info:
        select_backend(inputs)
    message = str(info.value)
    for name in xk.PRIORITY["cuda"]:
        assert f"\n  {name}: " in message
    assert "torch.cuda.is_available() is False" in message


# --------------------------------------------------------------------------- declared capabilities


def _probe(**changes) -> OpInputs:
    base = OpInputs("frame_attention", "cpu", torch.float32, 64, False)
    return dataclasses.replace(base, **changes)


def test_supported_call_has_no_reasons():
    assert get_backend("sdpa").not_supported_reasons(_probe()) == []
    assert get_backend("reference").not_supported_reasons(_probe(dtype=torch.bfloat16, requires_grad=True)) == []


def test_cpu_bfloat16_goes_to_cpp_first():
    # backend=None on CPU bf16 tensors takes cpp wherever it is built (tests/.../test_cpp.py runs it).
    assert torch.bfloat16 in get_backend("cpp").dtypes
    assert registry.PRIORITY["cpu"][0] == "cpp"


@pytest.mark.parametrize(
    "name, changes, reason",
    [
        ("sdpa", {"device_type": "mps"}, "device 'mps' not supported (supports cpu, cuda)"),
        ("cuda", {}, "device 'cpu' not supported (supports cuda)"),
        ("cpp", {"device_type": "cuda"}, "device 'cuda' not supported (supports cpu)"),
        ("cpp", {"dtype": torch.float16}, "dtype float16 not supported (supports float32, float64, bfloat16)"),
        ("xformers", {"dtype": torch.float64, "device_type": "cuda"}, "dtype float64 not supported (supports float16, bfloat16, float32)"),
        ("xformers", {"head_dim": 256, "device_type": "cuda"}, "head dim 256 > 128"),
        ("triton", {"head_dim": 160, "device_type": "cuda"}, "head dim 160 > 128"),
        ("xformers", {"op": "message_attention", "device_type": "cuda"}, "does not implement message_attention"),
    ],
    ids=["device-mps", "cuda-on-cpu", "cpp-on-cuda", "cpp-fp16", "xformers-fp64", "xformers-D256", "triton-D160", "xformers-op"],
)
def test_not_supported_reasons(name, changes, reason):
    reasons = get_backend(name).not_supported_reasons(_probe(**changes))
    assert reason in reasons, reasons


def test_every_failed_requirement_is_reported_not_just_the_first():
    reasons = get_backend("xformers").not_supported_reasons(
        _probe(op="message_attention", dtype=torch.float64, head_dim=256)
    )
    joined = " | ".join(reasons)
    for expected in ("does not implement message_attention", "device 'cpu'", "dtype float64", "head dim 256 > 128"):
        assert expected in joined, joined


def _declared(**fields) -> Backend:
    # Named after an available backend: Backend.unavailable_reasons looks availability up by
    # name in the registry (see test_backend_built_directly_uses_its_own_availability).
    spec = dict(
        name="sdpa",
        description="declared in a test",
        load=lambda: {"frame_attention": sdpa.frame_attention},
        ops=("frame_attention",),
        devices=("cpu",),
        dtypes=(torch.float32,),
        supports_backward=False,
    )
    return Backend(**{**spec, **fields})


def test_backend_without_backward_refuses_inputs_that_require_grad():
    backend = _declared()
    assert backend.not_supported_reasons(_probe()) == []
    assert backend.not_supported_reasons(_probe(requires_grad=True)) == ["backward not supported (inputs require grad)"]
    assert _declared(supports_backward=True).not_supported_reasons(_probe(requires_grad=True)) == []


def test_head_dim_limits_are_declared_data():
    backend = _declared(max_head_dim=64, head_dim_multiple=16)
    assert backend.not_supported_reasons(_probe(head_dim=64)) == []
    assert backend.not_supported_reasons(_probe(head_dim=80)) == ["head dim 80 > 64"]
    assert backend.not_supported_reasons(_probe(head_dim=40)) == ["head dim 40 is not a multiple of 16"]


def test_device_reasons_are_asked_only_for_declared_devices():
    backend = _declared(devices=("cpu", "cuda"), device_reasons=lambda device: [f"no {device} here"])
    assert backend.not_supported_reasons(_probe()) == ["no cpu here"]
    assert backend.not_supported_reasons(_probe(device_type="mps")) == ["device 'mps' not supported (supports cpu, cuda)"]


def test_backend_built_directly_uses_its_own_availability():
    backend = _declared(name="test-only", availability=lambda: ["missing package"])
    assert backend.not_supported_reasons(_probe()) == ["missing package"]
    same_name = _declared(name="sdpa", availability=lambda: ["other reason"])
    assert same_name.not_supported_reasons(_probe()) == ["other reason"]


def test_unknown_backend_in_environment_names_the_variable(monkeypatch):
    monkeypatch.setenv("XCLIP_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"^XCLIP_KERNELS_BACKEND: expected one of .*'fastest'"):
        select_backend(_probe())


def test_preload_automatic_takes_the_environment_or_the_first_available(monkeypatch):
    from xclip_kernels.registry import preload_automatic

    monkeypatch.setenv("XCLIP_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"^XCLIP_KERNELS_BACKEND: expected one of .*'fastest'"):
        preload_automatic()
    monkeypatch.setenv("XCLIP_KERNELS_BACKEND", "sdpa")
    assert preload_automatic() == ["sdpa"]
    monkeypatch.delenv("XCLIP_KERNELS_BACKEND")
    first_on_cpu = next(name for name in xk.PRIORITY["cpu"] if not get_backend(name).unavailable_reasons())
    assert preload_automatic()[0] == first_on_cpu


def test_triton_cpu_needs_the_interpreter_flag(monkeypatch):
    triton = get_backend("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert any("TRITON_INTERPRET=1" in r for r in triton.not_supported_reasons(_probe()))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not any("TRITON_INTERPRET" in r for r in triton.not_supported_reasons(_probe()))


# --------------------------------------------------------------------------- python -m xclip_kernels


def _run_python(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "XCLIP_KERNELS_BACKEND"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )


def test_module_prints_every_backend_and_why_not():
    result = _run_python("-m", "xclip_kernels")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: i for i, line in enumerate(lines) if line.split() and line.split()[0] in xk.BACKENDS}
    assert set(rows) == set(xk.BACKENDS), result.stdout
    for row in registry.backend_table():
        name, i = row["name"], rows[row["name"]]
        assert lines[i].split()[1] == ("yes" if row["available"] else "no"), lines[i]
        following = lines[i + 1 : i + 1 + len(row["reasons"])]
        assert [line.strip() for line in following] == [f"why not: {r}" for r in row["reasons"]], result.stdout
    # Unavailable backends exist on every machine (cpp is CPU-only, cuda needs CUDA...).
    assert any(not row["available"] for row in registry.backend_table())
    assert "why not:" in result.stdout
    for device, names in xk.PRIORITY.items():
        assert f"automatic choice on {device}: {' > '.join(names)}" in result.stdout


def test_import_prints_nothing_and_loads_no_backend_module():
    # The declarations' shared types (backends.base) are all the registry needs at import.
    code = (
        "import sys, xclip_kernels\n"
        "infrastructure = ('xclip_kernels.backends', 'xclip_kernels.backends.base')\n"
        "loaded = sorted(m for m in sys.modules if m.startswith(('xclip_kernels.backends', 'xclip_kernels._C',"
        " 'xformers', 'triton')) and m not in infrastructure)\n"
        "sys.stderr.write(repr(loaded))\n"
    )
    result = _run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert result.stderr == "[]"


def test_reading_every_declaration_imports_no_extension_triton_or_xformers():
    # Declarations sit beside the code they describe; reading them must stay free.
    code = (
        "import sys\n"
        "from xclip_kernels import registry\n"
        "declared = [registry.get_backend(name).name for name in registry.BACKENDS]\n"
        "assert declared == list(registry.BACKENDS), declared\n"
        "heavy = ('xclip_kernels._C', 'xformers', 'triton', 'xclip_kernels.backends.triton.')\n"
        "sys.stderr.write(repr(sorted(m for m in sys.modules if m.startswith(heavy))))\n"
    )
    result = _run_python("-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "[]"


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("XCLIP_KERNELS_BACKEND", "fastest", "XCLIP_KERNELS_BACKEND: expected one of reference, sdpa"),
        ("XCLIP_KERNELS_CPU_ISA", "bogus", "XCLIP_KERNELS_CPU_ISA: expected one of auto, avx512_bf16, avx2 (or unset), got 'bogus'"),
        ("XCLIP_KERNELS_GEMM", "mkl", "XCLIP_KERNELS_GEMM: expected one of auto, matmul, onednn, float32 (or unset), got 'mkl'"),
    ],
)
def test_module_names_a_bad_setting_in_one_line(variable, value, message):
    env = {k: v for k, v in os.environ.items() if k != "XCLIP_KERNELS_BACKEND"}
    env[variable] = value
    result = subprocess.run([sys.executable, "-m", "xclip_kernels"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m xclip_kernels: error: "), result.stderr
    assert message in lines[0]


def test_module_says_which_gemm_provider_this_cpu_gets():
    from xclip_kernels import gemm

    automatic = {name: value for name, value in os.environ.items() if name != "XCLIP_KERNELS_GEMM"}
    result = subprocess.run([sys.executable, "-m", "xclip_kernels"], cwd=REPO_ROOT, env=automatic, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    if not gemm.onednn_available():
        assert "CPU inference GEMMs: no oneDNN provider (this torch has no oneDNN linear op)" in result.stdout
        return
    for dtype in ("float32", "bfloat16"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(f"CPU inference GEMMs in {dtype}: "))
        chosen = line.split(": ", 1)[1].split()[0]
        assert chosen in gemm.PROVIDERS and "matmul" in line and "oneDNN prepacked" in line, line
    env = {**os.environ, "XCLIP_KERNELS_GEMM": "matmul"}
    forced = subprocess.run([sys.executable, "-m", "xclip_kernels"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert "CPU inference GEMMs: matmul for every dtype (XCLIP_KERNELS_GEMM=matmul)" in forced.stdout


def test_module_says_which_backend_the_environment_forces():
    env = {**os.environ, "XCLIP_KERNELS_BACKEND": "sdpa"}
    result = subprocess.run([sys.executable, "-m", "xclip_kernels"], cwd=REPO_ROOT, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "XCLIP_KERNELS_BACKEND=sdpa: calls with backend=None use sdpa" in result.stdout
