"""Parity of the Bayes-PFL engine with the independent naive reference (tests/reference_bayes_pfl.py).

Random OpenAI-layout CLIP weights (tiny widths, 24 vision blocks so layers 6/12/18/24 exist) and a
random official ``{'MyModel': ...}`` head are written to disk and loaded through the public API; the
engine's batched prediction for two images of two classes is compared with per-image reference calls
on identical noise, fp32 on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
import reference_bayes_pfl as ref

from inspector import BayesPFL
from inspector.imaging import preprocess

R = 2  # Monte-Carlo samples: small keeps the tests fast
B, P, Q, K = 3, 5, 5, 10
IMAGE_SIZE = 518
MAP_ATOL = 1e-4
TEXT_ATOL = 1e-5
CLASSES = ["metal_nut", "pcb1"]

# width -> (vision width, text width = embed dim); heads = width // 64
WIDTHS = {"w64": 64, "w128": 128}


def _images(seed=0):
    """Two random RGB images whose sizes are not 518, so the resize matters."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(300, 420, 3), dtype=np.uint8)
    # a smoother second image (structure at several scales) so the maps are not pure noise
    low = rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)
    b = np.asarray(Image.fromarray(low).resize((487, 611), Image.BILINEAR)).astype(np.int16)
    b = np.clip(b + rng.integers(-20, 21, size=b.shape), 0, 255).astype(np.uint8)
    return [Image.fromarray(a), Image.fromarray(b)]


def _noise(n, width, zero, seed=7):
    if zero:
        return {"isd": torch.zeros(n, R, width), "iad_normal": torch.zeros(R, width),
                "iad_abnormal": torch.zeros(R, width)}
    gen = torch.Generator().manual_seed(seed)
    return {"isd": torch.randn(n, R, width, generator=gen),
            "iad_normal": torch.randn(R, width, generator=gen),
            "iad_abnormal": torch.randn(R, width, generator=gen)}


class _Setup:
    def __init__(self, root: Path, width: int, head_name: str, seed: int):
        self.width = width
        self.clip_state = ref.make_openai_clip_state(width, 24, 14, 16, width, 2, width, seed=seed)
        self.head_state = ref.make_official_head_state(width, width, B=B, P=P, Q=Q, K=K, seed=seed + 100)
        root.mkdir(parents=True, exist_ok=True)
        self.clip_path = root / "clip.pt"
        self.head_path = root / head_name
        torch.save(self.clip_state, self.clip_path)
        torch.save({"MyModel": self.head_state}, self.head_path)
        self.model = BayesPFL.from_official(clip=self.clip_path, head=self.head_path, device="cpu", samples=R)
        self.images = _images()
        self.pixels = torch.stack([ref.reference_preprocess(im, IMAGE_SIZE) for im in self.images])


@pytest.fixture(scope="module", params=sorted(WIDTHS))
def setup(request, tmp_path_factory):
    width = WIDTHS[request.param]
    return _Setup(tmp_path_factory.mktemp(request.param), width, "train_visa.pth", seed=width)


@pytest.fixture(scope="module")
def setup_stage1(tmp_path_factory):
    return _Setup(tmp_path_factory.mktemp("stage1"), 64, "epoch_post_3_1.pth", seed=11)


def _check(s: _Setup, class_names, noise, stage):
    pred = s.model.predict(s.images, class_names, samples=R, noise=noise)
    n = len(s.images)
    assert tuple(pred.anomaly_map.shape) == (n, IMAGE_SIZE, IMAGE_SIZE)
    for key in ("text_score", "topk_score", "image_score"):
        assert tuple(getattr(pred, key).shape) == (n,)
    ref_maps, ref_scores = [], []
    for i in range(n):
        m, t = ref.reference_predict(s.clip_state, s.head_state, s.pixels[i:i + 1], class_names[i],
                                     noise["isd"][i], noise["iad_normal"], noise["iad_abnormal"],
                                     image_size=IMAGE_SIZE, B=B, P=P, Q=Q, K=K, stage=stage)
        ref_maps.append(m)
        ref_scores.append(t)
    ref_map = torch.stack(ref_maps)
    ref_text = torch.stack(ref_scores)
    ref_top = torch.stack([ref.reference_topk(ref_map[i], class_names[i]) for i in range(n)])

    # the reference itself must be non-degenerate for the comparison to mean something
    assert float(ref_map.std()) > 1e-2 and 0.0 < float(ref_map.min()) < float(ref_map.max()) < 1.0
    assert 0.01 < float(ref_text.min()) and float(ref_text.max()) < 0.99

    map_diff = float((pred.anomaly_map.float() - ref_map).abs().max())
    text_diff = float((pred.text_score.float() - ref_text).abs().max())
    top_diff = float((pred.topk_score.float() - ref_top).abs().max())
    assert map_diff <= MAP_ATOL, f"anomaly map differs by {map_diff:.3e}"
    assert text_diff <= TEXT_ATOL, f"text score differs by {text_diff:.3e}: {pred.text_score} vs {ref_text}"
    assert top_diff <= MAP_ATOL, f"top-k score differs by {top_diff:.3e}: {pred.topk_score} vs {ref_top}"
    # documented per-image product score: 0.5·s_text + 0.5·s_topk
    img_diff = float((pred.image_score.float() - (0.5 * ref_text + 0.5 * ref_top)).abs().max())
    assert img_diff <= MAP_ATOL, f"image score differs by {img_diff:.3e}"
    return pred, ref_map, ref_text


# -------------------------------------------------------------------------------------------------


def test_preprocess_matches_reference():
    images = _images()
    ours = preprocess(images, IMAGE_SIZE)
    theirs = torch.stack([ref.reference_preprocess(im, IMAGE_SIZE) for im in images])
    assert ours.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert float((ours - theirs).abs().max()) <= 1e-6


@pytest.mark.parametrize("zero_noise", [False, True], ids=["noise", "zero-noise"])
def test_parity_stage2(setup, zero_noise):
    assert setup.model.head.config.stage == 2  # "train_visa.pth" -> stage 2 (official file-name rule)
    _check(setup, CLASSES, _noise(2, setup.width, zero_noise), stage=2)


def test_parity_stage1(setup_stage1):
    s = setup_stage1
    assert s.model.head.config.stage == 1  # "epoch_post_3_1.pth" -> stage 1
    # "screw" uses top-k 20; "candle" is not in the class-name table (used as is) and uses top-k 2000
    _check(s, ["screw", "candle"], _noise(2, s.width, False, seed=3), stage=1)


def test_parity_file_paths_and_single_image(setup, tmp_path):
    """Images given as file paths, one image alone: same numbers as the reference."""
    path = tmp_path / "part.png"
    setup.images[1].save(path)
    noise = _noise(1, setup.width, False, seed=5)
    pred = setup.model.predict([str(path)], "pcb1", samples=R, noise=noise)
    m, t = ref.reference_predict(setup.clip_state, setup.head_state, setup.pixels[1:2], "pcb1",
                                 noise["isd"][0], noise["iad_normal"], noise["iad_abnormal"],
                                 B=B, P=P, Q=Q, K=K)
    assert float((pred.anomaly_map[0] - m).abs().max()) <= MAP_ATOL
    assert float((pred.text_score[0] - t).abs()) <= TEXT_ATOL


# -------------------------------------------------------------------------------------------------
# the official head layout


DEAD = (".decoder.", "_decoder.", ".p_mu.")
DUPLICATES = {"PFL_context.encoder.": "context_encoder.", "PFL_context.decoder.": "context_decoder.",
              "PFL_normal.encoder.": "state_encoder.", "PFL_normal.decoder.": "state_decoder.",
              "PFL_abnormal.encoder.": "state_encoder.", "PFL_abnormal.decoder.": "state_decoder."}


def test_official_head_layout_round_trip(tmp_path):
    from inspector.detectors.bayes_pfl.head import (
        BayesPFLHead,
        head_from_official_state,
        head_to_official_state,
    )

    state = ref.make_official_head_state(64, 128, B=B, P=P, Q=Q, K=K, seed=5)
    assert len(state) == 131
    for dup, src in DUPLICATES.items():
        for key in [k for k in state if k.startswith(dup)]:
            assert torch.equal(state[key], state[src + key[len(dup):]])

    path = tmp_path / "train_visa.pth"
    torch.save({"MyModel": state}, path)
    assert BayesPFLHead.load(path).config.stage == 2
    stage1 = tmp_path / "epoch_post_3_1.pth"
    torch.save({"MyModel": state}, stage1)
    assert BayesPFLHead.load(stage1).config.stage == 1

    back = head_to_official_state(head_from_official_state(state))
    assert set(back) == set(state)
    for key, value in state.items():
        assert tuple(back[key].shape) == tuple(value.shape), key
        if not any(d in key for d in DEAD):
            assert torch.equal(back[key].float(), value.float()), key
    for dup, src in DUPLICATES.items():
        for key in [k for k in back if k.startswith(dup)]:
            assert torch.equal(back[key], back[src + key[len(dup):]]), key
