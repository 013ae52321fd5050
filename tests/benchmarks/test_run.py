"""benchmarks.run: the JSON records, the scaling summary and the plot."""

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.run import _best_per_style, plot

REPO_ROOT = Path(__file__).resolve().parents[2]
KEYS = {"model", "attention", "backend", "frames", "batch", "dtype", "device", "gmacs", "clips_per_s"}


def _row(attention: str, frames: int, clips: float, gmacs: float, backend: str = "sdpa") -> dict:
    return dict(model="m", attention=attention, backend=backend, frames=frames, batch=1, dtype="float32",
                device="cpu", gmacs=gmacs, clips_per_s=clips)


def test_best_row_per_style_and_frames():
    rows = [_row("xclip", 8, 2.0, 39, "sdpa"), _row("xclip", 8, 3.0, 39, "cpp"), _row("joint", 8, 1.0, 37)]
    best = _best_per_style(rows)
    assert best["xclip"][8]["backend"] == "cpp" and best["joint"][8]["clips_per_s"] == 1.0


def test_plot_writes_a_png(tmp_path):
    rows = [_row(style, f, 8.0 / f, 10.0 * f) for style in ("xclip", "joint") for f in (8, 16, 32)]
    plot(rows, str(tmp_path / "run.png"))
    assert (tmp_path / "run.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_cpu_sweep_point_writes_records(tmp_path):
    out = tmp_path / "run.json"
    subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--preset", "cpu", "--frames", "8", "--rounds", "1", "--json", str(out)],
        cwd=REPO_ROOT, check=True, capture_output=True, text=True, timeout=300,
    )
    rows = json.loads(out.read_text())
    assert {r["attention"] for r in rows} == {"xclip", "joint", "divided", "factorised", "swin"}
    for r in rows:
        assert KEYS <= set(r) and r["frames"] == 8 and r["clips_per_s"] > 0 and r["gmacs"] > 0


def test_json_records_go_into_a_folder_that_does_not_exist_yet(tmp_path):
    from benchmarks.timing import write_json

    path = tmp_path / "bench-results" / "nested" / "run.json"
    write_json(str(path), [{"clips_per_s": 1.5}])
    assert json.loads(path.read_text()) == [{"clips_per_s": 1.5}]
