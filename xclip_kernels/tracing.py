"""Whether the ops run on stand-ins for data rather than on data.

Under ``torch.compile`` (Dynamo) and under a ``FakeTensorMode`` (shape inference, memory and
FLOP estimates without running, export's tracing) tensors have shapes but no memory: nothing
may read values (``.item()``), compare storage addresses, fill caches keyed by memory
(prepacked or widened weights) or keep a scratch buffer for later real calls. Code that does
any of these asks :func:`is_tracing` first and takes its plain path instead.
"""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensor


def is_tracing(*tensors: torch.Tensor | None) -> bool:
    """True under ``torch.compile``, inside a ``FakeTensorMode``, or when any of ``tensors`` is
    a fake tensor (used outside its mode)."""
    if torch.compiler.is_compiling():
        return True
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    return any(isinstance(t, FakeTensor) for t in tensors)
