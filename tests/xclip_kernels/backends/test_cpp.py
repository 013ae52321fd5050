"""The compiled ``cpp`` backend beyond the shared parity sweeps (which pick it up once built):
out-of-bounds safety, determinism, opcheck, fp64 gradcheck and the C++ argument checks."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import xclip_kernels as xk
from xclip_kernels import autograd
from xclip_kernels.backends import _extension, cpp, reference
from xk_helpers import (
    MESSAGE_ARG_NAMES,
    assert_matches_truth,
    assert_within_low_precision_rule,
    frame_inputs,
    leaves,
    message_inputs,
    nan_padded,
    output_and_grads,
)

_REASONS = xk.get_backend("cpp").unavailable_reasons()
pytestmark = pytest.mark.skipif(bool(_REASONS), reason=f"cpp: {'; '.join(_REASONS)}")

NO_TILES = "this build has no CPU tile kernels (has_cpu_tiles() is False): every shape takes the BLAS path"


@pytest.fixture
def isa(request):  # noqa: ANN001, ANN201
    """The tile kernels on the instruction set of the test's parameter for its duration: "native"
    (the widest the CPU has) or "avx2" (AVX2 even on an AVX-512 CPU); "auto" again afterwards."""
    extension = _extension.extension()
    if request.param == "avx2" and not extension.has_cpu_tiles():
        pytest.skip(NO_TILES)
    cpp.set_cpu_isa("avx2" if request.param == "avx2" else "auto")
    if request.param == "avx2":
        assert cpp.cpu_isa() == "avx2"
    yield request.param
    cpp.set_cpu_isa("auto")


def test_ignores_memory_beyond_n():
    inputs = frame_inputs(3, 50, 4, 64, torch.float32, seed=1)
    padded = nan_padded(inputs[:3], pad=13)
    out = xk.frame_attention(*padded, *inputs[3:], backend="cpp")
    assert torch.isfinite(out).all()
    assert torch.equal(out, xk.frame_attention(*inputs, backend="cpp"))


def test_backward_ignores_memory_beyond_n():
    frames, tokens, heads, head_dim, pad = 2, 17, 2, 32, 7
    inputs = frame_inputs(frames, tokens, heads, head_dim, torch.float32, seed=2)
    buffers = []
    for t in inputs[:3]:
        buffer = torch.full((frames, tokens + pad, heads, head_dim), float("nan"))
        buffer[:, :tokens] = t
        buffers.append(buffer.requires_grad_(True))
    msg = leaves(inputs[3:])
    out = xk.frame_attention(*(b[:, :tokens] for b in buffers), *msg, backend="cpp")
    grads = torch.autograd.grad(out.sum(), [*buffers, *msg])
    for grad in grads[:3]:
        assert torch.isfinite(grad[:, :tokens]).all() and grad[:, tokens:].eq(0).all()
    assert all(torch.isfinite(g).all() for g in grads[3:])


def test_repeated_calls_are_bitwise_identical():
    inputs = leaves(frame_inputs(4, 197, 12, 64, torch.float32, seed=3))
    upstream = torch.randn(4, 197, 12, 64)
    first = xk.frame_attention(*inputs, backend="cpp")
    first_grads = torch.autograd.grad(first, inputs, upstream)
    second = xk.frame_attention(*inputs, backend="cpp")
    second_grads = torch.autograd.grad(second, inputs, upstream)
    assert torch.equal(first, second)
    assert all(torch.equal(a, b) for a, b in zip(first_grads, second_grads))
    messages = message_inputs(2, 8, 768, torch.float32)
    call = dict(num_frames=8, num_heads=12, backend="cpp")
    assert torch.equal(xk.message_attention(*messages, **call), xk.message_attention(*messages, **call))


@pytest.mark.parametrize("isa", ["native", "avx2"], indirect=True)
@pytest.mark.parametrize("shape", [(2, 1, 3, 64), (2, 17, 3, 64), (3, 50, 2, 64), (1, 197, 2, 64), (1, 577, 1, 64),
                                   (2, 33, 2, 32), (2, 45, 2, 80), (2, 9, 2, 48)])
def test_tiles_match_reference_on_each_instruction_set(isa, shape):
    # float32 with D % 16 == 0 runs forward and backward on register tiles: AVX-512 where the
    # CPU has it, AVX2 under set_cpu_isa("avx2") (the isa fixture), so both builds are checked
    # here, with every tail height of both tile sizes among these N. A build without the tiles
    # runs the native case on its BLAS path.
    inputs = frame_inputs(*shape, torch.float32, seed=11)
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    out, grads = output_and_grads(lambda *t: xk.frame_attention(*t, backend="cpp"), leaves(inputs), upstream)
    truth, truth_grads = output_and_grads(reference.frame_attention, leaves(inputs, torch.float64), upstream)
    assert_matches_truth(out, truth, torch.float32, f"output {shape} on {isa}")
    for name, grad, expected in zip(("q", "k", "v", "msg_k", "msg_v"), grads, truth_grads):
        assert_matches_truth(grad, expected, torch.float32, f"d{name} {shape} on {isa}")


@pytest.mark.parametrize("isa", ["native", "avx2"], indirect=True)
@pytest.mark.parametrize("dim", [32, 64])
def test_tiles_every_key_count_on_each_instruction_set(isa, dim):
    # N = 1..40 (N + 1 keys with the message key): the keys are transposed into the score panels
    # a vector's worth of rows at a time, the message key and the zero padding inside the last
    # block, and the forward's score strip ends at a vector, so its last panel is whole or only
    # its left vector is computed. These N put the message key in every lane of a block and end
    # the strip on both kinds of panel for both vector widths; D = 32 is one transpose block of
    # AVX-512 lanes per panel row, D = 64 two.
    for tokens in range(1, 41):
        shape = (2, tokens, 2, dim)
        inputs = frame_inputs(*shape, torch.float32, seed=tokens)
        upstream = torch.randn(shape, generator=torch.Generator().manual_seed(100 + tokens))
        out, grads = output_and_grads(lambda *t: xk.frame_attention(*t, backend="cpp"), leaves(inputs), upstream)
        truth, truth_grads = output_and_grads(reference.frame_attention, leaves(inputs, torch.float64), upstream)
        assert_matches_truth(out, truth, torch.float32, f"output {shape} on {isa}")
        for name, grad, expected in zip(("q", "k", "v", "msg_k", "msg_v"), grads, truth_grads):
            assert_matches_truth(grad, expected, torch.float32, f"d{name} {shape} on {isa}")


@pytest.mark.parametrize("isa", ["native", "avx2"], indirect=True)
@pytest.mark.parametrize("videos, num_frames, width, heads",
                         [(1, 1, 64, 2), (1, 7, 96, 3), (2, 8, 768, 12), (4, 8, 768, 12), (2, 8, 1024, 16),
                          (3, 8, 768, 12), (3, 5, 40, 5), (9, 8, 64, 4)])
def test_message_path_and_gradients_match_reference_on_each_instruction_set(isa, videos, num_frames, width, heads):
    # float32 projections of up to 64 rows with W % 8 == 0 run on the skinny-linear tiles:
    # the outer-product form for 16 or 32 rows at W = 768 or 1024 (both instruction sets), the
    # dot-product form otherwise (every band height occurs here); 72 rows and W = 40 on
    # AVX-512 take BLAS. The backward's gradient tiles (W % 16 == 0, up to 64 rows) meet
    # partial row groups (1, 7, 24 rows), tails of their weight-gradient row tiles (W = 64)
    # and of their column vectors (W = 96).
    tensors = message_inputs(videos, num_frames, width, torch.float32, seed=12)
    upstream = torch.randn(videos * num_frames, width, generator=torch.Generator().manual_seed(13))
    out, grads = output_and_grads(
        lambda *t: xk.message_attention(*t, num_frames=num_frames, num_heads=heads, backend="cpp"),
        leaves(tensors), upstream,
    )
    truth, truth_grads = output_and_grads(
        lambda *t: reference.message_attention(*t, num_frames, heads), leaves(tensors, torch.float64), upstream
    )
    case = f"messages {videos}x{num_frames}x{width} on {isa}"
    assert_matches_truth(out, truth, torch.float32, case)
    for name, grad, expected in zip(MESSAGE_ARG_NAMES, grads, truth_grads, strict=True):
        assert_matches_truth(grad, expected, torch.float32, f"grad of {name}, {case}")


def test_cpu_isa_is_set_and_reported():
    extension = _extension.extension()
    try:
        cpp.set_cpu_isa("avx2")
        assert cpp.cpu_isa() == ("avx2" if extension.has_cpu_tiles() else "none")
        cpp.set_cpu_isa("auto")
        if not extension.has_cpu_tiles():
            assert cpp.cpu_isa() == "none"
        else:
            widest = "avx512" if torch.backends.cpu.get_cpu_capability() == "AVX512" else "avx2"
            assert cpp.cpu_isa() == widest
        cpp.set_cpu_isa("avx512_bf16")  # adds the native bf16 forward: the float32 tiles are unchanged
        if extension.has_cpu_tiles():
            assert cpp.cpu_isa() == widest
        with pytest.raises(ValueError, match=r'set_cpu_isa: name: expected "auto" .*, "avx512_bf16" or "avx2", got "avx512"'):
            cpp.set_cpu_isa("avx512")
    finally:
        cpp.set_cpu_isa("auto")


def _cpu_isa_in_a_fresh_process(value: str, report: str = "cpu_isa") -> subprocess.CompletedProcess:
    root = Path(xk.__file__).resolve().parent.parent
    env = {**os.environ, "XCLIP_KERNELS_CPU_ISA": value,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    code = f"from xclip_kernels.backends import cpp; print(cpp.{report}())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def test_cpu_isa_variable_is_applied_when_the_extension_loads():
    result = _cpu_isa_in_a_fresh_process("avx2")
    assert result.returncode == 0, result.stderr
    expected = "avx2" if _extension.extension().has_cpu_tiles() else "none"
    assert result.stdout.strip() == expected
    native = _cpu_isa_in_a_fresh_process("avx512_bf16", report="bf16_path")
    assert native.returncode == 0, native.stderr
    extension = _extension.extension()
    expected = "native" if extension.cpu_has_native_bf16() else "convert" if extension.has_cpu_tiles() else "float32 BLAS"
    assert native.stdout.strip() == expected
    bad = _cpu_isa_in_a_fresh_process("sse4")
    assert bad.returncode != 0
    assert "ValueError: XCLIP_KERNELS_CPU_ISA: expected one of auto, avx512_bf16, avx2 (or unset), got 'sse4'" in bad.stderr


def test_message_backward_has_a_kernel_for_each_device():
    # The extension compiles it for the CPU; its CUDA kernel is autograd's PyTorch formula,
    # registered when the extension loads (checkable without a GPU).
    _extension.extension()
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key("xclip_ext::message_attention_backward", key), key


def test_extension_reports_the_torch_it_was_compiled_against():
    assert _extension.extension().torch_version() == torch.__version__.split("+")[0]
    assert _extension.load_error() is None


def test_first_use_from_several_threads_at_once():
    # The extension is loaded (and its Python half registered) by whichever thread asks first;
    # the others must wait for it, not register the ops a second time.
    code = """
import threading, torch, xclip_kernels as xk
gen = torch.Generator().manual_seed(0)
inputs = [torch.randn(2, 9, 2, 64, generator=gen) for _ in range(3)] + [torch.randn(2, 2, 64, generator=gen) for _ in range(2)]
start, results, errors = threading.Barrier(4), [None] * 4, []
def run(i):
    start.wait()
    try:
        results[i] = xk.frame_attention(*inputs, backend="cpp")
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
assert not errors, errors
assert all(torch.equal(r, results[0]) for r in results), "threads disagree"
print("ok")
"""
    root = Path(xk.__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_opcheck():
    q, k, v, msg_k, msg_v = leaves(frame_inputs(2, 17, 2, 32, torch.float32, seed=4))
    torch.library.opcheck(torch.ops.xclip_ext.frame_attention.default, (q, k, v, msg_k, msg_v, 0.2))
    messages = leaves(message_inputs(2, 3, 64, torch.float32))
    torch.library.opcheck(torch.ops.xclip_ext.message_attention.default, (*messages, 3, 2, 1e-5))
    grad_out = torch.randn(6, 64)
    torch.library.opcheck(
        torch.ops.xclip_ext.message_attention_backward.default,
        (grad_out, *message_inputs(2, 3, 64, torch.float32), 3, 2, 1e-5),
    )


def test_message_backward_op_gives_the_gradients_of_every_argument():
    tensors = message_inputs(3, 5, 64, torch.float64, seed=8)
    upstream = torch.randn(15, 64, dtype=torch.float64)
    grads = torch.ops.xclip_ext.message_attention_backward(upstream, *tensors, 5, 4, 1e-5)
    inputs = leaves(tensors)
    truth = torch.autograd.grad(reference.message_attention(*inputs, 5, 4), inputs, upstream)
    for name, grad, expected in zip(MESSAGE_ARG_NAMES, grads, truth, strict=True):
        torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_message_backward_returns_gradients_only_where_autograd_asks():
    tensors = message_inputs(2, 4, 64, torch.float32)
    ctx = SimpleNamespace(saved_tensors=tuple(tensors), sizes=(4, 2, 1e-5),
                          needs_input_grad=(True, False, False, True, False, False, True, False, False, False))
    grad = autograd.message_attention_grad(torch.ops.xclip_ext.message_attention_backward)
    grads = grad(ctx, torch.ones(8, 64))
    assert len(grads) == 10
    assert [g is not None for g in grads] == list(ctx.needs_input_grad)
    assert grads[3].shape == (192, 64) and grads[6].shape == (64,)


def test_gradient_of_the_messages_alone_matches_reference():
    tensors = message_inputs(2, 4, 64, torch.float32)
    messages = tensors[0].clone().requires_grad_(True)
    out = xk.message_attention(messages, *tensors[1:], num_frames=4, num_heads=2, backend="cpp")
    (grad,) = torch.autograd.grad(out, [messages], torch.ones_like(out))
    truth = torch.autograd.grad(
        reference.message_attention(messages, *tensors[1:], 4, 2), [messages], torch.ones_like(out)
    )[0]
    assert_matches_truth(grad, truth.double(), torch.float32, "grad of messages")


def test_gradcheck_float64():
    inputs = leaves(frame_inputs(2, 5, 2, 16, torch.float64, seed=5))
    assert torch.autograd.gradcheck(lambda *t: xk.frame_attention(*t, backend="cpp"), inputs)
    messages = leaves(message_inputs(2, 3, 16, torch.float64))
    assert torch.autograd.gradcheck(
        lambda *t: xk.message_attention(*t, num_frames=3, num_heads=2, backend="cpp"), messages
    )


def test_float64_forward_matches_reference_tightly():
    inputs = frame_inputs(3, 63, 4, 64, torch.float64, seed=6)
    assert_matches_truth(xk.frame_attention(*inputs, backend="cpp"), reference.frame_attention(*inputs),
                         torch.float64, "output")


@pytest.mark.parametrize(
    "change, pattern",
    [
        (lambda a: a.__setitem__(1, a[1][:, :-1]), r"k: expected shape \(F, N, H, D\) of q"),
        (lambda a: a.__setitem__(3, a[3][:, :1]), r"msg_k: expected shape \(F, H, D\) of q"),
        (lambda a: a.__setitem__(4, a[4].double()), r"msg_v: expected dtype Float"),
        (lambda a: a.__setitem__(0, a[0][..., 0]), r"q: expected a 4-d tensor"),
        (lambda a: a.__setitem__(2, a[2].transpose(1, 3).contiguous().transpose(1, 3)), r"v: expected the last dim contiguous"),
    ],
    ids=["k-shape", "msg_k-shape", "msg_v-dtype", "q-rank", "v-strides"],
)
def test_cpp_boundary_checks_name_the_tensor(change, pattern):
    _extension._require()
    args = frame_inputs(2, 5, 3, 8, torch.float32, seed=7)
    change(args)
    with pytest.raises((ValueError, RuntimeError), match=pattern):
        torch.ops.xclip_ext.frame_attention(*args, 0.5)


def test_cpp_boundary_checks_message_arguments():
    _extension._require()
    messages = message_inputs(2, 3, 16, torch.float32)
    with pytest.raises(ValueError, match=r"num_frames: expected a divisor of F = 6, got 4"):
        torch.ops.xclip_ext.message_attention(*messages, 4, 2, 1e-5)
    with pytest.raises(ValueError, match=r"grad_out: expected shape \(F, W\) of messages = \[6, 16\], got \[6, 8\]"):
        torch.ops.xclip_ext.message_attention_backward(torch.ones(6, 8), *messages, 3, 2, 1e-5)
    messages[3] = messages[3][:-1]
    with pytest.raises(ValueError, match=r"in_proj_weight: expected shape \(3W, W\)"):
        torch.ops.xclip_ext.message_attention(*messages, 3, 2, 1e-5)
    with pytest.raises(ValueError, match=r"in_proj_weight: expected shape \(3W, W\)"):
        torch.ops.xclip_ext.message_attention_backward(torch.ones(6, 16), *messages, 3, 2, 1e-5)


def test_half_precision_is_refused_with_a_reason():
    inputs = frame_inputs(2, 5, 2, 16, torch.float32)
    with pytest.raises(xk.BackendNotSupportedError, match=r"cpp: dtype float16 not supported"):
        xk.frame_attention(*(t.half() for t in inputs), backend="cpp")


# --------------------------------------------------------------------------- bfloat16

NO_NATIVE_BF16 = "this CPU (or build) lacks avx512_bf16: only the convert path runs here"


@pytest.fixture
def bf16_path(request):  # noqa: ANN001, ANN201
    """bf16 on the path of the test's parameter for its duration: "native" (vdpbf16ps, skipped
    where the CPU lacks it), "convert" (float32 tiles on bf16 widened as packed, the default: AVX-512
    where the CPU has it) or "convert-avx2"; "auto" again afterwards."""
    extension = _extension.extension()
    if request.param == "native" and not extension.cpu_has_native_bf16():
        pytest.skip(NO_NATIVE_BF16)
    if request.param == "convert-avx2" and not extension.has_cpu_tiles():
        pytest.skip(NO_TILES)
    cpp.set_cpu_isa({"native": "avx512_bf16", "convert": "auto", "convert-avx2": "avx2"}[request.param])
    if extension.has_cpu_tiles():
        assert cpp.bf16_path() == ("native" if request.param == "native" else "convert")
    yield request.param
    cpp.set_cpu_isa("auto")


BF16_PATHS = ["native", "convert", "convert-avx2"]


def _bf16_case(shape: tuple[int, int, int, int], seed: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """bf16 inputs (fresh leaves) and a bf16 upstream gradient."""
    inputs = leaves(frame_inputs(*shape, torch.bfloat16, seed=seed))
    upstream = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).bfloat16()
    return inputs, upstream


def _assert_bf16_rule(inputs: list[torch.Tensor], upstream: torch.Tensor, what: str, backward: bool = True) -> None:
    """cpp in bf16 against the float64 reference on the same rounded inputs, at most 2x (output)
    and 3x (each gradient) the error of the reference itself run in bf16."""
    call = lambda *t: xk.frame_attention(*t, backend="cpp")  # noqa: E731
    if not backward:
        with torch.no_grad():
            out = call(*inputs)
            plain = reference.frame_attention(*inputs)
            truth = reference.frame_attention(*(t.double() for t in inputs))
        assert_within_low_precision_rule(out, plain, truth, "output", f"output {what}")
        return
    out, grads = output_and_grads(call, leaves(inputs), upstream)
    plain, plain_grads = output_and_grads(reference.frame_attention, leaves(inputs), upstream)
    truth, truth_grads = output_and_grads(reference.frame_attention, leaves(inputs, torch.float64), upstream.double())
    assert_within_low_precision_rule(out, plain, truth, "output", f"output {what}")
    for name, grad, plain_grad, expected in zip(("q", "k", "v", "msg_k", "msg_v"), grads, plain_grads, truth_grads):
        assert_within_low_precision_rule(grad, plain_grad, expected, "gradient", f"d{name} {what}")


@pytest.mark.parametrize("bf16_path", BF16_PATHS, indirect=True)
@pytest.mark.parametrize("shape", [(2, 1, 3, 64), (2, 7, 2, 64), (3, 50, 2, 32), (1, 197, 2, 64), (2, 13, 2, 16),
                                   (2, 33, 2, 48), (2, 9, 2, 20)])
def test_bf16_matches_reference_within_the_low_precision_rule(bf16_path, shape):
    # D = 64 and 32 run natively (forward) where the CPU has avx512_bf16; D = 16 and 48 (multiples
    # of 16, not of 32) take the AVX2 convert path; D = 20 widens to float32 for the BLAS path.
    inputs, upstream = _bf16_case(shape, seed=21)
    _assert_bf16_rule(inputs, upstream, f"{shape} on {bf16_path}")


@pytest.mark.parametrize("bf16_path", BF16_PATHS, indirect=True)
def test_bf16_every_tile_tail(bf16_path):
    # N = 1..25: every tail height of the 12-row (AVX-512) and 6-row (AVX2) tiles, odd and even
    # key counts (the native path pairs keys), and key panels that end anywhere in 32 columns.
    for tokens in range(1, 26):
        inputs, upstream = _bf16_case((1, tokens, 2, 64), seed=tokens)
        _assert_bf16_rule(inputs, upstream, f"N = {tokens} on {bf16_path}")


@pytest.mark.parametrize("bf16_path", BF16_PATHS, indirect=True)
def test_bf16_strided_views_of_a_fused_qkv_give_the_contiguous_result(bf16_path):
    qkv = torch.randn(2, 50, 3, 2, 64, generator=torch.Generator().manual_seed(31)).bfloat16()
    msg = torch.randn(2, 2, 2, 64, generator=torch.Generator().manual_seed(32)).bfloat16().unbind(1)
    views = list(qkv.clone().requires_grad_(True).unbind(2))  # non-leaf views of one fused tensor
    dense = leaves([t.contiguous() for t in qkv.unbind(2)])
    upstream = torch.randn(2, 50, 2, 64, generator=torch.Generator().manual_seed(33)).bfloat16()
    out_views, grads_views = output_and_grads(lambda *t: xk.frame_attention(*t, backend="cpp"),
                                              [*views, *leaves(msg)], upstream)
    out_dense, grads_dense = output_and_grads(lambda *t: xk.frame_attention(*t, backend="cpp"),
                                              [*dense, *leaves(msg)], upstream)
    assert not views[0].is_contiguous()
    assert torch.equal(out_views, out_dense)
    assert all(torch.equal(a, b) for a, b in zip(grads_views, grads_dense))


@pytest.mark.parametrize("bf16_path", BF16_PATHS, indirect=True)
def test_bf16_ignores_memory_beyond_n(bf16_path):
    inputs = frame_inputs(3, 50, 2, 64, torch.bfloat16, seed=34)
    padded = nan_padded(inputs[:3], pad=13)
    out = xk.frame_attention(*padded, *inputs[3:], backend="cpp")
    assert torch.isfinite(out).all()
    assert torch.equal(out, xk.frame_attention(*inputs, backend="cpp"))


@pytest.mark.parametrize("bf16_path", BF16_PATHS, indirect=True)
@pytest.mark.parametrize("shape", [(0, 5, 2, 64), (2, 0, 2, 64), (2, 5, 0, 64)])
def test_bf16_zero_size(bf16_path, shape):
    inputs, upstream = _bf16_case(shape, seed=35)
    out, grads = output_and_grads(lambda *t: xk.frame_attention(*t, backend="cpp"), inputs, upstream)
    assert out.shape == shape and out.dtype == torch.bfloat16
    for grad, t in zip(grads, inputs):
        assert grad.shape == t.shape and grad.dtype == torch.bfloat16
        assert grad.eq(0).all()  # with no query row, nothing flows into the message key or value


# Where a non-finite input goes: (input index, position, value). The reference's pattern of NaN
# and Inf in the output is the truth.
NON_FINITE = {
    "q-nan": (0, (0, 3, 1, 5), float("nan")),
    "k-nan": (1, (0, 3, 1, 5), float("nan")),
    "v-nan": (2, (1, 6, 0, 9), float("nan")),
    "v-inf": (2, (1, 6, 0, 9), float("inf")),
    "q-inf": (0, (0, 3, 1, 5), float("inf")),
    "k-minus-inf": (1, (1, 2, 0, 1), float("-inf")),
    "msg_k-nan": (3, (1, 1, 7), float("nan")),
    "msg_v-inf": (4, (0, 0, 3), float("-inf")),
}
@pytest.mark.parametrize("bf16_path", BF16_PATHS, indirect=True)
@pytest.mark.parametrize("case", list(NON_FINITE))
def test_bf16_nan_and_inf_propagate_as_in_the_reference(bf16_path, case):
    index, position, value = NON_FINITE[case]
    inputs = frame_inputs(2, 17, 2, 64, torch.bfloat16, seed=36)
    inputs[index][position] = value
    out = xk.frame_attention(*inputs, backend="cpp")
    truth = reference.frame_attention(*(t.double() for t in inputs))
    assert truth.isnan().any() or truth.isinf().any()  # the case means something
    assert torch.equal(out.isnan(), truth.isnan()), f"NaN at {int(out.isnan().sum())}, reference {int(truth.isnan().sum())}"
    assert torch.equal(out.isinf(), truth.isinf()), f"Inf at {int(out.isinf().sum())}, reference {int(truth.isinf().sum())}"
    assert torch.equal(out.isinf() & (out > 0), truth.isinf() & (truth > 0))
    finite = torch.isfinite(truth)
    plain = reference.frame_attention(*inputs)
    assert_within_low_precision_rule(out[finite], plain[finite], truth[finite], "output", case)


@pytest.mark.parametrize("videos, num_frames, width, heads", [(2, 8, 768, 12), (3, 5, 64, 4), (1, 1, 32, 2)])
def test_bf16_message_path_matches_reference_within_the_low_precision_rule(videos, num_frames, width, heads):
    tensors = message_inputs(videos, num_frames, width, torch.bfloat16, seed=37)
    upstream = torch.randn(videos * num_frames, width, generator=torch.Generator().manual_seed(38)).bfloat16()
    ours, grads = output_and_grads(
        lambda *t: xk.message_attention(*t, num_frames=num_frames, num_heads=heads, backend="cpp"),
        leaves(tensors), upstream)
    ref = lambda *t: reference.message_attention(*t, num_frames, heads)  # noqa: E731
    plain, plain_grads = output_and_grads(ref, leaves(tensors), upstream)
    truth, truth_grads = output_and_grads(ref, leaves(tensors, torch.float64), upstream.double())
    case = f"messages {videos}x{num_frames}x{width}"
    assert_within_low_precision_rule(ours, plain, truth, "output", case)
    for name, grad, plain_grad, expected in zip(MESSAGE_ARG_NAMES, grads, plain_grads, truth_grads, strict=True):
        assert_within_low_precision_rule(grad, plain_grad, expected, "gradient", f"grad of {name}, {case}")


def test_automatic_choice_runs_bf16_on_cpp():
    from xclip_kernels.registry import OpInputs, select_backend

    for op, grad in (("frame_attention", False), ("frame_attention", True), ("message_attention", True)):
        assert select_backend(OpInputs(op, "cpu", torch.bfloat16, 64, grad, 8)).name == "cpp"
    inputs = frame_inputs(2, 17, 2, 64, torch.bfloat16, seed=39)
    assert torch.equal(xk.frame_attention(*inputs), xk.frame_attention(*inputs, backend="cpp"))


def test_bf16_opcheck():
    q, k, v, msg_k, msg_v = leaves(frame_inputs(2, 17, 2, 32, torch.bfloat16, seed=40))
    torch.library.opcheck(torch.ops.xclip_ext.frame_attention.default, (q, k, v, msg_k, msg_v, 0.2))
    messages = leaves(message_inputs(2, 3, 64, torch.bfloat16))
    torch.library.opcheck(torch.ops.xclip_ext.message_attention.default, (*messages, 3, 2, 1e-5))


def test_bf16_path_is_reported_and_follows_set_cpu_isa():
    extension = _extension.extension()
    convert = "convert" if extension.has_cpu_tiles() else "float32 BLAS"
    try:
        assert cpp.bf16_path() == convert  # the default
        cpp.set_cpu_isa("avx512_bf16")
        assert cpp.bf16_path() == ("native" if extension.cpu_has_native_bf16() else convert)
        cpp.set_cpu_isa("avx2")
        assert cpp.bf16_path() == convert
    finally:
        cpp.set_cpu_isa("auto")
    notes = " ".join(xk.get_backend("cpp").notes())
    assert "bfloat16" in notes and ("avx512_bf16" in notes or "without the x86-64" in notes)


@pytest.mark.parametrize("isa", ["native", "avx2"], indirect=True)
@pytest.mark.parametrize("videos, num_frames, width, heads",
                         [(2, 8, 768, 12), (3, 8, 768, 12), (2, 8, 1024, 16), (3, 5, 64, 4), (9, 8, 64, 4),
                          (3, 5, 40, 5)])
def test_bf16_message_path_is_the_float32_path_on_widened_inputs(isa, videos, num_frames, width, heads):
    # bf16 -> float32 is exact and the bf16 path runs the float32 tiles' arithmetic in the same
    # order (weights widened in registers instead of in a copy), so output and gradients are
    # the float32 op's on widened inputs, rounded once: bit for bit, for the outer-product form
    # (16 and 32 rows at W = 768, 1024), the dot form (15 rows; 72 rows and W = 40 take BLAS).
    tensors = message_inputs(videos, num_frames, width, torch.bfloat16, seed=42)
    upstream = torch.randn(videos * num_frames, width, generator=torch.Generator().manual_seed(43)).bfloat16()
    run = lambda *t: xk.message_attention(*t, num_frames=num_frames, num_heads=heads, backend="cpp")  # noqa: E731
    ours, grads = output_and_grads(run, leaves(tensors), upstream)
    wide, wide_grads = output_and_grads(run, leaves(tensors, torch.float32), upstream.float())
    case = f"messages {videos}x{num_frames}x{width} on {isa}"
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, wide.bfloat16()), case
    for name, grad, wide_grad in zip(MESSAGE_ARG_NAMES, grads, wide_grads, strict=True):
        assert grad.dtype == torch.bfloat16 and torch.equal(grad, wide_grad.bfloat16()), f"grad of {name}, {case}"


def test_bf16_message_path_converts_nothing_weight_sized():
    # The projections and input gradients read the bf16 weights as stored (widened in
    # registers): a float32 copy of a (3W, W) or (W, W) weight per call would double the bytes
    # the op moves. The weight gradients are rounded to bf16 by their tiles as they are stored,
    # so no weight-sized float32 result is converted by a second pass either.
    if not _extension.extension().has_cpu_tiles():
        pytest.skip(NO_TILES)
    videos, num_frames, width, heads = 2, 8, 768, 12
    tensors = leaves(message_inputs(videos, num_frames, width, torch.bfloat16, seed=44))
    upstream = torch.randn(videos * num_frames, width, generator=torch.Generator().manual_seed(45)).bfloat16()
    weight_shapes = ([3 * width, width], [width, width])

    def weight_copies(fn) -> list[str]:  # noqa: ANN001
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            fn()
        return [f"{e.name} of {e.input_shapes[0]}" for e in prof.events()
                if e.name == "aten::_to_copy" and e.input_shapes and e.input_shapes[0] in weight_shapes]

    def forward() -> None:
        with torch.no_grad():
            xk.message_attention(*tensors, num_frames=num_frames, num_heads=heads, backend="cpp")

    def forward_backward() -> None:
        xk.message_attention(*tensors, num_frames=num_frames, num_heads=heads, backend="cpp").backward(upstream)

    assert weight_copies(forward) == []
    assert weight_copies(forward_backward) == []
