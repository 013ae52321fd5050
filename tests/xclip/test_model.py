"""The X-CLIP model: backends agree with the reference, grad and no-grad paths agree, bad input
is refused with a message naming it."""

import pytest
import torch

import xclip
import xclip_kernels as xk
from xclip.model import CrossFrameBlock

TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=2, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)
CPU_BACKENDS = [name for name in xk.BACKENDS if name in ("reference", "sdpa", "cpp") and not xk.get_backend(name).unavailable_reasons()]


def randomized(config: xclip.XCLIPConfig, seed: int = 0) -> xclip.XCLIP:
    """A model whose every parameter, LayerNorms and biases included, is random and non-trivial."""
    torch.manual_seed(seed)
    model = xclip.build_model(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("logit_scale"):
                continue
            if "ln" in name or "norm" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("weight") else 0.05 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.normal_(0, 0.05)
    return model.eval()


def inputs(config: xclip.XCLIPConfig, batch: int = 2):
    video = torch.randn(batch, config.num_frames, 3, config.image_size, config.image_size)
    text = xclip.tokenize(["archery", "playing the violin", "a dog"])
    return video, text


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("config", [TINY, xclip.VARIANTS["xclip-b32"]], ids=["tiny", "b32"])
def test_backend_logits_match_reference(backend: str, config: xclip.XCLIPConfig) -> None:
    model = randomized(config)
    video, text = inputs(config, batch=2 if config is TINY else 1)
    with torch.no_grad():
        model.set_attention_backend("reference")
        expected = model(video, text)
        model.set_attention_backend(backend)
        got = model(video, text)
    assert got.shape == (video.shape[0], text.shape[0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_automatic_backend_is_the_first_runnable_in_cpu_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XCLIP_KERNELS_BACKEND", raising=False)
    model = randomized(TINY)
    assert model.attention_backend is None
    video, text = inputs(TINY)
    first = next(name for name in xk.PRIORITY["cpu"] if not xk.get_backend(name).unavailable_reasons())
    with torch.no_grad():
        auto = model(video, text)
        model.set_attention_backend(first)
        assert torch.equal(model(video, text), auto)


def test_grad_path_matches_inference_path_and_reaches_every_parameter() -> None:
    model = randomized(TINY)
    video, text = inputs(TINY)
    with torch.no_grad():
        fast = model(video, text)  # in-place fused epilogues
    logits = model(video, text)  # out-of-place, differentiable
    torch.testing.assert_close(logits, fast, rtol=1e-5, atol=1e-5)
    logits.logsumexp(dim=-1).sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_inference_does_not_modify_inputs() -> None:
    model = randomized(TINY)
    video, text = inputs(TINY)
    video_copy, text_copy = video.clone(), text.clone()
    with torch.inference_mode():
        model(video, text)
    assert torch.equal(video, video_copy) and torch.equal(text, text_copy)


@pytest.mark.parametrize(
    "first, second",
    [(torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode), (torch.inference_mode, torch.enable_grad)],
    ids=["inference_mode-then-no_grad", "no_grad-then-inference_mode", "inference_mode-then-grad"],
)
def test_grad_modes_follow_each_other_in_one_thread(first, second) -> None:
    # The blocks' scratch buffers live per thread: one made under inference_mode is an
    # inference tensor, which a later no_grad forward may not write.
    model = randomized(TINY)
    video, text = inputs(TINY)
    with first():
        expected = model(video, text)
    with second():
        got = model(video, text)
    torch.testing.assert_close(got.detach(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_forward_hooks_capture_each_blocks_own_input_and_output(mode) -> None:
    # Hooks on the blocks are a common way to extract features: every captured tensor must
    # keep the value it had when its hook ran (no block may write into its input afterwards).
    model = randomized(TINY)
    video, text = inputs(TINY)
    blocks = [*model.visual.transformer.resblocks, *model.mit.resblocks, *model.transformer.resblocks]

    def capture(context):  # noqa: ANN001, ANN202
        captured = []
        handles = [b.register_forward_hook(lambda m, i, o: captured.append((i[0], o))) for b in blocks]
        try:
            with context():
                model(video, text)
        finally:
            for handle in handles:
                handle.remove()
        return captured

    expected = capture(torch.enable_grad)  # nothing is written in place while autograd records
    got = capture(mode)
    assert len(got) == len(expected) == len(blocks)
    for index, ((got_in, got_out), (want_in, want_out)) in enumerate(zip(got, expected)):
        torch.testing.assert_close(got_in, want_in.detach(), rtol=1e-5, atol=1e-5, msg=f"input of block {index}")
        torch.testing.assert_close(got_out, want_out.detach(), rtol=1e-5, atol=1e-5, msg=f"output of block {index}")


def test_text_padding_after_end_token_is_ignored() -> None:
    # The text tower skips tokens after the last end token; that must not change the features.
    model = randomized(TINY)
    text = xclip.tokenize(["a dog", "a photo of a cat"])
    with torch.no_grad():
        both = model.encode_text(text)
        alone = model.encode_text(text[:1])
    torch.testing.assert_close(both[:1], alone, rtol=1e-5, atol=1e-6)


def test_drop_path_trains_and_is_identity_in_eval() -> None:
    config = TINY.replace(drop_path_rate=0.5)
    model = randomized(config)
    video, text = inputs(config)
    with torch.no_grad():
        eval_logits = model(video, text)
        plain = randomized(TINY)(video, text)
    torch.testing.assert_close(eval_logits, plain, rtol=1e-5, atol=1e-5)
    model.train()
    torch.manual_seed(1)
    model(video, text).sum().backward()
    assert model.visual.transformer.resblocks[-1].drop_path.rate == 0.5


def test_blocks_use_the_set_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    model = randomized(TINY)
    model.set_attention_backend("reference")
    assert all(b.attention_backend == "reference" for b in model.modules() if isinstance(b, CrossFrameBlock))
    with pytest.raises(ValueError, match="backend"):
        model.set_attention_backend("nope")
    model.set_attention_backend("cuda")
    video, text = inputs(TINY)
    with pytest.raises(xk.BackendNotSupportedError, match="cuda"):
        model(video, text)


def test_build_model_variants_and_frames() -> None:
    with torch.device("meta"):
        for name, config in xclip.VARIANTS.items():
            model = xclip.build_model(name, num_frames=16)
            assert model.config == config.replace(num_frames=16)
            assert model.mit.positional_embedding.shape == (1, 16, config.embed_dim)
    assert xclip.VARIANTS["xclip-l14-336"].frame_tokens == 577
    assert xclip.VARIANTS["xclip-b16"].frame_tokens == 197
    with pytest.raises(ValueError, match="name_or_config"):
        xclip.build_model("xclip-b8")


def test_official_parameter_names() -> None:
    with torch.device("meta"):
        keys = set(xclip.build_model("xclip-b32").state_dict())
    for key in [
        "visual.class_embedding", "visual.positional_embedding", "visual.conv1.weight", "visual.ln_pre.weight",
        "visual.transformer.resblocks.11.message_fc.weight", "visual.transformer.resblocks.0.message_ln.bias",
        "visual.transformer.resblocks.0.message_attn.in_proj_weight", "visual.transformer.resblocks.0.attn.out_proj.bias",
        "visual.transformer.resblocks.0.mlp.c_fc.weight", "visual.transformer.resblocks.0.mlp.c_proj.bias",
        "visual.ln_post.weight", "visual.proj", "mit.positional_embedding", "mit.resblocks.0.attn.in_proj_bias",
        "prompts_visual_ln.weight", "prompts_visual_proj", "prompts_generator.norm.weight", "prompts_generator.alpha",
        "prompts_generator.decoder.1.cross_attn.q_proj.weight", "prompts_generator.decoder.1.cross_attn.proj.bias",
        "prompts_generator.decoder.0.mlp.0.weight", "prompts_generator.decoder.0.mlp.3.bias",
        "transformer.resblocks.11.attn.in_proj_weight", "token_embedding.weight", "positional_embedding",
        "ln_final.weight", "text_projection", "logit_scale",
    ]:
        assert key in keys, key
    assert "prompts_generator.decoder.0.cross_attn.q_proj.bias" not in keys


@pytest.mark.parametrize(
    "shape, match",
    [
        ((2, 3, 3, 32), "5 dims"),
        ((2, 3, 1, 32, 32), "3 channels"),
        ((2, 4, 3, 32, 32), "num_frames = 3"),
        ((2, 3, 3, 48, 48), "32x32"),
        ((0, 3, 3, 32, 32), "batch"),
    ],
)
def test_bad_video(shape: tuple[int, ...], match: str) -> None:
    model = randomized(TINY)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(shape), xclip.tokenize("a dog"))


def test_bad_video_type_and_dtype() -> None:
    model = randomized(TINY)
    with pytest.raises(TypeError, match="video"):
        model([[1.0]], xclip.tokenize("a dog"))
    with pytest.raises(TypeError, match="video.*floating"):
        model(torch.zeros(1, 3, 3, 32, 32, dtype=torch.uint8), xclip.tokenize("a dog"))


@pytest.mark.parametrize(
    "text, error, match",
    [
        (xclip.tokenize("a dog").float(), TypeError, "int64"),
        (xclip.tokenize("a dog", context_length=20), ValueError, r"\(K, 77\)"),
        (xclip.tokenize("a dog")[0], ValueError, r"\(K, 77\)"),
        (torch.full((1, 77), 49408), ValueError, r"\[0, 49408\)"),
        (torch.full((1, 77), -1), ValueError, r"\[0, 49408\)"),
        ("a dog", TypeError, "token ids"),
    ],
)
def test_bad_text(text: object, error: type, match: str) -> None:
    model = randomized(TINY)
    video = torch.randn(1, 3, 3, 32, 32)
    with pytest.raises(error, match=match):
        model(video, text)


@pytest.mark.parametrize(
    "changes, match",
    [
        (dict(image_size=30), "image_size"),
        (dict(vision_heads=5), "vision_heads"),
        (dict(num_frames=0), "num_frames"),
        (dict(drop_path_rate=1.5), "drop_path_rate"),
        (dict(vision_layers=2.0), "vision_layers"),
    ],
)
def test_bad_config(changes: dict, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        TINY.replace(**changes)


def _count_block_calls(model: xclip.XCLIP) -> dict[str, int]:
    """Calls of the vision and text blocks' ``forward`` (wrapped: module hooks do not fire
    when checkpointing recomputes a block)."""
    calls = {"vision": 0, "text": 0}

    def counting(forward, tower: str):
        def wrapped(*args, **kwargs):
            calls[tower] += 1
            return forward(*args, **kwargs)

        return wrapped

    for tower, blocks in (("vision", model.visual.transformer.resblocks), ("text", model.transformer.resblocks)):
        for block in blocks:
            block.forward = counting(block.forward, tower)
    return calls


def test_gradient_checkpointing_gives_identical_outputs_and_gradients() -> None:
    # Drop path on: the recomputation must replay the same random masks.
    config = TINY.replace(drop_path_rate=0.3)
    model = randomized(config).train()
    video, text = inputs(config)
    calls = _count_block_calls(model)

    def run(enabled: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.set_gradient_checkpointing(enabled)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        logits = model(video, text)
        torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2])).backward()
        return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, plain_grads = run(False)
    assert calls == {"vision": 2, "text": 2}
    checkpointed, checkpointed_grads = run(True)
    assert model.gradient_checkpointing
    assert calls == {"vision": 2 + 4, "text": 2 + 4}  # every block ran again in backward
    assert torch.equal(checkpointed, plain)
    assert checkpointed_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        assert torch.equal(checkpointed_grads[name], grad), name


def test_gradient_checkpointing_leaves_eval_and_no_grad_alone() -> None:
    model = randomized(TINY)
    video, text = inputs(TINY)
    with torch.no_grad():
        expected = model(video, text)
    expected_with_grad = model(video, text).detach()  # grad mode's GEMMs may be another provider's
    model.set_gradient_checkpointing(True)
    calls = _count_block_calls(model)
    with torch.no_grad():
        assert torch.equal(model.train()(video, text), expected)
    assert torch.equal(model.eval()(video, text).detach(), expected_with_grad)  # eval with grad: no recompute either
    assert calls == {"vision": 4, "text": 4}
    with pytest.raises(TypeError, match="enabled: expected a bool, got 'yes'"):
        model.set_gradient_checkpointing("yes")


def test_trains_and_infers_under_autocast_with_float32_weights() -> None:
    # Autocast runs the message path's matmuls in bf16 while the LayerNorm and projection weights
    # stay float32 (the model hands the op one dtype), and casts no in-place or out= operation
    # (so without grad the blocks must not take their in-place path).
    model = randomized(TINY).train()
    video, text = inputs(TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(video, text)
        with torch.no_grad():
            inferred = model(video, text)
    assert logits.dtype == inferred.dtype == torch.bfloat16
    assert torch.equal(inferred, logits.detach())
    torch.nn.functional.cross_entropy(logits.float(), torch.tensor([1, 0])).backward()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
