"""Checkpoints: ``xclip.load_checkpoint`` on every format (Hugging Face directory, official
``.pth``, our safetensors), ``XCLIP.save``, the conversions of ``xclip.checkpoint``, frame
count changes, and bad or hostile files.

Everything runs on a tiny model (see conftest.py) with non-trivial random weights; the Hugging
Face ``XCLIPModel`` on the same weights is the ground truth for the logits.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import shutil
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import xclip
from xclip.checkpoint import CheckpointError, config_from_hf, config_from_official, hf_to_official


HF_ATOL = 1e-4  # ours vs Hugging Face, float32, different kernels
SAME_ATOL = 1e-6  # the same weights through another file format

# -- helpers ------------------------------------------------------------------------------------
# (Fixtures and the tiny sizes live in conftest.py; nothing is imported from it by name, since
# several conftest.py files under tests/ would all be the module "conftest".)


@torch.no_grad()
def our_logits(model: xclip.XCLIP, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return model(video, text)


@torch.no_grad()
def hf_logits(hf_model, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return hf_model(input_ids=text, pixel_values=video).logits_per_video


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"max abs error {err:.3g} > {atol:g}\nactual\n{actual}\nexpected\n{expected}"


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, f"tensors differ: {different}"


def error_text(info: pytest.ExceptionInfo, path: Path) -> str:
    """The message of a caught error with the checkpoint path blanked out (tmp paths carry
    the test's name, which would match the words the tests look for)."""
    return str(info.value).replace(str(path), "<path>")


def line_with(message: str, word: str) -> str:
    """The first line of ``message`` that contains ``word`` (fails if none)."""
    lines = [line for line in message.splitlines() if word in line]
    assert lines, f"no line mentions {word!r} in:\n{message}"
    return lines[0]


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})


def write_safetensors(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata=metadata)
    return path


def truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


@pytest.fixture
def clean_import_state():
    """Restore sys.path and drop any ``yacs`` module a test put into sys.modules."""
    saved_path = list(sys.path)
    yield
    sys.path[:] = saved_path
    for name in [m for m in sys.modules if m == "yacs" or m.startswith("yacs.")]:
        del sys.modules[name]
    importlib.invalidate_caches()


def forget_module(root: Path, name: str = "yacs") -> None:
    """Make ``name`` unimportable again: off sys.path and out of sys.modules."""
    sys.path[:] = [p for p in sys.path if Path(p) != root]
    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    importlib.invalidate_caches()


# A stand-in for the official training config (a yacs CfgNode, a dict subclass with instance
# attributes), in a throwaway module that exists only while the checkpoint is written.
FAKE_YACS_CONFIG = textwrap.dedent(
    """
    import os

    IMPORTED_MARKER = os.environ.get("XCLIP_TEST_YACS_IMPORTED")
    if IMPORTED_MARKER:
        open(IMPORTED_MARKER, "w").close()


    class CfgNode(dict):
        def __init__(self, init_dict=None, key_list=None, new_allowed=False):
            init_dict = dict(init_dict or {})
            for key, value in init_dict.items():
                if isinstance(value, dict):
                    init_dict[key] = CfgNode(value)
            super().__init__(init_dict)
            self.__dict__["__immutable__"] = False
            self.__dict__["__new_allowed__"] = new_allowed

        def __setstate__(self, state):
            os.system("touch " + os.environ.get("XCLIP_TEST_YACS_RAN", "/nonexistent/ran"))
            self.__dict__.update(state)


    def run(command):
        os.system(command)
    """
)


def make_fake_yacs(root: Path) -> Path:
    package = root / "yacs"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "config.py").write_text(FAKE_YACS_CONFIG)
    return root


class ShellPayload:
    """Unpickling this runs a shell command."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class OpenPayload:
    """Unpickling this calls ``open(marker, "w")``, which creates the file: code without a shell."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# -- Hugging Face directories -------------------------------------------------------------------


def test_hf_directory_safetensors_matches_hf(hf_dir, hf_reference_logits, video, text, tiny_config):
    model = xclip.load_checkpoint(hf_dir)
    assert isinstance(model, xclip.XCLIP)
    assert model.config == tiny_config
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    logits = our_logits(model, video, text)
    assert logits.shape == (2, 3)
    # The comparison means something only if the logits are not all alike.
    assert hf_reference_logits.max() - hf_reference_logits.min() > 0.1
    assert_close(logits, hf_reference_logits, HF_ATOL)


def test_hf_directory_pytorch_model_bin_matches_hf(hf_bin_dir, hf_reference_logits, video, text, tiny_config):
    assert not (hf_bin_dir / "model.safetensors").exists()
    model = xclip.load_checkpoint(hf_bin_dir)
    assert model.config == tiny_config
    assert_close(our_logits(model, video, text), hf_reference_logits, HF_ATOL)


def test_hf_directory_as_str_and_pathlike(hf_dir, loaded):
    assert_same_state(xclip.load_checkpoint(str(hf_dir)), loaded)


@pytest.mark.parametrize(
    "heads",
    [
        # head counts other than width // 64 everywhere (the HF large-model caveat: MIT and
        # prompt heads of 8 where E // 64 says otherwise)
        dict(vision_heads=4, text_heads=2, mit_heads=2, prompt_heads=4),
        dict(vision_heads=1, text_heads=4, mit_heads=8, prompt_heads=2, attn_implementation="eager"),
    ],
    ids=["4-2-2-4", "1-4-8-2-eager"],
)
def test_hf_heads_are_read_from_config(heads, hf_model_factory, tmp_path, video, text):
    hf = hf_model_factory(seed=7, **heads)
    hf.save_pretrained(str(tmp_path))
    model = xclip.load_checkpoint(tmp_path)
    c = model.config
    assert (c.vision_heads, c.text_heads, c.mit_heads, c.prompt_heads) == (
        heads["vision_heads"], heads["text_heads"], heads["mit_heads"], heads["prompt_heads"],
    )
    assert c.embed_dim // 64 == 1  # so the heads above are not what width // 64 would give
    assert_close(our_logits(model, video, text), hf_logits(hf, video, text), HF_ATOL)


@pytest.mark.parametrize(
    "mutation",
    ["swap q and k of vision layer 0", "untransposed text_projection", "zero ln_post.bias", "drop a prompt LN bias"],
)
def test_hf_parity_detects_conversion_slips(mutation, official_state, hf_reference_logits, video, text, tiny_config):
    """Guards the parity tests: the conversion mistakes they exist to catch move the logits
    far beyond HF_ATOL with these random weights."""
    state = {k: v.clone() for k, v in official_state.items()}
    width = tiny_config.vision_width
    if mutation == "swap q and k of vision layer 0":
        key = "visual.transformer.resblocks.0.attn.in_proj_weight"
        w = state[key]
        state[key] = torch.cat([w[width : 2 * width], w[:width], w[2 * width :]])
    elif mutation == "untransposed text_projection":
        state["text_projection"] = state["text_projection"].t().contiguous()
    elif mutation == "zero ln_post.bias":
        state["visual.ln_post.bias"].zero_()
    else:
        state["prompts_generator.decoder.1.norm3.bias"].zero_()
    model = xclip.XCLIP(tiny_config).eval()
    model.load_state_dict(state)
    err = (our_logits(model, video, text) - hf_reference_logits).abs().max().item()
    assert err > 10 * HF_ATOL, f"{mutation}: logits moved only {err:.3g}"


# -- official checkpoints -----------------------------------------------------------------------


def test_official_training_checkpoint(official_pth, loaded, video, text, tiny_config):
    model = xclip.load_checkpoint(official_pth)
    assert model.config == tiny_config
    assert_same_state(model, loaded)
    assert_close(our_logits(model, video, text), our_logits(loaded, video, text), SAME_ATOL)


def test_official_bare_state_dict(official_state, loaded, tmp_path, video, text, tiny_config):
    path = tmp_path / "bare.pt"
    torch.save(official_state, path)
    model = xclip.load_checkpoint(path)
    assert model.config == tiny_config
    assert_same_state(model, loaded)
    assert_close(our_logits(model, video, text), our_logits(loaded, video, text), SAME_ATOL)


def test_official_ddp_prefixed_state_dict(official_state, loaded, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({"model": {f"module.{k}": v for k, v in official_state.items()}}, path)
    assert_same_state(xclip.load_checkpoint(path), loaded)


def test_official_legacy_torch_serialization(official_state, loaded, tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"model": official_state, "epoch": 3}, path, _use_new_zipfile_serialization=False)
    assert_same_state(xclip.load_checkpoint(path), loaded)


def test_official_half_precision_loads_as_float32(official_state, tmp_path):
    path = tmp_path / "fp16.pth"
    torch.save({"model": {k: v.half() for k, v in official_state.items()}}, path)
    model = xclip.load_checkpoint(path)
    assert all(p.dtype == torch.float32 for p in model.state_dict().values())
    assert torch.equal(model.visual.proj, official_state["visual.proj"].half().float())


@pytest.mark.parametrize("keys", ["official", "hf"])
def test_safetensors_without_our_metadata(keys, official_state, hf_model, loaded, tmp_path, tiny_config):
    state = official_state if keys == "official" else dict(hf_model.state_dict())
    path = write_safetensors(tmp_path / f"{keys}.safetensors", state)
    model = xclip.load_checkpoint(path)
    assert model.config == tiny_config
    assert_same_state(model, loaded)


@pytest.mark.parametrize("serialization", ["zip", "legacy"])
def test_official_checkpoint_with_unimportable_training_config(
    serialization, official_state, loaded, tmp_path, monkeypatch, clean_import_state, video, text
):
    """Official checkpoints pickle their yacs CfgNode beside the weights; yacs is usually not
    installed where the model is used. The weights load, and the class is neither imported
    nor run; also from a legacy (pre-zip) file, as the older released checkpoints are."""
    root = make_fake_yacs(tmp_path / "site")
    imported, ran = tmp_path / "yacs-imported", tmp_path / "yacs-ran"
    monkeypatch.setenv("XCLIP_TEST_YACS_IMPORTED", str(imported))
    monkeypatch.setenv("XCLIP_TEST_YACS_RAN", str(ran))
    sys.path.insert(0, str(root))
    from yacs.config import CfgNode  # type: ignore[import-not-found]

    config = CfgNode({"MODEL": {"ARCH": "ViT-B/32", "DROP_PATH_RATE": 0.0}, "DATA": {"NUM_FRAMES": 3}})
    path = tmp_path / "best.pth"
    torch.save(
        {"model": official_state, "config": config, "max_accuracy": 81.5, "epoch": 29},
        path,
        _use_new_zipfile_serialization=serialization == "zip",
    )
    forget_module(root)
    imported.unlink()
    with pytest.raises(ModuleNotFoundError):  # the scenario is real: plain pickle cannot load it
        torch.load(path, weights_only=False)

    model = xclip.load_checkpoint(path)

    assert "yacs" not in sys.modules and "yacs.config" not in sys.modules
    assert not imported.exists() and not ran.exists()
    assert_same_state(model, loaded)
    assert_close(our_logits(model, video, text), our_logits(loaded, video, text), SAME_ATOL)


@pytest.mark.parametrize("serialization", ["zip", "legacy"])
def test_numpy_values_beside_the_weights_load(serialization, official_state, loaded, tmp_path):
    """Training scripts save numpy scalars, arrays and dtypes beside the weights (an
    ``np.int64`` epoch, a best accuracy, a history); they are data, and the file loads."""
    np = pytest.importorskip("numpy")
    path = tmp_path / "numpy-meta.pth"
    torch.save(
        {
            "model": official_state,
            "epoch": np.int64(3),
            "max_accuracy": np.float32(81.5),
            "best": np.float64(0.25),
            "flag": np.bool_(True),
            "history": np.arange(6, dtype=np.float64).reshape(2, 3),
            "names": np.array(["a", "bc"]),
            "dtype": np.dtype(">f2"),
            "dtype_class": type(np.dtype("float32")),
            "scalar_type": np.int16,
        },
        path,
        _use_new_zipfile_serialization=serialization == "zip",
    )
    assert_same_state(xclip.load_checkpoint(path), loaded)


@pytest.mark.parametrize("serialization", ["zip", "legacy"])
@pytest.mark.parametrize("payload", ["numpy.save", "os.system", "builtins.eval"])
def test_callables_beside_numpy_values_are_refused(serialization, payload, official_state, tmp_path):
    """Accepting numpy values must not accept numpy (or any other) functions: a pickle that
    calls ``numpy.save`` (writes a file), ``os.system`` or ``eval`` is refused, in either
    file layout, and nothing runs."""
    np = pytest.importorskip("numpy")
    marker = tmp_path / "pwned.npy"
    call = {
        "numpy.save": (np.save, (str(marker), np.zeros(1))),
        "os.system": (os.system, (f"touch {marker}",)),
        "builtins.eval": (eval, (f"open({str(marker)!r}, 'w')",)),
    }[payload]

    class Payload:
        def __reduce__(self):
            return call

    path = tmp_path / "hostile.pth"
    torch.save(
        {"model": official_state, "epoch": np.int64(3), "extra": Payload()},
        path,
        _use_new_zipfile_serialization=serialization == "zip",
    )
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code"
    assert payload.split(".")[-1] in error_text(info, path)
    torch.load(path, weights_only=False)  # the payload is live
    assert marker.exists()


def test_metadata_module_globals_are_never_imported_or_called(
    official_state, tmp_path, monkeypatch, clean_import_state, tiny_config
):
    """A global under a module the loader treats as training metadata (here yacs, importable
    during the load, whose ``run`` would run a shell command) must neither be imported nor
    called: the load succeeds with the weights or refuses, but runs nothing."""
    root = make_fake_yacs(tmp_path / "site")
    imported, ran = tmp_path / "yacs-imported", tmp_path / "payload-ran"
    monkeypatch.setenv("XCLIP_TEST_YACS_IMPORTED", str(imported))
    sys.path.insert(0, str(root))
    import yacs.config  # type: ignore[import-not-found]

    class Payload:
        def __reduce__(self):
            return (yacs.config.run, (f"touch {ran}",))

    path = tmp_path / "hostile.pth"
    torch.save({"model": official_state, "config": Payload()}, path)
    # Leave yacs importable (on sys.path) but not imported.
    for mod in [m for m in sys.modules if m == "yacs" or m.startswith("yacs.")]:
        del sys.modules[mod]
    imported.unlink()

    try:
        model = xclip.load_checkpoint(path)
    except CheckpointError:
        model = None
    assert not ran.exists(), "the checkpoint ran code"
    assert not imported.exists() and "yacs" not in sys.modules, "the loader imported yacs"
    if model is not None:
        assert model.config == tiny_config
    # The payload is live: unpickling it without restrictions does run it.
    torch.load(path, weights_only=False)
    assert ran.exists()


# -- our own format -----------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path, video, text, tiny_config):
    config = tiny_config.replace(prompt_alpha=0.25, drop_path_rate=0.1, layer_norm_eps=1e-6, vision_mlp_dim=None)
    torch.manual_seed(3)
    model = xclip.build_model(config).eval()
    path = tmp_path / "model.safetensors"
    model.save(str(path))
    again = xclip.load_checkpoint(path)
    assert again.config == config
    assert_same_state(again, model)
    assert torch.equal(our_logits(again, video, text), our_logits(model, video, text))
    _, metadata = read_safetensors(path)
    assert metadata["format"] == "xclip-kernels/1"
    assert xclip.XCLIPConfig.from_dict(json.loads(metadata["config"])) == config


def test_save_of_converted_model_keeps_hf_parity(
    ours_safetensors, loaded, hf_reference_logits, video, text, tiny_config
):
    model = xclip.load_checkpoint(ours_safetensors)
    assert model.config == tiny_config
    assert_same_state(model, loaded)
    assert_close(our_logits(model, video, text), hf_reference_logits, HF_ATOL)


def test_save_accepts_pathlike(loaded, tmp_path):
    path = tmp_path / "pathlike.safetensors"
    loaded.save(path)  # type: ignore[arg-type]
    assert_same_state(xclip.load_checkpoint(path), loaded)


@pytest.fixture
def umask():
    """Sets the process umask for a test (``umask(0o027)``) and restores it after."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def test_save_to_a_missing_folder_names_the_target(loaded, tmp_path):
    path = tmp_path / "no-such-folder" / "model.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        loaded.save(path)
    message = str(info.value)
    assert str(path) in message and "does not exist" in message and ".tmp" not in message, message
    assert not (tmp_path / "no-such-folder").exists()


def test_save_to_a_folder_is_refused(loaded, tmp_path):
    with pytest.raises(IsADirectoryError, match="folder"):
        loaded.save(tmp_path)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077], ids=oct)
def test_saved_file_mode_honours_the_umask(mask, loaded, tmp_path, umask):
    """Like a file from ``open(path, "w")``: mode 0o666 less the umask (safetensors alone
    gives 0o600 whatever the umask)."""
    umask(mask)
    path = tmp_path / "model.safetensors"
    loaded.save(path)
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o666 & ~mask)
    plain = tmp_path / "plain"
    with open(plain, "w"):
        pass
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777


def test_saving_over_a_file_keeps_its_mode(loaded, tmp_path, umask):
    umask(0o022)
    path = tmp_path / "model.safetensors"
    loaded.save(path)
    os.chmod(path, 0o640)
    loaded.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o640


@pytest.mark.parametrize("target_exists", [True, False], ids=["existing", "dangling"])
def test_saving_through_a_symlink_writes_its_target(target_exists, loaded, tmp_path, tiny_config):
    """A link (e.g. ``latest.safetensors`` -> ``runs/epoch-3.safetensors``) stays a link; the
    file it points to gets the new weights."""
    folder = tmp_path / "runs"
    folder.mkdir()
    target = folder / "epoch-3.safetensors"
    if target_exists:
        target.write_bytes(b"old contents")
    link = tmp_path / "latest.safetensors"
    link.symlink_to(target)
    loaded.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert_same_state(xclip.load_checkpoint(target), loaded)
    assert sorted(p.name for p in folder.iterdir()) == ["epoch-3.safetensors"]  # no temporary left


# -- frame counts -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["hf", "official", "ours"])
def test_other_num_frames_needs_interpolate_frames(fmt, checkpoint_paths):
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(checkpoint_paths[fmt], num_frames=5)
    message = error_text(info, checkpoint_paths[fmt])
    assert "num_frames" in message and "interpolate_frames" in message
    assert "T=3" in message and "5" in message


@pytest.mark.parametrize("fmt", ["hf", "official", "ours"])
@pytest.mark.parametrize("new_frames", [1, 2, 5, 8])
def test_interpolate_frames(fmt, new_frames, checkpoint_paths, official_state, text, tiny_config):
    model = xclip.load_checkpoint(checkpoint_paths[fmt], num_frames=new_frames, interpolate_frames=True)
    assert model.config == tiny_config.replace(num_frames=new_frames)
    pos = official_state["mit.positional_embedding"]  # (1, 3, E)
    expected = F.interpolate(pos.transpose(1, 2), size=new_frames, mode="linear", align_corners=False).transpose(1, 2)
    assert model.mit.positional_embedding.shape == (1, new_frames, tiny_config.embed_dim)
    assert_close(model.mit.positional_embedding.detach(), expected, 1e-7)
    # Nothing else changes.
    state = model.state_dict()
    changed = [
        k for k in official_state if k != "mit.positional_embedding" and not torch.equal(state[k], official_state[k])
    ]
    assert not changed
    # And it runs at the new T (and only there).
    g = torch.Generator().manual_seed(5)
    clip = torch.randn(2, new_frames, 3, tiny_config.image_size, tiny_config.image_size, generator=g)
    logits = our_logits(model, clip, text)
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="num_frames"):
        our_logits(model, torch.randn(2, 3, 3, tiny_config.image_size, tiny_config.image_size), text)


def test_interpolate_frames_is_linear_in_time(official_state, tmp_path, tiny_config):
    """3 -> 5 slots without align_corners: slot i samples position (i + 0.5) * 3/5 - 0.5."""
    state = dict(official_state)
    ramp = torch.tensor([0.0, 1.0, 2.0]).view(1, 3, 1)
    state["mit.positional_embedding"] = ramp.expand(1, 3, tiny_config.embed_dim).clone()
    path = tmp_path / "ramp.pt"
    torch.save(state, path)
    model = xclip.load_checkpoint(path, num_frames=5, interpolate_frames=True)
    ramp = model.mit.positional_embedding.detach()[0, :, 0]
    assert_close(ramp, torch.tensor([0.0, 0.4, 1.0, 1.6, 2.0]), 1e-6)


@pytest.mark.parametrize("interpolate_frames", [False, True])
@pytest.mark.parametrize("fmt", ["hf", "official", "ours"])
def test_same_num_frames_is_a_no_op(fmt, interpolate_frames, checkpoint_paths, loaded, tiny_config):
    model = xclip.load_checkpoint(checkpoint_paths[fmt], num_frames=3, interpolate_frames=interpolate_frames)
    assert model.config == tiny_config
    assert_same_state(model, loaded)


@pytest.mark.parametrize("bad", [0, -2, "4", True, 2.5, 3.0])
def test_invalid_num_frames(bad, official_pth):
    with pytest.raises((ValueError, TypeError), match="num_frames"):
        xclip.load_checkpoint(official_pth, num_frames=bad, interpolate_frames=True)


# -- bad checkpoints ----------------------------------------------------------------------------


def test_missing_key_is_listed(official_state, tmp_path):
    state = dict(official_state)
    del state["visual.transformer.resblocks.1.mlp.c_proj.bias"]
    path = tmp_path / "missing.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    message = error_text(info, path)
    line = line_with(message, "missing")
    assert "visual.transformer.resblocks.1.mlp.c_proj.bias" in line
    assert "unexpected" not in message and "shape" not in message


def test_missing_hf_projection_is_named(hf_model, hf_dir, tmp_path):
    state = dict(hf_model.state_dict())
    del state["vision_model.encoder.layers.1.message_attn.k_proj.weight"]
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(tmp_path)
    message = error_text(info, tmp_path)
    assert "visual.transformer.resblocks.1.message_attn.in_proj_weight" in message or (
        "message_attn" in message and "k_proj" in message
    ), message


def test_missing_hf_key_is_listed(hf_model, hf_dir, tmp_path):
    state = dict(hf_model.state_dict())
    del state["vision_model.post_layernorm.bias"]
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    write_safetensors(tmp_path / "model.safetensors", state)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(tmp_path)
    line = line_with(error_text(info, tmp_path), "missing")
    assert "ln_post.bias" in line or "post_layernorm.bias" in line


def test_unexpected_key_is_listed(official_state, tmp_path):
    state = dict(official_state)
    state["visual.extra_head.weight"] = torch.zeros(4, 4)
    path = tmp_path / "extra.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    message = error_text(info, path)
    assert "visual.extra_head.weight" in line_with(message, "unexpected")
    assert "missing" not in message


def test_wrong_shape_names_key_and_both_shapes(official_state, tmp_path):
    state = dict(official_state)
    state["visual.ln_post.weight"] = torch.ones(127)
    path = tmp_path / "shape.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    line = line_with(error_text(info, path), "visual.ln_post.weight")
    assert "(127,)" in line and "(128,)" in line


def test_all_problems_in_one_error(ours_safetensors, tmp_path, tiny_config):
    state, metadata = read_safetensors(ours_safetensors)
    del state["mit.resblocks.0.ln_2.bias"]
    del state["token_embedding.weight"]
    state["prompts_generator.decoder.2.norm1.weight"] = torch.ones(tiny_config.embed_dim)
    state["logit_scale_extra"] = torch.tensor(1.0)
    state["visual.conv1.weight"] = torch.zeros(tiny_config.vision_width, 3, 4, 4)
    state["text_projection"] = torch.zeros(tiny_config.embed_dim, tiny_config.text_width + 1)
    path = write_safetensors(tmp_path / "many.safetensors", state, metadata)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    message = error_text(info, path)
    missing = line_with(message, "missing")
    assert "mit.resblocks.0.ln_2.bias" in missing and "token_embedding.weight" in missing
    unexpected = line_with(message, "unexpected")
    assert "prompts_generator.decoder.2.norm1.weight" in unexpected and "logit_scale_extra" in unexpected
    assert "(128, 3, 4, 4)" in line_with(message, "visual.conv1.weight")
    assert "(128, 3, 8, 8)" in line_with(message, "visual.conv1.weight")
    assert "(64, 65)" in line_with(message, "text_projection") and "(64, 64)" in line_with(message, "text_projection")


def test_hf_config_with_wrong_num_frames(hf_dir, tmp_path):
    """config.json says T=4, the weights were trained at T=3."""
    config = json.loads((hf_dir / "config.json").read_text())
    config["vision_config"]["num_frames"] = 4
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(tmp_path)
    line = line_with(error_text(info, tmp_path), "mit.positional_embedding")
    assert "(1, 3, 64)" in line and "(1, 4, 64)" in line


def test_our_metadata_with_wrong_num_frames(ours_safetensors, tmp_path, tiny_config):
    state, metadata = read_safetensors(ours_safetensors)
    metadata = dict(metadata, config=json.dumps(tiny_config.replace(num_frames=8).to_dict()))
    path = write_safetensors(tmp_path / "t8.safetensors", state, metadata)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    line = line_with(error_text(info, path), "mit.positional_embedding")
    assert "(1, 3, 64)" in line and "(1, 8, 64)" in line


@pytest.mark.parametrize(
    "content",
    [bytes(range(256)) * 64, b"\x00" * 100, b"hello, this is not a checkpoint\n", b""],
    ids=["binary", "zeros", "text", "empty"],
)
def test_unknown_format(content, tmp_path):
    path = tmp_path / "unknown.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a recognised checkpoint"):
        xclip.load_checkpoint(path)


def test_truncated_official_pth(official_pth, tmp_path):
    path = truncate(official_pth, tmp_path / "truncated.pth")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        xclip.load_checkpoint(path)


def test_truncated_our_safetensors(ours_safetensors, tmp_path):
    path = truncate(ours_safetensors, tmp_path / "truncated.safetensors")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        xclip.load_checkpoint(path)


def test_truncated_hf_safetensors(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    truncate(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        xclip.load_checkpoint(tmp_path)


def test_truncated_hf_pytorch_model_bin(hf_bin_dir, tmp_path):
    shutil.copy(hf_bin_dir / "config.json", tmp_path / "config.json")
    truncate(hf_bin_dir / "pytorch_model.bin", tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        xclip.load_checkpoint(tmp_path)


def test_nonexistent_path(tmp_path):
    path = tmp_path / "nowhere" / "k400_32_8.pth"
    with pytest.raises(FileNotFoundError) as info:
        xclip.load_checkpoint(path)
    assert str(path) in str(info.value)


def test_directory_without_config_json(tmp_path, official_pth):
    shutil.copy(official_pth, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="config.json"):
        xclip.load_checkpoint(tmp_path)


def test_hf_directory_without_weights(hf_dir, tmp_path):
    shutil.copy(hf_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(CheckpointError, match="model.safetensors"):
        xclip.load_checkpoint(tmp_path)


def test_hf_directory_with_invalid_config_json(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        xclip.load_checkpoint(tmp_path)


def test_hf_config_json_not_an_object(hf_dir, tmp_path):
    (tmp_path / "config.json").write_text("[]")
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="config.json"):
        xclip.load_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("metadata", "expected"),
    [
        pytest.param(
            {"format": "xclip-kernels/1"},
            CheckpointError,
            id="no-config",
        ),
        pytest.param(
            {"format": "xclip-kernels/1", "config": "{"},
            CheckpointError,
            id="config-not-json",
        ),
        pytest.param(
            {"format": "xclip-kernels/1", "config": {"vision_heads": 0}},
            CheckpointError,
            id="config-invalid",
        ),
        pytest.param(
            {"format": "xclip-kernels/1", "config": {"foo": 1}},
            CheckpointError,
            id="config-unknown-field",
        ),
    ],
)
def test_our_format_with_bad_config_metadata(metadata, expected, ours_safetensors, tmp_path):
    """A file that says it is ours but whose config is missing or broken: an error that says
    what is wrong with the config. A dict in ``metadata["config"]`` is applied to the real config's fields."""
    if isinstance(metadata.get("config"), dict):
        _, good = read_safetensors(ours_safetensors)
        metadata = dict(metadata, config=json.dumps({**json.loads(good["config"]), **metadata["config"]}))
    state, _ = read_safetensors(ours_safetensors)
    path = write_safetensors(tmp_path / "bad-meta.safetensors", state, metadata)
    with pytest.raises(expected, match="config|vision_heads|foo"):
        xclip.load_checkpoint(path)


def test_hf_directory_with_unsupported_activation(hf_dir, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    config["vision_config"]["hidden_act"] = "gelu"
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="hidden_act"):
        xclip.load_checkpoint(tmp_path)


@pytest.mark.parametrize("bad", [123, None, b"/tmp/x.pth", ["a.pth"]])
def test_path_of_wrong_type(bad):
    with pytest.raises(TypeError, match="path"):
        xclip.load_checkpoint(bad)


@pytest.mark.parametrize(
    "payload",
    [{"config": {"lr": 0.1}}, {"model": [1, 2, 3]}, {"model": {"a": 1}}, [torch.zeros(2)]],
    ids=["no-model-key-no-tensors", "model-is-list", "model-not-tensors", "list"],
)
def test_torch_file_without_state_dict(payload, tmp_path):
    path = tmp_path / "nostate.pth"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="state dict"):
        xclip.load_checkpoint(path)


def test_state_dict_of_another_model(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}}, path)
    with pytest.raises(CheckpointError, match="not an X-CLIP state dict"):
        xclip.load_checkpoint(path)


@pytest.mark.parametrize("payload_class", [ShellPayload, OpenPayload], ids=["os.system", "builtins.open"])
def test_pickle_that_runs_code_is_refused(payload_class, official_state, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    torch.save({"model": official_state, "extra": payload_class(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code"
    message = error_text(info, path)
    assert "system" in message or "open" in message, message
    # The payload is live: an unrestricted unpickle does run it.
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("payload_class", [ShellPayload, OpenPayload], ids=["os.system", "builtins.open"])
def test_legacy_raw_pickle_that_runs_code_is_refused(payload_class, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "hostile.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": payload_class(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError):
        xclip.load_checkpoint(path)
    assert not marker.exists(), "loading the checkpoint ran code"
    with open(path, "rb") as f:  # the payload is live
        pickle.load(f)
    assert marker.exists()


# -- sizes read from a file ----------------------------------------------------------------------


@pytest.fixture
def no_model_before_checks(monkeypatch):
    """Fails any construction of the model outside the ``meta`` device (where shapes cost no
    memory) whose config is not in ``allowed``: a size from a file must be checked against the
    tensors before a model of that size is built. Yields the ``allowed`` list to fill."""
    import xclip.checkpoint as ckpt

    allowed: list[xclip.XCLIPConfig] = []

    class Guarded(xclip.XCLIP):
        def __init__(self, config: xclip.XCLIPConfig) -> None:
            if torch.empty(0).device.type != "meta" and config not in allowed:
                raise AssertionError(f"a model was built from unchecked sizes: {config}")
            super().__init__(config)

    monkeypatch.setattr(ckpt, "XCLIP", Guarded)
    yield allowed


def hf_dir_with(hf_dir: Path, tmp_path: Path, where: str, key: str, value: object) -> Path:
    """A copy of ``hf_dir`` whose config.json has ``config[where][key] = value`` (top level
    when ``where`` is empty)."""
    config = json.loads((hf_dir / "config.json").read_text())
    (config[where] if where else config)[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    return tmp_path


@pytest.mark.parametrize(
    ("where", "key", "value", "field"),
    [
        ("text_config", "vocab_size", 10**8, "vocab_size"),
        ("text_config", "vocab_size", 1e8, "vocab_size"),
        ("vision_config", "num_hidden_layers", 10000, "vision_layers"),
        ("vision_config", "num_frames", 2**40, "num_frames"),
    ],
    ids=["vocab-int", "vocab-float", "layers", "frames"],
)
def test_absurd_size_in_config_json_is_refused_before_allocating(
    where, key, value, field, hf_dir, tmp_path, no_model_before_checks
):
    """A vocabulary of 10^8 would allocate tens of GB, 10^4 layers take minutes to build: the
    size is refused, naming the field, before any model is built."""
    path = hf_dir_with(hf_dir, tmp_path, where, key, value)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    message = error_text(info, path)
    assert field in message and str(int(value)) in message and "at most" in message, message


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        (dict(vocab_size=500_000), ["token_embedding.weight", "(49408, 64)", "(500000, 64)"]),
        (dict(vision_layers=200), ["vision_layers", "200", "holds 2 layers"]),
        (dict(text_mlp_dim=200_000), ["transformer.resblocks.0.mlp.c_fc.weight", "(96, 64)", "(200000, 64)"]),
        (dict(context_length=4096), ["positional_embedding", "(77, 64)", "(4096, 64)"]),
    ],
    ids=["vocab", "layers", "mlp", "context"],
)
def test_sizes_in_our_metadata_must_match_the_tensors(
    changes, words, ours_safetensors, tmp_path, tiny_config, no_model_before_checks
):
    """Sizes below the bounds but unlike the tensors present are refused by comparing shapes
    (of a model on the meta device) before the real model is built."""
    state, metadata = read_safetensors(ours_safetensors)
    metadata = dict(metadata, config=json.dumps(tiny_config.replace(**changes).to_dict()))
    path = write_safetensors(tmp_path / "sizes.safetensors", state, metadata)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    message = error_text(info, path)
    for word in words:
        assert word in message, message


def test_checked_sizes_still_load(ours_safetensors, loaded, no_model_before_checks, tiny_config):
    """The guard above lets the checked config through: the model is built once, after the checks."""
    no_model_before_checks.append(tiny_config)
    assert_same_state(xclip.load_checkpoint(ours_safetensors), loaded)


@pytest.mark.parametrize(
    ("where", "key", "value"),
    [
        ("vision_config", "hidden_size", 128.7),
        ("vision_config", "hidden_size", "128"),
        ("text_config", "num_hidden_layers", True),
        ("", "projection_dim", 64.5),
        ("", "prompt_alpha", "0.1"),
        ("vision_config", "layer_norm_eps", float("nan")),
    ],
    ids=["fraction", "string", "bool", "projection-fraction", "alpha-string", "eps-nan"],
)
def test_config_json_values_that_are_not_numbers_of_the_kind_are_named(where, key, value, hf_dir, tmp_path):
    """``hidden_size: 128.7`` is not silently truncated to 128: the field and the value are named."""
    path = hf_dir_with(hf_dir, tmp_path, where, key, value)
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    message = error_text(info, path)
    assert (f"{where}.{key}" if where else key) in message, message
    assert repr(value) in message and "config.json" in message, message


def test_config_json_integral_floats_are_sizes(hf_dir, tmp_path, loaded):
    """JSON has one number type: ``128.0`` is the size 128."""
    path = hf_dir_with(hf_dir, tmp_path, "vision_config", "hidden_size", 128.0)
    assert_same_state(xclip.load_checkpoint(path), loaded)


def test_config_json_that_is_not_utf8_names_the_file(hf_dir, tmp_path):
    (tmp_path / "config.json").write_bytes(b'{"projection_dim": 64, "name": "\xff\xfe caf\xe9"}')
    shutil.copy(hf_dir / "model.safetensors", tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value) and "UTF-8" in str(info.value)


@pytest.mark.parametrize("kind", ["char-device", "fifo"])
def test_special_file_is_named_not_missing(kind, tmp_path):
    """``/dev/zero`` or a FIFO exists but is no checkpoint file: it is said so (never opened,
    which would block on a FIFO), not reported as missing."""
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs on this platform")
        path = tmp_path / "pipe.pth"
        os.mkfifo(path)
        expected = "FIFO"
    else:
        path = Path("/dev/zero")
        if not path.exists():
            pytest.skip("no /dev/zero")
        expected = "character device"
    with pytest.raises(CheckpointError) as info:
        xclip.load_checkpoint(path)
    assert str(path) in str(info.value) and expected in str(info.value)


# -- conversions --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "changes",
    [
        {},
        dict(
            image_size=48, patch_size=16, vision_layers=3, vision_mlp_dim=None, embed_dim=128, mit_heads=2,
            prompt_heads=2, text_layers=1, text_mlp_dim=None, context_length=20, vocab_size=500, num_frames=5,
            mit_layers=2, mit_mlp_dim=None, prompt_layers=1,
        ),
    ],
    ids=["tiny", "other-sizes"],
)
def test_config_from_official_reproduces_sizes(changes, tiny_config):
    config = tiny_config.replace(**changes)
    inferred = config_from_official(xclip.XCLIP(config).state_dict())
    explicit_mlp = {f"{t}_mlp_dim": config.mlp_dim(t) for t in ("vision", "text", "mit")}
    assert inferred == config.replace(**explicit_mlp)


def test_config_from_hf_reproduces_sizes(hf_dir, tiny_config):
    assert config_from_hf(json.loads((hf_dir / "config.json").read_text())) == tiny_config


def test_hf_to_official_gives_our_keys_and_shapes(hf_model, tiny_config):
    hf_state = hf_model.state_dict()
    converted = hf_to_official(hf_state)
    ours = xclip.XCLIP(tiny_config).state_dict()
    assert set(converted) == set(ours)
    wrong = {k: (tuple(converted[k].shape), tuple(ours[k].shape)) for k in ours if converted[k].shape != ours[k].shape}
    assert not wrong
    # Transposed projections, q/k/v packed in that order, prompt cross-attention left unpacked.
    assert torch.equal(converted["visual.proj"], hf_state["visual_projection.weight"].t())
    assert torch.equal(converted["text_projection"], hf_state["text_projection.weight"].t())
    assert torch.equal(converted["prompts_visual_proj"], hf_state["prompts_visual_projection"])
    for ours_key, hf_prefix in [
        ("visual.transformer.resblocks.1.attn", "vision_model.encoder.layers.1.self_attn"),
        ("visual.transformer.resblocks.0.message_attn", "vision_model.encoder.layers.0.message_attn"),
        ("mit.resblocks.0.attn", "mit.encoder.layers.0.self_attn"),
        ("transformer.resblocks.1.attn", "text_model.encoder.layers.1.self_attn"),
    ]:
        for kind in ("weight", "bias"):
            packed = torch.cat([hf_state[f"{hf_prefix}.{p}_proj.{kind}"] for p in "qkv"])
            assert torch.equal(converted[f"{ours_key}.in_proj_{kind}"], packed), (ours_key, kind)
    assert torch.equal(
        converted["prompts_generator.decoder.0.cross_attn.k_proj.weight"],
        hf_state["prompts_generator.decoder.0.cross_attn.k_proj.weight"],
    )


def test_hf_to_official_ignores_position_ids(hf_model, tiny_config):
    state = dict(hf_model.state_dict())
    state["text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    assert set(hf_to_official(state)) == set(xclip.XCLIP(tiny_config).state_dict())


def test_hf_to_official_incomplete_qkv(hf_model):
    state = dict(hf_model.state_dict())
    del state["mit.encoder.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(CheckpointError, match=r"mit\.resblocks\.0\.attn\.in_proj_bias.*\bv\b"):
        hf_to_official(state)


# -- where and how it runs ----------------------------------------------------------------------


@pytest.mark.parametrize("map_location", ["cpu", torch.device("cpu")], ids=["str", "device"])
def test_map_location_cpu(map_location, official_pth, loaded):
    model = xclip.load_checkpoint(official_pth, map_location=map_location)
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert_same_state(model, loaded)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_map_location_cuda(official_pth, video, text, loaded):
    model = xclip.load_checkpoint(official_pth, map_location="cuda")
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    with torch.no_grad():
        logits = model(video.cuda(), text.cuda()).cpu()
    assert_close(logits, our_logits(loaded, video, text), 1e-4)


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_backend_is_set(backend, official_pth, loaded, video, text):
    model = xclip.load_checkpoint(official_pth, backend=backend)
    assert model.attention_backend == backend
    assert all(block.attention_backend == backend for block in model.visual.transformer.resblocks)
    assert_close(our_logits(model, video, text), our_logits(loaded, video, text), 1e-5)


def test_default_backend_is_automatic(official_pth):
    assert xclip.load_checkpoint(official_pth).attention_backend is None


def test_unknown_backend(official_pth):
    with pytest.raises(ValueError, match="backend"):
        xclip.load_checkpoint(official_pth, backend="no-such-backend")
