"""Label lists for zero-shot classification: parsed from a comma-separated string or read from
a file with one label per line, and checked (at least one, none repeated).

A label is the class text the model compares each video with (e.g. ``"playing the violin"``);
its position in the list is its class index in the ``(K,)`` probabilities.
"""

from __future__ import annotations

import os
from collections.abc import Sequence


def parse_labels(text: str) -> list[str]:
    """Labels from a comma-separated string; surrounding spaces are stripped, empty items dropped.

    Returns:
        The ``K >= 1`` labels in their order. Raises ``ValueError`` for none or a repeat.
    """
    if not isinstance(text, str):
        raise TypeError(f"labels: expected a comma-separated string, got {type(text).__name__}")
    return check_labels([item.strip() for item in text.split(",") if item.strip()], "labels")


def read_labels_file(path: str | os.PathLike) -> list[str]:
    """Labels from a UTF-8 text file, one per line; surrounding spaces stripped, blank lines skipped.

    Returns:
        The ``K >= 1`` labels in file order. Raises ``OSError`` for an unreadable file and
        ``ValueError`` for no label or a repeat.
    """
    with open(path, encoding="utf-8") as f:
        labels = [line.strip() for line in f if line.strip()]
    return check_labels(labels, f"labels file {os.fspath(path)}")


def check_labels(labels: Sequence[str], name: str = "labels") -> list[str]:
    """``labels`` as a list, after checking there is at least one and none repeats.

    Args:
        name: what the error messages call the list (an argument or a file name).
    """
    labels = list(labels)
    if not labels:
        raise ValueError(f"{name}: expected at least one label, got none")
    if not all(isinstance(label, str) for label in labels):
        raise TypeError(f"{name}: expected strings, got {[type(label).__name__ for label in labels]}")
    # A repeated label would split its probability between two classes of the same text.
    repeated = sorted({label for label in labels if labels.count(label) > 1})
    if repeated:
        raise ValueError(f"{name}: expected distinct labels, got repeats of {repeated}")
    return labels
