"""AA-CLIP: parity with the independent naive reference (tests/reference_aa_clip.py), files, head format.

Random OpenAI-layout CLIP weights (tiny widths, 24 vision blocks so layers 6/12/18/24 exist, 3 text blocks
for the 3 text adapters) and random adapters are written as official files and loaded through
``AACLIP.from_official`` with an open_clip-style config whose attention heads are not 64 wide. fp32, CPU.

At 518 (the official size) one vision pass of ours and of the reference is shared by the industrial,
medical and no-text-adapter comparisons and by the deliberate reference mistakes (but QuickGELU, which
needs its own pass and runs at 224); the full ``predict`` path (PIL preprocessing, batching, per-call
domain) is compared at 224 on a second architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from inspector.config import AAClipSettings
from inspector.detectors.aa_clip import AACLIP, HeadFormatError
from inspector.detectors.aa_clip.model import fuse_max, fuse_text_max
from inspector.detectors.base import EvalProtocol
from inspector.imaging import preprocess

from . import reference_aa_clip as ref

pytestmark = pytest.mark.usefixtures("one_thread")

MAP_ATOL = 1e-4
TEXT_ATOL = 1e-5
CLASSES = ["object", "pipe_fryum"]  # a literal "object" and a VisA folder whose description is in the table


def _images(seed=0):
    """Two random RGB images whose sizes are not the model's, so the resize matters."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, size=(300, 420, 3), dtype=np.uint8)
    low = rng.integers(0, 256, size=(12, 9, 3), dtype=np.uint8)  # structure at several scales
    b = np.asarray(Image.fromarray(low).resize((487, 611), Image.BILINEAR)).astype(np.int16)
    b = np.clip(b + rng.integers(-20, 21, size=b.shape), 0, 255).astype(np.uint8)
    return [Image.fromarray(a), Image.fromarray(b)]


def _adam_state(state_dict):
    """A real Adam state dict, as the official files carry next to the adapter weights."""
    params = [torch.nn.Parameter(v.clone()) for v in state_dict.values()]
    opt = torch.optim.Adam(params, lr=1e-5, betas=(0.5, 0.999))
    sum(p.sum() for p in params).backward()
    opt.step()
    return opt.state_dict()


class _Setup:
    def __init__(self, root: Path, image_size: int, head_width: int, text_heads: int, seed: int):
        self.root, self.image_size = root, image_size
        self.state = ref.random_openai_state(seed=seed)
        self.config = ref.tiny_config(head_width=head_width, text_heads=text_heads)
        self.text_state, self.image_state = ref.random_adapter_states(seed=seed + 1)
        self.clip_path, self.config_path = root / "ViT-L-14-336px.pt", root / "ViT-L-14-336.json"
        self.text_path, self.image_path = root / "text_adapter.pth", root / "image_adapter_5.pth"
        torch.save(self.state, self.clip_path)
        self.config_path.write_text(json.dumps(self.config))
        torch.save({"epoch": 5, "text_adapter": self.text_state, "text_optimizer": _adam_state(self.text_state)},
                   self.text_path)
        torch.save({"epoch": 5, "image_adapter": self.image_state, "image_optimizer": _adam_state(self.image_state)},
                   self.image_path)
        self.model = self.load()
        self.plain = self.load(text=False)
        self.images = _images()
        self.pixels = torch.stack([ref.reference_preprocess(im, image_size) for im in self.images])
        self.ref_clip = ref.load_reference_clip(self.state, self.config, image_size=image_size)
        self._ref_features = None

    def load(self, text=True, **options):
        return AACLIP.from_official(self.clip_path, self.text_path if text else None, self.image_path,
                                    model_config=self.config_path, image_size=self.image_size, **options)

    def reference(self, text=True, mistakes=(), clip=None):
        return ref.ReferenceAACLIP(clip or self.ref_clip, self.text_state if text else None, self.image_state,
                                   mistakes=mistakes)

    def ref_features(self):
        """The reference's per-image vision pass, once per setup."""
        if self._ref_features is None:
            self._ref_features = [self.reference().encode_image(self.pixels[i:i + 1]) for i in range(len(CLASSES))]
        return self._ref_features

    def ref_predict(self, text=True, domain="industrial", mistakes=(), clip=None):
        """Per image, one class each (the official code scores one class per batch)."""
        model = self.reference(text, mistakes, clip)
        maps, scores = [], []
        for i in range(len(CLASSES)):
            features = None if clip is not None else self.ref_features()[i]
            m, s = model.predict(self.pixels[i:i + 1], CLASSES[i], domain=domain, features=features)
            maps.append(m[0])
            scores.append(s[0])
        return torch.stack(maps), torch.stack(scores)


@pytest.fixture(scope="module")
def main(tmp_path_factory):
    """518, vision heads 32 wide (2 heads), 2 text heads."""
    return _Setup(tmp_path_factory.mktemp("hw32"), 518, head_width=32, text_heads=2, seed=1)


@pytest.fixture(scope="module")
def main_features(main):
    with torch.inference_mode():
        return main.model.image_features(main.pixels)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """224, vision heads 16 wide (4 heads), 4 text heads."""
    return _Setup(tmp_path_factory.mktemp("hw16"), 224, head_width=16, text_heads=4, seed=5)


def _diffs(pred, ref_map, ref_score):
    assert tuple(pred.anomaly_map.shape) == tuple(ref_map.shape)
    return (float((pred.anomaly_map - ref_map).abs().max()), float((pred.text_score - ref_score).abs().max()))


def _check_non_degenerate(ref_map, ref_score):
    assert float(ref_map.std()) > 0.5, "the reference map must vary for the comparison to mean something"
    assert 0.05 < float(ref_score.min()) and float(ref_score.max()) < 0.95


def _check_outputs(model, pred, domain):
    """The documented product outputs, from the official map and text score."""
    levels = len(model.levels)
    prob = torch.sigmoid((pred.anomaly_map - levels / 2) * (2 / levels))
    torch.testing.assert_close(pred.probability_map, prob, atol=1e-6, rtol=0)
    top = prob.flatten(1).topk(model.topk, dim=1).values.mean(1)
    torch.testing.assert_close(pred.topk_score, top, atol=1e-6, rtol=0)
    expected = 0.5 * pred.text_score + 0.5 * top if domain == "industrial" else top
    torch.testing.assert_close(pred.image_score, expected, atol=1e-6, rtol=0)
    assert pred.provenance["detector"] == "aa-clip" and pred.provenance["domain"] == domain


# -------------------------------------------------------------------------------------------------
# parity at 518


@pytest.mark.parametrize(("domain", "text"), [("industrial", True), ("medical", True), ("industrial", False)],
                         ids=["industrial", "medical", "no-text-adapter"])
def test_parity_518(main, main_features, domain, text):
    model = main.model if text else main.plain
    pred = model.score_features(*main_features, CLASSES, domain=domain)
    ref_map, ref_score = main.ref_predict(text=text, domain=domain)
    _check_non_degenerate(ref_map, ref_score)
    map_diff, text_diff = _diffs(pred, ref_map, ref_score)
    print(f"518 {domain} text_adapter={text}: max |map diff| {map_diff:.2e}, |text diff| {text_diff:.2e}")
    assert map_diff <= MAP_ATOL, f"anomaly map differs by {map_diff:.3e}"
    assert text_diff <= TEXT_ATOL, f"text score differs by {text_diff:.3e}"
    _check_outputs(model, pred, domain)
    assert pred.provenance["text_adapter"] is text


@pytest.mark.parametrize("mistake", ref.MISTAKES)
def test_each_reference_mistake_breaks_the_tolerance(main, main_features, small, mistake):
    """The comparison can fail: one deliberate deviation in the reference exceeds the tolerances."""
    if mistake == "quick_gelu":  # changes both towers, so a new reference pass: at 224 (cheaper)
        pred = small.model.predict(small.images, CLASSES)
        clip = ref.load_reference_clip(small.state, small.config, image_size=224, quick_gelu=True)
        ref_map, ref_score = small.ref_predict(clip=clip)
    else:  # the rest reuse the 518 vision passes
        pred = main.model.score_features(*main_features, CLASSES, domain="industrial")
        ref_map, ref_score = main.ref_predict(mistakes=(mistake,))
    map_diff, text_diff = _diffs(pred, ref_map, ref_score)
    print(f"mistake {mistake}: max |map diff| {map_diff:.2e}, |text diff| {text_diff:.2e}")
    if mistake == "renormalised_det":  # the only one that leaves the map alone
        assert text_diff > TEXT_ATOL
    else:
        assert map_diff > MAP_ATOL


# -------------------------------------------------------------------------------------------------
# the full predict path at 224


@pytest.mark.parametrize(("domain", "text"), [("industrial", True), ("medical", True), ("medical", False)],
                         ids=["industrial", "medical", "no-text-adapter"])
def test_predict_parity_224(small, domain, text):
    model = small.model if text else small.plain
    pred = model.predict(small.images, CLASSES, domain=domain)  # paths of PIL images, our preprocessing
    assert tuple(pred.anomaly_map.shape) == (2, 224, 224)
    ref_map, ref_score = small.ref_predict(text=text, domain=domain)
    _check_non_degenerate(ref_map, ref_score)
    map_diff, text_diff = _diffs(pred, ref_map, ref_score)
    print(f"224 {domain} text_adapter={text}: max |map diff| {map_diff:.2e}, |text diff| {text_diff:.2e}")
    assert map_diff <= MAP_ATOL and text_diff <= TEXT_ATOL, (map_diff, text_diff)
    _check_outputs(model, pred, domain)


def test_literal_attention_mode_matches_too(small):
    """``attention="explicit"`` (the official need_weights=True arithmetic) is a parity mode as well."""
    pred = small.load(attention="explicit").predict(small.images, CLASSES)
    ref_map, ref_score = small.ref_predict()
    map_diff, text_diff = _diffs(pred, ref_map, ref_score)
    print(f"224 explicit attention: max |map diff| {map_diff:.2e}, |text diff| {text_diff:.2e}")
    assert map_diff <= MAP_ATOL and text_diff <= TEXT_ATOL, (map_diff, text_diff)


def test_without_model_config_heads_are_64_wide(small):
    """No config: the architecture comes from the tensors, heads = width // 64 (OpenAI's files)."""
    model = AACLIP.from_official(small.clip_path, small.text_path, small.image_path, image_size=224)
    pred = model.predict(small.images[1], CLASSES[1])
    config = ref.tiny_config(head_width=64, text_heads=1)
    clip = ref.load_reference_clip(small.state, config, image_size=224)
    ref_map, ref_score = ref.ReferenceAACLIP(clip, small.text_state, small.image_state).predict(
        small.pixels[1:], CLASSES[1])
    map_diff, text_diff = _diffs(pred, ref_map, ref_score)
    assert map_diff <= MAP_ATOL and text_diff <= TEXT_ATOL, (map_diff, text_diff)


def test_batch_equals_single_images_and_domain_default(small):
    model = small.model
    medical = small.load(domain="medical")
    pixels = preprocess(small.images, 224)
    batch = model.predict_tensors(pixels, CLASSES)
    assert batch.provenance["domain"] == "industrial"
    for i, image in enumerate(small.images):
        single = model.predict(image, CLASSES[i])
        torch.testing.assert_close(single.anomaly_map[0], batch.anomaly_map[i], atol=1e-5, rtol=0)
        torch.testing.assert_close(single.text_score[0], batch.text_score[i], atol=1e-6, rtol=0)
        torch.testing.assert_close(single.image_score[0], batch.image_score[i], atol=1e-6, rtol=0)
    own = medical.predict_tensors(pixels, CLASSES)
    override = model.predict_tensors(pixels, CLASSES, domain="medical")
    assert own.provenance["domain"] == override.provenance["domain"] == "medical"
    torch.testing.assert_close(own.anomaly_map, override.anomaly_map, atol=0, rtol=0)
    assert not torch.allclose(own.anomaly_map, batch.anomaly_map, atol=1e-3)
    assert model.eval_protocol == EvalProtocol(smooth_sigma=0.0, fusion=fuse_text_max)
    assert medical.eval_protocol == EvalProtocol(smooth_sigma=0.0, fusion=fuse_max)
    with pytest.raises(ValueError, match="domain"):
        model.predict_tensors(pixels, CLASSES, domain="space")


def test_descriptions_and_anchor_cache(small):
    model = small.model
    assert model.class_description("object") == "object"
    assert model.class_description("pipe_fryum") == "pipe-shaped fryum"
    assert model.class_description("metal_nut") == "metal nut which has four notched edges"
    assert model.class_description("Kvasir") == "colon endoscopy image"
    assert model.class_description("red enamel mug") == "red enamel mug"
    t = model.text_anchors("pipe_fryum")
    assert tuple(t.shape) == (model.backbone.embed_dim, 2)
    torch.testing.assert_close(t.norm(dim=0), torch.ones(2))
    assert model.text_anchors("pipe_fryum") is t  # cached per description
    torch.testing.assert_close(model.compute_anchors(["pipe-shaped fryum"])[0], t, atol=1e-6, rtol=0)
    torch.testing.assert_close(t, small.reference().anchors("pipe_fryum"), atol=1e-6, rtol=0)
    model.to("cpu")
    assert model.text_anchors("pipe_fryum") is not t  # .to() clears the cache
    with pytest.raises(ValueError, match="too long"):
        model.text_anchors("very " * 80 + "long product")


def test_anchors_and_features_are_differentiable(small):
    model = small.model
    features, det = model.image_features(preprocess(small.images[:1], 224))
    anchors = model.compute_anchors(["object"])
    loss = sum((f @ anchors[0]).sum() for f in features) + (det @ anchors[0]).sum()
    loss.backward()
    assert all(p.grad is not None for p in model.image_adapter.parameters())
    assert all(p.grad is not None for p in model.text_adapter.parameters())
    model.zero_grad(set_to_none=True)


# -------------------------------------------------------------------------------------------------
# files


def test_head_round_trip(small, tmp_path):
    model = small.model
    path = tmp_path / "head.pt"
    model.save_head(path)
    options = AAClipSettings(domain="medical", topk=50)
    loaded = AACLIP.from_settings(small.model.backbone, path, options, provenance={"model": "v1"})
    assert (loaded.domain, loaded.topk, loaded.use_text_adapter) == ("medical", 50, True)
    for mine, theirs in ((model.text_adapter, loaded.text_adapter), (model.image_adapter, loaded.image_adapter)):
        a, b = mine.state_dict(), theirs.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pixels = preprocess(small.images[:1], 224)
    torch.testing.assert_close(loaded.predict_tensors(pixels, ["object"], domain="industrial").anomaly_map,
                               model.predict_tensors(pixels, ["object"]).anomaly_map, atol=0, rtol=0)
    info = model.describe_head()
    wv, et, e = 64, 64, 64
    assert info["parameters"] == {"text_adapter": 3 * et * et + e * et, "image_adapter": 6 * wv * wv + 5 * e * wv,
                                  "total": 3 * et * et + e * et + 6 * wv * wv + 5 * e * wv}
    assert info["config"]["text_adapter_weight"] == 0.1 and info["config"]["image_adapt_until"] == 6

    # no text adapter: saved as None, restored as the frozen text encoder; default options
    small.plain.save_head(path)
    assert torch.load(path, weights_only=True)["text_adapter"] is None
    plain = AACLIP.from_settings(small.model.backbone, path, AAClipSettings())
    assert (plain.use_text_adapter, plain.domain, plain.describe_head()["parameters"]["text_adapter"]) == (
        False, "industrial", 0)
    untrained = AACLIP.from_settings(small.model.backbone, None, AAClipSettings(),
                                     provenance={"random_weights": True})
    assert untrained.use_text_adapter and untrained.provenance["random_weights"]


def test_official_files_load_strictly_with_clear_errors(small, tmp_path):
    with pytest.raises(HeadFormatError, match="no 'text_adapter' entry.*image_adapter file"):
        AACLIP.from_official(small.clip_path, small.image_path, small.image_path, small.config_path, image_size=224)
    with pytest.raises(HeadFormatError, match="not found"):
        AACLIP.from_official(small.clip_path, small.text_path, tmp_path / "missing.pth", small.config_path,
                             image_size=224)

    def write(name, image_state):
        path = tmp_path / name
        torch.save({"epoch": 1, "image_adapter": image_state}, path)
        return path

    state = dict(small.image_state)
    missing = {k: v for k, v in state.items() if k != "det_proj.fc.weight"}
    with pytest.raises(ValueError, match=r"missing keys \['det_proj.fc.weight'\]"):
        AACLIP.from_official(small.clip_path, None, write("a.pth", missing), small.config_path, image_size=224)
    extra = {**state, "layer_adapters.6.fc.0.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"unexpected keys \['layer_adapters.6.fc.0.weight'\]"):
        AACLIP.from_official(small.clip_path, None, write("b.pth", extra), small.config_path, image_size=224)
    wrong = {**state, "seg_proj.0.fc.weight": torch.zeros(768, 1024)}
    with pytest.raises(ValueError, match=r"shape mismatch \(seg_proj.0.fc.weight: file \(768, 1024\), model \(64, 64\)"):
        AACLIP.from_official(small.clip_path, None, write("c.pth", wrong), small.config_path, image_size=224)
    relu = {k.replace("proj.fc.weight", "proj.fc.0.weight") if "proj." in k else k: v for k, v in state.items()}
    with pytest.raises(ValueError, match="--relu"):
        AACLIP.from_official(small.clip_path, None, write("d.pth", relu), small.config_path, image_size=224)
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable torch file"):
        AACLIP.from_official(small.clip_path, junk, small.image_path, small.config_path, image_size=224)
    # our head format is not an official file, and the other way round
    with pytest.raises(HeadFormatError, match="official AA-CLIP checkpoint, not an inspector head"):
        AACLIP.load_head(small.image_path)
    with pytest.raises(HeadFormatError, match="not an inspector AA-CLIP head"):
        AACLIP.load_head(_saved(tmp_path / "other.pt", {"a": 1}))
    with pytest.raises(HeadFormatError, match="version 7"):
        AACLIP.load_head(_saved(tmp_path / "future.pt", {"format": "inspector-aa-clip", "version": 7}))


def _saved(path, obj):
    torch.save(obj, path)
    return path


def test_import_official_registers_a_version_that_predicts_the_same(main, tmp_path):
    """`inspector models import-official --detector aa-clip` -> a registry version equal to from_official."""
    import os
    import subprocess
    import sys

    root = Path(__file__).parents[1]
    args = ["models", "import-official", "--detector", "aa-clip", "--clip", str(main.clip_path), "--text-adapter",
            str(main.text_path), "--image-adapter", str(main.image_path), "--model-config", str(main.config_path),
            "--name", "aa-official"]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("INSPECTOR_CONFIG", None)
    done = subprocess.run([sys.executable, "-m", "inspector.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "models" / "aa-official" / "manifest.json").read_text())
    assert manifest["detector"] == "aa-clip" and manifest["origin"]["kind"] == "official-aa-clip"
    assert manifest["backbone"]["model_config"] == str(main.config_path.resolve())
    from inspector import load_model
    from inspector.config import Settings

    settings = Settings()
    settings.registry.path = str(tmp_path / "models")
    settings.model.device = "cpu"
    settings.model.precision = "fp32"  # from_official is exact fp32; "auto" may be bf16 on this CPU
    loaded = load_model("aa-official", settings=settings)
    pixels = main.pixels
    a, b = loaded.predict_tensors(pixels, CLASSES), main.model.predict_tensors(pixels, CLASSES)
    torch.testing.assert_close(a.anomaly_map, b.anomaly_map, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.text_score, b.text_score, rtol=0, atol=1e-7)
