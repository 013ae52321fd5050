"""Our own checkpoint file: one safetensors file holding the weights (official key names) with
the :class:`~xclip.config.XCLIPConfig` as JSON in its metadata. :meth:`xclip.XCLIP.save`
writes it; :func:`xclip.load_checkpoint` recognises it by :data:`FORMAT`."""

from __future__ import annotations

import json
import os
import uuid
from typing import Mapping

import torch

from .config import XCLIPConfig

FORMAT = "xclip-kernels/1"
"""The ``format`` entry of the metadata."""


def write(state: Mapping[str, torch.Tensor], config: XCLIPConfig, path: str | os.PathLike) -> None:
    """Write ``state`` and ``config`` to ``path`` atomically: a temporary file in the same
    folder, renamed over ``path`` once complete, so a crash never leaves half a checkpoint."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    metadata = {"format": FORMAT, "config": json.dumps(config.to_dict())}
    # A fresh name beside the target (same file system, so the rename is atomic), created by
    # save_file itself so that the file gets the usual permissions.
    tmp = os.path.join(os.path.dirname(os.path.abspath(path)), f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
