"""Adapters that run other libraries' X-CLIP models on the xclip_kernels ops.

``hf``: a Hugging Face ``transformers`` ``XCLIPModel`` patched in place
(:func:`patch_hf_xclip`, :func:`unpatch_hf_xclip`). Importing this package imports no
``transformers``.
"""

from .hf import patch_hf_xclip, unpatch, unpatch_hf_xclip

__all__ = ["patch_hf_xclip", "unpatch", "unpatch_hf_xclip"]
