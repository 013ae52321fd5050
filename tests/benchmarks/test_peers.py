"""benchmarks.peers end to end on a tiny model: the record, the rows of missing or unsupported
peers, and every engine's logits against ours.

The peer packages (onnx, onnxscript, onnxruntime, openvino) are an optional extra: each peer's
checks skip with pytest.importorskip's reason where its packages are absent, and the rest runs.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import xclip

pytest.importorskip("transformers")  # the Hugging Face model is the source of every engine's weights

from benchmarks import peers  # noqa: E402 - after the skip: it imports transformers lazily, but the runs need it

TINY_NAME = "peers-tiny"
# Seconds per run: a 2-layer model at 32 x 32 pixels, patches of 8 (17 tokens per frame), 3 frames.
TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)
ARGS = ["--variant", TINY_NAME, "--frames", "3", "--batch", "2", "--labels", "2", "--rounds", "2"]
FP32_TOLERANCE = 1e-4  # the same fp32 math in another engine: rounding differences only


def run_peers(tmp: Path, *extra: str) -> tuple[int, dict]:
    """main() on the tiny variant (registered for the run only); its exit code and JSON record."""
    path = tmp / "peers.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(xclip.VARIANTS, TINY_NAME, TINY)
        code = peers.main([*ARGS, *extra, "--json", str(path)])
    return code, json.loads(path.read_text())


def importorskip_engine(name: str) -> None:
    """Skip, with importorskip's reason, unless every package ``name`` needs imports."""
    for module in peers.MODULES[name]:
        pytest.importorskip(module)


@pytest.fixture(scope="module")
def fp32_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict]]:
    """One fp32 run with every peer (those not installed get their row and nothing else)."""
    yield run_peers(tmp_path_factory.mktemp("fp32"))


def test_record_says_where_and_with_what_it_ran(fp32_run):
    code, record = fp32_run
    assert code == 0
    assert record["command"].startswith("python -m benchmarks.peers --variant peers-tiny")
    for key in ("device", "threads", "torch", "python", "date", "THP_MEM_ALLOC_ENABLE"):
        assert record[key] not in (None, "")
    assert (record["variant"], record["frames"], record["batch"], record["labels"], record["dtype"]) == (
        TINY_NAME, 3, 2, 2, "float32")
    assert record["cpu_bf16_flags"] == peers.cpu_bf16_flags()
    assert record["native_bf16"] == bool(record["cpu_bf16_flags"])
    assert set(record["versions"]) == set(peers.VERSIONED) and record["versions"]["torch"]
    assert list(record["engines"]) == ["ours", *peers.PEERS]


def test_ours_is_the_baseline(fp32_run):
    ours = fp32_run[1]["engines"]["ours"]
    assert ours["status"] == "ok" and ours["max_abs_logit_diff"] == 0.0 and ours["ours_over_engine"] == 1.0
    assert len(ours["seconds"]) == 2 and ours["clips_per_s"] > 0


@pytest.mark.parametrize("name", peers.PEERS)
def test_peer_matches_ours_in_fp32(fp32_run, name):
    importorskip_engine(name)
    row = fp32_run[1]["engines"][name]
    assert row["status"] == "ok", row["status"]
    assert row["max_abs_logit_diff"] < FP32_TOLERANCE
    assert row["clips_per_s"] > 0 and row["ours_over_engine"] > 0 and len(row["seconds"]) == 2
    assert row["version"]
    if name == "openvino":  # f32 asked for explicitly: its default on a bf16 CPU is bf16
        assert row["settings"]["inference_precision"] == "f32"
    if name in ("onnxruntime", "openvino"):
        threads = row["settings"].get("intra_op_num_threads", row["settings"].get("inference_num_threads"))
        assert threads == fp32_run[1]["threads"]


def test_missing_peers_are_rows_not_errors(tmp_path, monkeypatch):
    for module in ("onnxruntime", "openvino", "onnxscript"):
        monkeypatch.setitem(sys.modules, module, None)  # `import` of these now raises ImportError
    code, record = run_peers(tmp_path)
    assert code == 0
    for name in ("onnxruntime", "openvino"):
        row = record["engines"][name]
        assert row["status"].startswith("not installed (pip install ") and name in row["status"]
        assert "onnxscript" in row["status"] and "clips_per_s" not in row
    assert record["engines"]["hf"]["status"] == "ok"


def test_a_failing_peer_is_a_row_and_the_exit_code(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("engine broke\n(a long traceback-like tail)")

    monkeypatch.setattr(peers, "_hf_engine", broken)
    code, record = run_peers(tmp_path, "--peers", "hf")
    assert code == 1
    assert record["engines"]["hf"]["status"] == "failed: RuntimeError: engine broke"
    assert record["engines"]["ours"]["status"] == "ok" and record["engines"]["ours"]["clips_per_s"] > 0


def test_bfloat16_runs_openvino_in_bf16_and_says_onnxruntime_cannot(tmp_path):
    code, record = run_peers(tmp_path, "--dtype", "bfloat16", "--peers", "openvino", "onnxruntime")
    assert code == 0 and record["dtype"] == "bfloat16"
    assert list(record["engines"]) == ["ours", "onnxruntime", "openvino"]  # table order, not flag order
    ort_row = record["engines"]["onnxruntime"]
    assert ort_row["status"].startswith(("not run: ONNX Runtime has no bf16", "not installed"))
    assert "clips_per_s" not in ort_row
    importorskip_engine("openvino")
    row = record["engines"]["openvino"]
    assert row["status"] == "ok" and row["settings"]["inference_precision"] == "bf16"
    # Both sides round to bf16 (8 bits of mantissa) in different places: close, not equal.
    assert math.isfinite(row["max_abs_logit_diff"]) and row["max_abs_logit_diff"] < 0.5


@pytest.mark.parametrize("argv, flag", [
    (["--dtype", "float16"], "--dtype"),
    (["--peers", "tensorrt"], "--peers"),
    (["--rounds", "0"], "--rounds"),
    (["--batch", "0"], "--batch"),
])
def test_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        peers.parse_args(argv)
    assert info.value.code == 2 and flag in capsys.readouterr().err
