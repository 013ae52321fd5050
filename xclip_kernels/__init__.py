"""xclip_kernels: fused attention kernels for X-CLIP's message-token cross-frame attention.

    import xclip_kernels as xk
    out = xk.frame_attention(q, k, v, msg_k, msg_v)      # IFA, (F, N, H, D)
    m = xk.message_attention(m, *message_weights, num_frames=T, num_heads=H)   # CFA, (F, W)

Backends are listed in :data:`BACKENDS`; ``python -m xclip_kernels`` says which run here.
Importing this package touches no GPU, compiles nothing and prints nothing.
"""

from .ops import frame_attention, message_attention
from .registry import BACKENDS, PRIORITY, Backend, BackendNotSupportedError, OpInputs, get_backend, select_backend

__all__ = [
    "BACKENDS",
    "PRIORITY",
    "Backend",
    "BackendNotSupportedError",
    "OpInputs",
    "frame_attention",
    "get_backend",
    "message_attention",
    "select_backend",
]
__version__ = "0.1.0"
