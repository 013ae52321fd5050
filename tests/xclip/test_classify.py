"""``python -m xclip classify``: zero-shot classification of real (synthetic) video files end to
end with a tiny checkpoint: output format and values against the model run directly, multi-view
averaging, the text-feature cache, per-file errors, the progress bar and argument errors."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import xclip
from video_helpers import write_resolution_change, write_video
from xclip import classify as xc
from xclip import cli
from xclip import text_cache as tc
from xclip import video as xv
from xclip.cli import main, parse_views
from xclip.labels import parse_labels

pytest.importorskip("av")

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)
LABELS = ["archery", "bowling", "playing the violin", "surfing water"]
LABEL_ARG = ",".join(LABELS)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    xclip.build_model(TINY).save(str(path))
    return path


@pytest.fixture(scope="module")
def model(checkpoint) -> xclip.XCLIP:
    return xclip.load_checkpoint(checkpoint)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Two good videos (MP4 and Matroska, different sizes), a 2-frame video (T is 3), a text
    file named .mp4, a directory, and a path that does not exist."""
    root = tmp_path_factory.mktemp("videos")
    g = torch.Generator().manual_seed(5)
    out = {
        "a": root / "a.mp4",
        "b": root / "b clip.mkv",
        "short": root / "short.mp4",
        "text": root / "notes.mp4",
        "dir": root / "folder.mp4",
        "missing": root / "missing.mp4",
    }
    write_video(out["a"], torch.randint(0, 256, (20, 48, 64, 3), generator=g, dtype=torch.uint8))
    write_video(out["b"], torch.randint(0, 256, (12, 64, 40, 3), generator=g, dtype=torch.uint8))
    write_video(out["short"], torch.randint(0, 256, (2, 48, 64, 3), generator=g, dtype=torch.uint8))
    out["text"].write_text("not a video at all\n" * 50)
    out["dir"].mkdir()
    return out


def expected_probabilities(
    model: xclip.XCLIP, path: Path, clips: int = 1, crops: int = 1, allow_short: bool = False
) -> torch.Tensor:
    """The model run directly: softmax over the labels per view, mean over views."""
    views = xv.load_views(
        path, TINY.num_frames, TINY.image_size, num_clips=clips, num_crops=crops, allow_short=allow_short
    )
    with torch.no_grad():
        logits = model(views, xclip.tokenize(LABELS))
    return logits.softmax(dim=-1).mean(dim=0)


def run(capsys, *args: object) -> tuple[int, str, str]:
    status = main(["classify", *(str(a) for a in args)])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def parse_text(out: str) -> list[tuple[str, list[tuple[float, str]]]]:
    """Blocks of the text format: a path line, then ``  probability  label`` lines."""
    blocks: list[tuple[str, list[tuple[float, str]]]] = []
    for line in out.splitlines():
        if line.startswith("  "):
            probability, label = line.strip().split("  ", 1)
            blocks[-1][1].append((float(probability), label))
        else:
            blocks.append((line, []))
    return blocks


def parse_json(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines()]


# -- end to end ---------------------------------------------------------------------------------


def test_text_output_top_k_per_file_in_order(capsys, checkpoint, model, files, tmp_path) -> None:
    common = ("--checkpoint", checkpoint, "--labels", LABEL_ARG, "--cache-dir", tmp_path)
    status, out, err = run(capsys, files["a"], files["b"], *common)
    assert status == 0, err
    blocks = parse_text(out)
    assert [path for path, _ in blocks] == [str(files["a"]), str(files["b"])]
    for (path, rows), video in zip(blocks, (files["a"], files["b"])):
        assert len(rows) == len(LABELS)  # default top-k: 5, or fewer labels
        probabilities = [p for p, _ in rows]
        assert probabilities == sorted(probabilities, reverse=True)
        assert sorted(label for _, label in rows) == sorted(LABELS)
        assert sum(probabilities) <= 1 + 4 * 5e-5  # printed with 4 decimals
        expected = expected_probabilities(model, video)
        for p, label in rows:
            assert abs(p - float(expected[LABELS.index(label)])) <= 5e-5 + 1e-6, (label, p, expected)
    # The two files get different answers (the video matters).
    assert blocks[0][1] != blocks[1][1]

    status, out, _ = run(capsys, files["a"], *common, "--top-k", 2)
    (path, rows), = parse_text(out)
    assert status == 0 and len(rows) == 2 and rows == blocks[0][1][:2]


def test_json_output_and_multi_view_averaging(capsys, checkpoint, model, files, tmp_path) -> None:
    common = ("--checkpoint", checkpoint, "--labels", LABEL_ARG, "--cache-dir", tmp_path, "--json", "--quiet")
    status, out, err = run(capsys, files["a"], files["b"], *common, "--views", "2x3")
    assert status == 0 and err == ""
    results = parse_json(out)
    assert [r["path"] for r in results] == [str(files["a"]), str(files["b"])]
    for result, video in zip(results, (files["a"], files["b"])):
        probabilities = [row["probability"] for row in result["top"]]
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
        expected = expected_probabilities(model, video, clips=2, crops=3)
        got = torch.tensor([probabilities[[row["label"] for row in result["top"]].index(label)] for label in LABELS])
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    single = expected_probabilities(model, files["a"])
    assert not torch.allclose(single, expected_probabilities(model, files["a"], clips=2, crops=3), atol=1e-4)
    # --views 6 and --clips 2 --crops 3 are the same 2 clips x 3 crops.
    assert run(capsys, files["a"], files["b"], *common, "--views", "6")[1] == out
    assert run(capsys, files["a"], files["b"], *common, "--clips", "2", "--crops", "3")[1] == out


def test_labels_file_gives_the_same_answers(capsys, checkpoint, files, tmp_path) -> None:
    labels_file = tmp_path / "labels.txt"
    labels_file.write_text("\n".join(["", *LABELS[:2], "   ", *LABELS[2:], ""]) + "\n", encoding="utf-8")
    common = ("--checkpoint", checkpoint, "--cache-dir", tmp_path / "cache", "--json")
    by_file = run(capsys, files["a"], *common, "--labels-file", labels_file)
    by_arg = run(capsys, files["a"], *common, "--labels", LABEL_ARG)
    assert by_file[0] == by_arg[0] == 0 and by_file[1] == by_arg[1]


def test_real_entry_point_in_a_subprocess(checkpoint, files, tmp_path) -> None:
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    result = subprocess.run(
        [sys.executable, "-m", "xclip", "classify", str(files["a"]), "--checkpoint", str(checkpoint),
         "--labels", LABEL_ARG, "--top-k", "3", "--json"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    (record,) = parse_json(result.stdout)
    assert record["path"] == str(files["a"]) and len(record["top"]) == 3
    probabilities = [row["probability"] for row in record["top"]]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1 + 1e-6
    # The default cache directory honours XDG_CACHE_HOME.
    assert len(list((tmp_path / "xdg" / "xclip").glob("text-*.safetensors"))) == 1


def test_help(capsys) -> None:
    for argv in (["--help"], ["classify", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "classify" in out and "--labels-file" in out and "--views" in out and "4x3" in out


# -- the text-feature cache ---------------------------------------------------------------------


def test_text_features_are_cached_on_disk_and_invalidated(capsys, monkeypatch, checkpoint, files, tmp_path) -> None:
    calls: list[int] = []
    original = xclip.XCLIP.encode_text

    def counting(self, text):
        calls.append(text.shape[0])
        return original(self, text)

    monkeypatch.setattr(xclip.XCLIP, "encode_text", counting)
    cache = tmp_path / "cache"
    ckpt = tmp_path / "ckpt.safetensors"
    ckpt.write_bytes(checkpoint.read_bytes())

    def classify(labels: list[str], *extra: object, videos: tuple[Path, ...] = (files["a"],)) -> tuple[str, str]:
        calls.clear()
        args = ("--checkpoint", ckpt, "--labels", ",".join(labels), "--cache-dir", cache, "--json", *extra)
        status, out, err = run(capsys, *videos, *args)
        assert status == 0, err
        return out, err

    _, err = classify(LABELS, videos=(files["a"], files["b"]))
    assert calls == [len(LABELS)]  # once for the run, not once per file
    assert "encoded and saved to" in err
    assert len(list(cache.glob("text-*.safetensors"))) == 1
    first, err = classify(LABELS, "--no-cache")
    assert calls == [len(LABELS)] and "text features" not in err

    second, err = classify(LABELS)
    assert calls == [] and "read from" in err and second == first  # a hit gives the same answers
    assert len(list(cache.glob("text-*.safetensors"))) == 1  # --no-cache wrote nothing

    classify(list(reversed(LABELS)))  # the order is part of the key
    assert calls == [len(LABELS)]
    classify(LABELS[:3] + ["skiing"])  # a changed label
    assert calls == [len(LABELS)]
    assert len(list(cache.glob("text-*.safetensors"))) == 3
    classify(LABELS[:3] + ["skiing"])
    assert calls == []

    stat = ckpt.stat()  # the same weights with a new modification time: still a hit (the key is the content)
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert classify(LABELS)[0] == first and calls == []
    torch.manual_seed(1)  # other weights at the same path, same size and mtime: a miss
    xclip.build_model(TINY).save(str(ckpt))
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert classify(LABELS)[0] != first and calls == [len(LABELS)]
    ckpt.write_bytes(checkpoint.read_bytes())

    for cached in cache.glob("text-*.safetensors"):  # a damaged cache file is a miss, rewritten
        cached.write_bytes(b"\x00garbage")
    classify(LABELS)
    assert calls == [len(LABELS)]
    classify(LABELS)
    assert calls == []

    before = sorted(p.name for p in cache.iterdir())
    out, err = classify(LABELS, "--no-cache")
    assert calls == [len(LABELS)] and out == first and sorted(p.name for p in cache.iterdir()) == before


def test_cache_key_depends_on_weights_and_exact_labels(model) -> None:
    weights = tc.weights_digest(model)
    assert len(weights) == 64 and weights == tc.weights_digest(model)
    key = tc.cache_key(weights, LABELS, 77)
    assert key == tc.cache_key(tc.weights_digest(model), list(LABELS), 77)
    assert key != tc.cache_key(weights, LABELS[:-1], 77)
    assert key != tc.cache_key(weights, [*LABELS[:-1], LABELS[-1] + " "], 77)
    assert key != tc.cache_key(weights, LABELS, 76)
    assert key != tc.cache_key(weights[::-1], LABELS, 77)


# -- bad files ----------------------------------------------------------------------------------


def test_bad_files_are_reported_and_the_others_still_run(capsys, checkpoint, files, tmp_path) -> None:
    order = ["missing", "a", "text", "short", "dir", "b"]
    common = ("--checkpoint", checkpoint, "--labels", LABEL_ARG, "--cache-dir", tmp_path)
    status, out, err = run(capsys, *(files[name] for name in order), *common)
    assert status == 1
    assert [path for path, _ in parse_text(out)] == [str(files["a"]), str(files["b"])]
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 4
    assert f"path: no such file: {files['missing']}" in errors[0]
    assert f"{files['text']} is not a video file that FFmpeg can read" in errors[1]
    assert f"{files['short']} has 2 frames, fewer than the model's num_frames = 3" in errors[2]
    assert "--allow-short" in errors[2]
    assert f"expected a video file, got a directory: {files['dir']}" in errors[3]
    assert "4 of 6 files failed" in err

    status, out, err = run(capsys, files["a"], files["short"], *common, "--allow-short", "--json")
    assert status == 0, err
    results = parse_json(out)
    assert [r["path"] for r in results] == [str(files["a"]), str(files["short"])]
    expected = expected_probabilities(xclip.load_checkpoint(checkpoint), files["short"], allow_short=True)
    top = results[1]["top"][0]
    torch.testing.assert_close(torch.tensor(top["probability"]), expected.max(), rtol=1e-5, atol=1e-6)
    assert top["label"] == LABELS[int(expected.argmax())]


def test_a_file_that_changes_resolution_or_raises_does_not_stop_the_others(
    capsys, monkeypatch, checkpoint, model, files, tmp_path
) -> None:
    """A real stream whose frames change from landscape to portrait is classified (it used to
    end the whole call with an uncaught torch.stack error); any other error while one file is
    decoded or classified is that file's one-line error, and the next files still run."""
    g = torch.Generator().manual_seed(9)
    changing = tmp_path / "changing.ts"
    write_resolution_change(changing, [
        torch.randint(0, 256, (5, 48, 64, 3), generator=g, dtype=torch.uint8),
        torch.randint(0, 256, (6, 64, 48, 3), generator=g, dtype=torch.uint8),
    ])
    expected = expected_probabilities(model, changing)
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(files["a"].read_bytes())
    real_load_views = xc.load_views

    def load_views(path, *args, **kwargs):
        if os.fspath(path) == str(broken):
            raise RuntimeError("decoder state lost\nsecond line of detail")
        return real_load_views(path, *args, **kwargs)

    monkeypatch.setattr(xc, "load_views", load_views)
    common = ("--checkpoint", checkpoint, "--labels", LABEL_ARG, "--cache-dir", tmp_path, "--json")
    status, out, err = run(capsys, changing, broken, files["a"], *common)
    assert status == 1
    results = parse_json(out)
    assert [r["path"] for r in results] == [str(changing), str(files["a"])]
    top = results[0]["top"][0]
    assert top["label"] == LABELS[int(expected.argmax())]
    torch.testing.assert_close(torch.tensor(top["probability"]), expected.max(), rtol=1e-5, atol=1e-6)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert errors == [f"xclip classify: error: path: {broken}: RuntimeError: decoder state lost; second line of detail"]
    assert "1 of 3 files failed" in err


def test_a_bad_checkpoint_is_one_clear_error(capsys, files, tmp_path) -> None:
    missing = tmp_path / "nope.pth"
    status, out, err = run(capsys, files["a"], "--checkpoint", missing, "--labels", LABEL_ARG, "--cache-dir", tmp_path)
    assert status == 2 and out == ""  # a usage error: nothing was classified
    assert "error: checkpoint:" in err and "nope.pth" in err and len(err.splitlines()) == 1


def unusable_backends() -> list[str]:
    """Backends that cannot run on the CPU of this machine (triton, cuda, xformers, usually)."""
    from xclip_kernels import get_backend as backend_named

    return [
        name for name in ("triton", "cuda", "xformers")
        if backend_named(name).unavailable_reasons() or "cpu" not in backend_named(name).devices
        or backend_named(name).device_reasons("cpu")
    ]


@pytest.mark.parametrize("backend", ["triton", "cuda", "xformers"])
def test_a_backend_this_machine_cannot_run_is_one_line_exit_2(capsys, checkpoint, files, tmp_path, backend) -> None:
    if backend not in unusable_backends():
        pytest.skip(f"{backend} runs on the CPU here")
    common = ("--checkpoint", checkpoint, "--labels", LABEL_ARG, "--cache-dir", tmp_path)
    status, out, err = run(capsys, files["a"], *common, "--backend", backend)
    assert status == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith(f"xclip classify: error: backend: {backend} cannot run on cpu here: ")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--device", "meta"], "device: expected a device that holds data, such as cpu or cuda:0, got meta"),
        (["--device", "cuda:x"], "device: expected a torch device such as cpu or cuda:0, got 'cuda:x'"),
    ],
)
def test_a_device_that_cannot_compute_is_one_line_exit_2(capsys, checkpoint, files, tmp_path, extra, message) -> None:
    common = ("--checkpoint", checkpoint, "--labels", LABEL_ARG, "--cache-dir", tmp_path)
    status, out, err = run(capsys, files["a"], *common, *extra)
    assert status == 2 and out == ""
    assert err.splitlines() == [f"xclip classify: error: {message}"]


def test_labels_that_are_not_utf8_are_one_line_exit_2(capsys, checkpoint, files, tmp_path) -> None:
    # Python keeps argv bytes that are not UTF-8 as lone surrogates: b"b\xff" arrives as "b\udcff".
    common = ("--checkpoint", str(checkpoint), "--cache-dir", str(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(files["a"]), *common, "--labels", "a,b\udcff"])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert "--labels: expected UTF-8 text, got b'b\\xff'" in line
    labels_file = tmp_path / "labels.txt"
    labels_file.write_bytes(b"archery\nbowl\xffing\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(files["a"]), *common, "--labels-file", str(labels_file)])
    assert exit_info.value.code == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert f"--labels-file: expected UTF-8 text, got byte 0xff at offset 12 of {labels_file}" in line
    # From Python (run_classify), the same check names the label's position.
    with pytest.raises(ValueError, match=r"labels\[1\]: expected UTF-8 text, got b'b\\xff'"):
        cli.run_classify(videos=[str(files["a"])], checkpoint=str(checkpoint), labels=["a", "b\udcff"], use_cache=False)


def test_an_over_long_label_is_one_line_for_cli_users_exit_2(capsys, checkpoint, files, tmp_path) -> None:
    long_label = " ".join(["archery"] * 90)
    common = ("--checkpoint", str(checkpoint), "--cache-dir", str(tmp_path))
    status, out, err = run(capsys, files["a"], *common, "--labels", f"bowling,{long_label}")
    assert status == 2 and out == ""
    (line,) = err.splitlines()
    assert line.startswith("xclip classify: error: label 2 ('archery archery") and line.endswith("shorten it"), line
    assert "truncate=True" not in line  # that advice is for Python callers


def test_usage_errors_print_one_line_and_no_traceback_from_the_real_entry_point(checkpoint, files, tmp_path) -> None:
    cases = [
        ["--device", "meta"],
        ["--labels-file", str(tmp_path / "missing.txt")],
        ["--top-k", "0"],
    ] + [["--backend", name] for name in unusable_backends()[:1]]
    for extra in cases:
        labels = [] if extra[0] == "--labels-file" else ["--labels", LABEL_ARG]
        result = subprocess.run(
            [sys.executable, "-m", "xclip", "classify", str(files["a"]), "--checkpoint", str(checkpoint),
             "--no-cache", *labels, *extra],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
        )
        assert result.returncode == 2, (extra, result.stderr)
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, (extra, result.stderr)
        assert "Traceback" not in result.stderr and "error: " in result.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--backend", "bogus"], "backend: expected one of"),
        (["--device", "cuda:x"], "device: expected a torch device"),
        (["--labels", "a " * 100], "label 1 ("),  # longer than the 77-token context
    ],
)
def test_bad_run_settings_exit_2_and_say_why(capsys, checkpoint, files, tmp_path, extra, message) -> None:
    common = ("--checkpoint", checkpoint, "--labels", LABEL_ARG, "--cache-dir", tmp_path)
    status, out, err = run(capsys, files["a"], *common, *extra)
    assert status == 2 and out == "" and message in err


def test_an_unwritable_cache_costs_only_the_cache(capsys, checkpoint, files, tmp_path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory would be")
    common = ("--checkpoint", checkpoint, "--labels", LABEL_ARG, "--cache-dir", blocker / "cache")
    status, out, err = run(capsys, files["a"], *common)
    assert status == 0 and [path for path, _ in parse_text(out)] == [str(files["a"])]
    assert "warning: text features not cached" in err


# -- progress bar -------------------------------------------------------------------------------


class Terminal:
    """One terminal behind two streams, as a shell gives a command: ``stdout`` and ``stderr``
    are different objects that both report a terminal and write to the same screen."""

    class Stream(io.TextIOBase):
        def __init__(self, received: io.StringIO) -> None:
            self.received = received

        def write(self, text: str) -> int:
            return self.received.write(text)

        def isatty(self) -> bool:
            return True

    def __init__(self) -> None:
        self.received = io.StringIO()
        self.stdout = Terminal.Stream(self.received)
        self.stderr = Terminal.Stream(self.received)

    def text(self) -> str:
        """Everything written to either stream, in order."""
        return self.received.getvalue()


def screen(text: str) -> list[str]:
    """The lines a terminal shows after receiving ``text``: ``\\r`` returns to the start of the
    line, ``\\x1b[K`` erases to its end, ``\\n`` goes to a new line, any other character
    overwrites the one under the cursor; trailing spaces are invisible. Any other escape
    sequence fails (the bar must not move the cursor to other lines)."""
    lines: list[str] = []
    line: list[str] = []
    col = 0
    i = 0
    while i < len(text):
        if text.startswith("\x1b[K", i):
            del line[col:]
            i += 3
            continue
        char = text[i]
        assert char != "\x1b", f"unexpected escape sequence {text[i : i + 8]!r}"
        if char == "\r":
            col = 0
        elif char == "\n":
            lines.append("".join(line).rstrip())
            line, col = [], 0
        else:
            if col < len(line):
                line[col] = char
            else:
                line.append(char)
            col += 1
        i += 1
    return [*lines, "".join(line).rstrip()]


def test_screen_shows_what_a_terminal_would() -> None:
    # The checker of the bar tests must itself catch leftovers and garbling.
    assert screen("\r 50%|#####| 1/2\r" + " " * 15 + "\rresult\n") == ["result", ""]
    assert screen("\r 50%|#####| 1/2\r" + " " * 8 + "\rresult\n") == ["result  ##| 1/2", ""]
    assert screen("\r 50%|#####| 1/2result\n") == [" 50%|#####| 1/2result", ""]
    assert screen("\r 50%|#####| 1/2\r\x1b[Kdone") == ["done"]
    assert screen("\r 50%|#####| 1/2\rok") == ["ok0%|#####| 1/2"]


def test_progress_bar_on_a_terminal_only(checkpoint, files, tmp_path) -> None:
    def classify(stdout: io.TextIOBase, stderr: io.TextIOBase, videos: tuple[Path, ...], **kw: object) -> None:
        status = cli.run_classify(
            videos=[str(v) for v in videos], checkpoint=str(checkpoint), labels=LABELS,
            cache_dir=tmp_path, stdout=stdout, stderr=stderr, **kw,
        )
        assert status == 0

    two = (files["a"], files["b"])
    terminal = Terminal()
    classify(io.StringIO(), terminal.stderr, two)
    shown = terminal.text()
    draws = shown.split("\r")
    # Drawn at every step, naming the file being classified.
    assert any("0/2" in draw and "a.mp4" in draw for draw in draws), draws
    assert any("1/2" in draw and "b clip.mkv" in draw for draw in draws), draws
    assert any("2/2" in draw for draw in draws), draws
    # Erased at the end: the note printed before the bar is all that is left, on an empty line.
    (note,) = [line for line in screen(shown) if line]
    assert note.startswith("xclip classify: text features of 4 labels") and screen(shown)[-1] == ""

    for videos, kw in [(two, {"quiet": True}), ((files["a"],), {}), (two, {"progress": False})]:
        terminal = Terminal()  # quiet, one file (nothing to show progress of), or turned off
        classify(terminal.stdout, terminal.stderr, videos, **kw)
        assert "\r" not in terminal.text(), kw
    classify(io.StringIO(), stderr := io.StringIO(), two)  # not a terminal
    assert "\r" not in stderr.getvalue()
    classify(io.StringIO(), bar := io.StringIO(), two, progress=True)  # forced on
    assert "2/2" in bar.getvalue()


def test_progress_bar_leaves_results_and_errors_intact(checkpoint, files) -> None:
    # stdout and stderr on one terminal, a failing file between two good ones: the screen must
    # show exactly what the same run prints without a bar.
    videos = [str(files["a"]), str(files["missing"]), str(files["b"])]

    def classify(stdout: io.TextIOBase, stderr: io.TextIOBase, **kw: object) -> None:
        status = cli.run_classify(
            videos=videos, checkpoint=str(checkpoint), labels=LABELS, use_cache=False,
            stdout=stdout, stderr=stderr, **kw,
        )
        assert status == 1

    plain = io.StringIO()
    classify(plain, plain)
    plain = plain.getvalue()
    assert "\r" not in plain and plain.count("error:") == 1 and plain.endswith("1 of 3 files failed\n")
    terminal = Terminal()
    classify(terminal.stdout, terminal.stderr)
    assert "3/3" in terminal.text()  # the bar was drawn
    assert screen(terminal.text()) == plain.split("\n")
    # With --json too (one line per result).
    plain_json = io.StringIO()
    classify(plain_json, plain_json, as_json=True)
    terminal = Terminal()
    classify(terminal.stdout, terminal.stderr, as_json=True)
    assert "3/3" in terminal.text() and screen(terminal.text()) == plain_json.getvalue().split("\n")


def test_progress_bar_clears_before_other_output() -> None:
    terminal = Terminal()
    with cli.progress_bar(3, terminal.stderr, enabled=True) as bar:
        bar.set_postfix_str("x.mp4")
        (drawn,) = screen(terminal.text())
        assert "0/3" in drawn and drawn.endswith("x.mp4]")
        cli.write_line(bar, "x.mp4 result", terminal.stdout)  # another stream, the same screen
        first, drawn = screen(terminal.text())
        assert first == "x.mp4 result" and "0/3" in drawn  # the line intact, the bar below it
        bar.update(1)
        assert "1/3" in screen(terminal.text())[-1]
    assert screen(terminal.text()) == ["x.mp4 result", ""]  # closed: nothing left on the line

    silent = Terminal()
    with cli.progress_bar(3, silent.stderr, enabled=False) as off:
        off.set_postfix_str("x")
        cli.write_line(off, "line", silent.stdout)
        off.update(1)
    assert silent.text() == "line\n"
    empty = Terminal()
    with cli.progress_bar(0, empty.stderr, enabled=True) as none:  # no files: no bar
        none.update(0)
    assert empty.text() == ""


def test_progress_bar_fits_the_terminal_width() -> None:
    # A real pseudo-terminal 40 columns wide: a line that wrapped could not be redrawn in place
    # by "\r", so every draw must stay within one row, however long the file name.
    termios = pytest.importorskip("termios")
    import fcntl
    import struct
    import threading

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 40, 0, 0))
    received = bytearray()

    def drain() -> None:  # keeps the pty buffer from filling up and blocking the writer
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the slave side is closed
                return
            if not chunk:
                return
            received.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    with open(slave, "w", encoding="utf-8", closefd=True) as tty:
        assert tty.isatty()
        with cli.progress_bar(2, tty, enabled=True) as bar:
            bar.set_postfix_str("a very long file name of a holiday video " * 3 + ".mp4")
            bar.update(1)
    reader.join(timeout=10)
    os.close(master)
    text = received.decode("utf-8")
    draws = [part for part in text.replace("\n", "\r").split("\r") if part.strip()]
    assert any("1/2" in draw for draw in draws), text
    assert max(len(draw) for draw in draws) < 40, draws
    assert screen(text)[-1] == ""


def test_xclip_imports_without_tqdm_and_the_command_names_it(tmp_path) -> None:
    # tqdm is imported when the command runs, never by `import xclip` (torch.hub imports it
    # when it is installed, so its absence from sys.modules cannot be the check: it is hidden).
    code = (
        "import sys; sys.modules['tqdm'] = None\n"  # makes `import tqdm` raise ImportError
        "import xclip, xclip.video, xclip.labels, xclip.text_cache, xclip.classify, xclip.cli, xclip.__main__\n"
        f"argv = ['classify', 'a.mp4', '--checkpoint', {str(tmp_path / 'x.pth')!r}, '--labels', 'a']\n"
        "sys.exit(xclip.cli.main(argv))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout == "" and "xclip classify: error: " in result.stderr and "pip install tqdm" in result.stderr
    assert "Traceback" not in result.stderr


# -- arguments ----------------------------------------------------------------------------------


def test_label_parsing() -> None:
    assert parse_labels(" archery, bowling ,,playing the violin ") == ["archery", "bowling", "playing the violin"]
    with pytest.raises(ValueError, match=r"labels: expected distinct labels, got repeats of \['a'\]"):
        parse_labels("a,b,a")
    with pytest.raises(ValueError, match="labels: expected at least one label"):
        parse_labels(" , ")


def test_top_k_sorts_and_keeps_label_order_on_ties() -> None:
    probabilities = torch.tensor([0.2, 0.4, 0.2, 0.2])
    expected = [("b", pytest.approx(0.4)), ("a", pytest.approx(0.2)), ("c", pytest.approx(0.2))]
    assert xc.top_k(probabilities, ["a", "b", "c", "d"], 3) == expected
    assert len(xc.top_k(probabilities, ["a", "b", "c", "d"], 10)) == 4


def test_parse_views() -> None:
    assert parse_views("4x3") == (4, 3)
    assert parse_views("12") == (4, 3)
    assert parse_views("3") == (1, 3)
    assert parse_views("4") == (4, 1)
    assert parse_views("1") == (1, 1)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--labels", " , "], "--labels: labels: expected at least one label"),
        (["--labels", "a,a"], "expected distinct labels"),
        (["--labels", "a", "--views", "4x2"], "crops 1 or 3"),
        (["--labels", "a", "--views", "abc"], "CLIPSxCROPS"),
        (["--labels", "a", "--views", "4x3", "--clips", "2"], "--views: not allowed with --clips or --crops"),
        (["--labels", "a", "--crops", "2"], "invalid choice"),
        (["--labels", "a", "--top-k", "0"], "expected an int >= 1, got 0"),
        (["--labels", "a", "--clips", "x"], "expected an int >= 1, got 'x'"),
        ([], "one of the arguments --labels --labels-file is required"),
        (["--labels", "a", "--labels-file", "f"], "not allowed with argument"),
        (["--labels-file", "/nonexistent/labels.txt"], "--labels-file"),
    ],
)
def test_argument_errors_exit_2_and_say_why(capsys, files, checkpoint, extra, message) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(files["a"]), "--checkpoint", str(checkpoint), *extra])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
