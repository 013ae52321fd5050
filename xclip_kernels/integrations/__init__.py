"""Adapters that run other libraries' X-CLIP models on the xclip_kernels ops.

``hf``: a Hugging Face ``transformers`` ``XCLIPModel`` patched in place
(:func:`patch_hf_xclip`, :func:`unpatch_hf_xclip`; :class:`HFFallbackWarning` when a call runs
HF's own forward). Importing this package imports no ``transformers``.
"""

from .hf import HFFallbackWarning, patch_hf_xclip, unpatch, unpatch_hf_xclip

__all__ = ["HFFallbackWarning", "patch_hf_xclip", "unpatch", "unpatch_hf_xclip"]
