"""``xclip_kernels.integrations``: a Hugging Face ``XCLIPModel`` patched in place runs its
cross-frame blocks on our ops with the same logits and gradients, unpatches exactly, refuses
bad arguments with a message naming them, and runs HF's own forward (one warning) for a call
the kernels cannot serve.

The model is a tiny HF ``XCLIPModel`` with non-trivial random weights (LayerNorms and biases
included, so using the wrong norm or bias shows). Logits are compared as
tests/xclip/test_checkpoint.py compares ours with HF's: max abs error within ``HF_ATOL`` in
fp32; gradients within the same bound relative to each gradient's scale. CUDA cases (marker
``cuda``) run the triton and cuda backends on a GPU machine and skip elsewhere with the reason.
"""

from __future__ import annotations

import ast
import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import xclip
import xclip_kernels as xk
from xclip_kernels.integrations import hf as integrations
from xclip_kernels.integrations import patch_hf_xclip, unpatch, unpatch_hf_xclip
from xclip_kernels.registry import OPS, OpInputs, get_backend

transformers = pytest.importorskip("transformers")
from transformers.models.x_clip import modeling_x_clip  # noqa: E402

HF_ATOL = 1e-4  # as tests/xclip/test_checkpoint.py: fp32, HF's kernels against others
FRAMES, SIZE, WIDTH, HEADS = 3, 32, 128, 2
TOKENS = (SIZE // 8) ** 2 + 1  # L: patches plus the class token
LABELS = ["archery", "bowling", "playing the violin"]

CASES = [pytest.param("cpu", name, id=f"cpu-{name}") for name in ("reference", "sdpa", "cpp")] + [
    pytest.param("cuda", name, id=f"cuda-{name}", marks=pytest.mark.cuda) for name in ("triton", "cuda", "sdpa")
]


def skip_unless_runs(device: str, backend: str, grad: bool = True) -> None:
    """Skip with the registry's reasons unless ``backend`` runs both ops of the tiny model."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (torch.cuda.is_available() is False)")
    reasons: list[str] = []
    for op in OPS:
        probe = OpInputs(op, device, torch.float32, WIDTH // HEADS, grad, FRAMES)
        reasons += [r for r in get_backend(backend).not_supported_reasons(probe) if r not in reasons]
    if reasons:
        pytest.skip(f"{backend}: {'; '.join(reasons)}")


def hf_config(**vision_overrides) -> transformers.XCLIPConfig:
    vision = dict(
        hidden_size=WIDTH, intermediate_size=192, num_hidden_layers=2, num_attention_heads=HEADS,
        image_size=SIZE, patch_size=8, num_frames=FRAMES, mit_hidden_size=64, mit_intermediate_size=80,
        mit_num_hidden_layers=1, mit_num_attention_heads=1,
    )
    vision.update(vision_overrides)
    text = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=1)
    config = transformers.XCLIPConfig(
        text_config=text, vision_config=vision, projection_dim=64, prompt_layers=1, prompt_num_attention_heads=1
    )
    config._attn_implementation = "sdpa"  # the XCLIPModel constructor reads it from the config
    return config


@torch.no_grad()
def make_hf_model(seed: int = 0, **vision_overrides) -> transformers.XCLIPModel:
    """A tiny ``XCLIPModel`` in eval mode; matrices std 1/sqrt(fan_in), LayerNorm weights
    1 + N(0, 0.1), biases N(0, 0.05), embeddings N(0, 0.5)."""
    model = transformers.XCLIPModel(hf_config(**vision_overrides))
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name == "logit_scale":
            continue
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("alpha"):
            p.copy_(0.5 + 0.25 * noise.abs())
        elif name.endswith("bias"):
            p.copy_(0.05 * noise)
        elif p.dim() == 1 and "embedding" not in name:
            p.copy_(1 + 0.1 * noise)
        elif "embedding" in name and "patch" not in name:
            p.copy_(0.5 * noise)
        else:
            fan_in = p.shape[0] if name == "prompts_visual_projection" else math.prod(p.shape[1:])
            p.copy_(noise * fan_in**-0.5)
    return model.eval()


@pytest.fixture(scope="module")
def base_model() -> transformers.XCLIPModel:
    """Shared and never patched: tests patch :func:`copy.deepcopy` copies (``model`` fixture)."""
    return make_hf_model()


@pytest.fixture
def model(base_model) -> transformers.XCLIPModel:
    return copy.deepcopy(base_model)


@pytest.fixture(scope="module")
def inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(2, FRAMES, 3, SIZE, SIZE, generator=g), xclip.tokenize(LABELS)


def logits(model: torch.nn.Module, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return model(input_ids=text, pixel_values=video).logits_per_video


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str = "logits") -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} vs {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item()
    assert err <= atol, f"{what}: max abs error {err:.3g} > {atol:g}"


def grads(model: torch.nn.Module, video: torch.Tensor, text: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    logits(model, video, text).logsumexp(dim=-1).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert got.keys() == expected.keys(), f"parameters with grads differ: {sorted(got.keys() ^ expected.keys())}"
    for name, grad in expected.items():
        assert_close(got[name], grad, HF_ATOL * max(1.0, grad.abs().max().item()), f"grad of {name}")


def cross_frame_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, modeling_x_clip.XCLIPVisionEncoderLayer)]


@pytest.fixture(autouse=True)
def _exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


# -- parity ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device, backend", CASES)
def test_patched_logits_and_grads_match_hf(device, backend, model, inputs, monkeypatch):
    skip_unless_runs(device, backend)
    model = model.to(device)
    video, text = (t.to(device) for t in inputs)
    with torch.no_grad():
        expected = logits(model, video, text)
    expected_grads = grads(model, video, text)
    # The comparison means something only if the logits are not all alike.
    assert expected.max() - expected.min() > 0.1

    calls = kernel_calls(monkeypatch)
    assert patch_hf_xclip(model, backend=backend) is model
    with torch.no_grad():
        got = logits(model, video, text)
    assert calls == {"frame_attention": 2, "message_attention": 2}  # one each per layer
    assert_close(got, expected, HF_ATOL)
    assert_same_grads(grads(model, video, text), expected_grads)


def test_patched_blocks_never_run_hf_attention_or_concatenate_tokens(model, inputs):
    """The message token is no longer appended to the frame's tokens (HF's torch.cat of
    (b*T, L+1, W)), and HF's attention modules are not called."""
    skip_unless_runs("cpu", "cpp", grad=False)  # sdpa and reference concatenate keys by design
    video, text = inputs

    class CatShapes(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.cat.default:
                self.shapes.append(tuple(out.shape))
            return out

    attention_calls = []
    for layer in cross_frame_layers(model):
        for attention in (layer.self_attn, layer.message_attn):
            attention.register_forward_hook(lambda *_: attention_calls.append(1))
    with torch.no_grad():
        with CatShapes() as hf_run:
            logits(model, video, text)
        assert (2 * FRAMES, TOKENS + 1, WIDTH) in hf_run.shapes  # the control: HF's cat
        assert len(attention_calls) == 4
        attention_calls.clear()
        patch_hf_xclip(model, backend="cpp")
        with CatShapes() as patched_run:
            logits(model, video, text)
    assert attention_calls == []
    assert [s for s in patched_run.shapes if len(s) == 3 and s[1] == TOKENS + 1] == []


def test_automatic_backend(model, inputs):
    video, text = inputs
    with torch.no_grad():
        expected = logits(model, video, text)
        patch_hf_xclip(model)
        assert_close(logits(model, video, text), expected, HF_ATOL)


def test_gradient_checkpointing_and_drop_path_in_training(inputs):
    """HF's gradient checkpointing still applies to the patched blocks (in transformers 5 it
    lives in the class's forward, which the patch replaces); drop path on the message branch
    draws the same random numbers as HF's, so one seed gives the same logits and grads."""
    video, text = inputs
    model = make_hf_model(drop_path_rate=0.5).train()
    # gradient_checkpointing_enable is the older name, deprecated in transformers 5
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in cross_frame_layers(model))
    torch.manual_seed(3)
    expected = grads(model, video, text)
    patch_hf_xclip(model, backend="sdpa")
    recomputed = []
    model.vision_model.encoder.layers[0].message_fc.register_forward_hook(lambda *_: recomputed.append(1))
    torch.manual_seed(3)
    got = grads(model, video, text)
    assert len(recomputed) == 2  # forward, then the checkpoint's recomputation in backward
    assert_same_grads(got, expected)


# -- patch / unpatch ------------------------------------------------------------------------


def test_unpatch_restores_bit_identical_outputs_and_the_original_forwards(model, inputs):
    video, text = inputs
    layers = cross_frame_layers(model)
    assert len(layers) == 2 and all("forward" not in layer.__dict__ for layer in layers)
    with torch.no_grad():
        before = logits(model, video, text)
        patch_hf_xclip(model, backend="sdpa")
        assert all(layer.forward.__func__ is integrations._patched_forward for layer in layers)
        assert unpatch_hf_xclip(model) is model
        after = logits(model, video, text)
    assert torch.equal(after, before)
    for layer in layers:
        assert "forward" not in layer.__dict__  # the class's forward shows through, as before
        assert layer.forward.__func__ is type(layer).forward
        assert not any(name.startswith("_xclip_kernels") for name in vars(layer))
    assert unpatch is unpatch_hf_xclip


def test_unpatch_restores_a_forward_other_code_had_set(model, inputs):
    layer = cross_frame_layers(model)[0]
    own = layer.forward  # e.g. what a hooking library would install on the instance
    layer.forward = own
    patch_hf_xclip(model)
    assert layer.forward is not own
    unpatch(model)
    assert layer.forward is own


def test_patching_twice_does_not_wrap_twice_and_changes_the_backend(model, inputs):
    video, text = inputs
    layers = cross_frame_layers(model)
    patch_hf_xclip(model, backend="reference")
    first = [layer.forward for layer in layers]
    patch_hf_xclip(model, backend="sdpa")
    assert [layer.forward for layer in layers] == first
    assert {integrations._PATCH_ATTRIBUTE in vars(layer) for layer in layers} == {True}
    assert {getattr(layer, integrations._PATCH_ATTRIBUTE).backend for layer in layers} == {"sdpa"}
    patch_hf_xclip(model.vision_model)  # a part of the patched model: the same, no new wrapper
    unpatch_hf_xclip(model)
    assert all("forward" not in layer.__dict__ for layer in layers)
    with pytest.raises(ValueError, match="model: expected a model patched by patch_hf_xclip"):
        unpatch_hf_xclip(model)


def test_vision_model_alone_and_one_layer(model, inputs):
    video, text = inputs
    frames = video.flatten(0, 1)
    with torch.no_grad():
        expected = model.vision_model(pixel_values=frames).pooler_output
        patch_hf_xclip(model.vision_model, backend="sdpa")
        assert_close(model.vision_model(pixel_values=frames).pooler_output, expected, HF_ATOL, "pooler_output")
        unpatch_hf_xclip(model.vision_model)
        layer = cross_frame_layers(model)[0]
        hidden = torch.randn(2 * FRAMES, 17, WIDTH)
        expected = layer(hidden, None)
        patch_hf_xclip(layer, backend="sdpa")
        assert_close(layer(hidden, None), expected, HF_ATOL, "hidden_states")


def test_training_updates_hf_parameters_in_place(model, inputs):
    video, text = inputs
    patch_hf_xclip(model, backend="sdpa")
    weight = model.vision_model.encoder.layers[0].message_attn.k_proj.weight
    before = weight.detach().clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    logits(model, video, text).logsumexp(dim=-1).sum().backward()
    optimizer.step()
    assert weight is model.vision_model.encoder.layers[0].message_attn.k_proj.weight
    assert not torch.equal(weight.detach(), before)


# (torch.compile of a patched model: tests/xclip/test_compile.py.)


# -- what it refuses ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad, match",
    [
        ("xclip-base-patch32", r"model: expected a Hugging Face XCLIPModel.*got str"),
        (torch.nn.Linear(4, 4), r"model: expected .*XCLIPVisionEncoderLayer blocks, got a Linear without any$"),
    ],
    ids=["str", "other-module"],
)
def test_bad_model_is_a_type_error_naming_it(bad, match):
    for function in (patch_hf_xclip, unpatch_hf_xclip):
        with pytest.raises(TypeError, match=match):
            function(bad)


def test_our_own_model_is_refused_with_a_hint():
    with torch.device("meta"):
        ours = xclip.build_model("xclip-b32")
    with pytest.raises(TypeError, match=r"got a XCLIP without any \(xclip.XCLIP runs on xclip_kernels already"):
        patch_hf_xclip(ours)


def test_unknown_backend_is_refused_before_anything_changes(model):
    with pytest.raises(ValueError, match=r"backend: expected one of reference, sdpa.* got 'nope'"):
        patch_hf_xclip(model, backend="nope")
    assert all("forward" not in layer.__dict__ for layer in cross_frame_layers(model))


def test_forced_backend_that_cannot_run_raises_its_reasons(model, inputs):
    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    patch_hf_xclip(model, backend="cuda")
    with pytest.raises(xk.BackendNotSupportedError, match="cuda"):
        logits(model, *inputs)


# -- what the kernels cannot serve: HF's own forward for that call -----------------------------

CPU_BACKENDS = ["reference", "sdpa", "cpp"]


@pytest.fixture
def warned(monkeypatch) -> None:
    """A fresh once-per-process memory of fallback warnings for this test."""
    monkeypatch.setattr(integrations, "_WARNED", set())


def kernel_calls(monkeypatch) -> dict[str, int]:
    """Count the integration's calls of the two ops from now on."""
    calls = {"frame_attention": 0, "message_attention": 0}
    for op in calls:
        def counted(*args, _op=op, _real=getattr(integrations, op), **kwargs):
            calls[_op] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(integrations, op, counted)
    return calls


def fallback_warnings(record: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, integrations.HFFallbackWarning)]


def use_attention(model: torch.nn.Module, implementation: str) -> None:
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None:
            config._attn_implementation = implementation


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_output_attentions_runs_hf_forward_with_one_warning(backend, implementation, model, inputs, monkeypatch, warned):
    """``output_attentions=True`` (passed, or the config's default) gives exactly what the
    unpatched model gives, attention weights included (HF's eager attention forms them; its
    sdpa attention gives none); the next plain call runs on the kernels again."""
    skip_unless_runs("cpu", backend, grad=False)
    video, text = inputs
    use_attention(model, implementation)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # HF's own note that sdpa forms no weights
        expected = model(input_ids=text, pixel_values=video, output_attentions=True)
        plain = logits(model, video, text)
    if implementation == "eager":  # the control: the weights of both cross-frame blocks are there
        assert [tuple(a.shape) for a in expected.vision_model_output.attentions] == [
            (2 * FRAMES, HEADS, TOKENS + 1, TOKENS + 1)
        ] * 2
    patch_hf_xclip(model, backend=backend)
    calls = kernel_calls(monkeypatch)
    with torch.no_grad(), warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")  # "once" must come from the patch, not the filters
        got = model(input_ids=text, pixel_values=video, output_attentions=True)
        again = model(input_ids=text, pixel_values=video, output_attentions=True)
    assert calls == {"frame_attention": 0, "message_attention": 0}
    for out in (got, again):
        assert torch.equal(out.logits_per_video, expected.logits_per_video)
        assert len(out.vision_model_output.attentions) == len(expected.vision_model_output.attentions)
        for a, b in zip(out.vision_model_output.attentions, expected.vision_model_output.attentions):
            assert torch.equal(a, b)
    messages = fallback_warnings(record)
    assert len(messages) == 1, messages  # two layers, two calls: one warning
    assert "output_attentions=True" in messages[0] and "original forward" in messages[0]

    with torch.no_grad():
        assert_close(logits(model, video, text), plain, HF_ATOL)  # a plain call: the kernels again
    assert calls == {"frame_attention": 2, "message_attention": 2}

    if implementation == "eager":  # HF allows a config default of output_attentions only there
        config = cross_frame_layers(model)[0].self_attn.config  # the config's default counts too
        config.output_attentions = True
        with torch.no_grad(), warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            assert torch.equal(logits(model, video, text), expected.logits_per_video)
        assert calls == {"frame_attention": 2, "message_attention": 2}
        assert fallback_warnings(record) == []  # already warned in this process


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention_dropout_in_training_runs_hf_forward(backend, inputs, monkeypatch, warned):
    """In training with attention dropout the patched model gives HF's logits and gradients for
    the same seed (the same dropout draws); in eval, where dropout is off, the kernels run."""
    skip_unless_runs("cpu", backend)
    video, text = inputs
    model = make_hf_model(attention_dropout=0.3).train()
    torch.manual_seed(7)
    expected = grads(model, video, text)
    torch.manual_seed(7)
    expected_logits = logits(model, video, text).detach()
    torch.manual_seed(8)
    assert not torch.equal(logits(model, video, text).detach(), expected_logits)  # dropout is on
    patch_hf_xclip(model, backend=backend)
    calls = kernel_calls(monkeypatch)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(7)
        got = grads(model, video, text)
        torch.manual_seed(7)
        got_logits = logits(model, video, text).detach()
    assert calls == {"frame_attention": 0, "message_attention": 0}
    assert torch.equal(got_logits, expected_logits)
    assert_same_grads(got, expected)
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "attention dropout in training" in messages[0]

    model.eval()
    with torch.no_grad():
        logits(model, video, text)
    assert calls == {"frame_attention": 2, "message_attention": 2}


def test_attention_mask_runs_hf_forward(monkeypatch, warned):
    layer = cross_frame_layers(make_hf_model())[0]
    hidden = torch.randn(FRAMES, 5, WIDTH)
    mask = torch.zeros(FRAMES, 1, 6, 6)
    mask[..., 2] = -1e4  # one key hidden from every query: the mask matters
    with torch.no_grad():
        expected = layer(hidden, mask)
        assert not torch.allclose(expected, layer(hidden, None))
        patch_hf_xclip(layer, backend="sdpa")
        calls = kernel_calls(monkeypatch)
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            got = layer(hidden, mask)
            layer(hidden, mask)
    assert calls == {"frame_attention": 0, "message_attention": 0}
    assert torch.equal(got, expected)
    messages = fallback_warnings(record)
    assert len(messages) == 1 and "attention mask" in messages[0]


def test_the_package_imports_no_transformers_at_import_time():
    """No module-level import of transformers anywhere in xclip_kernels (a subprocess check
    would spend seconds importing torch)."""
    offenders = []
    for path in sorted(Path(xk.__file__).parent.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:  # module level only; lazy imports are fine
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            offenders += [f"{path}: {n}" for n in names if n.split(".")[0] == "transformers"]
    assert offenders == []


def test_flop_counter_around_the_first_patched_forward_counts_our_ops():
    """Patching with the automatic backend preloads it (as xclip.build_model does), so a
    FlopCounterMode entered before the first forward of a fresh process has its formulas."""
    import os
    import subprocess
    import sys

    skip_unless_runs("cpu", "cpp", grad=False)
    code = (
        "import torch, transformers\n"
        "from torch.utils.flop_counter import FlopCounterMode\n"
        "from xclip_kernels.integrations import patch_hf_xclip\n"
        f"vision = dict(hidden_size={WIDTH}, intermediate_size=192, num_hidden_layers=1, num_attention_heads={HEADS},"
        f" image_size={SIZE}, patch_size=8, num_frames={FRAMES}, mit_hidden_size=64, mit_intermediate_size=80,"
        " mit_num_hidden_layers=1, mit_num_attention_heads=1)\n"
        "config = transformers.XCLIPConfig(text_config=dict(hidden_size=64, intermediate_size=96, num_hidden_layers=1,"
        " num_attention_heads=1), vision_config=vision, projection_dim=64, prompt_layers=1,"
        " prompt_num_attention_heads=1)\n"
        "model = patch_hf_xclip(transformers.XCLIPModel(config).eval())\n"
        f"pixels = torch.randn(1, {FRAMES}, 3, {SIZE}, {SIZE})\n"
        "with torch.no_grad(), FlopCounterMode(display=False) as counter:\n"
        "    model(input_ids=torch.tensor([[49406, 320, 49407]]), pixel_values=pixels)\n"
        "print(sorted(str(op) for op in counter.get_flop_counts()['Global']))\n"
    )
    env = {name: value for name, value in os.environ.items() if name != "XCLIP_KERNELS_BACKEND"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                            cwd=Path(__file__).resolve().parents[3])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "xclip_ext.frame_attention" in result.stdout and "xclip_ext.message_attention" in result.stdout, result.stdout
