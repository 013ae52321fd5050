"""``xclip_kernels.gemm``: the CPU inference GEMM providers, packed and widened weights and their invalidation."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from xclip_kernels import _env, fused, gemm
from xclip_kernels.backends import reference
from xk_helpers import assert_matches_truth

pytestmark = pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN linear op")

SLOPE = reference.QUICK_GELU_SLOPE


@pytest.fixture(autouse=True)
def _fresh_provider():
    """Each test starts with the automatic provider and no packed weights, and leaves it so."""
    gemm.set_provider(None)
    gemm.clear()
    yield
    gemm.set_provider(None)
    gemm.clear()


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _linear_case(rows: int, inner: int, outer: int, seed: int = 0):
    return (_randn(rows, inner, seed=seed), _randn(rows, outer, seed=seed + 1),
            _randn(outer, inner, seed=seed + 2, scale=inner**-0.5), _randn(outer, seed=seed + 3, scale=0.1))


# Row counts around oneDNN's blocking (tails), and inner/outer sizes that are not multiples of 16.
SHAPES = [
    pytest.param((1, 64, 48), id="rows1"),
    pytest.param((37, 96, 64), id="rows37"),
    pytest.param((100, 130, 70), id="odd-inner-outer"),
    pytest.param((800, 768, 768), id="b32-proj"),
]


def _assert_low_precision(ours: torch.Tensor, plain: torch.Tensor, truth: torch.Tensor, factor: float, what: str):
    """docs/testing.md's rule: err <= factor * base + 1e-5 * max(1, max|truth|), and finite."""
    assert torch.isfinite(ours).all(), f"{what}: non-finite values"
    err = (ours.double() - truth).abs().max().item()
    base = (plain.double() - truth).abs().max().item()
    floor = 1e-5 * max(1.0, truth.abs().max().item())
    assert err <= factor * base + floor, f"{what}: error {err:.3g} > {factor} x plain's {base:.3g} + {floor:.3g}"


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_fp32_matches_float64(shape):
    x, residual, weight, bias = _linear_case(*shape)
    gemm.set_provider("onednn")
    f32 = [t.float() for t in (x, residual, weight, bias)]
    with torch.inference_mode():
        plain = gemm.linear(f32[0], f32[2], f32[3])
        added = fused.linear_residual(f32[0], f32[1], f32[2], f32[3])
        scaled = gemm.linear_quick_gelu_scaled(f32[0], f32[2], f32[3], SLOPE)
    hidden = x @ weight.T + bias
    assert_matches_truth(plain, hidden, torch.float32, "linear")
    assert_matches_truth(added, hidden + residual, torch.float32, "linear + residual")
    assert_matches_truth(scaled, SLOPE * reference.quick_gelu(hidden), torch.float32, "1.702 * QuickGELU(linear)")
    assert gemm.packed_count() == 2  # the plain weight and the 1.702-scaled one


@pytest.mark.parametrize("shape", SHAPES)
def test_packed_bf16_within_the_low_precision_rule(shape):
    """Truth: float64 on the same bf16-rounded inputs; plain: the reference math in bf16."""
    rounded = [t.bfloat16() for t in _linear_case(*shape)]
    x, residual, weight, bias = (t.double() for t in rounded)
    truth_hidden = x @ weight.T + bias
    gemm.set_provider("onednn")
    with torch.inference_mode():
        packed = gemm.linear(rounded[0], rounded[2], rounded[3])
        added = gemm.linear_add(rounded[0], rounded[1], rounded[2], rounded[3])
        mlp = fused.mlp_residual(rounded[0][:, :64], rounded[1], *_mlp_weights(rounded[1].shape[-1], torch.bfloat16))
    with torch.no_grad():
        plain_hidden = torch.nn.functional.linear(rounded[0], rounded[2], rounded[3])
        _assert_low_precision(packed, plain_hidden, truth_hidden, 2, "linear")
        _assert_low_precision(added, plain_hidden + rounded[1], truth_hidden + residual, 2, "linear + residual")
        mlp_inputs = (rounded[0][:, :64], rounded[1], *_mlp_weights(rounded[1].shape[-1], torch.bfloat16))
        plain_mlp = reference.mlp_residual(*mlp_inputs)
        truth_mlp = reference.mlp_residual(*(t.double() for t in mlp_inputs))
        _assert_low_precision(mlp, plain_mlp, truth_mlp, 2, "mlp_residual")


def _mlp_weights(width: int, dtype: torch.dtype, hidden: int = 96):
    return [t.to(dtype) for t in (_randn(hidden, 64, seed=7, scale=0.125), _randn(hidden, seed=8, scale=0.1),
                                  _randn(width, hidden, seed=9, scale=hidden**-0.5), _randn(width, seed=10, scale=0.1))]


def test_mlp_residual_packed_matches_float64():
    gemm.set_provider("onednn")
    x, residual = _randn(50, 64, seed=1).float(), _randn(50, 48, seed=2).float()
    weights = _mlp_weights(48, torch.float32)
    with torch.inference_mode():
        out = fused.mlp_residual(x, residual, *weights)
        blocked = fused.block_mlp_residual(x, residual.clone(), *weights)
    truth = reference.mlp_residual(x.double(), residual.double(), *(w.double() for w in weights))
    assert_matches_truth(out, truth, torch.float32, "mlp_residual on oneDNN")
    assert_matches_truth(blocked, truth, torch.float32, "block_mlp_residual on oneDNN")
    assert gemm.packed_count() == 2  # c_fc scaled by 1.702, c_proj by 1 / 1.702


def test_non_finite_inputs_propagate_as_in_the_reference():
    gemm.set_provider("onednn")
    x, residual, weight, bias = (t.float() for t in _linear_case(6, 32, 16))
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    weight[5, 7] = float("nan")
    with torch.inference_mode():
        ours = (gemm.linear(x, weight, bias), gemm.linear_add(x, residual, weight, bias))
    expected = (torch.nn.functional.linear(x, weight, bias), torch.nn.functional.linear(x, weight, bias) + residual)
    for got, want in zip(ours, expected):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf())


# --------------------------------------------------------------------------- when packing applies


def test_grad_mode_with_parameters_takes_the_differentiable_path():
    gemm.set_provider("onednn")
    layer = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    out = gemm.linear(x, layer.weight, layer.bias)
    out.sum().backward()
    assert layer.weight.grad is not None and gemm.packed_count() == 0
    with torch.no_grad():
        gemm.linear(x, layer.weight, layer.bias)
    assert gemm.packed_count() == 1


def test_autocast_and_inference_tensor_weights_are_not_packed():
    gemm.set_provider("onednn")
    layer = nn.Linear(16, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        gemm.linear(torch.randn(4, 16), layer.weight, layer.bias)
    with torch.inference_mode():
        made_in_inference = torch.randn(8, 16)  # no version counter: a pack could go stale
        gemm.linear(torch.randn(4, 16), made_in_inference)
    assert gemm.packed_count() == 0
    with pytest.raises(ValueError, match="inference tensor"):
        gemm.packed_weight(made_in_inference)


def test_provider_settings_are_validated(monkeypatch):
    with pytest.raises(ValueError, match="name: expected one of matmul, onednn, float32, 'auto' or None, got 'mkl'"):
        gemm.set_provider("mkl")
    with pytest.raises(ValueError, match="name: .* got 'fp32'"):
        gemm.set_provider("fp32")
    monkeypatch.setenv("XCLIP_KERNELS_GEMM", "fast")
    with pytest.raises(ValueError, match="XCLIP_KERNELS_GEMM: expected one of auto, matmul, onednn, float32"):
        _env.gemm_provider()
    monkeypatch.setenv("XCLIP_KERNELS_GEMM", "matmul")
    assert gemm.provider(torch.float32) == "matmul"
    monkeypatch.setenv("XCLIP_KERNELS_GEMM", "onednn")
    assert gemm.provider(torch.float32) == "onednn"
    assert gemm.provider(torch.float64) == "onednn"  # fixed provider; float64 is still never packed
    assert not gemm.use_packed(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64))


def test_measure_times_both_providers_and_decides_by_the_margin():
    result = gemm.measure(torch.float32, rounds=1)
    assert result.matmul_gflops > 0 and result.onednn_gflops > 0
    assert result.float32_gflops is None  # widening float32 is no provider of its own
    expected = "onednn" if result.onednn_gflops >= gemm.MARGIN * result.matmul_gflops else "matmul"
    assert result.chosen == expected
    assert gemm.measurements()[torch.float32] == result


def test_measure_times_the_widened_route_for_bf16_and_fp16():
    bf16 = gemm.measure(torch.bfloat16, rounds=1)
    assert bf16.matmul_gflops > 0 and bf16.onednn_gflops > 0 and bf16.float32_gflops > 0
    assert bf16.chosen == gemm.choose({"matmul": bf16.matmul_gflops, "onednn": bf16.onednn_gflops,
                                       "float32": bf16.float32_gflops})
    fp16 = gemm.measure(torch.float16, rounds=1)
    assert fp16.onednn_gflops is None and fp16.float32_gflops > 0  # oneDNN's linear is not used for fp16
    assert fp16.chosen in ("matmul", "float32")
    with pytest.raises(ValueError, match="dtype: expected one of .* got torch.float64"):
        gemm.measure(torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_measure_works_under_inference_mode(dtype):
    """The first GEMM of a process may come under ``torch.inference_mode``; its measurement
    (the widened route caches a float32 weight copy, which inference tensors may not have)
    must still time every candidate."""
    with torch.inference_mode():
        result = gemm.measure(dtype, rounds=1)
    assert result.matmul_gflops > 0
    assert (result.float32_gflops is not None) == (dtype != torch.float32)


def test_measure_is_invisible_to_the_callers_flop_counter(monkeypatch):
    """A FlopCounterMode around the first GEMM of a process counts that GEMM, not the
    providers' calibration runs it triggers."""
    from torch.utils.flop_counter import FlopCounterMode

    monkeypatch.setattr(gemm, "_choices", {})
    monkeypatch.setattr(gemm, "_measurements", {})
    x, weight = torch.randn(8, 64), torch.randn(32, 64)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        gemm.linear(x, weight)
    assert torch.float32 in gemm.measurements()  # it did measure, inside the counter
    assert counter.get_total_flops() == 2 * 8 * 64 * 32


@pytest.mark.parametrize(
    ("rates", "chosen"),
    [
        ({"matmul": 100.0, "onednn": 110.0, "float32": 120.0}, "matmul"),  # all within the margin
        ({"matmul": 100.0, "onednn": 130.0, "float32": 150.0}, "onednn"),  # float32 < 1.25 x oneDNN
        ({"matmul": 142.0, "onednn": 156.0, "float32": 231.0}, "float32"),  # avx512_bf16 without AMX
        ({"matmul": 100.0, "onednn": 200.0, "float32": 240.0}, "onednn"),  # EPYC-like: oneDNN far ahead
        ({"matmul": 100.0, "float32": 125.0}, "float32"),  # fp16: no oneDNN; exactly the margin
        ({"matmul": 100.0, "float32": 124.0}, "matmul"),
        ({"matmul": 100.0, "onednn": 125.0}, "onednn"),  # float32 dtype: no widened route
    ],
)
def test_choose_takes_a_provider_only_by_the_margin(rates, chosen):
    assert gemm.choose(rates) == chosen


def test_choose_needs_matmul_and_provider_follows_the_measured_choice(monkeypatch):
    with pytest.raises(ValueError, match="rates: expected a 'matmul' entry"):
        gemm.choose({"onednn": 1.0})
    fake = {torch.bfloat16: {"matmul": 142.0, "onednn": 156.0, "float32": 231.0},
            torch.float32: {"matmul": 245.0, "onednn": 247.0}}
    measured: list[torch.dtype] = []

    def fake_measure(dtype: torch.dtype, rounds: int = 3) -> gemm.Measurement:
        measured.append(dtype)
        gemm._choices.setdefault(dtype, gemm.choose(fake[dtype]))
        return gemm.Measurement(dtype, fake[dtype]["matmul"], fake[dtype]["onednn"], gemm._choices[dtype],
                                fake[dtype].get("float32"))

    monkeypatch.delenv("XCLIP_KERNELS_GEMM", raising=False)  # the automatic choice, whatever the caller forced
    monkeypatch.setattr(gemm, "_choices", {})
    monkeypatch.setattr(gemm, "measure", fake_measure)
    assert gemm.provider(torch.bfloat16) == "float32"
    assert gemm.provider(torch.bfloat16) == "float32" and measured == [torch.bfloat16]  # measured once
    assert gemm.provider(torch.float32) == "matmul" and gemm.float32_engine() == "matmul"
    assert gemm.provider(torch.float64) == "matmul" and measured == [torch.bfloat16, torch.float32]
    monkeypatch.setenv("XCLIP_KERNELS_GEMM", "float32")
    assert gemm.provider(torch.bfloat16) == "float32" and gemm.provider(torch.float16) == "float32"
    # Widening float32 changes nothing: float32 GEMMs keep their own (measured) provider.
    assert gemm.provider(torch.float32) == "matmul" and gemm.provider(torch.float64) == "matmul"
    monkeypatch.setenv("XCLIP_KERNELS_GEMM", "matmul")
    assert gemm.provider(torch.bfloat16) == "matmul"


# --------------------------------------------------------------------------- never stale


class _TwoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(32, 64)
        self.second = nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = gemm.linear(x, self.first.weight, self.first.bias)
        return gemm.linear(hidden, self.second.weight[:, :64], self.second.bias)  # a view, as in_proj_weight[W:]


def _packed_and_plain(model: nn.Module, x: torch.Tensor, mode=torch.inference_mode) -> tuple[torch.Tensor, torch.Tensor]:
    gemm.set_provider("onednn")
    with mode():
        packed = model(x)
    gemm.set_provider("matmul")
    with mode():
        plain = model(x)
    gemm.set_provider("onednn")
    return packed, plain


def _change_by_optimizer_step(model: nn.Module) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(3, 32, dtype=model.first.weight.dtype, requires_grad=True)
    model(x).float().square().sum().backward()
    optimizer.step()


def _change_by_load_state_dict(model: nn.Module) -> None:
    other = _TwoLayers()
    model.load_state_dict(other.state_dict())


def _change_in_place_under_no_grad(model: nn.Module) -> None:
    with torch.no_grad():
        model.first.weight.mul_(-2.0)


def _change_by_nn_init(model: nn.Module) -> None:
    nn.init.normal_(model.second.weight)


def _change_by_data_assignment(model: nn.Module) -> None:
    model.first.weight.data = torch.randn_like(model.first.weight)


def _change_by_to_and_back(model: nn.Module) -> None:
    dtype = model.first.weight.dtype
    model.to(torch.float64)
    with torch.no_grad():
        model.first.bias.add_(1.0)
        model.first.weight.add_(0.25)
    model.to(dtype)


def _change_by_training_after_requires_grad(model: nn.Module) -> None:
    model.requires_grad_(False)
    model.first.requires_grad_(True)
    _change_by_optimizer_step(model)


CHANGES = [
    pytest.param(_change_by_optimizer_step, id="optimizer-step"),
    pytest.param(_change_by_load_state_dict, id="load_state_dict"),
    pytest.param(_change_in_place_under_no_grad, id="in-place-no_grad"),
    pytest.param(_change_by_nn_init, id="nn.init"),
    pytest.param(_change_by_data_assignment, id="param.data="),
    pytest.param(_change_by_to_and_back, id="to-float64-and-back"),
    pytest.param(_change_by_training_after_requires_grad, id="requires_grad_-then-train"),
]


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("change", CHANGES)
def test_a_packed_weight_never_outlives_a_weight_change(change, mode):
    torch.manual_seed(0)
    model = _TwoLayers()
    x = torch.randn(5, 32)
    before, plain_before = _packed_and_plain(model, x, mode)
    torch.testing.assert_close(before, plain_before, rtol=1e-5, atol=1e-5)
    assert gemm.packed_count() == 2
    change(model)
    after, plain_after = _packed_and_plain(model, x, mode)
    assert (plain_after - plain_before).abs().max() > 1e-2, "the change did not change the model"
    torch.testing.assert_close(after, plain_after, rtol=1e-5, atol=1e-5)


def test_unchanged_weights_reuse_their_packs():
    gemm.set_provider("onednn")
    layer = nn.Linear(32, 16)
    with torch.inference_mode():
        gemm.linear(torch.randn(2, 32), layer.weight, layer.bias)
        first = gemm.packed_weight(layer.weight)
        gemm.linear(torch.randn(2, 32), layer.weight, layer.bias)
    with torch.no_grad():  # packs made under inference mode are ordinary tensors
        assert gemm.packed_weight(layer.weight) is first
        gemm.linear(torch.randn(2, 32), layer.weight, layer.bias)
    assert gemm.packed_count() == 1


def test_stale_packs_of_a_weight_are_dropped_and_dead_weights_free_theirs():
    gemm.set_provider("onednn")
    layer = nn.Linear(32, 16)
    with torch.no_grad():
        gemm.packed_weight(layer.weight)
        gemm.packed_weight(layer.weight, 2.0)
        assert gemm.packed_count() == 2
        layer.weight.add_(1.0)
        gemm.packed_weight(layer.weight)
    assert gemm.packed_count() == 1  # the scaled pack of the old contents went with it
    del layer
    assert gemm.packed_count() == 0


def test_threads_share_packs_and_match_serial_bit_for_bit():
    gemm.set_provider("onednn")
    torch.manual_seed(0)
    model = _TwoLayers()
    inputs = [torch.randn(7, 32) for _ in range(4)]
    with torch.inference_mode():
        serial = [model(x) for x in inputs]
    gemm.clear()
    results: dict[int, list[torch.Tensor]] = {}
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            modes = (torch.inference_mode, torch.no_grad)
            outs = []
            for step, x in enumerate(inputs):
                with modes[(index + step) % 2]():
                    outs.append(model(x))
            results[index] = outs
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for outs in results.values():
        for got, want in zip(outs, serial):
            assert torch.equal(got, want)


# --------------------------------------------------------------------------- widened to float32


@pytest.fixture(params=["matmul", "onednn"])
def float32_engine(request, monkeypatch) -> str:
    """Run the widened route's float32 GEMMs on each engine float32 GEMMs may take (the choice
    of this machine is measured; both must be right)."""
    monkeypatch.setattr(gemm, "float32_engine", lambda: request.param)
    return request.param


def _widened_cases(shape, dtype):
    rounded = [t.to(dtype) for t in _linear_case(*shape)]
    mlp_inputs = (rounded[0][:, :64], rounded[1], *_mlp_weights(rounded[1].shape[-1], dtype))
    return rounded, mlp_inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES)
def test_widened_within_the_low_precision_rule_and_rounded_once(shape, dtype, float32_engine):
    """Truth: float64 on the same rounded inputs; plain: the reference math in ``dtype``. The
    widened route computes everything in float32 and rounds each output once, so beyond the
    2x rule every element is within half a unit in the last place of ``dtype`` (plus float32's
    own error) of the truth: the MLP's hidden is never rounded."""
    rounded, mlp_inputs = _widened_cases(shape, dtype)
    x, residual, weight, bias = (t.double() for t in rounded)
    truth_hidden = x @ weight.T + bias
    gemm.set_provider("float32")
    with torch.inference_mode():
        assert gemm.route(rounded[0], rounded[2], others=(rounded[3],)) == "float32"
        ours = {
            "linear": gemm.linear(rounded[0], rounded[2], rounded[3]),
            "linear + residual": fused.linear_residual(rounded[0], rounded[1], rounded[2], rounded[3]),
            "mlp_residual": fused.mlp_residual(*mlp_inputs),
            "block_mlp_residual": fused.block_mlp_residual(mlp_inputs[0], mlp_inputs[1].clone(), *mlp_inputs[2:]),
        }
    with torch.no_grad():
        plain_hidden = torch.nn.functional.linear(rounded[0], rounded[2], rounded[3])
        plain_mlp = reference.mlp_residual(*mlp_inputs)
    truth_mlp = reference.mlp_residual(*(t.double() for t in mlp_inputs))
    plains = {"linear": (plain_hidden, truth_hidden),
              "linear + residual": (plain_hidden + rounded[1], truth_hidden + residual),
              "mlp_residual": (plain_mlp, truth_mlp), "block_mlp_residual": (plain_mlp, truth_mlp)}
    half_ulp = torch.finfo(dtype).eps / 2  # relative: half the spacing of dtype's numbers
    for what, got in ours.items():
        plain, truth = plains[what]
        assert got.dtype == dtype and got.shape == truth.shape, what
        _assert_low_precision(got, plain, truth, 2, what)
        # plus float32's own error on these sums: far below 1e-5 of the largest value
        bound = half_ulp * truth.abs() + 1e-5 * truth.abs().max()
        excess = (got.double() - truth).abs() - bound
        assert excess.max() <= 0, f"{what}: not rounded once from float32 (excess {excess.max():.3g})"
    assert gemm.packed_count() == 3  # the linear weight (shared by both), c_fc, c_proj


def test_rounded_once_is_a_real_check():
    """The native bf16 MLP (hidden rounded to bf16) does not pass the widened route's bound."""
    _, mlp_inputs = _widened_cases((800, 768, 768), torch.bfloat16)
    gemm.set_provider("matmul")
    with torch.inference_mode():
        native = fused.mlp_residual(*mlp_inputs)
    truth = reference.mlp_residual(*(t.double() for t in mlp_inputs))
    bound = torch.finfo(torch.bfloat16).eps / 2 * truth.abs() + 1e-5 * truth.abs().max()
    assert ((native.double() - truth).abs() > bound).any()


def test_widened_inplace_mlp_and_residual_write_the_residual(float32_engine):
    rounded, mlp_inputs = _widened_cases((37, 96, 64), torch.bfloat16)
    gemm.set_provider("float32")
    with torch.inference_mode():
        fresh = fused.mlp_residual(*mlp_inputs)
        target = mlp_inputs[1].clone()
        returned = fused.mlp_residual(mlp_inputs[0], target, *mlp_inputs[2:], inplace=True)
        added = rounded[1].clone()
        fused.linear_residual(rounded[0], added, rounded[2], rounded[3], inplace=True)
        added_fresh = fused.linear_residual(rounded[0], rounded[1], rounded[2], rounded[3])
    assert returned is target and torch.equal(target, fresh)
    assert torch.equal(added, added_fresh)


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_widened_results_never_alias_the_scratch_buffers(mode, float32_engine):
    # The widened input and the float32 sum live in per-thread scratch reused by the next call:
    # what a call returns must not change when the next one runs (nor may the MLP's result).
    rounded, mlp_inputs = _widened_cases((37, 96, 64), torch.bfloat16)
    other = [t * 2 for t in rounded]  # made outside the mode: weights must keep a version counter
    other_mlp = [t * 2 for t in mlp_inputs]
    gemm.set_provider("float32")
    with mode():
        first = gemm.linear(rounded[0], rounded[2], rounded[3])
        first_sum = fused.linear_residual(rounded[0], rounded[1], rounded[2], rounded[3])
        first_mlp = fused.mlp_residual(*mlp_inputs)
        first_hidden = gemm.widened_linear_quick_gelu_scaled(mlp_inputs[0], *mlp_inputs[2:4], 1.702)
        kept = [t.clone() for t in (first, first_sum, first_mlp, first_hidden)]
        gemm.linear(other[0], other[2], other[3])
        fused.linear_residual(other[0], other[1], other[2], other[3])
        fused.mlp_residual(*other_mlp)
        gemm.widened_linear_quick_gelu_scaled(other_mlp[0], *other_mlp[2:4], 1.702)
    for got, want in zip((first, first_sum, first_mlp, first_hidden), kept):
        assert torch.equal(got, want)


def test_widened_non_finite_inputs_propagate_as_in_the_reference(float32_engine):
    gemm.set_provider("float32")
    x, residual, weight, bias = (t.bfloat16() for t in _linear_case(6, 32, 16))
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    x[4, 1] = float("-inf")
    weight[5, 7] = float("nan")
    mlp = _mlp_weights(16, torch.bfloat16, hidden=24)
    mlp[0] = torch.randn(24, 32).bfloat16()
    mlp[0][3, 2] = float("inf")
    with torch.inference_mode():
        ours = (gemm.linear(x, weight, bias), fused.linear_residual(x, residual, weight, bias),
                fused.mlp_residual(x, residual, *mlp))
    with torch.no_grad():
        hidden = torch.nn.functional.linear(x, weight, bias)
        expected = (hidden, hidden + residual, reference.mlp_residual(x.double(), residual.double(),
                                                                       *(w.double() for w in mlp)))
    for got, want in zip(ours, expected):
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.isposinf(), want.isposinf()) and torch.equal(got.isneginf(), want.isneginf())


def test_widened_route_only_in_inference_on_the_cpu(float32_engine):
    gemm.set_provider("float32")
    layer = nn.Linear(16, 8).bfloat16()
    x = torch.randn(4, 16).bfloat16()
    out = gemm.linear(x, layer.weight, layer.bias)  # grad mode, parameters that require grad
    out.float().sum().backward()
    assert layer.weight.grad is not None and gemm.packed_count() == 0
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        gemm.linear(x, layer.weight, layer.bias)
    with torch.inference_mode():
        assert gemm.route(x, torch.randn(8, 16).bfloat16()) == "matmul"  # an inference tensor weight
        assert gemm.route(x, layer.weight.float()) == "matmul"  # mixed dtypes
        assert gemm.route(x.double(), layer.weight.double()) == "matmul"
    assert gemm.packed_count() == 0
    with torch.no_grad():
        gemm.linear(x, layer.weight, layer.bias)
    assert gemm.packed_count() == 1


def test_widened_copies_cost_twice_the_weights_and_clear_drops_them():
    gemm.set_provider("float32")
    layer = nn.Linear(64, 32).bfloat16()
    with torch.no_grad():
        copy = gemm.float32_weight(layer.weight)
        assert copy.dtype == torch.float32 and torch.equal(copy, layer.weight.float())
        assert gemm.float32_weight(layer.weight) is copy
        assert gemm.cached_bytes() == 2 * layer.weight.numel() * layer.weight.element_size()
    gemm.clear()
    assert gemm.packed_count() == 0 and gemm.cached_bytes() == 0
    with pytest.raises(ValueError, match="weight: expected a floating-point tensor"):
        gemm.float32_weight(torch.ones(3, 4, dtype=torch.int32))


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("change", CHANGES)
def test_a_widened_weight_never_outlives_a_weight_change(change, mode, float32_engine):
    """After each change the widened route gives, bit for bit, what it gives with no cached
    copy at all (and the change did change the output)."""
    torch.manual_seed(0)
    model = _TwoLayers().bfloat16()
    x = torch.randn(5, 32).bfloat16()
    gemm.set_provider("float32")
    with mode():
        before = model(x)
    assert gemm.packed_count() == 2
    change(model)
    assert model.first.weight.dtype == torch.bfloat16
    gemm.set_provider("float32")
    with mode():
        after = model(x)
    gemm.clear()
    with mode():
        uncached = model(x)
    assert (uncached.double() - before.double()).abs().max() > 1e-2, "the change did not change the model"
    assert torch.equal(after, uncached)
