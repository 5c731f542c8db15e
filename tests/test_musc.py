"""MuSc on a tiny random backbone (CPU, fp32): parity of the closed-pool function with the naive reference
written from the spec (tests/reference_musc.py) for several pool sizes and both k lists, deliberate
reference mistakes that the tolerance catches, the position-embedding kernel, the live rolling pool
(warm-up, duplicates, cap, removal, reference images), the detector contract and the bench hook.

The backbone is test-tiny built at 70 px (a 5 x 5 position grid) and run at 112 px (8 x 8): the position
embedding is *upsampled*, as the official 24 -> 37 at 518 px. Random weights: the scores mean nothing.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from inspector.backbone import BackboneSpec, ClipBackbone
from inspector.config import Settings
from inspector.detectors import detector_class
from inspector.detectors.musc import K_LIST_VISA, MuSc, official_k_list
from inspector.references import ReferenceStore

from . import reference_musc as ref
from .conftest import MUSC_SIZE as SIZE
from .conftest import musc_backbone as _backbone
from .conftest import tiny_clip as _clip

TOL = 1e-5
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return _clip()


@pytest.fixture(scope="module")
def model(clip):
    return MuSc(_backbone(clip))


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    """12 images: a shared smooth texture, per-image noise and, in three of them, a bright square."""
    gen = torch.Generator().manual_seed(0)
    base = torch.nn.functional.interpolate(torch.randn(1, 3, 14, 14, generator=gen), size=SIZE, mode="bilinear")
    x = base + 0.5 * torch.randn(12, 3, SIZE, SIZE, generator=gen)
    for i, (r, c) in zip((2, 5, 9), ((20, 30), (60, 10), (40, 70)), strict=True):
        x[i, :, r:r + 24, c:c + 24] += 2.5
    return x


@pytest.fixture(scope="module")
def reference(clip, pixels):
    """The reference's features of all 12 images (per image: nothing depends on the pool)."""
    taps, embeddings = ref.forward(clip, pixels)
    return ref.features(taps, SIZE // 14), embeddings


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


# ------------------------------------------------------------------------------------------------------
# parity with the naive reference


def test_features_match_reference(model, pixels, reference):
    feats, embeddings = reference
    z, g = model.features(pixels[:3])
    assert z.shape == (3, 12, 64, 64)
    for n in range(3):
        for ri, r in enumerate(ref.R_LIST):
            for t in range(4):
                assert _close(z[n, ri * 4 + t], feats[n][(r, t)]) < TOL
    assert _close(g, embeddings[:3]) < TOL


@pytest.mark.parametrize("msm", ["matmul", "cdist"])
@pytest.mark.parametrize("count, k_list", [(5, (1, 2, 3)), (8, (1, 2, 3)), (12, K_LIST_VISA)])
def test_closed_pool_matches_reference(clip, model, pixels, reference, count, k_list, msm):
    feats, embeddings = reference
    chosen = list(range(12 - count, 12))  # different subsets for different sizes
    scorer = model if msm == "matmul" else MuSc(model.backbone, msm="cdist")
    if msm == "matmul":
        scorer.memory_mb = 1  # blocks of a few image pairs: the chunked path is exercised
    ours = scorer.score_pool(pixels[chosen], k_list=k_list)
    maps, raw, official = ref.score_pool([feats[i] for i in chosen], embeddings[chosen], SIZE, k_list)
    assert ours.anomaly_map.shape == (count, SIZE, SIZE) and ours.anomaly_map.dtype == torch.float64
    assert _close(ours.anomaly_map, maps) < TOL
    assert _close(ours.map_max, raw) < TOL
    assert _close(ours.official_score, official) < TOL
    assert float(ours.anomaly_map.std()) > 1e-3 and float(official.std()) > 1e-2, "nothing constant"
    assert torch.equal(ours.map_max, ours.anomaly_map.flatten(1).amax(1))


def test_chunk_budget_does_not_change_the_result(clip, pixels):
    small, large = MuSc(_backbone(clip), memory_mb=1), MuSc(_backbone(clip), memory_mb=1024)
    a, b = small.score_pool(pixels[:7]), large.score_pool(pixels[:7])
    assert _close(a.anomaly_map, b.anomaly_map) < 1e-6


@pytest.mark.parametrize("mistake", ["antialias", "k+1", "self", "token_ln", "corners", "grid_max"])
def test_deliberate_mistakes_break_the_tolerance(clip, model, pixels, mistake):
    chosen = list(range(10))
    ours = model.score_pool(pixels[chosen])
    taps, embeddings = ref.forward(clip, pixels[chosen], mistake)
    feats = ref.features(taps, SIZE // 14, mistake)
    maps, raw, official = ref.score_pool(feats, embeddings, SIZE, (1, 2, 3), mistake)
    error = max(_close(ours.anomaly_map, maps), _close(ours.map_max, raw), _close(ours.official_score, official))
    assert error > 50 * TOL, f"the mistake '{mistake}' stays within {error:.2g}"


def test_wrong_k_list_breaks_the_tolerance(model, pixels, reference):
    feats, embeddings = reference
    ours = model.score_pool(pixels, k_list=(1, 2, 3))
    _, _, visa = ref.score_pool(feats, embeddings, SIZE, K_LIST_VISA)
    assert _close(ours.official_score, visa) > 1e-2
    assert official_k_list("visa") == (1, 8, 9) and official_k_list("mvtec") == official_k_list("btad") == (1, 2, 3)


def test_small_pools_are_refused(model, pixels):
    with pytest.raises(ValueError, match="at least 5 images"):
        model.score_pool(pixels[:4])
    with pytest.raises(ValueError, match="at least 9 images"):
        model.score_pool(pixels[:8], k_list=K_LIST_VISA)


# ------------------------------------------------------------------------------------------------------
# the position-embedding kernel


def test_position_embedding_kernel(clip, pixels, reference):
    faithful = _backbone(clip)
    shared = _backbone(clip, antialias=True)
    assert faithful.spec.pos_embed_antialias is False and shared.spec.pos_embed_antialias is True
    pos_f, pos_s = faithful.clip.visual.positional_embedding, shared.clip.visual.positional_embedding
    assert _close(pos_f, pos_s) > 1e-3
    source = clip.visual.positional_embedding.detach()
    assert _close(pos_s, ref.resize_position_embedding(source, 8, antialias=True)) < 1e-6
    shared.set_pos_embed_antialias(False)  # what MuSc.from_settings does on a backbone loaded antialiased
    assert torch.equal(shared.clip.visual.positional_embedding, pos_f) and shared.spec.pos_embed_antialias is False
    taps, _ = ref.forward(clip, pixels[:1], "antialias")
    antialiased = MuSc(_backbone(clip, antialias=True)).features(pixels[:1])[0]
    assert _close(antialiased[0, 0], ref.features(taps, 8)[0][(1, 0)]) < TOL


# ------------------------------------------------------------------------------------------------------
# live scoring with a rolling pool


def test_live_scores_against_earlier_images(clip, pixels, reference):
    feats, _ = reference
    live = MuSc(_backbone(clip), pool_size=20)
    first = live.predict_tensors(pixels[:1], ["screw"])
    assert first.provenance["unscored"] == 1 and float(first.image_score) == 1.0  # warm-up: flagged
    assert torch.all(first.anomaly_map == 2.0) and live.pool_count("screw") == 1
    second = live.predict_tensors(pixels[1:2], ["screw"])  # one reference: its nearest image (k = 1)
    assert _close(second.anomaly_map[0], ref.score_live(feats[1], feats[:1], SIZE)) < TOL
    batch = live.predict_tensors(pixels[2:5], ["screw"] * 3)  # each against its 2 batch peers and the pool of 2
    for j, i in enumerate(range(2, 5)):
        refs = [feats[q] for q in range(5) if q != i]
        assert _close(batch.anomaly_map[j], ref.score_live(feats[i], refs, SIZE)) < TOL
    assert batch.provenance["references"] == [4, 4, 4] and live.pool_count("screw") == 5
    # an image scored against a pool of N - 1 earlier images gets its map of the closed pool of N
    later = live.predict_tensors(pixels[5:6], ["screw"])
    closed = live.score_pool(pixels[:6])
    assert _close(later.anomaly_map[0], closed.anomaly_map[5]) < TOL
    assert _close(later.image_score, closed.map_max[5] / 2) < TOL
    other = live.predict_tensors(pixels[6:7], ["nut"])  # pools are per class
    assert other.provenance["unscored"] == 1


def test_duplicates_cap_and_removal(clip, pixels):
    live = MuSc(_backbone(clip), pool_size=3)
    twins = torch.stack([pixels[0], pixels[0], pixels[1]])
    pred = live.predict_tensors(twins, ["a"] * 3)
    assert pred.provenance["references"] == [1, 1, 2]  # a twin is never its twin's reference
    assert torch.allclose(pred.anomaly_map[0], pred.anomaly_map[1])
    assert live.pool_count("a") == 2  # joined once
    live.predict_tensors(pixels[2:6], ["a"] * 4)
    assert live.pool_count("a") == 3  # the cap: the oldest are replaced
    pool = live._pools["a"]
    from inspector.detectors.musc import content_hash

    assert set(pool.hashes) == {content_hash(p) for p in pixels[3:6]}
    assert live.pool_remove("a", pixels[4:5]) == 1 and live.pool_count("a") == 2
    assert live.pool_remove("a", pixels[4:5]) == 0
    assert live.pool_add("a", pixels[6:8]) == 3
    live.clear_pools("a")
    assert live.pool_count("a") == 0


def test_reference_images_seed_the_pool(clip, pixels, reference, tmp_path):
    feats, _ = reference
    rng = np.random.default_rng(3)
    files = []
    for i in range(2):
        files.append(tmp_path / f"ref{i}.png")
        Image.fromarray(rng.integers(0, 256, size=(40, 50, 3), dtype=np.uint8)).save(files[-1])
    store = ReferenceStore(tmp_path / "refs")
    live = MuSc(_backbone(clip), references=store, join_pool=False)
    assert live.predict_tensors(pixels[:1], ["screw"]).provenance["unscored"] == 1
    store.add("screw", files)
    pred = live.predict_tensors(pixels[:1], ["screw"])
    assert pred.provenance["references"] == [2] and live.pool_count("screw") == 0  # join_pool off
    live.set_references("screw", pixels[1:3])  # pinned references win over the store
    pinned = live.predict_tensors(pixels[:1], ["screw"])
    assert _close(pinned.anomaly_map[0], ref.score_live(feats[0], feats[1:3], SIZE)) < TOL


# ------------------------------------------------------------------------------------------------------
# the detector contract


def test_contract(clip, pixels, tmp_path):
    assert detector_class("musc") is MuSc
    assert MuSc.name == "musc" and MuSc.trainable is False
    spec = MuSc.default_backbone
    assert (spec.arch, spec.image_size, spec.feature_layers, spec.pos_embed_antialias) == \
        ("ViT-L-14-336", 518, (6, 12, 18, 24), False)
    settings = Settings()
    settings.override("musc", pool_size=7, k_list=[1, 8, 9], msm="cdist", references=str(tmp_path / "r"))
    built = MuSc.from_settings(_backbone(clip, antialias=True), None, settings.musc,
                               provenance={"random_weights": True})
    assert built.backbone.spec.pos_embed_antialias is False  # faithful kernel by default
    assert (built.pool_size, built.k_list, built.msm) == (7, (1, 8, 9), "cdist")
    assert built.describe_head()["bytes_per_pooled_image"] == 12 * 64 * 64 * 4 + 64 * 4
    with pytest.raises(NotImplementedError):
        built.save_head(tmp_path / "head.pt")
    pred = built.predict_tensors(pixels[:2], ["screw", "screw"])
    assert pred.anomaly_map.shape == pred.probability_map.shape == (2, SIZE, SIZE)
    assert torch.allclose(pred.probability_map, pred.anomaly_map / 2)
    assert torch.equal(pred.image_score, pred.text_score)
    assert pred.provenance["random_weights"] is True and pred.provenance["detector"] == "musc"
    with pytest.raises(ValueError, match="class names"):
        built.predict_tensors(pixels[:2], ["screw"])
    with pytest.raises(ValueError, match="msm"):
        MuSc(built.backbone, msm="fast")


def test_from_official_builds_the_faithful_backbone(tmp_path, pixels):
    native = _clip(224)  # the checkpoint's own grid (16 x 16), resized to 8 x 8 by the loader
    state = {k: (v.half().float() if v.is_floating_point() else v) for k, v in native.state_dict().items()}
    torch.save(state, tmp_path / "ViT-L-14-336px.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MuSc.from_official(tmp_path / "ViT-L-14-336px.pt", model_config="test-tiny", image_size=SIZE)
    assert model.backbone.spec.pos_embed_antialias is False
    assert model.backbone.clip.visual.transformer.resblocks[0].attn.num_heads == 2
    native.load_state_dict(state)
    expected = MuSc(ClipBackbone(native, BackboneSpec(arch="test-tiny", pretrained="random", image_size=SIZE,
                                                      pos_embed_antialias=False)))
    assert _close(model.score_pool(pixels[:5]).anomaly_map, expected.score_pool(pixels[:5]).anomaly_map) < 1e-6


def test_bench_cases(clip, pixels):
    live = MuSc(_backbone(clip), pool_size=4)
    live.bench_pools = (6,)
    cases = dict(live.bench_plan(pixels[:2], ["bench"] * 2))
    assert list(cases) == ["musc", "musc N=6"]
    pred = cases["musc N=6"]()
    assert pred.provenance["references"] == [6, 6] and live.pool_count("bench") == 0  # pool restored
    report = live.bench_report()
    assert report["bytes_per_pooled_image"] == live.bytes_per_pooled_image()
    assert round(report["full_size"]["msm_gflop_per_image"][200] / 199) == 46  # spec §12: 46 GFLOP (N - 1)


def test_run_bench_times_musc_pools(clip, monkeypatch):
    """`inspector bench --detectors musc`: the pool cases and the cost model. The `watch --once` case is
    stubbed: it belongs to the pipeline (tests/test_detectors.py), not to the detector."""
    from inspector import bench

    monkeypatch.setattr(bench, "pipeline_case", lambda model, batch_size, count:
                        (bench.Case("pipeline (watch --once)", batch_size, 1.0, 1000.0, 0.0), {}))
    live = MuSc(_backbone(clip), pool_size=4, provenance={"backbone": "test-tiny/random", "random_weights": True})
    live.bench_pools = (8,)
    report = bench.run_bench(live, [1], repeats=1, samples=1)
    names = {c["name"] for c in report["cases"]}
    assert {"floor", "musc", "musc N=8", "pipeline (watch --once)"} <= names
    assert report["main_case"] == "musc" and all(c["ratio_to_floor"] > 0 for c in report["cases"])
    assert report["detector_report"]["bytes_per_pooled_image"] == live.bytes_per_pooled_image()
    assert live.pool_count("bench part") == 0  # the timed cases leave no pool behind
