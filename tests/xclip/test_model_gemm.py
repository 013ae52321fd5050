"""The model on each CPU inference GEMM provider (``xclip_kernels.gemm``): parity with float64,
bf16 under the low-precision rule, and no stale packed or widened weight after the model changes."""

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
    # "float32" widens only bf16/fp16: float32 GEMMs keep their own (measured) provider.
    assert (gemm.packed_count() > 0) == (gemm.provider(torch.float32) == "onednn")


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
    assert (gemm.packed_count() > 0) == (provider != "matmul")  # the route asked for was taken


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


# --------------------------------------------------------------------------- widened to float32


@pytest.fixture(params=["matmul", "onednn"])
def float32_engine(request, monkeypatch) -> str:
    """The widened route's float32 GEMMs on each engine float32 GEMMs may take here."""
    if request.param == "onednn" and not gemm.onednn_available():
        pytest.skip("this torch build has no oneDNN linear op")
    monkeypatch.setattr(gemm, "float32_engine", lambda: request.param)
    return request.param


def _float64_features(model: xclip.XCLIP, video: torch.Tensor, text: torch.Tensor):
    twin = xclip.build_model(TINY).eval()
    twin.load_state_dict(model.state_dict())
    twin.double().set_attention_backend("reference")
    with torch.no_grad():
        return twin.encode_video_features(video.double()), twin.encode_text(text)


def test_bf16_features_on_the_widened_route_within_the_low_precision_rule(float32_engine):
    """Video features, patch features and label features (not only the logits) of the widened
    route against float64 on the bf16-rounded weights, under the 2x rule with the matmul
    provider in bf16 (reference attention) as plain."""
    model = _model().bfloat16()
    video, text = _inputs()
    video = video.bfloat16()
    truth_video, truth_text = _float64_features(model, video, text)
    gemm.set_provider("matmul")
    model.set_attention_backend("reference")
    with torch.inference_mode():
        plain_video, plain_text = model.encode_video_features(video), model.encode_text(text)
    model.set_attention_backend(None)
    gemm.set_provider("float32")
    with torch.inference_mode():
        got_video, got_text = model.encode_video_features(video), model.encode_text(text)
    pairs = {"video": (got_video.video, plain_video.video, truth_video.video),
             "patches": (got_video.patches, plain_video.patches, truth_video.patches),
             "text": (got_text, plain_text, truth_text)}
    for what, (got, plain, truth) in pairs.items():
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all(), what
        err = (got.double() - truth).abs().max().item()
        base = (plain.double() - truth).abs().max().item()
        assert err <= 2 * base + 1e-5 * max(1.0, truth.abs().max().item()), (what, err, base)
    assert gemm.packed_count() > 0


class _GemmInputs(TorchDispatchMode):
    """Records each GEMM op dispatched while active with the dtypes of its tensor arguments."""

    GEMMS = {torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.mm, torch.ops.aten.linear,
             torch.ops.aten.matmul}

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[object, set[torch.dtype]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.GEMMS:
            dtypes = {a.dtype for a in (*args, *(kwargs or {}).values()) if isinstance(a, torch.Tensor)}
            self.seen.append((func.overloadpacket, dtypes))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", [torch.inference_mode, torch.no_grad], ids=["inference_mode", "no_grad"])
def test_every_linear_layer_widens_bf16_when_chosen(mode, float32_engine):
    """No GEMM of the model (patch embedding, blocks, MIT, prompts, text tower, projections)
    runs in bf16 once the widened route is the provider: they all see float32 operands."""
    model = _model().bfloat16()
    video, text = _inputs()
    gemm.set_provider("float32")
    with mode():
        model(video.bfloat16(), text)  # the first call makes the float32 copies
        with _AtenOps() as ops, _GemmInputs() as gemms:
            model(video.bfloat16(), text)
    cpp = xk.get_backend("cpp")
    in_bf16 = [op for op, dtypes in gemms.seen if torch.bfloat16 in dtypes]
    if cpp.unavailable_reasons() or torch.bfloat16 not in cpp.dtypes:
        # The automatic backend is then sdpa, whose message path projects inside the op with
        # matmul (seen as mm outside inference mode, where matmul decomposes).
        in_bf16 = [op for op in in_bf16 if op not in (torch.ops.aten.matmul, torch.ops.aten.mm)]
    assert not in_bf16, sorted(map(str, in_bf16))
    if float32_engine == "onednn":
        assert torch.ops.mkldnn._linear_pointwise in ops.seen
    else:
        assert any(op in (torch.ops.aten.addmm, torch.ops.aten.addmm_) for op, _ in gemms.seen)


def test_model_changes_reach_the_widened_route(float32_engine):
    """Float32 copies made by one inference are never used after the model changes: a loaded
    state dict, a training step, an edit under no_grad and a round trip through ``.float()``
    each give, bit for bit, what the widened route gives with no cached copy at all."""
    gemm.set_provider("float32")
    model, other = _model(0).bfloat16(), _model(1).bfloat16()
    video, text = _inputs()
    video = video.bfloat16()

    def run() -> torch.Tensor:
        with torch.inference_mode():
            return model(video, text)

    def uncached() -> torch.Tensor:
        gemm.clear()
        return run()

    def train_step() -> None:
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)  # small enough not to saturate the logits
        model(video, text).float().logsumexp(dim=-1).sum().backward()
        optimizer.step()
        model.eval()

    def edit_under_no_grad() -> None:
        with torch.no_grad():
            model.visual.transformer.resblocks[0].mlp.c_fc.weight.mul_(-1.0)
            model.transformer.resblocks[0].attn.in_proj_weight.mul_(0.5)

    def through_float32() -> None:
        model.float()
        with torch.no_grad():
            model.mit.resblocks[0].mlp.c_proj.weight.add_(0.05)
            model.prompts_generator.decoder[0].cross_attn.q_proj.weight.mul_(3.0)
        model.bfloat16()

    changes = {"load_state_dict": lambda: model.load_state_dict(other.state_dict()), "train": train_step,
               "no_grad edit": edit_under_no_grad, ".float() and back": through_float32}
    previous = run()
    assert gemm.packed_count() > 0
    for what, change in changes.items():
        change()
        got = run()
        assert not torch.equal(got, previous), f"{what} did not change the logits"
        assert torch.equal(got, uncached()), f"{what}: a stale float32 copy was used"
        previous = got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_first_forward_of_a_process_under_inference_mode(monkeypatch, dtype):
    """A process whose first forward runs under ``torch.inference_mode`` measures the GEMM
    providers there (nothing measured yet), and that forward gives what ``no_grad`` gives on
    the provider it chose."""
    model = _model().to(dtype)
    video, text = _inputs()
    monkeypatch.setattr(gemm, "_choices", {})
    monkeypatch.setattr(gemm, "_measurements", {})
    with torch.inference_mode():
        logits = model(video.to(dtype), text)
    assert dtype in gemm.measurements()
    with torch.no_grad():
        expected = model(video.to(dtype), text)
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("provider", PROVIDERS)
def test_fake_tensors_run_the_model_and_leave_nothing_behind(provider, dtype):
    """Under FakeTensorMode (shape, memory and FLOP estimates without running) every provider
    takes its plain path: the model gives fake logits of the real shape and dtype, and fills no
    cache or scratch buffer that the next real call would then read."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    model = _model().to(dtype)
    video, text = _inputs()
    gemm.set_provider(provider)
    with torch.no_grad():
        before = model(video.to(dtype), text)
        with FakeTensorMode(allow_non_fake_inputs=True) as fake_mode:
            fake = model(fake_mode.from_tensor(video.to(dtype)), text)
        after = model(video.to(dtype), text)
    assert isinstance(fake, FakeTensor) and fake.shape == before.shape and fake.dtype == before.dtype
    torch.testing.assert_close(after, before, atol=0, rtol=0)
