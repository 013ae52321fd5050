"""Fixtures of the xclip_kernels tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch):
    """Every test starts with automatic backend choice and a fixed seed.

    ``XCLIP_KERNELS_BACKEND`` in the caller's shell would silently reroute ``backend=None``
    calls, so it is removed here; tests that need it set it themselves.
    """
    monkeypatch.delenv("XCLIP_KERNELS_BACKEND", raising=False)
    torch.manual_seed(0)
    yield
