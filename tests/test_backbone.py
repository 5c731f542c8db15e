"""The frozen CLIP feature extractor: sources of weights, shapes, activation, errors."""

from __future__ import annotations

import warnings

import pytest
import torch

from inspector.backbone import BackboneError, BackboneSpec, load_backbone, resize_position_embedding

TINY = {"arch": "test-tiny", "pretrained": "random"}


def test_random_weights_warn_loudly_and_are_repeatable():
    with pytest.warns(UserWarning, match="RANDOM WEIGHTS"):
        a = load_backbone(BackboneSpec(**TINY))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = load_backbone(BackboneSpec(**TINY))
    assert a.spec.is_random
    for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), key


@pytest.fixture(scope="module")
def tiny():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(BackboneSpec(**TINY))


def test_features_shapes_and_frozen(tiny):
    pixels = torch.randn(2, 3, 518, 518)
    g, patch_tokens = tiny.encode_image(pixels)
    assert g.shape == (2, tiny.embed_dim)
    assert [tuple(f.shape) for f in patch_tokens] == [(2, 37 * 37, tiny.vision_width)] * 4
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training
    # the floor is the same global embedding
    torch.testing.assert_close(tiny.encode_image_floor(pixels), g)


def test_patch_tokens_are_the_raw_residual_stream(tiny):
    """F_l after block l equals running the first l blocks by hand (no LN_post, CLS removed)."""
    from inspector.backbone import _run_block

    pixels = torch.randn(1, 3, 518, 518)
    _, (f6, *_rest) = tiny.encode_image(pixels)
    v = tiny.clip.visual
    x = v.conv1(pixels).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(1, 1, -1), x], 1) + v.positional_embedding
    x = v.ln_pre(x)
    for block in v.transformer.resblocks[:6]:
        x = _run_block(block, x, causal=False)
    torch.testing.assert_close(f6, x[:, 1:])


def test_activation_switch_changes_the_function(tiny):
    pixels = torch.randn(1, 3, 518, 518)
    gelu = tiny.encode_image(pixels, layers=())[0]
    tiny.set_activation("quick_gelu")
    try:
        quick = tiny.encode_image(pixels, layers=())[0]
    finally:
        tiny.set_activation("gelu")
    assert not torch.allclose(gelu, quick)
    with pytest.raises(BackboneError, match="activation"):
        tiny.set_activation("relu")


def test_position_embedding_resize_keeps_cls_and_identity():
    pos = torch.randn(1 + 16 * 16, 8)
    out = resize_position_embedding(pos, 37)
    assert out.shape == (1 + 37 * 37, 8)
    assert torch.equal(out[0], pos[0])
    assert torch.equal(resize_position_embedding(pos, 16), pos)


def test_open_clip_checkpoint_file_roundtrip(tiny, tmp_path):
    import open_clip

    torch.manual_seed(0)  # the seed the "random" source uses, so the weights equal tiny's before resizing
    path = tmp_path / "tiny_open_clip.pt"
    torch.save({"state_dict": open_clip.create_model("test-tiny").state_dict()}, path)
    loaded = load_backbone(BackboneSpec(arch="test-tiny", pretrained=str(path)))
    assert not loaded.spec.is_random
    pixels = torch.randn(1, 3, 518, 518)
    torch.testing.assert_close(loaded.encode_image(pixels)[0], tiny.encode_image(pixels)[0])


@pytest.mark.parametrize("spec, message", [
    (BackboneSpec(arch="no-such-arch", pretrained="random"), "unknown backbone architecture"),
    (BackboneSpec(arch="test-tiny", pretrained="/nonexistent/clip.pt"), "not found"),
    (BackboneSpec(arch="test-tiny", pretrained="nosuchtag"), "not a file nor a pretrained tag"),
    (BackboneSpec(arch="test-tiny", pretrained="random", feature_layers=(6, 30)), "outside 1..24"),
    (BackboneSpec(arch="test-tiny", pretrained="random", image_size=500), "not a multiple"),
])
def test_clear_errors(spec, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(BackboneError, match=message):
            load_backbone(spec)


def test_non_clip_file_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"layer.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(BackboneError, match="not an OpenAI ViT CLIP"):
        load_backbone(BackboneSpec(arch="test-tiny", pretrained=str(path), clip_format="openai"))
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(BackboneError, match="neither a TorchScript archive nor a state dict"):
        load_backbone(BackboneSpec(arch="test-tiny", pretrained=str(tmp_path / "junk.pt"), clip_format="openai"))
