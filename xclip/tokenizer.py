"""CLIP's byte-pair tokenizer, offline: the BPE ranks ship inside ``instant-clip-tokenizer``."""

from __future__ import annotations

import functools
import html
import re
from typing import Sequence

import torch

from xclip_kernels import checks

START_OF_TEXT = 49406
END_OF_TEXT = 49407


@functools.cache
def _tokenizer():  # type: ignore[no-untyped-def]
    import instant_clip_tokenizer

    return instant_clip_tokenizer.Tokenizer()


def _clean(text: str) -> str:
    # The official tokenizer unescapes HTML twice and collapses whitespace before BPE
    # (it also runs ftfy, which only changes mis-decoded text).
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


def tokenize(texts: str | Sequence[str], context_length: int = 77, *, truncate: bool = False) -> torch.Tensor:
    """Token ids as the official ``clip.tokenize``: start token, BPE ids, end token, zero padding.

    Args:
        texts: one string or a sequence of K strings (label names, no template).
        context_length: columns of the result (77 for every CLIP text tower).
        truncate: an over-long text raises ``ValueError`` (as the official tokenizer does);
            with ``truncate=True`` it keeps the first ``context_length - 2`` ids and ends with
            the end token.

    Returns:
        int64 tensor ``(K, context_length)``.
    """
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, Sequence) or not all(isinstance(t, str) for t in texts):
        raise TypeError(f"texts: expected a string or a sequence of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts: expected at least one string, got an empty sequence")
    checks.integer("context_length", context_length, minimum=2)
    result = torch.zeros(len(texts), context_length, dtype=torch.long)
    for row, text in enumerate(texts):
        ids = [START_OF_TEXT, *_tokenizer().encode(_clean(text)), END_OF_TEXT]
        if len(ids) > context_length:
            if not truncate:
                raise ValueError(
                    f"texts[{row}]: {len(ids)} tokens with start and end, more than context_length="
                    f"{context_length} (pass truncate=True to cut it): {text[:60]!r}..."
                )
            ids = ids[: context_length - 1] + [END_OF_TEXT]
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result
