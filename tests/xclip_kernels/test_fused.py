"""``xclip_kernels.fused``: projection + bias + residual and the QuickGELU MLP epilogues."""

from __future__ import annotations

import pytest
import torch

from xclip_kernels import fused
from xclip_kernels.backends import reference
from xk_helpers import DTYPES, assert_matches_truth, leaves, output_and_grads

LINEAR_NAMES = ("x", "residual", "weight", "bias")
MLP_NAMES = ("x", "residual", "fc_weight", "fc_bias", "proj_weight", "proj_bias")

# Leading dims of x / residual: the model's (F, L) activations, flat rows, and one row.
LEADING = [
    pytest.param((2, 50), id="F2-L50"),
    pytest.param((3, 17), id="F3-L17"),
    pytest.param((37,), id="rows37"),
    pytest.param((1,), id="rows1"),
]


def _linear_inputs(leading, in_features=96, out_features=64, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = (
        torch.randn(*leading, in_features, generator=gen, dtype=torch.float64),
        torch.randn(*leading, out_features, generator=gen, dtype=torch.float64),
        torch.randn(out_features, in_features, generator=gen, dtype=torch.float64) / in_features**0.5,
        0.1 * torch.randn(out_features, generator=gen, dtype=torch.float64),
    )
    return [t.to(dtype) for t in tensors]


def _mlp_inputs(leading, width=64, hidden=256, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tensors = (
        torch.randn(*leading, width, generator=gen, dtype=torch.float64),
        torch.randn(*leading, width, generator=gen, dtype=torch.float64),
        torch.randn(hidden, width, generator=gen, dtype=torch.float64) / width**0.5,
        0.1 * torch.randn(hidden, generator=gen, dtype=torch.float64),
        torch.randn(width, hidden, generator=gen, dtype=torch.float64) / hidden**0.5,
        0.1 * torch.randn(width, generator=gen, dtype=torch.float64),
    )
    return [t.to(dtype) for t in tensors]


OPS = [
    pytest.param((fused.linear_residual, reference.linear_residual, _linear_inputs, LINEAR_NAMES), id="linear_residual"),
    pytest.param((fused.mlp_residual, reference.mlp_residual, _mlp_inputs, MLP_NAMES), id="mlp_residual"),
]


def _truth(ref_fn, tensors):
    with torch.no_grad():
        return ref_fn(*(t.double() for t in tensors))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leading", LEADING)
@pytest.mark.parametrize("op", OPS)
def test_forward_matches_float64_reference(op, leading, dtype):
    fn, ref_fn, make, _ = op
    tensors = make(leading, dtype=dtype)
    originals = [t.clone() for t in tensors]
    for grad_mode in (False, True):
        with torch.set_grad_enabled(grad_mode):
            out = fn(*tensors)
        assert_matches_truth(out, _truth(ref_fn, tensors), dtype, f"output (grad mode {grad_mode})")
        assert out.shape == tensors[1].shape
        # Out of place: no argument is touched, the residual least of all.
        for name_index, (t, original) in enumerate(zip(tensors, originals)):
            assert torch.equal(t, original), f"argument {name_index} was modified"
        assert out.data_ptr() != tensors[1].data_ptr()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leading", [pytest.param((2, 50), id="F2-L50"), pytest.param((37,), id="rows37")])
@pytest.mark.parametrize("op", OPS)
def test_gradients_match_float64_reference(op, leading, dtype):
    fn, ref_fn, make, names = op
    tensors = leaves(make(leading, dtype=dtype))
    upstream = torch.randn(tensors[1].shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out, grads = output_and_grads(fn, tensors, upstream)
    truth, truth_grads = output_and_grads(ref_fn, leaves(tensors, torch.float64), upstream)
    assert_matches_truth(out, truth, dtype, "output")
    for name, grad, expected in zip(names, grads, truth_grads):
        assert_matches_truth(grad, expected, dtype, f"grad of {name}")


@pytest.mark.parametrize("op", OPS)
def test_gradcheck_fp64(op):
    fn, _, make, _ = op
    tensors = leaves(make((3,), 4, 5) if make is _linear_inputs else make((3,), 4, 8))
    assert torch.autograd.gradcheck(fn, tensors)


def test_mlp_is_quick_gelu_literally():
    """Independent of reference.mlp_residual: c_proj(x * sigmoid(1.702 x)) on c_fc(x), plus residual."""
    x, residual, fc_w, fc_b, proj_w, proj_b = _mlp_inputs((5,), seed=2)
    hidden = x @ fc_w.T + fc_b
    expected = residual + (hidden * torch.sigmoid(1.702 * hidden)) @ proj_w.T + proj_b
    torch.testing.assert_close(fused.mlp_residual(x, residual, fc_w, fc_b, proj_w, proj_b), expected, atol=1e-12, rtol=1e-12)
    # QuickGELU is not the exact (erf) GELU: a swapped activation would be caught.
    gelu = residual + torch.nn.functional.gelu(hidden) @ proj_w.T + proj_b
    assert (gelu - expected).abs().max() > 1e-3


# --------------------------------------------------------------------------- in place


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("leading", [pytest.param((2, 50), id="F2-L50"), pytest.param((37,), id="rows37")])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "grad_mode_no_requires_grad"])
@pytest.mark.parametrize("op", OPS)
def test_inplace_writes_into_and_returns_the_residual(op, context, leading, dtype):
    fn, ref_fn, make, _ = op
    tensors = make(leading, dtype=dtype)
    if context != "grad_mode_no_requires_grad":
        for t in tensors[2:]:
            t.requires_grad_(True)  # parameters of a module in eval: inference must still work
    truth = _truth(ref_fn, tensors)
    x_before = tensors[0].clone()
    residual = tensors[1]
    pointer = residual.data_ptr()
    manager = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}.get(context, torch.enable_grad)
    with manager():
        out = fn(*tensors, inplace=True)
    assert out is residual
    assert residual.data_ptr() == pointer and residual.shape == (*leading, residual.shape[-1])
    assert_matches_truth(residual, truth, dtype, "residual after in-place accumulation")
    assert torch.equal(tensors[0], x_before), "x was modified"


@pytest.mark.parametrize("requires_grad_index", [0, 1, 2, 3], ids=lambda i: f"grad-on-arg{i}")
@pytest.mark.parametrize("op", OPS)
def test_inplace_refuses_tensors_that_require_grad(op, requires_grad_index):
    fn, _, make, names = op
    tensors = make((4,))
    tensors[requires_grad_index].requires_grad_(True)
    residual_before = tensors[1].detach().clone()
    with pytest.raises(RuntimeError, match=r"^inplace=True: .*require grad"):
        fn(*tensors, inplace=True)
    assert torch.equal(tensors[1].detach(), residual_before), f"{names[1]} modified before the error"
    # The same call out of place is fine and differentiable.
    assert fn(*tensors).requires_grad


@pytest.mark.parametrize("op", OPS)
def test_inplace_false_is_the_default_even_under_no_grad(op):
    fn, ref_fn, make, _ = op
    tensors = make((2, 7))
    before = tensors[1].clone()
    with torch.no_grad():
        out = fn(*tensors)
    assert out is not tensors[1] and torch.equal(tensors[1], before)
    assert_matches_truth(out, _truth(ref_fn, tensors), torch.float64, "output")


@pytest.mark.parametrize(
    "fn, tensors",
    [
        pytest.param(fused.linear_residual, _linear_inputs((4,), in_features=64, out_features=64), id="linear_residual"),
        pytest.param(fused.mlp_residual, _mlp_inputs((4,)), id="mlp_residual"),
    ],
)
def test_inplace_refuses_x_aliasing_the_residual(fn, tensors):
    tensors = list(tensors)
    tensors[0] = tensors[1]
    with pytest.raises(ValueError, match=r"^x: inplace=True needs x and residual in separate memory"):
        with torch.no_grad():
            fn(*tensors, inplace=True)


@pytest.mark.parametrize("op", OPS)
def test_inplace_refuses_a_non_contiguous_residual(op):
    fn, _, make, _ = op
    tensors = list(make((3, 5)))
    tensors[1] = tensors[1].transpose(0, 1).contiguous().transpose(0, 1)
    with pytest.raises(ValueError, match=r"^residual: inplace=True needs a contiguous tensor"):
        with torch.no_grad():
            fn(*tensors, inplace=True)


# --------------------------------------------------------------------------- workspace


def test_workspace_reuses_grows_and_separates_threads():
    import threading

    ws = fused.Workspace()
    a = ws.buffer("h", (4, 8), torch.float32, torch.device("cpu"))
    b = ws.buffer("h", (2, 8), torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and b.shape == (2, 8)
    c = ws.buffer("h", (8, 8), torch.float32, torch.device("cpu"))  # grows
    assert c.shape == (8, 8) and c.numel() == 64
    d = ws.buffer("h", (8, 8), torch.float64, torch.device("cpu"))  # other dtype: new memory
    assert d.dtype == torch.float64
    assert ws.buffer("other", (8, 8), torch.float64, torch.device("cpu")).data_ptr() != d.data_ptr()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(ws.buffer("h", (8, 8), torch.float64, torch.device("cpu")).data_ptr()))
    thread.start()
    thread.join()
    assert seen[0] != d.data_ptr()


def test_mlp_residual_with_workspace_matches_and_returns_fresh_results():
    tensors = _mlp_inputs((2, 50), dtype=torch.float32)
    truth = _truth(reference.mlp_residual, tensors)
    ws = fused.Workspace()
    with torch.no_grad():
        first = fused.mlp_residual(tensors[0], tensors[1].clone(), *tensors[2:], inplace=True, workspace=ws)
        second = fused.mlp_residual(tensors[0], tensors[1].clone(), *tensors[2:], inplace=True, workspace=ws)
    assert torch.equal(first, second)
    assert_matches_truth(first, truth, torch.float32, "mlp_residual with a workspace")
