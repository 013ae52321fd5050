"""``xclip.text_cache``: the disk cache of label features is keyed by the weights' content, so
a stale hit (features of other weights) cannot happen, while the same weights under another
path or modification time share one entry. End-to-end cache behaviour through the CLI is in
test_classify.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

import xclip
from xclip import text_cache as tc
from xclip.classify import encode_labels

TINY = xclip.XCLIPConfig(
    image_size=32, patch_size=8, vision_width=128, vision_layers=1, vision_heads=2, embed_dim=64,
    text_width=64, text_layers=2, text_heads=1, num_frames=3, mit_heads=1, prompt_heads=1,
)
LABELS = ["archery", "bowling", "playing the violin", "surfing water"]


def tiny_model(seed: int) -> xclip.XCLIP:
    torch.manual_seed(seed)
    return xclip.build_model(TINY).eval()


@pytest.fixture(scope="module")
def models() -> tuple[xclip.XCLIP, xclip.XCLIP]:
    """Two models of the same sizes with different random weights."""
    return tiny_model(0), tiny_model(1)


def test_checkpoint_rewritten_with_the_same_size_and_mtime_is_a_miss(models, tmp_path):
    """The stale hit of a path + size + mtime key: other weights written to the same path, with
    the same size and modification time, must not get the first weights' features."""
    first, second = models
    cache = tc.TextFeatureCache(tmp_path / "cache")
    path = tmp_path / "model.safetensors"
    first.save(path)
    stamp = os.stat(path)
    _, hit = tc.text_features(xclip.load_checkpoint(path), LABELS, checkpoint=path, cache=cache)
    assert not hit

    second.save(path)
    os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert os.stat(path).st_size == stamp.st_size and os.stat(path).st_mtime_ns == stamp.st_mtime_ns
    reloaded = xclip.load_checkpoint(path)
    features, hit = tc.text_features(reloaded, LABELS, checkpoint=path, cache=cache)
    assert not hit, "features of the previous weights were returned"
    assert torch.equal(features, encode_labels(second, LABELS))
    assert not torch.allclose(features, encode_labels(first, LABELS))


def test_same_weights_under_another_path_or_mtime_hit(models, tmp_path):
    first, _ = models
    cache = tc.TextFeatureCache(tmp_path / "cache")
    path = tmp_path / "a.safetensors"
    first.save(path)
    features, hit = tc.text_features(xclip.load_checkpoint(path), LABELS, checkpoint=path, cache=cache)
    assert not hit
    copy = tmp_path / "elsewhere" / "b.safetensors"
    copy.parent.mkdir()
    shutil.copy(path, copy)
    os.utime(copy, ns=(10**18, 10**18))
    again, hit = tc.text_features(xclip.load_checkpoint(copy), LABELS, checkpoint=copy, cache=cache)
    assert hit and torch.equal(again, features)
    # No path at all: the weights identify themselves.
    again, hit = tc.text_features(first, LABELS, cache=cache)
    assert hit and torch.equal(again, features)
    assert len(list((tmp_path / "cache").glob("text-*.safetensors"))) == 1


def test_weights_changed_in_memory_are_a_miss(tmp_path):
    """The same model object (and checkpoint path) after an in-place update of one text-side
    weight: the features are encoded again."""
    model = tiny_model(2)
    path = tmp_path / "model.safetensors"
    model.save(path)
    cache = tc.TextFeatureCache(tmp_path / "cache")
    before, hit = tc.text_features(model, LABELS, checkpoint=path, cache=cache)
    assert not hit
    with torch.no_grad():
        model.transformer.resblocks[1].ln_2.bias[5] += 0.5
    after, hit = tc.text_features(model, LABELS, checkpoint=path, cache=cache)
    assert not hit and torch.equal(after, encode_labels(model, LABELS))
    assert not torch.equal(after, before)


def test_digest_covers_exactly_what_the_features_depend_on():
    """Every text-side tensor is in the digest; the tensors it leaves out (vision tower, MIT,
    prompts, logit scale) indeed cannot change the label features."""
    model = tiny_model(3)
    digest = tc.weights_digest(model)
    features = encode_labels(model, LABELS)
    hashed, skipped = 0, 0
    for name, tensor in model.state_dict().items():
        original = tensor.clone()
        with torch.no_grad():
            tensor.view(-1)[0] += 1.0
        if name.startswith(("visual.", "mit.", "prompts_", "logit_scale")):
            skipped += 1
            assert tc.weights_digest(model) == digest, name
            assert torch.equal(encode_labels(model, LABELS), features), f"{name} changes the label features"
        else:
            hashed += 1
            assert tc.weights_digest(model) != digest, f"{name} is not in the digest"
        with torch.no_grad():
            tensor.copy_(original)
    assert hashed and skipped and tc.weights_digest(model) == digest
    # The config (the LayerNorm eps here: same tensors, other features) and the dtype count too.
    other = tiny_model(3)
    assert tc.weights_digest(other) == digest
    other.config = TINY.replace(layer_norm_eps=1e-6)
    assert tc.weights_digest(other) != digest
    assert tc.weights_digest(tiny_model(3).double()) != digest


def test_a_cache_file_of_other_weights_is_ignored(models, tmp_path):
    """A file under the requested key but written for other weights (hand-copied, or a key
    collision) is a miss, as one for other labels is."""
    first, second = models
    cache = tc.TextFeatureCache(tmp_path / "cache")
    tc.text_features(first, LABELS, cache=cache)
    (written,) = (tmp_path / "cache").glob("text-*.safetensors")
    key = tc.cache_key(tc.weights_digest(second), LABELS, TINY.context_length)
    shutil.copy(written, cache.path(key))
    features, hit = tc.text_features(second, LABELS, cache=cache)
    assert not hit and torch.equal(features, encode_labels(second, LABELS))


def test_no_cache_always_encodes(models, tmp_path):
    first, _ = models
    features, hit = tc.text_features(first, LABELS, checkpoint=tmp_path / "whatever")
    assert not hit and torch.equal(features, encode_labels(first, LABELS))
