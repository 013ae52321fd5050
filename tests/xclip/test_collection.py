"""xclip.collection (``classify --output``, ``embed``): a collection of synthetic videos gives
the per-file classify's answers, survives kill -9 and resumes with every video once, splits
over two torchrun processes, records bad files, computes accuracy and writes embeddings."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import xclip
from video_helpers import write_video
from xclip import classify as xc
from xclip import collection
from xclip import video as xv
from xclip.cli import main
from xclip_kernels import gemm

pytest.importorskip("av")

REPO_ROOT = Path(__file__).resolve().parents[2]
TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)
LABELS = ["archery", "bowling", "playing the violin", "surfing water", "skiing", "juggling"]
LABEL_ARG = ",".join(LABELS)
TORCHRUN_VARIABLES = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    xclip.build_model(TINY).save(str(path))
    return path


@pytest.fixture(scope="module")
def model(checkpoint) -> xclip.XCLIP:
    return xclip.load_checkpoint(checkpoint).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """Five small videos (one in a sub-folder, one .MKV), a text file named .mp4 and files the
    folder search must skip (hidden, not a video)."""
    root = tmp_path_factory.mktemp("videos")
    (root / "sub").mkdir()
    g = torch.Generator().manual_seed(5)
    for name, (n, h, w) in {
        "a.mp4": (9, 48, 64), "b.MKV": (7, 64, 40), "c.mp4": (12, 40, 40), "sub/d.mp4": (5, 48, 48),
        "sub/e.avi": (6, 32, 56),
    }.items():
        write_video(root / name, torch.randint(0, 256, (n, h, w, 3), generator=g, dtype=torch.uint8))
    (root / "bad.mp4").write_text("not a video\n" * 20)
    (root / ".hidden.mp4").write_text("skipped")
    (root / "notes.txt").write_text("skipped")
    return root


def videos(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mp4", ".mkv", ".avi") and p.name[0] != "." and p.name != "bad.mp4")


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def probabilities(record: dict) -> torch.Tensor:
    """The record's probabilities in LABELS order (top-k = all labels)."""
    by_label = {row["label"]: row["probability"] for row in record["top"]}
    return torch.tensor([by_label[label] for label in LABELS])


def test_results_equal_per_file_classify_and_bad_files_are_recorded(capsys, checkpoint, folder, tmp_path) -> None:
    common = ["--checkpoint", str(checkpoint), "--labels", LABEL_ARG, "--cache-dir", str(tmp_path / "cache"),
              "--top-k", "6", "--views", "2x3"]
    good = videos(folder)
    assert main(["classify", *map(str, good), *common, "--json", "--quiet"]) == 0
    per_file = {r["path"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}

    out = tmp_path / "results.jsonl"
    # Two decode processes, 8 clips a batch: 6 views per file, so batches span files.
    status = main(["classify", str(folder), *common, "--output", str(out), "--workers", "2", "--batch-size", "8"])
    err = capsys.readouterr().err
    assert status == 1  # the bad file
    got = {r["path"]: r for r in records(out)}
    assert set(got) == set(per_file) | {str(folder / "bad.mp4")}  # hidden file and notes.txt not searched
    assert "not a video file" in got[str(folder / "bad.mp4")]["error"]
    assert "6 videos, 1 errors" in err
    for path, expected in per_file.items():
        assert [row["label"] for row in got[path]["top"]] == [row["label"] for row in expected["top"]]
        torch.testing.assert_close(probabilities(got[path]), probabilities(expected), rtol=1e-5, atol=1e-6)

    # Without --resume an existing output is refused (exit 2, nothing written).
    before = out.read_bytes()
    assert main(["classify", str(folder), *common, "--output", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err and out.read_bytes() == before
    # --resume with everything done: nothing decoded, nothing added.
    assert main(["classify", str(folder), *common, "--output", str(out), "--resume", "--workers", "0"]) == 0
    assert "0 videos, 0 errors, 6 already done" in capsys.readouterr().err and out.read_bytes() == before


def test_killed_run_resumes_with_every_video_once(checkpoint, folder, tmp_path) -> None:
    good = [str(p) for p in videos(folder)]
    # A FIFO as the third input: opening it blocks until a writer comes, so the run is
    # certainly mid-way (two results written, the rest not) when it is killed.
    fifo = tmp_path / "blocking.mp4"
    os.mkfifo(fifo)
    inputs = [*good[:2], str(fifo), *good[2:]]
    common = ["--checkpoint", str(checkpoint), "--labels", LABEL_ARG, "--cache-dir", str(tmp_path / "cache"),
              "--top-k", "6", "--workers", "0", "--batch-size", "1", "--quiet"]
    out = tmp_path / "results.jsonl"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
           # This process's GEMM provider: each process times both once and, on a loaded
           # machine, may pick the other one, whose last bits differ from this process's.
           "XCLIP_KERNELS_GEMM": gemm.provider(torch.float32)}
    for key in TORCHRUN_VARIABLES:
        env.pop(key, None)
    proc = subprocess.Popen([sys.executable, "-m", "xclip", "classify", *inputs, *common, "--output", str(out)],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        time.sleep(0.3)  # it is blocked on the FIFO: nothing more can come
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [r["path"] for r in records(out)] == good[:2]
    with open(out, "a") as f:  # and a write torn by the kill
        f.write('{"path": "' + good[2] + '", "top": [{"lab')
    fifo.unlink()
    write_video(fifo, torch.randint(0, 256, (4, 32, 32, 3), generator=torch.Generator().manual_seed(9), dtype=torch.uint8))

    assert main(["classify", *inputs, *common, "--output", str(out), "--resume"]) == 0
    resumed = records(out)
    assert sorted(r["path"] for r in resumed) == sorted(inputs)  # each exactly once, the torn line gone
    clean = tmp_path / "clean.jsonl"
    assert main(["classify", *inputs, *common, "--output", str(clean)]) == 0
    by_path = {r["path"]: r for r in records(clean)}
    for record in resumed:  # the same batches (size 1): the same numbers
        assert record == by_path[record["path"]]


def test_manifest_labels_give_known_accuracy(model, folder, tmp_path) -> None:
    good = videos(folder)[:4]
    features = xc.encode_labels(model, LABELS)
    ranked = []  # each video's labels from the per-file classify, most probable first
    for path in good:
        result = xc.classify_file(model, features, LABELS, str(path), k=len(LABELS))
        ranked.append([label for label, _ in result.top])
    # True labels at ranks 1, 1, 2, 6 of 6: top-1 2/4, top-5 3/4; a labelled bad file: failed.
    truth = [ranked[0][0], ranked[1][0], ranked[2][1], ranked[3][5]]
    manifest = tmp_path / "lists" / "val.csv"
    manifest.parent.mkdir()
    rows = ["path,label", *(f"{os.path.relpath(p, manifest.parent)},{t}" for p, t in zip(good, truth)),
            f"{folder / 'bad.mp4'},{LABELS[0]}"]
    manifest.write_text("\n".join(rows) + "\n")
    items = collection.collect_inputs([], manifest)
    assert [i.path for i in items[:4]] == [os.path.join(manifest.parent, os.path.relpath(p, manifest.parent)) for p in good]
    summary = collection.classify_collection(model, LABELS, features, items, tmp_path / "r.jsonl", k=1, batch_size=2)
    assert summary.accuracy == {"top1": 0.5, "top5": 0.75, "labelled": 4, "failed": 1}
    assert summary.videos == 5 and summary.errors == 1
    assert [r.get("rank") for r in records(tmp_path / "r.jsonl")] == [1, 1, 2, 6, None]

    with pytest.raises(ValueError, match="not one of the 6 labels"):
        collection.classify_collection(model, LABELS, features, [collection.Item(str(good[0]), "diving")], tmp_path / "x")


def test_decoding_in_process_uses_one_torch_thread_and_gives_the_threads_back(monkeypatch, folder) -> None:
    # Per-frame resizes on torch's intra-op threads cost several times their CPU time; the
    # model's batches between two files still get every thread.
    seen = []
    monkeypatch.setattr(collection, "load_views", lambda *a, **k: seen.append((torch.get_num_threads(), k["threads"])))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        dataset = collection.ViewsDataset([collection.Item(str(videos(folder)[0]))], TINY.num_frames, TINY.image_size)
        assert dataset[0]["error"] is None
        assert seen == [(1, 0)]  # one torch thread; FFmpeg's own (0: one per core), the model waiting meanwhile
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_a_decode_worker_builds_its_views_in_shared_memory(monkeypatch, folder) -> None:
    # Sent to the main process as a handle (no copy into a new segment); in process there is
    # no one to send to, so ordinary memory.
    dataset = collection.ViewsDataset([collection.Item(str(videos(folder)[0]))], TINY.num_frames, TINY.image_size)
    in_process = dataset[0]["views"]
    assert not in_process.is_shared()
    monkeypatch.setattr(collection, "get_worker_info", lambda: object())
    in_worker = dataset[0]["views"]
    assert in_worker.is_shared()
    torch.testing.assert_close(in_worker, in_process, rtol=0, atol=0)


def test_manifest_formats_and_errors(tmp_path) -> None:
    (tmp_path / "list.txt").write_text("# a comment\na.mp4\n\n/abs/b.mp4\n")
    (tmp_path / "list.jsonl").write_text('{"path": "a.mp4", "label": "x"}\n\n{"path": "b.mp4"}\n')
    assert collection.read_manifest(tmp_path / "list.txt") == [
        collection.Item(str(tmp_path / "a.mp4")), collection.Item("/abs/b.mp4")]
    assert collection.read_manifest(tmp_path / "list.jsonl") == [
        collection.Item(str(tmp_path / "a.mp4"), "x"), collection.Item(str(tmp_path / "b.mp4"))]
    (tmp_path / "nopath.csv").write_text("file,label\na.mp4,x\n")
    with pytest.raises(ValueError, match="'path' column"):
        collection.read_manifest(tmp_path / "nopath.csv")
    (tmp_path / "bad.jsonl").write_text('{"path": "a.mp4"}\n["b.mp4"]\n')
    with pytest.raises(ValueError, match="line 2"):
        collection.read_manifest(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="videos: expected at least one"):
        collection.collect_inputs([tmp_path])  # a folder without videos


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_torchrun_processes_give_the_single_process_results(capsys, checkpoint, folder, tmp_path) -> None:
    common = ["--checkpoint", str(checkpoint), "--labels", LABEL_ARG, "--cache-dir", str(tmp_path / "cache"),
              "--top-k", "6", "--workers", "0", "--batch-size", "2", "--quiet"]
    single = tmp_path / "single.jsonl"
    assert main(["classify", str(folder), *common, "--output", str(single)]) == 1
    two = tmp_path / "two.jsonl"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    for key in TORCHRUN_VARIABLES:
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(_free_port()), "-m", "xclip", "classify", str(folder), *common, "--output", str(two)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-4000:]  # the bad file, on one of the ranks
    assert not list(tmp_path.glob("two.jsonl.part-*"))  # merged by rank 0 and removed
    # One settings file (rank 0's), the same as the single process's.
    assert (tmp_path / "two.jsonl.settings.json").read_text() == (tmp_path / "single.jsonl.settings.json").read_text()
    merged, expected = records(two), records(single)
    assert sorted(r["path"] for r in merged) == sorted(r["path"] for r in expected)
    assert [r["path"] for r in merged] == [str(p) for p in collection.find_videos(folder)]  # input order
    by_path = {r["path"]: r for r in expected}
    for record in merged:
        if "error" in record:
            assert record == by_path[record["path"]]
        else:
            torch.testing.assert_close(probabilities(record), probabilities(by_path[record["path"]]), rtol=1e-5, atol=1e-6)


def test_embed_writes_shards_index_and_text_and_resumes(capsys, checkpoint, model, folder, tmp_path) -> None:
    out = tmp_path / "emb"
    status = main(["embed", str(folder), "--checkpoint", str(checkpoint), "--labels", LABEL_ARG, "--output", str(out),
                   "--workers", "0", "--batch-size", "3", "--shard-size", "2", "--views", "2", "--quiet"])
    assert status == 1  # bad.mp4
    index = records(out / collection.INDEX)
    errors = [r for r in index if "error" in r]
    assert [r["path"] for r in errors] == [str(folder / "bad.mp4")]
    rows = {r["path"]: r for r in index if "error" not in r}
    assert set(rows) == {str(p) for p in videos(folder)}
    from safetensors import safe_open

    for path, record in rows.items():
        with safe_open(str(out / record["shard"]), framework="pt") as f:
            row = f.get_tensor("video")[record["row"]]
            assert json.loads(f.metadata()["paths"])[record["row"]] == path
        views = xv.load_views(path, TINY.num_frames, TINY.image_size, num_clips=2)
        with torch.no_grad():
            expected = model.encode_video(views).mean(dim=0)
        torch.testing.assert_close(row, expected, rtol=1e-5, atol=1e-5)
    with safe_open(str(out / collection.TEXT), framework="pt") as f:
        assert json.loads(f.metadata()["labels"]) == LABELS
        torch.testing.assert_close(f.get_tensor("text"), xc.encode_labels(model, LABELS))

    # An interruption after the first shard: its index lines stay, the next shard's are gone
    # (and its file orphaned). Resume re-does exactly the missing videos.
    first = index[0]["shard"] if "shard" in index[0] else next(r["shard"] for r in index if "shard" in r)
    kept = [r for r in index if r.get("shard") == first]
    (out / collection.INDEX).write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"path": "torn')
    summary = xclip.embed(model, [folder], out, resume=True, num_clips=2, batch_size=3, shard_size=2)
    assert summary.skipped == len(kept) and summary.videos == 6 - len(kept)
    again = records(out / collection.INDEX)
    assert sorted(r["path"] for r in again) == sorted(r["path"] for r in index)
    referenced = {r["shard"] for r in again if "shard" in r}
    assert referenced == {p.name for p in out.glob("video-*.safetensors")}  # no orphan left

    # Resuming with other views stops before anything in the folder changes (labels are no
    # setting of embed: its rows do not depend on them).
    assert json.loads((out / "index.jsonl.settings.json").read_text())["settings"]["views"] == [2, 1]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(collection.SettingsError, match=r"views \(clips x crops\): 2x1 there, 1x1 now"):
        xclip.embed(model, [folder], out, labels=LABELS[:2], resume=True, num_clips=1)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_resume_with_other_settings_fails_naming_the_setting(capsys, checkpoint, model, folder, tmp_path) -> None:
    good = videos(folder)
    features = xc.encode_labels(model, LABELS)
    out = tmp_path / "r.jsonl"
    collection.classify_collection(model, LABELS, features, good[:2], out, k=3, batch_size=2)
    settings = json.loads((tmp_path / "r.jsonl.settings.json").read_text())["settings"]
    assert settings["labels"] == LABELS and settings["top_k"] == 3 and settings["views"] == [1, 1]
    assert settings["weights"] == collection.model_digest(model) and settings["model"]["num_frames"] == TINY.num_frames
    before = out.read_bytes()

    other_labels = [*LABELS[:2], "cooking", *LABELS[3:]]
    torch.manual_seed(1)
    other_weights = xclip.build_model(TINY).eval()  # the same config, other weights
    more_frames = xclip.build_model(dataclasses.replace(TINY, num_frames=4)).eval()
    cases = [
        (dict(labels=other_labels), "labels: label 3 is 'playing the violin' there, 'cooking' now"),
        (dict(labels=LABELS[:5]), r"labels: label 6 is 'juggling' there, none now \(6 labels there, 5 now\)"),
        (dict(k=2), "top-k: 3 there, 2 now"),
        (dict(num_clips=2), r"views \(clips x crops\): 1x1 there, 2x1 now"),
        (dict(allow_short=True), "allow-short: False there, True now"),
        (dict(model=other_weights), r"checkpoint weights: sha256 [0-9a-f]{12}\.\.\. there, sha256 [0-9a-f]{12}\.\.\. now"),
        (dict(model=more_frames), "model config num_frames: 3 there, 4 now"),
    ]
    for change, message in cases:
        run = {"model": model, "labels": LABELS, "k": 3, **change}
        run_model, run_labels = run.pop("model"), run.pop("labels")
        with pytest.raises(collection.SettingsError, match=message):
            collection.classify_collection(
                run_model, run_labels, xc.encode_labels(run_model, run_labels), good[:3], out, resume=True, **run
            )
        assert out.read_bytes() == before and not list(tmp_path.glob("r.jsonl.part-*"))  # nothing written

    # The same settings (other batch size and workers are not settings): resumes.
    summary = collection.classify_collection(model, LABELS, features, good[:3], out, k=3, resume=True, batch_size=1)
    assert summary.skipped == 2 and summary.videos == 1

    # From the command line: exit 2, one line naming the setting and both values.
    common = ["--checkpoint", str(checkpoint), "--cache-dir", str(tmp_path / "cache"), "--top-k", "3", "--quiet",
              "--workers", "0", "--output", str(out), "--resume"]
    before = out.read_bytes()
    assert main(["classify", *map(str, good[:3]), "--labels", ",".join(other_labels), *common]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("xclip classify: error: resume: ")
    assert "label 3 is 'playing the violin' there, 'cooking' now" in err and out.read_bytes() == before
    assert main(["classify", *map(str, good[:4]), "--labels", LABEL_ARG, *common]) == 0  # as written: resumes
    assert [r["path"] for r in records(out)] == [str(p) for p in good[:4]]


def test_resume_of_an_output_without_recorded_settings_warns_and_records_them(
    capsys, checkpoint, model, folder, tmp_path
) -> None:
    good = videos(folder)
    features = xc.encode_labels(model, LABELS)
    out = tmp_path / "r.jsonl"
    collection.classify_collection(model, LABELS, features, good[:2], out, k=2)
    sidecar = tmp_path / "r.jsonl.settings.json"
    recorded = sidecar.read_text()
    sidecar.unlink()  # as an output written before settings were recorded

    warned: list[str] = []
    summary = collection.classify_collection(model, LABELS, features, good[:3], out, k=2, resume=True,
                                             on_warning=warned.append)
    assert summary.skipped == 2 and summary.videos == 1
    assert len(warned) == 1 and "records no settings" in warned[0] and "2 results are kept unchecked" in warned[0]
    assert sidecar.read_text() == recorded  # this run's settings, recorded from now on
    with pytest.raises(collection.SettingsError, match="top-k: 2 there, 1 now"):
        collection.classify_collection(model, LABELS, features, good[:3], out, k=1, resume=True)
    with pytest.warns(UserWarning, match="records no settings"):  # without on_warning: a Python warning
        sidecar.unlink()
        collection.classify_collection(model, LABELS, features, good[:3], out, k=2, resume=True)
    sidecar.unlink()  # the command line prints it, --quiet or not, and goes on
    assert main(["classify", *map(str, good[:4]), "--checkpoint", str(checkpoint), "--labels", LABEL_ARG, "--top-k", "2",
                 "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--quiet", "--output", str(out), "--resume"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("xclip classify: warning: resume: ") and "3 results are kept unchecked" in err
    assert len(records(out)) == 4 and sidecar.read_text() == recorded

    sidecar.write_text('{"format": 1}')
    with pytest.raises(ValueError, match="r.jsonl.settings.json: expected settings of format 1"):
        collection.classify_collection(model, LABELS, features, good[:3], out, k=2, resume=True)

    # Results removed, settings left: they protect nothing and are replaced. A new folder is made.
    out.unlink()
    collection.classify_collection(model, LABELS, features, good[:1], out, k=1, resume=True)
    assert json.loads(sidecar.read_text())["settings"]["top_k"] == 1
    nested = tmp_path / "new" / "folder" / "r.jsonl"
    collection.classify_collection(model, LABELS, features, good[:1], nested, k=1)
    assert json.loads((nested.parent / "r.jsonl.settings.json").read_text())["settings"]["top_k"] == 1
