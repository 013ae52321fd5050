"""The model on each CPU inference GEMM provider (``xclip_kernels.gemm``): parity with float64,
bf16 under the low-precision rule, and no stale packed weight after the model changes."""

from __future__ import annotations

import pytest
import torch

from torch.utils._python_dispatch import TorchDispatchMode

import xclip
import xclip_kernels as xk
from xclip_kernels import gemm

TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)
PROVIDERS = [p for p in gemm.PROVIDERS if p == "matmul" or gemm.onednn_available()]


@pytest.fixture(autouse=True)
def _fresh_provider():
    gemm.set_provider(None)
    gemm.clear()
    yield
    gemm.set_provider(None)
    gemm.clear()


def _model(seed: int = 0) -> xclip.XCLIP:
    torch.manual_seed(seed)
    model = xclip.build_model(TINY).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.05)
    return model


def _inputs():
    generator = torch.Generator().manual_seed(1)
    video = torch.randn(2, TINY.num_frames, 3, TINY.image_size, TINY.image_size, generator=generator)
    return video, xclip.tokenize(["archery", "playing the violin", "a dog"])


def _float64_logits(model: xclip.XCLIP, video: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    twin = xclip.build_model(TINY).eval()
    twin.load_state_dict(model.state_dict())
    twin.double().set_attention_backend("reference")
    with torch.no_grad():
        return twin(video.double(), text)


@pytest.mark.parametrize("provider", PROVIDERS)
def test_fp32_logits_match_float64_on_every_provider(provider):
    model = _model()
    video, text = _inputs()
    truth = _float64_logits(model, video, text)
    gemm.set_provider(provider)
    with torch.inference_mode():
        got = model(video, text)
    scale = truth.abs().max().item()
    assert (got.double() - truth).abs().max().item() <= 1e-5 * max(1.0, scale)
    assert (gemm.packed_count() > 0) == (provider == "onednn")


class _AtenOps(TorchDispatchMode):
    """Records the overload packets of every op dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


@pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN linear op")
@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_linear_layer_takes_onednn_when_chosen(mode, dtype):
    """No GEMM of the model (patch embedding, blocks, MIT, prompts, text tower, projections)
    falls back to matmul in inference once oneDNN is the provider."""
    model = _model().to(dtype)
    video, text = _inputs()
    gemm.set_provider("onednn")
    with mode():
        model(video.to(dtype), text)  # the first call packs
        with _AtenOps() as ops:
            model(video.to(dtype), text)
    matmuls = {torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.mm, torch.ops.aten.linear,
               torch.ops.aten.matmul}
    cpp = xk.get_backend("cpp")
    if cpp.unavailable_reasons() or dtype not in cpp.dtypes:
        # The automatic backend is then sdpa, whose message path projects inside the op with
        # matmul (seen as mm outside inference mode, where matmul decomposes).
        matmuls -= {torch.ops.aten.matmul, torch.ops.aten.mm}
    assert not (ops.seen & matmuls), sorted(str(op) for op in ops.seen & matmuls)
    assert torch.ops.mkldnn._linear_pointwise in ops.seen


@pytest.mark.parametrize("provider", PROVIDERS)
def test_bf16_logits_within_the_low_precision_rule(provider):
    """Truth: float64 on the bf16-rounded weights and video; plain: the matmul provider in bf16
    with the reference attention."""
    model = _model().bfloat16()
    video, text = _inputs()
    video = video.bfloat16()
    truth = _float64_logits(model, video, text)
    gemm.set_provider("matmul")
    model.set_attention_backend("reference")
    with torch.inference_mode():
        plain = model(video, text)
    model.set_attention_backend(None)
    gemm.set_provider(provider)
    with torch.inference_mode():
        got = model(video, text)
    err = (got.double() - truth).abs().max().item()
    base = (plain.double() - truth).abs().max().item()
    assert torch.isfinite(got).all()
    assert err <= 2 * base + 1e-5 * max(1.0, truth.abs().max().item()), (err, base)


@pytest.mark.skipif(not gemm.onednn_available(), reason="this torch build has no oneDNN linear op")
def test_model_changes_reach_the_packed_path():
    """Packed weights made by one inference are never used after the model changes: a loaded
    state dict, a training step, and a cast to bf16 each give the new model's logits."""
    gemm.set_provider("onednn")
    model, other = _model(0), _model(1)
    video, text = _inputs()
    with torch.inference_mode():
        model(video, text)
    model.load_state_dict(other.state_dict())
    with torch.inference_mode():
        got = model(video, text)
    gemm.set_provider("matmul")
    with torch.inference_mode():
        expected = other(video, text)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    gemm.set_provider("onednn")
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model(video, text).logsumexp(dim=-1).sum().backward()
    optimizer.step()
    model.eval()
    with torch.inference_mode():
        trained = model(video, text)
    gemm.set_provider("matmul")
    with torch.inference_mode():
        trained_plain = model(video, text)
    assert (trained_plain - expected).abs().max() > 1e-3
    torch.testing.assert_close(trained, trained_plain, rtol=1e-5, atol=1e-5)
