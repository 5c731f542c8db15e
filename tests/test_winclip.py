"""WinCLIP on the tiny random backbone (CPU, fp32): parity with a naive per-window reference written from
anomalib's formulas, the batched window pass, few-shot references from the ``ReferenceStore``."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from inspector.backbone import BackboneSpec, load_backbone
from inspector.config import Settings
from inspector.detectors import detector_class
from inspector.detectors.base import fuse_live
from inspector.detectors.winclip import WinCLIP, covering_windows, harmonic_aggregation, window_indices
from inspector.imaging import preprocess
from inspector.references import ReferenceStore, class_slug

from . import reference_winclip as ref

SIZE = 112  # patch 14 -> an 8 x 8 grid: 49 + 36 windows, so the per-window reference stays quick
TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_backbone(BackboneSpec(arch="test-tiny", pretrained="random", image_size=SIZE, feature_layers=()))


@pytest.fixture(scope="module")
def model(backbone):
    return WinCLIP(backbone, window_batch=29)  # chunks that straddle images and scales


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, SIZE, SIZE, generator=gen)


@pytest.fixture(scope="module")
def ref_pixels() -> torch.Tensor:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(2, 3, SIZE, SIZE, generator=gen)


def _pictures(count: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        base = rng.uniform(0, 255, size=(12, 15, 3)).astype(np.uint8)
        out.append(Image.fromarray(base).resize((150, 120), Image.BILINEAR))
    return out


# ------------------------------------------------------------------------------------------------------
# windows


@pytest.mark.parametrize("grid", [3, 8, 15, 16])
def test_window_counts_and_order(grid):
    counts = [window_indices(grid, s).shape[0] for s in (2, 3)]
    assert counts == [(grid - 1) ** 2, (grid - 2) ** 2]
    for scale in (2, 3):
        ours = window_indices(grid, scale)
        assert ours.tolist() == ref.windows_of(grid, scale)
        # the order anomalib gets from F.unfold on the index grid
        unfolded = F.unfold(torch.arange(grid * grid).float().view(1, 1, grid, grid), scale).long()[0].T
        assert torch.equal(ours, unfolded)
        cover = covering_windows(grid, scale)
        for p in range(grid * grid):
            expected = [m for m, w in enumerate(ref.windows_of(grid, scale)) if p in w]
            assert [m for m in cover[p].tolist() if m < len(ours)] == expected


def test_harmonic_aggregation_matches_the_documented_example():
    """anomalib's docstring example: 3 x 3 grid, four 2 x 2 windows with scores 1, .75, .5, .25."""
    out = harmonic_aggregation(torch.tensor([[1.0, 0.75, 0.5, 0.25]]), covering_windows(3, 2), 3)
    expected = torch.tensor([[1.0, 0.8571, 0.75], [0.6667, 0.48, 0.375], [0.5, 0.3333, 0.25]])
    assert torch.allclose(out[0], expected, atol=1e-4)
    zero = harmonic_aggregation(torch.tensor([[0.0, 0.5, 0.5, 0.5]]), covering_windows(3, 2), 3)
    assert zero[0, 0, 0] == 0 and zero[0, 1, 1] == 0 and zero[0, 2, 2] == 0.5  # 1/0 = inf -> 0


def test_batched_windows_equal_looped(model, backbone, pixels):
    tokens = backbone.embed_image(pixels[:2])
    with torch.inference_mode():
        batched = model.window_embeddings(tokens)
        _, looped, _ = ref.encode(backbone.clip, pixels[:2])
    assert [w.shape for w in batched] == [(2, 49, backbone.embed_dim), (2, 36, backbone.embed_dim)]
    for ours, theirs in zip(batched, looped):
        assert torch.allclose(ours, theirs, atol=TOL, rtol=TOL)


# ------------------------------------------------------------------------------------------------------
# parity with the naive reference


def test_zero_shot_matches_reference(model, backbone, pixels):
    model.set_references("screw", None)
    pred = model.predict_tensors(pixels[:2], ["screw", "screw"])
    score, maps = ref.winclip(backbone.clip, pixels[:2], "screw")
    assert pred.anomaly_map.shape == (2, SIZE, SIZE)
    assert (pred.anomaly_map - maps).abs().max() < TOL
    assert (pred.image_score - score).abs().max() < TOL
    assert torch.equal(pred.text_score, pred.image_score)
    assert float(pred.anomaly_map.std()) > 1e-3, "maps must not be constant"


def anomalib_pixels(paths: list, size: int) -> torch.Tensor:
    """What anomalib 2.7 feeds ``WinClipModel`` from files: ``read_image(path, as_tensor=True)`` (RGB, float32
    in [0, 1]) then its WinCLIP pre-processor, torchvision v2 ``Resize((240, 240), antialias=True,
    interpolation=BICUBIC)`` and ``Normalize`` with CLIP's mean and std (here at the tiny model's size)."""
    from torchvision.transforms import v2

    transform = v2.Compose([v2.Resize((size, size), antialias=True, interpolation=v2.InterpolationMode.BICUBIC),
                            v2.Normalize(mean=(0.48145466, 0.4578275, 0.40821073),
                                         std=(0.26862954, 0.26130258, 0.27577711))])
    images = [v2.functional.to_dtype(v2.functional.to_image(Image.open(p).convert("RGB")), torch.float32, scale=True)
              for p in paths]
    return torch.stack([transform(x) for x in images])


def test_from_files_matches_anomalib_preprocessing(model, backbone, tmp_path):
    """From PNG files (wide, tall, and one smaller than the input) the map matches anomalib's function to
    1e-4 and the score to 1e-5: the 8-bit image becomes float first, then an antialiased resize."""
    paths = []
    for i, (w, h) in enumerate(((331, 197), (150, 260), (90, 70))):
        picture = _pictures(1, seed=20 + i)[0].resize((w, h), Image.BICUBIC)
        paths.append(tmp_path / f"part{i}.png")
        picture.save(paths[-1])
    model.set_references("screw", None)
    pred = model.predict([str(p) for p in paths], "screw")
    score, maps = ref.winclip(backbone.clip, anomalib_pixels(paths, SIZE), "screw")
    assert (pred.anomaly_map - maps).abs().max() < 1e-4
    assert (pred.image_score - score).abs().max() < 1e-5
    # the 8-bit PIL resize (what Bayes-PFL and AA-CLIP do, as their official code) is another function
    pil = model.predict_tensors(preprocess([str(p) for p in paths], SIZE), ["screw"] * 3)
    assert (pil.anomaly_map - maps).abs().max() > 1e-4


def test_few_shot_matches_reference(model, backbone, pixels, ref_pixels):
    zero = model.predict_tensors(pixels[:2], ["screw", "screw"])
    model.set_references("screw", ref_pixels)
    try:
        pred = model.predict_tensors(pixels[:2], ["screw", "screw"])
    finally:
        model.set_references("screw", None)
    score, maps = ref.winclip(backbone.clip, pixels[:2], "screw", ref_pixels)
    assert (pred.anomaly_map - maps).abs().max() < TOL
    assert (pred.image_score - score).abs().max() < TOL
    assert torch.allclose(pred.text_score, zero.text_score)  # the zero-shot image score in both modes
    assert pred.provenance["references"] == {"screw": 2}


def test_batch_equals_single_calls_and_ranges(model, pixels, ref_pixels):
    names = ["screw", "metal_nut", "screw", "bottle"]
    model.set_references("metal_nut", ref_pixels[:1])  # one few-shot class in a mixed batch
    try:
        batch = model.predict_tensors(pixels, names)
        singles = [model.predict_tensors(pixels[i:i + 1], [names[i]]) for i in range(len(names))]
    finally:
        model.set_references("metal_nut", None)
    for field in ("anomaly_map", "image_score", "text_score", "topk_score"):
        joined = torch.cat([getattr(s, field) for s in singles])
        assert torch.allclose(getattr(batch, field), joined, atol=1e-6), field
    for value in (batch.anomaly_map, batch.image_score, batch.text_score, batch.topk_score):
        assert float(value.min()) >= 0 and float(value.max()) <= 1
    assert batch.probability_map is batch.anomaly_map
    k = SIZE * SIZE // 100
    expected = batch.anomaly_map.flatten(1).topk(k, dim=1).values.mean(1)
    assert torch.allclose(batch.topk_score, expected)
    assert batch.provenance["references"] == {"screw": 0, "metal_nut": 1, "bottle": 0}


# ------------------------------------------------------------------------------------------------------
# references


def test_store_references_change_scores(backbone, tmp_path):
    a, b, c = _pictures(3, seed=7)
    files = []
    for i, image in enumerate((a, b, c)):
        files.append(tmp_path / f"in{i}.png")
        image.save(files[-1])
    store = ReferenceStore(tmp_path / "refs")
    model = WinCLIP(backbone, references=store)
    name = "metal nut"

    zero = model.predict(files[0], name)
    assert zero.provenance["references"] == {name: 0}
    store.add(name, files[1:])
    with_bc = model.predict(files[0], name)  # store changed -> references read again
    assert with_bc.provenance["references"] == {name: 2}
    assert not torch.allclose(with_bc.image_score, zero.image_score)
    assert torch.allclose(with_bc.text_score, zero.text_score)

    store.add(name, [files[0]])  # the very image scored is now a reference
    with_a = model.predict(files[0], name)
    assert with_a.provenance["references"] == {name: 3}
    assert float(with_a.image_score) < float(with_bc.image_score)
    assert float(with_a.anomaly_map.mean()) < float(with_bc.anomaly_map.mean())
    # its own patches and windows are in memory: the few-shot map is 0, so the result is half the zero-shot
    assert torch.allclose(with_a.anomaly_map, zero.anomaly_map / 2, atol=1e-5)

    limited = WinCLIP(backbone, references=store, k_shot=1)
    assert limited.predict(files[0], name).provenance["references"] == {name: 1}

    store.remove(name)
    again = model.predict(files[0], name)
    assert again.provenance["references"] == {name: 0}
    assert torch.allclose(again.anomaly_map, zero.anomaly_map)


def test_bad_reference_file_adds_nothing(tmp_path):
    good = tmp_path / "good.png"
    _pictures(1, seed=3)[0].save(good)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    store = ReferenceStore(tmp_path / "refs")
    with pytest.raises(ValueError, match="broken.png"):
        store.add("screw", [good, bad])
    with pytest.raises(ValueError, match="missing.png"):
        store.add("screw", [good, tmp_path / "missing.png"])
    assert store.list("screw") == [] and store.classes() == [] and store.fingerprint("screw") == ()
    assert not list((tmp_path / "refs").rglob("*.png"))


def test_unreadable_stored_reference_is_a_clear_error(backbone, pixels, tmp_path):
    store = ReferenceStore(tmp_path / "refs")
    store.class_folder("screw").mkdir(parents=True)
    (store.class_folder("screw") / "0123456789abcdef.png").write_bytes(b"garbage")  # dropped in by hand
    with pytest.raises(ValueError, match="screw.*unreadable.*0123456789abcdef.png"):
        WinCLIP(backbone, references=store).predict_tensors(pixels[:1], ["screw"])


def test_store_layout_dedup_and_names(tmp_path):
    a, b = _pictures(2, seed=11)
    store = ReferenceStore(tmp_path / "refs")
    jpeg_free = tmp_path / "a.png"
    a.save(jpeg_free)
    first = store.add("pcb/1 (top)", [jpeg_free, a, b])  # a path and a PIL image with the same pixels
    assert first[0] == first[1] and len(set(first)) == 2
    assert all(len(p.stem) == 16 and p.suffix == ".png" for p in first)
    assert first[0].parent == tmp_path / "refs" / class_slug("pcb/1 (top)")
    assert "/" not in class_slug("pcb/1 (top)") and class_slug("screw") == "screw"
    assert class_slug("pcb 1") != class_slug("pcb_1")
    assert store.classes() == ["pcb/1 (top)"]
    assert store.list("pcb/1 (top)") == sorted(set(first))
    before = store.fingerprint("pcb/1 (top)")
    assert store.add("pcb/1 (top)", [b]) == [first[2]] and store.fingerprint("pcb/1 (top)") == before
    with Image.open(first[0]) as stored:
        assert np.array_equal(np.asarray(stored.convert("RGB")), np.asarray(a))
    assert store.remove("pcb/1 (top)") == 2 and store.classes() == []


def test_set_references_from_images_equals_pixels(model, pixels):
    pictures = _pictures(2, seed=5)
    model.set_references("bottle", pictures)
    try:
        from_images = model.predict_tensors(pixels[:1], ["bottle"])
        model.set_references("bottle", model.preprocess(pictures))
        from_pixels = model.predict_tensors(pixels[:1], ["bottle"])
    finally:
        model.set_references("bottle", None)
    assert torch.equal(from_images.anomaly_map, from_pixels.anomaly_map)
    with pytest.raises(ValueError):
        model.set_references("bottle", [])


# ------------------------------------------------------------------------------------------------------
# the detector contract


def test_contract(backbone, model, pixels, tmp_path):
    assert detector_class("winclip") is WinCLIP
    assert WinCLIP.name == "winclip" and WinCLIP.trainable is False
    assert WinCLIP.default_backbone.arch == "ViT-B-16-plus-240" and WinCLIP.default_backbone.image_size == 240
    assert WinCLIP.eval_protocol.fusion is fuse_live and WinCLIP.eval_protocol.smooth_sigma == 0
    settings = Settings()
    settings.override("winclip", references=str(tmp_path / "r"), k_shot=3)
    built = WinCLIP.from_settings(backbone, None, settings.winclip, provenance={"random_weights": True})
    assert built.k_shot == 3 and built.references.folder == tmp_path / "r" and built.scales == (2, 3)
    assert not (tmp_path / "r").exists()  # nothing is created until references are added
    head = built.describe_head()
    assert head["training_free"] is True and head["scales"] == [2, 3]
    with pytest.raises(NotImplementedError):
        built.save_head(tmp_path / "head.pt")
    assert built.image_size == SIZE and built.device.type == "cpu"
    assert model.encode_floor(pixels[:2]).shape == (2, backbone.embed_dim)
    pred = built.predict_tensors(pixels[:1], ["screw"])
    assert pred.provenance["random_weights"] is True and pred.provenance["detector"] == "winclip"
    with pytest.raises(ValueError, match="class names"):
        built.predict_tensors(pixels[:2], ["screw"])


def test_move_clears_text_keeps_pinned_references(backbone, pixels, ref_pixels):
    model = WinCLIP(backbone)
    model.set_references("screw", ref_pixels[:1])
    first = model.predict_tensors(pixels[:1], ["screw"])
    assert "screw" in model._text
    model.to("cpu")
    assert "screw" not in model._text and "screw" in model._memory
    assert torch.equal(model.predict_tensors(pixels[:1], ["screw"]).anomaly_map, first.anomaly_map)
