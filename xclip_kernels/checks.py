"""Argument checks of the public ops and of ``xclip``'s public functions: each error names the
argument, what was expected and what came."""

from __future__ import annotations

from typing import Sequence

import torch


def tensor(name: str, value: object, ndim: int | None = None) -> torch.Tensor:
    """``value`` as a floating-point tensor of rank ``ndim``, or ``TypeError``/``ValueError``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(
            f"{name}: expected a {ndim}-d tensor, got {value.dim()}-d of shape {tuple(value.shape)}"
        )
    return value


def shape(name: str, value: torch.Tensor, expected: Sequence[int], meaning: str) -> None:
    """``ValueError`` unless ``value.shape == expected``; ``meaning`` spells the dims, e.g. "(F, H, D)"."""
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {meaning} = {tuple(expected)}, got {tuple(value.shape)}")


def same_device_and_dtype(reference_name: str, reference: torch.Tensor, **others: torch.Tensor) -> None:
    """``ValueError`` unless every tensor in ``others`` has ``reference``'s device and dtype."""
    for name, t in others.items():
        if t.device != reference.device:
            raise ValueError(
                f"{name}: expected device {reference.device} (that of {reference_name}), got {t.device}"
            )
        if t.dtype != reference.dtype:
            raise ValueError(
                f"{name}: expected dtype {reference.dtype} (that of {reference_name}), got {t.dtype}"
            )


def integer(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int (not a bool) >= ``minimum``; ``TypeError`` for anything that
    is not an int, ``ValueError`` for one below ``minimum``. The one integer check of both
    packages (flags and config fields pass their own names)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value
