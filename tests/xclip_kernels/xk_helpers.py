"""Shared helpers of the xclip_kernels tests: random inputs, the tolerance rule, gradients.

The ground truth is always :mod:`xclip_kernels.backends.reference` run in float64 on the
*same* (already rounded) values the op under test received, so only the op's own arithmetic
is measured. Tolerances follow ``docs/testing.md#tolerances``: fp32 within 1e-5 relative to
the tensor's scale, fp64 within 1e-10; bf16/fp16 within 2x (outputs) or 3x (gradients) the
error of plain PyTorch at that dtype.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import pytest
import torch

import xclip_kernels as xk
from xclip_kernels.registry import OpInputs, get_backend

# Relative tolerance per test dtype; the absolute floor is this times max(1, max|truth|).
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float64, id="fp64")]


def tolerance(dtype: torch.dtype, truth: torch.Tensor) -> dict[str, float]:
    """``atol``/``rtol`` for comparing a ``dtype`` result with its float64 ``truth``."""
    rel = TOLERANCE[dtype]
    scale = max(1.0, truth.abs().max().item()) if truth.numel() else 1.0
    return {"atol": rel * scale, "rtol": rel}


def assert_matches_truth(actual: torch.Tensor, truth: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``actual`` (of ``dtype``) equals the float64 ``truth`` within the tolerance of ``docs/testing.md``."""
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype}, expected {dtype}"
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    # Same rule as torch.testing.assert_close (|a - t| <= atol + rtol |t|), several times
    # faster on the multi-million-element weight gradients.
    tol = tolerance(dtype, truth)
    error = (actual.double() - truth).abs()
    excess = error - (tol["atol"] + tol["rtol"] * truth.abs())
    if (excess > 0).any():
        worst = int(excess.argmax())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), truth.shape))
        raise AssertionError(
            f"{what} ({dtype}): {int((excess > 0).sum())} of {truth.numel()} elements off; "
            f"max |error| {error.max().item():.3g}; worst at {index}: got {actual[index].item()!r}, "
            f"expected {truth[index].item()!r} (atol {tol['atol']:.3g}, rtol {tol['rtol']:.3g})"
        )


LOW_PRECISION_FACTOR = {"output": 2.0, "gradient": 3.0}
"""The 2x/3x rule of ``docs/testing.md#low-precision``: outputs, gradients."""


def assert_within_low_precision_rule(
    actual: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, kind: str, what: str
) -> None:
    """``actual`` (bf16/fp16) is as close to the float64 ``truth`` as the rule asks:
    ``max|actual - truth| <= factor * max|plain - truth| + 1e-5 * max(1, max|truth|)``, with
    ``plain`` the reference run at ``actual``'s dtype on the same rounded inputs and ``factor``
    2 for an ``"output"``, 3 for a ``"gradient"``; ``actual`` finite, of ``plain``'s dtype."""
    assert actual.dtype == plain.dtype, f"{what}: dtype {actual.dtype}, expected {plain.dtype}"
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(truth.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    if truth.numel() == 0:
        return
    factor = LOW_PRECISION_FACTOR[kind]
    err = (actual.double() - truth).abs().max().item()
    base = (plain.double() - truth).abs().max().item()
    floor = 1e-5 * max(1.0, truth.abs().max().item())
    assert err <= factor * base + floor, (
        f"{what}: max |error| {err:.3g} > {factor:g} x {base:.3g} (plain PyTorch at {actual.dtype}) + {floor:.3g}"
    )


def leaves(tensors: Sequence[torch.Tensor], dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """Fresh leaf copies (cast to ``dtype`` if given) that require grad."""
    return [t.detach().to(dtype or t.dtype).clone().requires_grad_(True) for t in tensors]


def output_and_grads(
    fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], upstream: torch.Tensor, **kwargs
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """``fn(*inputs, **kwargs)`` and the gradients of ``<out, upstream>`` w.r.t. every input."""
    out = fn(*inputs, **kwargs)
    grads = torch.autograd.grad(out, inputs, upstream.to(out.dtype))
    return out.detach(), grads


def frame_inputs(
    frames: int, tokens: int, heads: int, head_dim: int, dtype: torch.dtype, seed: int = 0
) -> list[torch.Tensor]:
    """q, k, v ``(F, N, H, D)`` and msg_k, msg_v ``(F, H, D)``, standard normal, contiguous, fresh copies."""
    return [t.to(dtype, copy=True) for t in _frame_inputs_fp64(frames, tokens, heads, head_dim, seed)]


@functools.lru_cache(maxsize=4)
def _frame_inputs_fp64(frames: int, tokens: int, heads: int, head_dim: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    big = [torch.randn(frames, tokens, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(3)]
    msg = [torch.randn(frames, heads, head_dim, generator=gen, dtype=torch.float64) for _ in range(2)]
    return (*big, *msg)


def message_inputs(videos: int, num_frames: int, width: int, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """messages ``(b*T, W)`` and the six ``message_ln``/``message_attn`` tensors, O(1) activations, fresh copies."""
    return [t.to(dtype, copy=True) for t in _message_inputs_fp64(videos, num_frames, width, seed)]


# Random generation of the W = 1024 weights costs as much as the op itself: the cases'
# forward/gradient and fp32/fp64 tests share one draw (callers always get copies).
@functools.lru_cache(maxsize=4)
def _message_inputs_fp64(videos: int, num_frames: int, width: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    return (
        randn(videos * num_frames, width),  # messages
        1.0 + 0.1 * randn(width),  # ln_weight
        0.1 * randn(width),  # ln_bias
        randn(3 * width, width) / width**0.5,  # in_proj_weight
        0.1 * randn(3 * width),  # in_proj_bias
        randn(width, width) / width**0.5,  # out_proj_weight
        0.1 * randn(width),  # out_proj_bias
    )


MESSAGE_ARG_NAMES = (
    "messages",
    "ln_weight",
    "ln_bias",
    "in_proj_weight",
    "in_proj_bias",
    "out_proj_weight",
    "out_proj_bias",
)


def cpu_backends(op: str) -> list[str]:
    """Backends other than ``reference`` that can run ``op`` on CPU tensors in this process.

    Today that is ``sdpa``; ``cpp`` (and ``triton`` under ``TRITON_INTERPRET=1``) join the
    parity sweeps on their own once they are built, without editing the tests.
    """
    names = []
    for name in xk.BACKENDS:
        if name == "reference":
            continue
        backend = get_backend(name)
        if "cpu" in backend.devices and op in backend.ops and not backend.unavailable_reasons():
            probe = OpInputs(op, "cpu", torch.float32, 64, False)
            if not backend.not_supported_reasons(probe):
                names.append(name)
    return names


def skip_unless_supported(backend: str, inputs: OpInputs) -> None:
    """Skip (with the backend's own reasons) a case a discovered backend declares it cannot run."""
    reasons = get_backend(backend).not_supported_reasons(inputs)
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def automatic_cpu_backend() -> str:
    """What ``backend=None`` picks for CPU tensors here: the first available of PRIORITY["cpu"]
    (``cpp`` once the extension is built, else ``sdpa``)."""
    return next(name for name in xk.PRIORITY["cpu"] if not get_backend(name).unavailable_reasons())


def nan_padded(tensors: Sequence[torch.Tensor], pad: int) -> list[torch.Tensor]:
    """Views ``t[:, :N]`` of ``(F, N + pad, ...)`` buffers whose rows beyond N are NaN: a kernel
    that reads past N pulls NaN into its results (xformers' out-of-bounds check)."""
    views = []
    for t in tensors:
        buffer = torch.full((t.shape[0], t.shape[1] + pad, *t.shape[2:]), float("nan"), dtype=t.dtype, device=t.device)
        buffer[:, : t.shape[1]] = t
        views.append(buffer[:, : t.shape[1]])
    return views


# --------------------------------------------------------------------------- NaN and Inf
#
# Non-finite inputs must come out exactly as the reference's do (docs/testing.md#nan-and-inf):
# the truth is the reference at the test dtype on the same values (an overflow of q.k in
# float32 does not overflow in float64), NaN, +Inf and -Inf in the same positions, the finite
# elements within the usual tolerance.

NAN, INF = float("nan"), float("inf")


def assert_same_non_finite(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """``actual`` has NaN, +Inf and -Inf exactly where ``expected`` (the reference at ``dtype``)
    has them, and its finite elements match within the tolerance of ``docs/testing.md``."""
    assert actual.dtype == dtype and actual.shape == expected.shape, (
        f"{what}: {actual.dtype} {tuple(actual.shape)}, expected {dtype} {tuple(expected.shape)}")
    for name, test in (("NaN", torch.isnan), ("+Inf", lambda t: t == INF), ("-Inf", lambda t: t == -INF)):
        got, want = test(actual), test(expected)
        if not torch.equal(got, want):
            first = tuple(int(i) for i in (got != want).nonzero()[0])
            raise AssertionError(
                f"{what}: {name} at {int(got.sum())} elements, the reference at {int(want.sum())}; first difference "
                f"at {first}: got {actual[first].item()!r}, the reference {expected[first].item()!r}")
    finite = torch.isfinite(expected)
    torch.testing.assert_close(actual[finite], expected[finite], **tolerance(dtype, expected[finite].double()),
                               msg=lambda m: f"{what}, finite elements: {m}")


def _put(index: int, where: tuple, value: float) -> Callable[[list[torch.Tensor]], None]:
    def change(tensors: list[torch.Tensor]) -> None:
        tensors[index][where] = value
    return change


def _big(t: torch.Tensor) -> float:
    """16 sqrt(max) of t's dtype: the product of two overflows, even after a scale of 1/16."""
    return 16 * torch.finfo(t.dtype).max ** 0.5


def _overflowing_scores(sign: float) -> Callable[[list[torch.Tensor]], None]:
    """The score of query 3 and key 4 in frame 0, head 1 overflows to sign * Inf (+Inf: that
    query's softmax is NaN; -Inf: that key has weight 0 and everything stays finite). Both
    are big in dim 0 only and every other query and key of the head is 0 there, so no other
    score is big (huge finite scores would make the gradients ill-conditioned)."""
    def change(tensors: list[torch.Tensor]) -> None:
        q, k, msg_k = tensors[0], tensors[1], tensors[3]
        q[0, :, 1, 0] = k[0, :, 1, 0] = msg_k[0, 1, 0] = 0.0
        q[0, 3, 1, 0] = _big(q)
        k[0, 4, 1, 0] = sign * _big(k)
    return change


def _every_score_minus_inf(tensors: list[torch.Tensor]) -> None:
    """Every score of frame 0, head 1 (the message key's too) overflows to -Inf: NaN, as softmax of all -Inf."""
    big = _big(tensors[0])
    tensors[0][0, :, 1] = big
    tensors[1][0, :, 1] = -big
    tensors[3][0, 1] = -big


def _overflowing_message_scores(tensors: list[torch.Tensor]) -> None:
    """Element 5 of every query and key (through the in_proj bias) is big: every score +Inf, all NaN."""
    width = tensors[0].shape[1]
    tensors[4][5] = tensors[4][width + 5] = _big(tensors[4])


FRAME_NON_FINITE = [
    # (name, change of [q, k, v, msg_k, msg_v] in place); inputs at least (2, 5, 2, 8)
    pytest.param("nan-q", _put(0, (0, 3, 1, 5), NAN), id="nan-q"),
    pytest.param("nan-k", _put(1, (1, 2, 0, 7), NAN), id="nan-k"),
    pytest.param("nan-v", _put(2, (0, 4, 1, 5), NAN), id="nan-v"),
    pytest.param("nan-msg_k", _put(3, (1, 0, 2), NAN), id="nan-msg_k"),
    pytest.param("nan-msg_v", _put(4, (0, 1, 6), NAN), id="nan-msg_v"),
    pytest.param("inf-q", _put(0, (1, 3, 0, 5), INF), id="inf-q"),
    pytest.param("-inf-k", _put(1, (0, 2, 1, 7), -INF), id="-inf-k"),
    pytest.param("inf-v", _put(2, (1, 4, 1, 5), INF), id="inf-v"),
    pytest.param("-inf-msg_v", _put(4, (1, 0, 3), -INF), id="-inf-msg_v"),
    pytest.param("qk-overflows-to-inf", _overflowing_scores(+1.0), id="qk-overflows-to-inf"),
    pytest.param("qk-overflows-to-minus-inf", _overflowing_scores(-1.0), id="qk-overflows-to-minus-inf"),
    pytest.param("every-score-minus-inf", _every_score_minus_inf, id="every-score-minus-inf"),
]

MESSAGE_NON_FINITE = [
    # (name, change of the seven message_attention tensors in place); W >= 16, T >= 2, b >= 1
    pytest.param("nan-message", _put(0, (1, 5), NAN), id="nan-message"),  # its video NaN, the others finite
    pytest.param("inf-message", _put(0, (1, 5), INF), id="inf-message"),
    pytest.param("nan-ln_weight", _put(1, (5,), NAN), id="nan-ln_weight"),
    pytest.param("nan-in_proj_weight-v", _put(3, (-1, 7), NAN), id="nan-in_proj_weight-v"),
    pytest.param("nan-out_proj_weight", _put(5, (5, 7), NAN), id="nan-out_proj_weight"),  # one output column NaN
    pytest.param("inf-out_proj_bias", _put(6, (3,), INF), id="inf-out_proj_bias"),  # one output column +Inf
    pytest.param("qk-overflows-to-inf", _overflowing_message_scores, id="qk-overflows-to-inf"),
]
