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


class TextTooLongError(ValueError):
    """A text with more token ids (start and end included) than ``context_length``.

    The message speaks to a Python caller (it suggests ``truncate=True``); the attributes let
    another front end, such as the command line, say it in its own terms.

    Attributes:
        index: position of the text in the ``texts`` given to :func:`tokenize`.
        text: the text itself.
        num_tokens: its ids, start and end tokens included.
        context_length: the most ids a row holds.
    """

    def __init__(self, index: int, text: str, num_tokens: int, context_length: int) -> None:
        self.index, self.text, self.num_tokens, self.context_length = index, text, num_tokens, context_length
        shown = repr(text[:60]) + ("..." if len(text) > 60 else "")
        super().__init__(
            f"texts[{index}]: {num_tokens} tokens with start and end, more than context_length="
            f"{context_length} (pass truncate=True to cut it): {shown}"
        )

    def __reduce__(self) -> tuple[type, tuple[int, str, int, int]]:
        # Rebuilt from the fields (pickling, multiprocessing), not from the message.
        return (type(self), (self.index, self.text, self.num_tokens, self.context_length))


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
        truncate: an over-long text raises :class:`TextTooLongError`, a ``ValueError`` (as
            the official tokenizer does);
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
                raise TextTooLongError(row, text, len(ids), context_length)
            ids = ids[: context_length - 1] + [END_OF_TEXT]
        result[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return result
