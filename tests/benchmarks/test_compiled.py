"""benchmarks.compiled: argument checks, the ratio and break-even arithmetic, the table rows,
and main() end to end on a tiny model.

Inductor is never run here: its C++ build takes minutes on the development CPUs. The end-to-end
runs set ``compiled.COMPILER`` to ``"aot_eager"``, which traces the model exactly as Inductor
would receive it (Dynamo, AOTAutograd, the custom ops' fake kernels) and runs the traced graph
with eager kernels; the freezing flag and the fresh cache are then no-ops.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import xclip
from benchmarks import compiled
from benchmarks.timing import Timings
from xclip_kernels.registry import get_backend

TINY_NAME = "compiled-tiny"
# Fractions of a second per call: 2 layers at 32 x 32 pixels, patches of 8, 3 frames.
TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)
ARGS = ["--variant", TINY_NAME, "--frames", "3", "--batch", "2", "--labels", "2", "--rounds", "2"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Dynamo's caches are process-wide: every run traces from scratch, and leaves nothing behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def run_compiled(tmp: Path, *extra: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, dict]:
    """main() on the tiny variant with the aot_eager compiler; its exit code and JSON record."""
    path = tmp / "compiled.json"
    monkeypatch.setitem(xclip.VARIANTS, TINY_NAME, TINY)
    monkeypatch.setattr(compiled, "COMPILER", "aot_eager")
    code = compiled.main([*ARGS, *extra, "--json", str(path)])
    return code, json.loads(path.read_text())


# -- pure helpers ----------------------------------------------------------------------------


def test_defaults_are_the_issue_s_run():
    args = compiled.parse_args([])
    assert (args.variant, args.frames, args.batch, args.labels, args.dtype) == ("xclip-b32", 8, 2, 1, "float32")
    assert args.compiled == ["sdpa", "auto"] and args.json is None


def test_compiled_backends_come_in_table_order_without_repeats():
    assert compiled.parse_args(["--compiled", "auto", "reference", "auto"]).compiled == ["reference", "auto"]


@pytest.mark.parametrize("argv, flag", [
    (["--dtype", "float16"], "--dtype"),
    (["--compiled", "xformers"], "--compiled"),
    (["--rounds", "0"], "--rounds"),
    (["--batch", "0"], "--batch"),
    (["--frames", "-1"], "--frames"),
])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        compiled.parse_args(argv)
    assert info.value.code == 2 and flag in capsys.readouterr().err


def test_break_even_is_compile_time_over_the_time_saved_per_clip():
    # 60 s of compiling, 0.5 s per clip eager, 0.3 s compiled: 0.2 s saved per clip.
    assert compiled.break_even_clips(60.0, 0.5, 0.3) == pytest.approx(300.0)
    assert compiled.break_even_clips(0.0, 0.5, 0.3) == 0.0


@pytest.mark.parametrize("compiled_s", [0.5, 0.7])
def test_break_even_is_never_when_compiling_saves_nothing(compiled_s):
    assert compiled.break_even_clips(60.0, 0.5, compiled_s) == math.inf


@pytest.mark.parametrize("args, name", [
    ((-1.0, 0.5, 0.3), "compile_s"),
    ((math.nan, 0.5, 0.3), "compile_s"),
    ((1.0, math.inf, 0.3), "eager_s_per_clip"),
    ((1.0, 0.5, -0.3), "compiled_s_per_clip"),
])
def test_break_even_rejects_bad_times_by_name(args, name):
    with pytest.raises(ValueError, match=name):
        compiled.break_even_clips(*args)


def test_summary_ratio_is_the_median_of_per_round_ratios():
    """The machine's speed drifts between rounds: the ratio pairs each round's own times."""
    timings = Timings({"eager": [1.0, 2.0, 4.0], "compiled sdpa": [0.5, 2.5, 2.0]})
    row = compiled.summarize(timings, "compiled sdpa", batch=2)
    # Per-round eager / compiled: 2.0, 0.8, 2.0 -> median 2.0; the ratio of medians would be 1.0.
    assert row["over_eager"] == 2.0
    assert row["clips_per_s"] == 1.0  # batch 2 / median 2.0 s
    assert (row["clips_per_s_p20"], row["clips_per_s_p80"]) == (0.8, 4.0)  # of 4.0, 0.8, 1.0 clips/s
    assert row["seconds"] == [0.5, 2.5, 2.0]
    assert compiled.summarize(timings, "eager", batch=2)["over_eager"] == 1.0


def test_percentile_of_nothing_names_the_argument():
    with pytest.raises(ValueError, match="values"):
        compiled.percentile([], 0.5)


def test_rows_print_every_column_or_the_reason():
    row = dict(status="ok", compile_s=61.234, clips_per_s=3.5, clips_per_s_p20=3.1, clips_per_s_p80=3.9,
               over_eager=1.25, break_even_clips=412.4, max_abs_logit_diff=1.5e-5,
               chosen={"frame_attention": "sdpa", "message_attention": "sdpa"})
    line = compiled.format_row("compiled sdpa", row)
    for text in ("compiled sdpa", "61.2", "3.500", "[  3.100,   3.900]", "1.250x", "412 clips", "1.50e-05",
                 "frame_attention=sdpa, message_attention=sdpa"):
        assert text in line
    assert "never" in compiled.format_row("x", dict(row, break_even_clips=math.inf))
    eager = compiled.format_row("eager", dict(row, compile_s=None, break_even_clips=None))
    assert eager.split()[1] == "-"  # no compile time for eager
    failed = compiled.format_row("compiled cpp", dict(status="failed: RuntimeError: no fake kernel"))
    assert failed.split(None, 2)[2] == "failed: RuntimeError: no fake kernel"
    # Columns line up with the header.
    assert line.index("61.2") + len("61.2") == compiled.HEADER.index("compile s") + len("compile s")


def test_the_automatic_choice_names_a_backend_per_op():
    chosen = compiled.chosen_backends(TINY, torch.float32, "auto")
    assert set(chosen) == {"frame_attention", "message_attention"}
    assert compiled.chosen_backends(TINY, torch.float32, "sdpa") == dict.fromkeys(chosen, "sdpa")


# -- main() end to end (aot_eager, seconds) --------------------------------------------------


def test_record_rows_and_parity(tmp_path, monkeypatch):
    code, record = run_compiled(tmp_path, "--compiled", "reference", "sdpa", "auto", monkeypatch=monkeypatch)
    assert code == 0
    assert record["command"].startswith("python -m benchmarks.compiled --variant compiled-tiny")
    for key in ("device", "threads", "torch", "python", "date", "THP_MEM_ALLOC_ENABLE"):
        assert record[key] not in (None, "")
    assert (record["variant"], record["frames"], record["batch"], record["labels"], record["dtype"]) == (
        TINY_NAME, 3, 2, 2, "float32")
    assert record["mode"] == "torch.no_grad" and record["freezing"] is True and record["compiler"] == "aot_eager"
    rows = record["rows"]
    eager = rows["eager"]
    assert eager["status"] == "ok" and eager["compile_s"] is None and eager["over_eager"] == 1.0
    assert eager["max_abs_logit_diff"] == 0.0 and len(eager["seconds"]) == 2
    # The automatic choice compiles as its own row unless a forced backend already built that graph.
    automatic = eager["chosen"]
    names = ["compiled reference", "compiled sdpa", "compiled auto"]
    assert list(rows) == ["eager", *names]
    for name in names:
        row = rows[name]
        if name == "compiled auto" and automatic == dict.fromkeys(automatic, "sdpa"):
            assert row["status"].startswith("not run: the automatic choice at float32 is sdpa")
            continue
        assert row["status"] == "ok", row["status"]
        assert row["compile_s"] > 0 and row["clips_per_s"] > 0 and row["over_eager"] > 0
        assert row["break_even_clips"] is None or row["break_even_clips"] >= 0
        assert row["max_abs_logit_diff"] < 1e-4  # aot_eager runs the same fp32 kernels
        assert row["chosen"] == (automatic if name == "compiled auto" else dict.fromkeys(automatic, name.split()[1]))


def test_cpp_compiles_through_its_fake_kernels(tmp_path, monkeypatch):
    reasons = get_backend("cpp").unavailable_reasons()
    if reasons:
        pytest.skip(f"cpp: {'; '.join(reasons)}")
    code, record = run_compiled(tmp_path, "--compiled", "cpp", monkeypatch=monkeypatch)
    row = record["rows"]["compiled cpp"]
    assert code == 0 and row["status"] == "ok", row["status"]
    assert row["chosen"] == {"frame_attention": "cpp", "message_attention": "cpp"}
    assert row["max_abs_logit_diff"] < 1e-4


def test_a_backend_that_cannot_run_is_a_row_not_a_failure(tmp_path, monkeypatch):
    """A backend that refuses the call (here cpp, made to refuse every call): its reasons are the
    row, and the run goes on."""

    class Refusing:
        def not_supported_reasons(self, inputs):
            return [f"refuses {inputs.op} (a stand-in)"]

    monkeypatch.setattr(compiled, "get_backend", lambda name: Refusing() if name == "cpp" else get_backend(name))
    code, record = run_compiled(tmp_path, "--dtype", "bfloat16", "--compiled", "cpp", monkeypatch=monkeypatch)
    assert code == 0
    row = record["rows"]["compiled cpp"]
    assert row["status"].startswith("not run: cpp: refuses frame_attention (a stand-in)"), row
    assert "clips_per_s" not in row
    assert record["rows"]["eager"]["clips_per_s"] > 0


def test_a_failing_compile_is_a_row_and_the_exit_code(tmp_path, monkeypatch):
    def broken(model, **kwargs):
        def call(*args):
            raise RuntimeError("Inductor broke\n(pages of generated code)")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    code, record = run_compiled(tmp_path, "--compiled", "sdpa", monkeypatch=monkeypatch)
    assert code == 1
    assert record["rows"]["compiled sdpa"]["status"] == "failed: RuntimeError: Inductor broke"
    assert record["rows"]["eager"]["status"] == "ok" and record["rows"]["eager"]["clips_per_s"] > 0


def test_wrong_logits_fail_the_row(tmp_path, monkeypatch):
    """A compiled model whose logits are not finite is a failure, not a fast row."""
    def nan_logits(model, **kwargs):
        return lambda video, text: torch.full((video.shape[0], text.shape[0]), math.nan)

    monkeypatch.setattr(torch, "compile", nan_logits)
    code, record = run_compiled(tmp_path, "--compiled", "sdpa", monkeypatch=monkeypatch)
    assert code == 1
    row = record["rows"]["compiled sdpa"]
    assert row["status"].startswith("failed: logits") and "clips_per_s" not in row
