"""benchmarks.collection: the decode-only benchmark writes its videos once, times every worker
count and prints (and records) the table, the ratios, the CPU and the machine's load."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.collection import control_ratios, parse_size, parse_workers, ratios, synthetic_videos

REPO_ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("av")


def test_tiny_run_prints_the_table_and_writes_the_record(tmp_path):
    folder, out = tmp_path / "videos", tmp_path / "decode.json"
    command = [sys.executable, "-m", "benchmarks.collection", "--folder", str(folder), "--videos", "3", "--size", "64x48",
               "--seconds", "1", "--frames", "3", "--image-size", "32", "--rounds", "1", "--workers", "0,1,2",
               "--json", str(out)]
    proc = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    videos = sorted(p.name for p in folder.iterdir())
    assert videos == [f"synthetic-64x48-1s-{i:04d}.mp4" for i in range(3)]  # named by size and length, no temporaries

    text = proc.stdout
    assert "3 videos 64x48, 1 s at 10 fps" in text and "CPU: " in text and "load average (1, 5, 15 min) before " in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| workers")]
    assert [row.split(" | ")[0] for row in rows] == ["| 0 (in process)", "| 1", "| 2"]
    assert "2 workers / 1 worker: " in text and "1 worker / in process: " in text and "goal >= 1.7x" in text

    record = json.loads(out.read_text())
    assert record["videos"] == {"count": 3, "width": 64, "height": 48, "seconds": 1, "fps": 10, "folder": str(folder)}
    assert [row["workers"] for row in record["rows"]] == [0, 1, 2]
    for row in record["rows"]:
        assert len(row["seconds"]) == 1 and row["videos_per_s"][0] == pytest.approx(3 / row["seconds"][0])
        assert row["cpu_seconds_per_video"] > 0 and row["decode_seconds_per_video"] > 0 and row["errors"] == 0
        assert 0 <= row["main_cpu_seconds_per_video"] <= row["cpu_seconds_per_video"]
    assert set(record["ratios"]) == {"2/1", "1/0"}
    assert set(record["load"]) == {"busy_cores_before", "busy_cores_after", "loadavg_before", "loadavg_after", "loaded"}
    assert record["environment"]["device"] and record["environment"]["av"]
    # The control: the same decoding in 1 and 2 independent processes, in the same rounds.
    assert "Control, the same decoding in independent processes" in text and "  2 processes: " in text
    assert set(record["control"]["seconds"]) == {"1", "2"} and all(
        len(s) == 1 and s[0] > 0 for s in record["control"]["seconds"].values())
    assert set(record["control"]["ratios"]) == {"2/1", "pipeline 1/control 1", "pipeline 2/control 2"}

    # Another run reuses the videos: nothing rewritten.
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert synthetic_videos(str(folder), 3, (64, 48), 1) == [str(folder / name) for name in videos]
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_ratios_are_per_round_medians():
    rows = [{"workers": 0, "seconds": [4.0, 9.0, 9.0]}, {"workers": 1, "seconds": [2.0, 2.0, 3.0]},
            {"workers": 2, "seconds": [1.0, 1.6, 1.5]}]
    assert ratios(rows) == pytest.approx({"2/1": 2.0, "1/0": 3.0})  # per round 2/1: 2, 1.25, 2; 1/0: 2, 4.5, 3
    assert ratios(rows[2:]) == {}  # no 1-worker row: nothing to compare with


def test_control_ratios_are_per_round_medians():
    rows = [{"workers": 1, "seconds": [2.0, 2.0, 3.0]}, {"workers": 2, "seconds": [1.0, 1.6, 1.5]}]
    control = {1: [1.8, 2.0, 2.4], 2: [1.0, 1.0, 1.5]}
    # control 2/1 per round: 1.8, 2.0, 1.6; pipeline/control: 1: 0.9, 1.0, 0.8; 2: 1.0, 0.625, 1.0
    assert control_ratios(rows, control) == pytest.approx(
        {"2/1": 1.8, "pipeline 1/control 1": 0.9, "pipeline 2/control 2": 1.0})
    assert control_ratios(rows, {}) == {}


def test_argument_checks():
    import argparse

    assert parse_size("320x240") == (320, 240) and parse_workers("0,1,2") == [0, 1, 2]
    for bad in ("320", "321x240", "0x0", "axb"):
        with pytest.raises(argparse.ArgumentTypeError, match="WIDTHxHEIGHT|even width"):
            parse_size(bad)
    for bad in ("1,1", "-1", "a"):
        with pytest.raises(argparse.ArgumentTypeError, match="integers"):
            parse_workers(bad)
