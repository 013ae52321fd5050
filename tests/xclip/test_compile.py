"""``torch.compile(model, fullgraph=True)`` of ``xclip.XCLIP`` (and of a Hugging Face
``XCLIPModel`` patched by ``xclip_kernels.integrations``): one graph, no graph break, on every
backend that runs here, and no recompilation when only the batch size changes.

The recipe under test is the one the README gives: ``torch._dynamo.mark_dynamic(video, 0)`` on
the first call's video. Recompilation is caught with ``torch.compiler.set_stance(
"fail_on_recompile")``, which raises instead of compiling again; a negative control shows that
the stance does fire on a change that needs a new graph.

Compiled with ``backend="aot_eager"``: Dynamo's tracing, the dynamic shapes and AOTAutograd's
forward/backward graphs are what can break, and they are all exercised; Inductor on top
generates and builds C++ for the CPU, which took ~110 s for one tiny model on the two shared
development cores (well past the minute a test may take here).
CUDA cases (marker ``cuda``) run the triton and cuda backends on a GPU machine and skip
elsewhere with the registry's reason.
"""

from __future__ import annotations

import pytest
import torch

import xclip
from xclip_kernels import registry
from xclip_kernels.backends import base
from xclip_kernels.integrations import patch_hf_xclip
from xclip_kernels.registry import OPS, OpInputs, get_backend

COMPILER = "aot_eager"

CASES = [pytest.param("cpu", name, id=f"cpu-{name}") for name in ("reference", "sdpa", "cpp")] + [
    pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.cuda) for name in ("triton", "cuda", "sdpa")
]


def skip_unless_runs(device: str, backend: str, config: xclip.XCLIPConfig, grad: bool = False) -> None:
    """Skip with the registry's reasons unless ``backend`` runs both ops of ``config`` on ``device``."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    head_dim = config.vision_width // config.vision_heads
    reasons: list[str] = []
    for op in OPS:
        probe = OpInputs(op, device, torch.float32, head_dim, grad, config.num_frames)
        reasons += [r for r in get_backend(backend).not_supported_reasons(probe) if r not in reasons]
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles from scratch (Dynamo's caches are per code object, process-wide) and
    compares fp32 results with TF32 off."""
    torch._dynamo.reset()
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def config(tiny_config) -> xclip.XCLIPConfig:
    """The tiny model with one layer per stack: compile time grows with the graph, and one
    layer of each kind exercises every path."""
    return tiny_config.replace(vision_layers=1, text_layers=1, prompt_layers=1)


def make_model(config: xclip.XCLIPConfig, backend: str | None, device: str = "cpu") -> xclip.XCLIP:
    torch.manual_seed(0)
    return xclip.build_model(config, backend=backend).to(device).eval()


def videos(config: xclip.XCLIPConfig, *batches: int, device: str = "cpu") -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    shape = (config.num_frames, 3, config.image_size, config.image_size)
    return [torch.randn(b, *shape, generator=g).to(device) for b in batches]


@pytest.mark.parametrize("device, backend", CASES)
def test_compiled_model_takes_a_new_batch_size_without_recompiling(device, backend, config, text):
    skip_unless_runs(device, backend, config)
    model = make_model(config, backend, device)
    text = text.to(device)
    first, second = videos(config, 2, 3, device=device)
    compiled = torch.compile(model, fullgraph=True, backend=COMPILER)
    with torch.no_grad():
        torch._dynamo.mark_dynamic(first, 0)
        got_first = compiled(first, text)
        with torch.compiler.set_stance("fail_on_recompile"):
            got_second = compiled(second, text)
        expected_first, expected_second = model(first, text), model(second, text)
    assert got_second.shape == (3, text.shape[0])
    torch.testing.assert_close(got_first, expected_first, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_second, expected_second, rtol=1e-5, atol=1e-5)
    # The stance is live: a change that needs a new graph (another label count, static) raises.
    with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile"):
        with pytest.raises(RuntimeError, match="recompile"):
            compiled(second, text[:2])


def test_compiled_training_step_takes_a_new_batch_size_without_recompiling(config, text):
    """Forward and backward graphs stay dynamic in the batch; gradients equal eager ones."""
    model = make_model(config, None).train()
    compiled = torch.compile(model, fullgraph=True, backend=COMPILER)

    def grads(fn, video: torch.Tensor) -> list[torch.Tensor]:
        model.zero_grad()
        fn(video, text).logsumexp(dim=-1).sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    first, second = videos(config, 2, 3)
    torch._dynamo.mark_dynamic(first, 0)
    compiled_grads = grads(compiled, first)
    with torch.compiler.set_stance("fail_on_recompile"):
        compiled_grads += grads(compiled, second)
    eager_grads = grads(model, first) + grads(model, second)
    for got, expected in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * max(1.0, expected.abs().max().item()))


def test_automatic_backend_compiles_before_any_eager_call(config, text, monkeypatch):
    """The backend choice needs imports and the extension's loading, which Dynamo cannot trace:
    with the registry's caches empty (a fresh process), the first call may be a compiled one."""
    monkeypatch.setattr(base, "_AVAILABILITY", {})
    monkeypatch.setattr(base, "_IMPLEMENTATIONS", {})
    monkeypatch.setattr(registry, "_BY_NAME", {})
    model = make_model(config, None)
    (video,) = videos(config, 2)
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True, backend=COMPILER)(video, text)
        expected = model(video, text)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_trace_time_backend_choice_is_marked_as_torch_would_mark_it():
    """The registry sets the flag ``torch.compiler.assume_constant_result`` sets, rather than
    calling it at import (which would import torch._dynamo); this fails if torch changes how."""
    assert torch.compiler.assume_constant_result(lambda: None)._dynamo_marked_constant is True
    assert registry._select_while_tracing._dynamo_marked_constant is True


def test_patched_hf_model_takes_a_new_batch_size_without_recompiling(hf_model_factory, video, text):
    """A Hugging Face XCLIPModel patched by xclip_kernels.integrations compiles as one graph too."""
    backend = "cpp" if not get_backend("cpp").unavailable_reasons() else "sdpa"
    hf = patch_hf_xclip(hf_model_factory(seed=0), backend=backend)

    def logits(model: torch.nn.Module, video: torch.Tensor) -> torch.Tensor:
        return model(input_ids=text, pixel_values=video).logits_per_video

    first = video.clone()
    second = torch.cat([video, video[:1].flip(-1)])
    compiled = torch.compile(logits, fullgraph=True, backend=COMPILER)
    with torch.no_grad():
        torch._dynamo.mark_dynamic(first, 0)
        got_first = compiled(hf, first)
        with torch.compiler.set_stance("fail_on_recompile"):
            got_second = compiled(hf, second)
        torch.testing.assert_close(got_first, logits(hf, video), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_second, logits(hf, second), rtol=1e-5, atol=1e-5)
