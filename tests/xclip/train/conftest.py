"""Fixtures of the xclip.train tests: one thread, and the tiny checkpoint every run starts from."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_helpers import tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The tiny models here are all overhead: one thread is several times faster than two
    fighting over shared cores (the two-process runs also get one thread each)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model written with ``model.save()``, the starting point of every run."""
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    tiny_model().save(str(path))
    return path
