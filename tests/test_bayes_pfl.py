"""Behaviour of the Bayes-PFL engine on the tiny random backbone (CPU, fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from inspector.backbone import EOT_TOKEN, tokenize
from inspector.detectors.bayes_pfl import BayesPFL, BayesPFLHead, official_image_scores
from inspector.detectors.bayes_pfl.head import (
    HeadFormatError,
    head_from_official_state,
    head_to_official_state,
)
from inspector.detectors.bayes_pfl.model import prompt_name
from inspector.imaging import preprocess

R = 3


def noise_for(model: BayesPFL, n: int, samples: int = R, seed: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    e = model.config.text_width
    return {"isd": torch.randn(n, samples, e, generator=gen), "iad_normal": torch.randn(samples, e, generator=gen),
            "iad_abnormal": torch.randn(samples, e, generator=gen)}


def test_shapes_and_ranges(tiny_model, images):
    pred = tiny_model.predict(images, ["metal_nut", "screw", "bottle"], samples=R)
    assert pred.anomaly_map.shape == (3, 518, 518)
    for field in (pred.image_score, pred.text_score, pred.topk_score):
        assert field.shape == (3,)
    assert 0 <= float(pred.anomaly_map.min()) and float(pred.anomaly_map.max()) <= 1
    assert torch.all((pred.text_score > 0) & (pred.text_score < 1))
    assert torch.allclose(pred.image_score, 0.5 * pred.text_score + 0.5 * pred.topk_score)
    assert pred.provenance["random_weights"] is True
    assert float(pred.anomaly_map.std()) > 1e-4, "maps must not be constant"


def test_truncated_text_path_equals_full_77_tokens(tiny_model):
    """Cutting each prompt after its EOT changes nothing under the causal mask."""
    model, c = tiny_model, tiny_model.config
    names = ["metal_nut", "pcb1"]
    g = torch.randn(2, c.text_width)
    eps = noise_for(model, 2)
    states = [model._state_inputs(eps["iad_normal"], eps["iad_abnormal"])] * 2
    ours = model.encode_prompts(g, eps["isd"], names, states)  # [2, M, E]

    # the official construction: 77 tokens, "X" replaced by P+Q learned tokens, tail cut at 77
    inserted = c.context_len + c.state_len
    z_isd = model.head.isd(g, eps["isd"])["zk"]
    for i, name in enumerate(names):
        tokens = tokenize(["X " + prompt_name(name)])[0]
        eot = int((tokens == EOT_TOKEN).nonzero()[0])
        emb = model.backbone.token_embeddings(tokens)
        seqs = []
        for s in range(2):
            for r in range(R):
                for b in range(c.bank_size):
                    learned = torch.cat([c_ := model.head.context[b] + z_isd[i, r], states[i][s, r, b]])
                    del c_
                    seqs.append(torch.cat([emb[:1], learned, emb[2:77 - inserted + 1]]))
        full = torch.stack(seqs)
        assert full.shape[1] == 77
        t = model.backbone.encode_text(full, torch.full((full.shape[0],), eot + inserted - 1))
        torch.testing.assert_close(torch.nn.functional.normalize(t, dim=-1), ours[i], atol=1e-5, rtol=0)


def test_batch_equals_single_calls(tiny_model, images):
    names = ["metal_nut", "screw", "pcb1"]
    batch = tiny_model.predict(images, names, samples=R)
    for i, image in enumerate(images):
        single = tiny_model.predict([image], names[i], samples=R)
        torch.testing.assert_close(single.anomaly_map[0], batch.anomaly_map[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(single.text_score[0], batch.text_score[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(single.topk_score[0], batch.topk_score[i], atol=1e-5, rtol=0)


def test_same_noise_same_output_and_noise_matters(tiny_model, images):
    noise = noise_for(tiny_model, 2)
    a = tiny_model.predict(images[:2], "bottle", samples=R, noise=noise)
    b = tiny_model.predict(images[:2], "bottle", samples=R, noise={k: v.clone() for k, v in noise.items()})
    assert torch.equal(a.anomaly_map, b.anomaly_map) and torch.equal(a.text_score, b.text_score)
    other = tiny_model.predict(images[:2], "bottle", samples=R, noise=noise_for(tiny_model, 2, seed=6))
    assert not torch.allclose(a.anomaly_map, other.anomaly_map)
    zero = {k: torch.zeros_like(v) for k, v in noise.items()}
    z1 = tiny_model.predict(images[:2], "bottle", samples=R, noise=zero)
    z2 = tiny_model.predict(images[:2], "bottle", samples=1, noise={k: v[..., :1, :] for k, v in zero.items()})
    # with zero noise every sample is the same prompt: R samples equal one
    torch.testing.assert_close(z1.anomaly_map, z2.anomaly_map, atol=1e-5, rtol=0)


def test_seeded_noise_is_reproducible_and_class_specific(tiny_model, images):
    a = tiny_model.predict(images[:1], "bottle", samples=R)
    tiny_model.clear_caches()
    b = tiny_model.predict(images[:1], "bottle", samples=R)
    assert torch.equal(a.anomaly_map, b.anomaly_map)
    n1, a1 = tiny_model.draw_iad_noise("bottle", R)
    n2, _ = tiny_model.draw_iad_noise("screw", R)
    assert not torch.equal(n1, n2) and not torch.equal(n1, a1)


def test_noise_shape_is_checked(tiny_model, images):
    noise = noise_for(tiny_model, 1, samples=2)
    with pytest.raises(ValueError, match=r"noise\['isd'\] has shape"):
        tiny_model.predict(images[:1], "bottle", samples=R, noise=noise)


def test_class_cache_equals_exact_with_own_prototype(tiny_model, images):
    noise = noise_for(tiny_model, 1)
    exact = tiny_model.predict(images[:1], "bottle", samples=R, noise=noise)
    tiny_model.text_cache = "class"
    try:
        tiny_model.set_prototype("bottle", images[:1])  # the image's own embedding
        cached = tiny_model.predict(images[:1], "bottle", samples=R, noise=noise)
        torch.testing.assert_close(cached.anomaly_map, exact.anomaly_map, atol=1e-6, rtol=0)
        torch.testing.assert_close(cached.text_score, exact.text_score, atol=1e-6, rtol=0)
        # without noise, the class's text embeddings are computed once and reused for every image
        first = tiny_model.predict(images, "bottle", samples=R)
        assert ("bottle", R) in tiny_model._class_text
        again = tiny_model.predict(images[1:2], "bottle", samples=R)
        torch.testing.assert_close(again.anomaly_map[0], first.anomaly_map[1], atol=1e-6, rtol=0)
    finally:
        tiny_model.text_cache = "none"
        tiny_model._prototypes.clear()
        tiny_model.clear_caches()


def test_topk_follows_the_official_rule_unless_configured(tiny_model, images):
    pred = tiny_model.predict(images[:2], ["screw", "bottle"], samples=1)
    flat = pred.anomaly_map.flatten(1)
    torch.testing.assert_close(pred.topk_score[0], flat[0].topk(20).values.mean())
    torch.testing.assert_close(pred.topk_score[1], flat[1].topk(2000).values.mean())
    tiny_model.topk = 7
    try:
        pred = tiny_model.predict(images[:1], "screw", samples=1)
        torch.testing.assert_close(pred.topk_score[0], pred.anomaly_map[0].flatten().topk(7).values.mean())
    finally:
        tiny_model.topk = 0


def test_official_image_scores_minmax_per_class():
    text = torch.tensor([0.2, 0.4, 0.3, 0.9])
    topk = torch.tensor([0.1, 0.3, 0.5, 0.5])
    fused = official_image_scores(text, topk, ["a", "a", "b", "b"])
    expected_a = 0.5 * torch.tensor([0.0, 1.0]) + 0.5 * torch.tensor([0.0, 1.0])
    torch.testing.assert_close(fused[:2].float(), expected_a, atol=1e-6, rtol=0)
    torch.testing.assert_close(fused[2:].float(), torch.tensor([0.0, 0.5]), atol=1e-6, rtol=0)


def test_class_name_too_long_is_a_clear_error(tiny_model, images):
    with pytest.raises(ValueError, match="too long"):
        tiny_model.predict(images[:1], "very " * 70, samples=1)


def test_head_save_load_roundtrip(tiny_model, images, tmp_path):
    path = tmp_path / "head.pt"
    tiny_model.head.save(path)
    loaded = BayesPFLHead.load(path)
    assert loaded.config == tiny_model.head.config
    for key, value in tiny_model.head.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    model2 = BayesPFL(tiny_model.backbone, loaded, samples=R)
    a = tiny_model.predict(images[:1], "bottle", samples=R)
    b = model2.predict(images[:1], "bottle", samples=R)
    assert torch.equal(a.anomaly_map, b.anomaly_map)


def test_official_layout_roundtrip_and_stage_rule(tiny_model, tmp_path):
    official = head_to_official_state(tiny_model.head)
    assert len(official) == 131  # every key of the official loader (strict=True)
    torch.save({"MyModel": official}, tmp_path / "epoch_post_7_1.pth")
    torch.save({"MyModel": official}, tmp_path / "train_visa.pth")
    stage1 = BayesPFLHead.load(tmp_path / "epoch_post_7_1.pth")
    stage2 = BayesPFLHead.load(tmp_path / "train_visa.pth")
    assert stage1.config.stage == 1 and stage2.config.stage == 2
    for key, value in tiny_model.head.state_dict().items():
        assert torch.equal(value, stage2.state_dict()[key]), key
    back = head_to_official_state(head_from_official_state(official))
    assert back.keys() == official.keys()
    broken = dict(official)
    del broken["RCA.q_proj_pre.bias"]
    torch.save({"MyModel": broken}, tmp_path / "broken.pth")
    with pytest.raises(HeadFormatError, match="RCA.q_proj_pre.bias"):
        BayesPFLHead.load(tmp_path / "broken.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(HeadFormatError, match="not a readable"):
        BayesPFLHead.load(tmp_path / "junk.pth")


def test_stage_one_ignores_the_image_head(tiny_model, images):
    stage1 = BayesPFLHead(dataclasses.replace(tiny_model.head.config, stage=1))
    stage1.load_state_dict(tiny_model.head.state_dict())
    model1 = BayesPFL(tiny_model.backbone, stage1, samples=1)
    before = model1.predict(images[:1], "bottle", samples=1)
    with torch.no_grad():
        stage1.image_mapping.weight.add_(1.0)
    after = model1.predict(images[:1], "bottle", samples=1)
    assert torch.equal(before.text_score, after.text_score)
    stage2 = BayesPFL(tiny_model.backbone, tiny_model.head, samples=1).predict(images[:1], "bottle", samples=1)
    assert not torch.equal(before.text_score, stage2.text_score)


def test_preprocess_matches_official_transform(images):
    import numpy as np
    from PIL import Image

    pixels = preprocess(images[:1], 518)[0]
    resized = np.asarray(images[0].resize((518, 518), Image.BICUBIC), dtype=np.float32) / 255.0
    mean = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
    std = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
    expected = torch.from_numpy((resized - mean) / std).permute(2, 0, 1)
    torch.testing.assert_close(pixels, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("grid, size", [(37, 518), (16, 224), (2, 5)])
def test_separable_upsampling_equals_interpolate(grid, size):
    from inspector.detectors.bayes_pfl.model import upsampled_sigmoid_sum

    diff = torch.randn(2, 6, grid, grid, generator=torch.Generator().manual_seed(grid)) * 5
    expected = torch.sigmoid(torch.nn.functional.interpolate(diff, size=(size, size), mode="bilinear",
                                                             align_corners=True)).sum(1)
    torch.testing.assert_close(upsampled_sigmoid_sum(diff, size), expected, atol=6 * 1e-5, rtol=0)
    # the single-block path that CUDA takes, and an uneven block size
    torch.testing.assert_close(upsampled_sigmoid_sum(diff, size, block_rows=size), expected, atol=6e-5, rtol=0)
    torch.testing.assert_close(upsampled_sigmoid_sum(diff, size, block_rows=7), expected, atol=6e-5, rtol=0)
