"""Our own checkpoint file: one safetensors file holding the weights (official key names) with
the :class:`~xclip.config.XCLIPConfig` as JSON in its metadata. :meth:`xclip.XCLIP.save`
writes it; :func:`xclip.load_checkpoint` recognises it by :data:`FORMAT`."""

from __future__ import annotations

import json
import os
import stat
import uuid
from typing import Mapping

import torch

from .config import XCLIPConfig

FORMAT = "xclip-kernels/1"
"""The ``format`` entry of the metadata."""


def _umask() -> int:
    """The process umask, read without changing it where the system says it (Linux), else
    by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write(state: Mapping[str, torch.Tensor], config: XCLIPConfig, path: str | os.PathLike) -> None:
    """Write ``state`` and ``config`` to ``path`` atomically: a temporary file in the same
    folder, renamed over ``path`` once complete, so a crash never leaves half a checkpoint.

    The file behaves as one written by a plain ``open(path, "wb")``: a new file gets mode
    ``0o666`` less the umask, an existing one keeps its mode, and a symbolic link at ``path``
    stays a link, its target being rewritten.

    Raises:
        FileNotFoundError: the folder of ``path`` does not exist (named, with ``path``).
        IsADirectoryError: ``path`` is a folder.
        OSError: the file could not be written (naming ``path``, not the temporary file).
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    # Through a symbolic link, the file to replace is the link's target: renaming over the
    # link itself would turn it into a plain file and leave the target stale.
    target = os.path.realpath(path)
    folder = os.path.dirname(target)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"path: cannot save {path}: the folder {folder} does not exist")
    if os.path.isdir(target):
        raise IsADirectoryError(f"path: cannot save to {path}: it is a folder")
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict())}
    # A fresh name beside the target (same file system, so the rename is atomic).
    tmp = os.path.join(folder, f".{os.path.basename(target)}.{uuid.uuid4().hex}.tmp")
    try:
        try:
            save_file(tensors, tmp, metadata=metadata)
            # safetensors creates its files 0600 whatever the umask.
            os.chmod(tmp, mode)
            os.replace(tmp, target)
        except Exception as exc:
            raise OSError(f"path: cannot save {path} ({type(exc).__name__}: {exc})") from exc
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
