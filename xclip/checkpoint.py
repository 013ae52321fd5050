"""Checkpoints: official ``.pth``, Hugging Face XCLIP directories, and our own safetensors file.

Nothing here executes code from a checkpoint: torch files (zip or legacy pre-zip) load with
``weights_only=True``. Besides tensors and plain containers, numpy scalars, arrays and dtypes
are rebuilt as data (training scripts save them beside the weights); the training metadata
official checkpoints carry, such as a ``yacs`` config, is replaced by inert placeholders,
never imported; any other global (``os.system``, ``eval``, ``numpy.save``, ...) is refused.
Everything else is safetensors or JSON.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import pickle
import pickletools
import re
import stat
import struct
import zipfile
from typing import Mapping

import torch
import torch.nn.functional as F

from xclip_kernels import checks

from . import saved
from .config import XCLIPConfig
from .model import XCLIP


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong with it."""


# -- reading files ------------------------------------------------------------------------------

# Training metadata that official checkpoints pickle beside the weights ("config" is a yacs
# CfgNode). These classes are never imported or run: placeholders stand in for them.
_METADATA_MODULES = ("yacs.", "argparse.", "omegaconf.", "easydict.")
# Globals of these modules are torch's own unpickler's to accept (tensors, storages, plain
# containers) or refuse (``builtins.eval``): its allowlist is the authority, not a guess here.
_TORCH_JUDGES = ("torch.", "collections.", "builtins.", "_codecs.", "copyreg.")


class _InertMetadata:
    """Stands in for a pickled metadata class: "constructing" it gives a plain ``OrderedDict``
    (the one mapping torch's safe unpickler lets items and state be set on), so the object's
    contents land in inert data and none of its code exists or runs."""

    def __new__(cls, *args: object, **kwargs: object) -> "collections.OrderedDict[object, object]":  # type: ignore[misc]
        return collections.OrderedDict()


def _numpy_data_global(name: str) -> object | None:
    """The numpy object a pickle global ``name`` stands for when it only rebuilds data (a
    scalar, an array, a dtype, a scalar type), else ``None``.

    Training scripts save ``np.int64`` epochs, arrays and dtypes beside the weights. These
    constructors take bytes, shapes and dtype codes and run no code of the file's choosing;
    every other numpy function (``numpy.save``, ``numpy.load``, ...) stays refused. The
    functions are looked up from what numpy itself pickles, so a numpy 1.x name
    (``numpy.core.multiarray.scalar``) maps to numpy 2's object without importing
    ``numpy.core``.
    """
    if not name.startswith("numpy."):
        return None
    try:
        import numpy as np
    except ImportError:
        return None
    module, _, attr = name.rpartition(".")
    if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        return {
            "scalar": np.float64(0).__reduce__()[0],
            "_reconstruct": np.zeros(0).__reduce__()[0],
        }.get(attr)
    if module == "numpy" and attr in ("dtype", "ndarray"):
        return getattr(np, attr)
    candidate = getattr(getattr(np, "dtypes", None), attr, None) if module == "numpy.dtypes" else None
    if module == "numpy":
        candidate = getattr(np, attr, None)
    # numpy.dtypes.Float64DType and friends (the classes of dtypes), and the scalar types
    # (numpy.float64, ...): classes whose construction only makes a value.
    if isinstance(candidate, type) and (issubclass(candidate, np.dtype) or issubclass(candidate, np.generic)):
        return candidate
    return None


def _numpy_dtype_classes() -> list[tuple[object, str]]:
    """Every ``numpy.dtypes.*DType`` class with its name: a pickled dtype is rebuilt as
    ``numpy.dtype(code)`` and then given its byte order and flags by ``__setstate__``, which
    torch's safe unpickler allows only on an instance of an allowlisted class, and the
    instance's class (``Int64DType``, ...) is never named in the pickle."""
    import numpy as np

    dtypes = getattr(np, "dtypes", None)  # numpy >= 1.25
    if dtypes is None:
        return []
    return [
        (cls, f"numpy.dtypes.{name}")
        for name in dir(dtypes)
        if isinstance(cls := getattr(dtypes, name), type) and issubclass(cls, np.dtype)
    ]


def _legacy_globals(path: str) -> set[str]:
    """The globals named in a legacy (pre-zip) ``torch.save`` file, read without unpickling.

    The file is four pickles (magic number, protocol, system info, the object) followed by
    raw storage bytes; ``pickletools.genops`` walks each pickle up to its STOP opcode.
    ``torch.save`` writes protocol 2, whose globals are GLOBAL opcodes; torch's safe
    unpickler supports no other kind.
    """
    names: set[str] = set()
    with open(path, "rb") as f:
        for _ in range(4):
            for opcode, arg, _pos in pickletools.genops(f):
                if opcode.name == "GLOBAL":
                    names.add(str(arg).replace(" ", "."))
    return names


def _torch_load(path: str) -> object:
    try:
        if zipfile.is_zipfile(path):
            unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
        else:
            unsafe = {name for name in _legacy_globals(path) if not name.startswith(_TORCH_JUDGES)}
    except Exception as exc:
        raise CheckpointError(f"path: {path} is a truncated or corrupt torch checkpoint ({exc})") from exc
    allowed: list[tuple[object, str]] = []
    refused = []
    for name in sorted(unsafe):
        data = _numpy_data_global(name)
        if data is not None:
            allowed.append((data, name))
        elif name.startswith(_METADATA_MODULES):
            allowed.append((_InertMetadata, name))
        else:
            refused.append(name)
    if any(name.startswith("numpy.") for _, name in allowed):
        allowed += _numpy_dtype_classes()
    if refused:
        raise CheckpointError(
            f"path: {path} refers to {', '.join(refused)}, which could run code when unpickled; "
            "refusing to load it (only tensors, plain containers and numpy values are accepted)"
        )
    try:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(f"path: {path} holds objects that are not weights, refusing to unpickle them ({exc})") from exc
    except Exception as exc:
        raise CheckpointError(f"path: {path} is a truncated or corrupt torch checkpoint ({type(exc).__name__}: {exc})") from exc


def _read_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            return {k: f.get_tensor(k) for k in f.keys()}, metadata
    except Exception as exc:
        raise CheckpointError(f"path: {path} is a truncated or corrupt safetensors file ({exc})") from exc


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (header_len,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and header_len <= size - 8


def detect_format(path: str) -> str:
    """"hf" (a Hugging Face directory), "safetensors" or "torch", from the content; else raises."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise CheckpointError(f"path: {path} is a directory without config.json, not a Hugging Face checkpoint")
        return "hf"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"path: no checkpoint file or directory at {path}") from None
    if not stat.S_ISREG(mode):
        # Never opened: a FIFO would block, /dev/zero would never end.
        kind = (
            "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode)
            else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode)
            else "not a regular file"
        )
        raise CheckpointError(f"path: {path} is {kind}, not a checkpoint file or directory")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":  # torch zip archive, or legacy pickle
        return "torch"
    if _is_safetensors(head, size):
        return "safetensors"
    raise CheckpointError(
        f"path: {path} is not a recognised checkpoint (expected an official .pth, a safetensors file "
        f"or a Hugging Face XCLIP directory); it starts with {head[:8]!r}"
    )


# -- the Hugging Face layout --------------------------------------------------------------------

_HF_RENAMES = [
    (r"^vision_model\.embeddings\.class_embedding$", "visual.class_embedding"),
    (r"^vision_model\.embeddings\.patch_embedding\.weight$", "visual.conv1.weight"),
    (r"^vision_model\.embeddings\.position_embedding\.weight$", "visual.positional_embedding"),
    (r"^vision_model\.pre_layernorm\.", "visual.ln_pre."),
    (r"^vision_model\.post_layernorm\.", "visual.ln_post."),
    (r"^vision_model\.encoder\.layers\.(\d+)\.", r"visual.transformer.resblocks.\1."),
    (r"^mit\.position_embedding$", "mit.positional_embedding"),
    (r"^mit\.encoder\.layers\.(\d+)\.", r"mit.resblocks.\1."),
    (r"^prompts_visual_layernorm\.", "prompts_visual_ln."),
    (r"^prompts_visual_projection$", "prompts_visual_proj"),
    (r"^prompts_generator\.layernorm\.", "prompts_generator.norm."),
    (r"^text_model\.embeddings\.token_embedding\.", "token_embedding."),
    (r"^text_model\.embeddings\.position_embedding\.weight$", "positional_embedding"),
    (r"^text_model\.encoder\.layers\.(\d+)\.", r"transformer.resblocks.\1."),
    (r"^text_model\.final_layer_norm\.", "ln_final."),
]
# Inside a transformer layer (vision, MIT, text): CLIP's HF names -> official names.
_HF_LAYER_RENAMES = [
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]
_HF_IGNORED = re.compile(r"(^|\.)position_ids$")


def hf_to_official(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``XCLIPModel`` state dict to the official keys.

    Separate q/k/v projections are packed into ``in_proj_weight``/``in_proj_bias`` (q, k, v
    order) and ``visual_projection``/``text_projection`` are transposed. Keys that match no
    rule keep their name, so the strict load reports them as unexpected.
    """
    out: dict[str, torch.Tensor] = {}
    packed: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if _HF_IGNORED.search(key):
            continue
        if key == "visual_projection.weight":
            out["visual.proj"] = value.t().contiguous()
            continue
        if key == "text_projection.weight":
            out["text_projection"] = value.t().contiguous()
            continue
        new = key
        for pattern, repl in _HF_RENAMES:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        if not new.startswith("prompts_generator."):
            for pattern, repl in _HF_LAYER_RENAMES:
                new = re.sub(pattern, repl, new)
        m = re.match(r"^(.*\.(?:self_attn|message_attn))\.([qkv])_proj\.(weight|bias)$", new)
        if m and not new.startswith("prompts_generator."):
            base = m.group(1).replace(".self_attn", ".attn")
            packed.setdefault(f"{base}.in_proj_{m.group(3)}", {})[m.group(2)] = value
            continue
        out[new] = value
    for key, parts in packed.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointError(f"checkpoint: {key} lacks the {', '.join(missing)} projection(s)")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def _json_int(source: str, name: str, value: object) -> int:
    # JSON has one number type: 768.0 is 768, but 128.7 (or "768", true) is not a size, and
    # int() would silently truncate it.
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        isinstance(value, float) and not value.is_integer()
    ):
        raise CheckpointError(f"{source}: {name}: expected an integer, got {value!r}")
    return int(value)


def _json_float(source: str, name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise CheckpointError(f"{source}: {name}: expected a finite number, got {value!r}")
    return float(value)


def config_from_hf(hf: Mapping[str, object], source: str = "config.json") -> XCLIPConfig:
    """Our config from a Hugging Face ``XCLIPConfig`` ``config.json`` (HF defaults where absent).

    Args:
        source: what error messages call the file (the loader passes its path).

    Raises:
        CheckpointError: naming the field, for a size that is not an integer (``128.7``, a
            string), an unsupported activation, or sizes that contradict each other.
    """
    sections: dict[str, dict[str, object]] = {}
    for where in ("vision_config", "text_config"):
        section = hf.get(where) or {}
        if not isinstance(section, Mapping):
            raise CheckpointError(f"{source}: {where}: expected a JSON object, got {type(section).__name__}")
        sections[where] = dict(section)
    vision, text = sections["vision_config"], sections["text_config"]

    def size(where: str, key: str, default: int) -> int:
        section = hf if where == "" else sections[where]
        return _json_int(source, f"{where}.{key}" if where else key, section.get(key, default))

    for where, cfg in sections.items():
        act = cfg.get("hidden_act", "quick_gelu")
        if act != "quick_gelu":
            raise CheckpointError(f"{source}: {where}.hidden_act: expected quick_gelu, got {act!r}")
    if hf.get("prompt_hidden_act", "quick_gelu") != "quick_gelu":
        raise CheckpointError(f"{source}: prompt_hidden_act: expected quick_gelu, got {hf['prompt_hidden_act']!r}")
    projection = size("", "projection_dim", 512)
    mit_width = size("vision_config", "mit_hidden_size", 512)
    if mit_width != projection:
        raise CheckpointError(
            f"{source}: vision_config.mit_hidden_size: expected projection_dim={projection}, got {mit_width}"
        )
    eps = _json_float(source, "vision_config.layer_norm_eps", vision.get("layer_norm_eps", 1e-5))
    if _json_float(source, "text_config.layer_norm_eps", text.get("layer_norm_eps", 1e-5)) != eps:
        raise CheckpointError(f"{source}: vision and text layer_norm_eps differ; one value is supported")
    return XCLIPConfig(
        image_size=size("vision_config", "image_size", 224),
        patch_size=size("vision_config", "patch_size", 32),
        vision_width=size("vision_config", "hidden_size", 768),
        vision_layers=size("vision_config", "num_hidden_layers", 12),
        vision_heads=size("vision_config", "num_attention_heads", 12),
        vision_mlp_dim=size("vision_config", "intermediate_size", 3072),
        embed_dim=projection,
        context_length=size("text_config", "max_position_embeddings", 77),
        vocab_size=size("text_config", "vocab_size", 49408),
        text_width=size("text_config", "hidden_size", 512),
        text_layers=size("text_config", "num_hidden_layers", 12),
        text_heads=size("text_config", "num_attention_heads", 8),
        text_mlp_dim=size("text_config", "intermediate_size", 2048),
        num_frames=size("vision_config", "num_frames", 8),
        mit_layers=size("vision_config", "mit_num_hidden_layers", 1),
        mit_heads=size("vision_config", "mit_num_attention_heads", 8),
        mit_mlp_dim=size("vision_config", "mit_intermediate_size", 2048),
        prompt_layers=size("", "prompt_layers", 2),
        prompt_heads=size("", "prompt_num_attention_heads", 8),
        prompt_alpha=_json_float(source, "prompt_alpha", hf.get("prompt_alpha", 0.1)),
        layer_norm_eps=eps,
    )


# -- the official layout ------------------------------------------------------------------------


def _count(state: Mapping[str, torch.Tensor], prefix: str) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return len(indices)


def config_from_official(state: Mapping[str, torch.Tensor]) -> XCLIPConfig:
    """Sizes of an official state dict, read off its tensors (heads are width / 64, as there)."""
    needed = [
        "visual.conv1.weight", "visual.positional_embedding", "text_projection", "positional_embedding",
        "token_embedding.weight", "ln_final.weight", "mit.positional_embedding",
    ]
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint: not an X-CLIP state dict, missing {', '.join(missing)}")
    conv = state["visual.conv1.weight"]
    width, patch = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(state["visual.positional_embedding"].shape[0] - 1)
    embed = state["text_projection"].shape[1]
    text_width = state["ln_final.weight"].shape[0]

    def mlp_dim(key: str, default: int) -> int:
        return state[key].shape[0] if key in state else default

    return XCLIPConfig(
        image_size=patch * grid,
        patch_size=patch,
        vision_width=width,
        vision_layers=_count(state, "visual.transformer.resblocks."),
        vision_heads=max(width // 64, 1),
        vision_mlp_dim=mlp_dim("visual.transformer.resblocks.0.mlp.c_fc.weight", 4 * width),
        embed_dim=embed,
        context_length=state["positional_embedding"].shape[0],
        vocab_size=state["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_layers=_count(state, "transformer.resblocks."),
        text_heads=max(text_width // 64, 1),
        text_mlp_dim=mlp_dim("transformer.resblocks.0.mlp.c_fc.weight", 4 * text_width),
        num_frames=state["mit.positional_embedding"].shape[1],
        mit_layers=_count(state, "mit.resblocks."),
        mit_heads=max(embed // 64, 1),
        mit_mlp_dim=mlp_dim("mit.resblocks.0.mlp.c_fc.weight", 4 * embed),
        prompt_layers=_count(state, "prompts_generator.decoder."),
        prompt_heads=max(embed // 64, 1),
    )


def _official_state(raw: object, path: str) -> dict[str, torch.Tensor]:
    state = raw.get("model", raw) if isinstance(raw, dict) else raw
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"path: {path} holds no state dict (expected a dict of tensors, or one under 'model')")
    keys = list(state)
    if keys and all(k.startswith("module.") for k in keys):  # saved from a DDP wrapper
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


# -- loading ------------------------------------------------------------------------------------


def _set_frames(
    config: XCLIPConfig, state: dict[str, torch.Tensor], num_frames: int | None, interpolate_frames: bool
) -> XCLIPConfig:
    if num_frames is not None:
        checks.integer("num_frames", num_frames)
    if num_frames is None or num_frames == config.num_frames:
        return config
    pos = state.get("mit.positional_embedding")
    if not interpolate_frames:
        raise CheckpointError(
            f"num_frames: the checkpoint was trained for T={config.num_frames} frames "
            f"(mit.positional_embedding {tuple(pos.shape) if pos is not None else '?'}), got num_frames={num_frames}; "
            "pass interpolate_frames=True to interpolate the temporal position embedding"
        )
    if pos is not None:
        # (1, T, E) -> (1, E, T), linear along time, back: a smooth resampling of the T slots.
        resized = F.interpolate(pos.float().transpose(1, 2), size=num_frames, mode="linear", align_corners=False)
        state["mit.positional_embedding"] = resized.transpose(1, 2).to(pos.dtype).contiguous()
    return config.replace(num_frames=num_frames)


# Bounds on sizes read from a file, far above every released X-CLIP (24 layers, width 1024,
# vocabulary 49408, 32 frames): a size past them is a damaged or hostile file, refused before
# even an empty model of that size is built (10^4 layers take minutes to construct).
_MAX_LAYERS = 256
_MAX_SIZE = 1 << 20
_LAYER_KEYS = {
    "vision_layers": "visual.transformer.resblocks.",
    "text_layers": "transformer.resblocks.",
    "mit_layers": "mit.resblocks.",
    "prompt_layers": "prompts_generator.decoder.",
}


def _check_sizes(config: XCLIPConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Refuse ``config`` unless it describes the tensors in ``state``, before anything of the
    config's size is allocated.

    In order: every size within a sane bound; no layer count above the layers present;
    then the parameter shapes of the model, built on the ``meta`` device (shapes only, no
    memory), against the tensors (one error listing every mismatch). The real model is then
    no larger than the tensors already read, whatever the config says.
    """
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, bool) or not isinstance(value, int):
            continue
        bound = _MAX_LAYERS if field.name in _LAYER_KEYS else _MAX_SIZE
        if value > bound:
            raise CheckpointError(
                f"{source}: {field.name}: expected at most {bound} (far beyond any X-CLIP), got {value}"
            )
    for field, prefix in _LAYER_KEYS.items():
        # More layers than the file holds is refused here, in one line, rather than by
        # building them all to list every key as missing; fewer shows as unexpected keys in
        # the one report of every mismatch below.
        present = _count(state, prefix)
        if getattr(config, field) > present:
            raise CheckpointError(
                f"{source}: {field}: the config says {getattr(config, field)}, "
                f"the checkpoint holds {present} layers ({prefix}N.*)"
            )
    with torch.device("meta"):
        expected = {k: v.shape for k, v in XCLIP(config).state_dict().items()}
    _check_keys(expected, state, source)


def _check_keys(expected: Mapping[str, torch.Size], state: Mapping[str, torch.Tensor], source: str) -> None:
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(state) & set(expected))
        if tuple(state[k].shape) != tuple(expected[k])
    ]
    if missing or unexpected or misshaped:
        lines = [f"{source}: the checkpoint does not match the model"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if misshaped:
            lines.append(f"  wrong shapes ({len(misshaped)}): " + "; ".join(misshaped))
        raise CheckpointError("\n".join(lines))


def _build(config: XCLIPConfig, state: dict[str, torch.Tensor], source: str, backend: str | None) -> XCLIP:
    _check_sizes(config, state, source)
    model = XCLIP(config)
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, strict=True)
    model.set_attention_backend(backend)
    return model.eval()


def _config_from_metadata(metadata: Mapping[str, str], path: str) -> XCLIPConfig:
    try:
        values = json.loads(metadata["config"])
        if not isinstance(values, dict):
            raise TypeError(f"expected a JSON object, got {type(values).__name__}")
        return XCLIPConfig.from_dict(values)
    except KeyError:
        raise CheckpointError(f"path: {path} is marked {saved.FORMAT} but its metadata has no 'config'") from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"path: {path} has an invalid config in its metadata ({exc})") from exc


def load_checkpoint(
    path: str | os.PathLike,
    *,
    backend: str | None = None,
    num_frames: int | None = None,
    map_location: str | torch.device = "cpu",
    interpolate_frames: bool = False,
) -> XCLIP:
    """Load an X-CLIP checkpoint of any supported format, detected from its content.

    Args:
        path: an official ``.pth``/``.pt`` (a dict with ``"model"``, or a bare state dict;
            sizes are inferred from the tensors), a Hugging Face XCLIP directory
            (``config.json`` + ``model.safetensors`` or ``pytorch_model.bin``), or a
            safetensors file written by :meth:`XCLIP.save` (or holding official or HF keys).
        backend: attention backend of the cross-frame blocks (``None``: automatic).
        num_frames: T to run at; ``None`` keeps the checkpoint's. A different T raises
            unless ``interpolate_frames=True``, which resamples ``mit.positional_embedding``
            linearly along time.
        map_location: device of the returned model.

    Returns:
        The model in eval mode, float32, on ``map_location``. Any missing, unexpected or
        mis-shaped key raises one :class:`CheckpointError` listing all of them; so does a size
        from ``config.json`` or our metadata that is not an integer, is beyond any X-CLIP or
        contradicts the tensors, before a model of that size is built.
    """
    kind = detect_format(path)
    path = os.fspath(path)
    if kind == "hf":
        config_path = os.path.join(path, "config.json")
        with open(config_path, "rb") as f:
            raw_config = f.read()
        try:
            hf_config = json.loads(raw_config.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise CheckpointError(f"path: {config_path} is not UTF-8 text ({exc})") from exc
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"path: {config_path} is not valid JSON ({exc})") from exc
        if not isinstance(hf_config, dict):
            raise CheckpointError(f"path: {config_path}: expected a JSON object, got {type(hf_config).__name__}")
        try:
            config = config_from_hf(hf_config, source=f"path: {config_path}")
        except (ValueError, TypeError) as exc:
            if isinstance(exc, CheckpointError):
                raise
            raise CheckpointError(f"path: {config_path} has invalid sizes ({exc})") from exc
        weights = os.path.join(path, "model.safetensors")
        if os.path.isfile(weights):
            state, _ = _read_safetensors(weights)
        elif os.path.isfile(os.path.join(path, "pytorch_model.bin")):
            state = _official_state(_torch_load(os.path.join(path, "pytorch_model.bin")), path)
        else:
            raise CheckpointError(f"path: {path} has config.json but neither model.safetensors nor pytorch_model.bin")
        state = hf_to_official(state)
    elif kind == "safetensors":
        state, metadata = _read_safetensors(path)
        if metadata.get("format") == saved.FORMAT:
            config = _config_from_metadata(metadata, path)
        else:
            if any(k.startswith("vision_model.") for k in state):
                state = hf_to_official(state)
            config = config_from_official(state)
    else:
        state = _official_state(_torch_load(path), path)
        if any(k.startswith("vision_model.") for k in state):
            state = hf_to_official(state)
        config = config_from_official(state)
    config = _set_frames(config, state, num_frames, interpolate_frames)
    return _build(config, state, path, backend).to(map_location)
