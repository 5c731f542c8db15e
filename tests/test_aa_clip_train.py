"""AA-CLIP training on CPU with a tiny random backbone: each stage moves only its own adapters and lowers its
loss, the losses follow their formulas, the V-V path behaves as the official one, and the run directory
holds official checkpoints that load strictly and resume to the same result."""

from __future__ import annotations

import shutil
import warnings

import pytest
import torch

from inspector.backbone import BackboneSpec, ClipBackbone, read_model_config
from inspector.data import load_dataset
from inspector.data.synthetic import make_synthetic
from inspector.detectors.aa_clip import AACLIP
from inspector.detectors.aa_clip.train import (
    AACLIPTrainConfig,
    class_anchors,
    dice_loss,
    disentangle_loss,
    focal_loss,
    load_example,
    segmentation_loss,
    stage1_losses,
    stage2_losses,
    surgery_features,
    train_aa_clip,
    validate,
)

SPEC = BackboneSpec(arch="test-tiny", pretrained="random", image_size=224, feature_layers=(6, 12, 18, 24))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone() -> ClipBackbone:
    """``test-tiny`` (24 vision blocks) with 3 text blocks instead of 2, so that every adapter of the default
    AA-CLIP (text adapters after blocks 1-3) is used and gets a gradient."""
    from open_clip.model import CLIP

    config = read_model_config("test-tiny")
    config["text_cfg"] = {**config["text_cfg"], "layers": 3}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ClipBackbone(CLIP(**config).float().eval(), SPEC)


def fresh_model(backbone: ClipBackbone, seed: int = 0) -> AACLIP:
    torch.manual_seed(seed)
    return AACLIP(backbone)


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    root = make_synthetic(tmp_path_factory.mktemp("aux") / "synthetic", classes=2, train_good=0, test_good=2,
                          test_bad=2, size=64, seed=3)
    return load_dataset(root, splits=("test",))


def small(records):
    """One normal and one anomalous image of each class."""
    return [records[i] for i in (0, 1, 4, 5)]


def fixed_batch(records):
    examples = [load_example(r, SPEC.image_size, None, False) for r in records]
    pixels = torch.stack([e[0] for e in examples])
    masks = torch.stack([e[1] for e in examples])
    labels = torch.tensor([r.label for r in records])
    return pixels, masks, labels, [r.class_name for r in records]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(v, before[k])}


def test_stage1_step_lowers_its_loss_and_moves_only_the_text_adapter(backbone, records):
    model = fresh_model(backbone)
    pixels, masks, _, names = fixed_batch(small(records))
    cfg = AACLIPTrainConfig()
    text, image, clip = snapshot(model.text_adapter), snapshot(model.image_adapter), snapshot(model.backbone)
    model.text_adapter.requires_grad_(True)
    model.image_adapter.requires_grad_(False)
    opt = torch.optim.Adam(model.text_adapter.parameters(), lr=1e-3, betas=cfg.betas)
    losses = stage1_losses(model, pixels, masks, names, cfg)
    assert torch.isfinite(losses["loss"]) and float(losses["orth"]) >= 0
    losses["loss"].backward()
    # the gradient reaches every text adapter through the frozen text blocks; none reaches CLIP
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.text_adapter.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    opt.step()
    with torch.no_grad():
        after = stage1_losses(model, pixels, masks, names, cfg)["loss"]
    before = float(losses["loss"].detach())
    assert float(after) < before, (before, float(after))
    assert changed(text, model.text_adapter) == set(text)
    assert not changed(image, model.image_adapter) and not changed(clip, model.backbone)


def test_stage2_step_lowers_its_loss_and_moves_only_the_image_adapter(backbone, records):
    model = fresh_model(backbone)
    pixels, masks, labels, names = fixed_batch(small(records))
    with torch.no_grad():
        table = model.compute_anchors([model.class_description(c) for c in sorted(set(names))])
    anchors = table[[sorted(set(names)).index(c) for c in names]]
    text, image, clip = snapshot(model.text_adapter), snapshot(model.image_adapter), snapshot(model.backbone)
    model.image_adapter.requires_grad_(True)
    opt = torch.optim.Adam(model.image_adapter.parameters(), lr=5e-4, betas=(0.5, 0.999))
    losses = stage2_losses(model, pixels, masks, labels, anchors)
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.image_adapter.parameters())
    assert all(p.grad is None for p in model.backbone.parameters())
    opt.step()
    with torch.no_grad():
        after = stage2_losses(model, pixels, masks, labels, anchors)["loss"]
    before = float(losses["loss"].detach())
    assert float(after) < before, (before, float(after))
    assert changed(image, model.image_adapter) == set(image)
    assert not changed(text, model.text_adapter) and not changed(clip, model.backbone)


def test_disentangle_loss_is_the_squared_batch_mean_inner_product():
    def pair(inner: float) -> torch.Tensor:
        normal = torch.tensor([1.0, 0.0, 0.0])
        abnormal = torch.tensor([inner, (1 - inner ** 2) ** 0.5, 0.0])
        return torch.stack([normal, abnormal], dim=1)  # [E, 2]

    anchors = torch.stack([pair(0.6), pair(0.2)])  # [N, E, 2]
    torch.testing.assert_close(disentangle_loss(anchors), torch.tensor(0.4 ** 2))
    torch.testing.assert_close(disentangle_loss(torch.stack([pair(0.6), pair(-0.6)])), torch.tensor(0.0))


def test_segmentation_losses_follow_the_official_formulas():
    mask = torch.zeros(1, 4, 4)
    mask[0, :2] = 1
    p = torch.full((1, 4, 4), 0.7)  # abnormal probability everywhere
    probs = torch.stack([1 - p, p], dim=1)
    # focal: mean over pixels of -(1 - p_t)^2 log p_t, target clamped to [1e-5, 1 - 1e-5], p_t += 1e-5
    p_fg = 1e-5 * 0.3 + (1 - 1e-5) * 0.7 + 1e-5
    p_bg = (1 - 1e-5) * 0.3 + 1e-5 * 0.7 + 1e-5
    expected = 0.5 * (-(1 - p_fg) ** 2 * torch.log(torch.tensor(p_fg))) \
        + 0.5 * (-(1 - p_bg) ** 2 * torch.log(torch.tensor(p_bg)))
    torch.testing.assert_close(focal_loss(probs, mask), expected)
    # dice per image with smooth 1
    torch.testing.assert_close(dice_loss(p, mask), torch.tensor(1 - (2 * 0.7 * 8 + 1) / (0.7 * 16 + 8 + 1)))
    perfect = torch.stack([1 - mask, mask], dim=1)
    assert float(segmentation_loss(perfect, mask)) < 1e-4


def test_vv_features_mix_the_batch_like_the_official_code(backbone, records):
    pixels, *_ = fixed_batch(records[:3])
    a_with_b = surgery_features(backbone, pixels[[0, 1]], (12, 24), axis="batch")
    a_with_c = surgery_features(backbone, pixels[[0, 2]], (12, 24), axis="batch")
    assert len(a_with_b) == 2 and a_with_b[0].shape == (2, backbone.grid ** 2, backbone.embed_dim)
    assert (a_with_b[1][0] - a_with_c[1][0]).abs().max() > 1e-4  # image 0 depends on its batch companion
    t_b = surgery_features(backbone, pixels[[0, 1]], (24,), axis="tokens")[0]
    t_c = surgery_features(backbone, pixels[[0, 2]], (24,), axis="tokens")[0]
    torch.testing.assert_close(t_b[0], t_c[0], rtol=0, atol=1e-5)
    # every patch feature is a unit vector plus the unit image embedding of the unmodified CLIP
    g = torch.nn.functional.normalize(backbone.encode_image(pixels[[0, 1]], layers=())[0], dim=-1)
    torch.testing.assert_close((t_b - g[:, None]).norm(dim=-1), torch.ones(2, backbone.grid ** 2))


OFFICIAL_TEXT_KEYS = {f"{i}.fc.0.weight" for i in range(4)}
OFFICIAL_IMAGE_KEYS = ({f"layer_adapters.{i}.fc.0.weight" for i in range(6)}
                       | {f"seg_proj.{i}.fc.weight" for i in range(4)} | {"det_proj.fc.weight"})


def test_checkpoints_are_official_and_a_resumed_run_ends_where_a_straight_one_does(backbone, records, tmp_path):
    records = small(records)  # one image per (class, label): nothing is held out for validation
    cfg = AACLIPTrainConfig(text_epochs=1, image_epochs=2, text_batch_size=4, image_batch_size=2, text_lr=1e-4)
    run, later = tmp_path / "straight", tmp_path / "resumed"
    calls = []

    def keep_files_after_first_image_epoch(state) -> bool:
        """What an interrupted run leaves behind: the files as they are after epoch 2 (text 1, image 1)."""
        if state.epoch == 2:
            shutil.copytree(run, later)
        return False

    model = fresh_model(backbone)
    clip = snapshot(model.backbone)
    straight = train_aa_clip(model, records, cfg, run, should_stop=keep_files_after_first_image_epoch,
                             progress=lambda phase, step, steps, losses: calls.append((phase, step, steps)))
    assert straight.finished and (straight.epoch, straight.text_epoch, straight.image_epoch) == (3, 1, 2)
    assert [(h["stage"], h["stage_epoch"]) for h in straight.history] == [(1, 1), (2, 1), (2, 2)]
    assert all(h["loss"] > 0 for h in straight.history)
    assert {c[0] for c in calls} == {"text", "image"} and ("text", 1, 1) in calls and ("image", 2, 2) in calls
    assert not changed(clip, model.backbone)

    text = torch.load(run / "text_adapter.pth", weights_only=True)
    assert set(text) == {"epoch", "text_adapter", "text_optimizer"} and text["epoch"] == 1
    assert set(text["text_adapter"]) == OFFICIAL_TEXT_KEYS
    assert text["text_optimizer"]["param_groups"][0]["betas"] == (0.5, 0.999)
    for name, epoch in (("image_adapter.pth", 2), ("image_adapter_1.pth", 1), ("image_adapter_2.pth", 2)):
        blob = torch.load(run / name, weights_only=True)
        assert set(blob) == {"epoch", "image_adapter", "image_optimizer"} and blob["epoch"] == epoch
        assert set(blob["image_adapter"]) == OFFICIAL_IMAGE_KEYS
    image = torch.load(run / "image_adapter.pth", weights_only=True)
    width, embed = backbone.vision_width, backbone.embed_dim
    assert image["image_adapter"]["layer_adapters.0.fc.0.weight"].shape == (width, width)
    assert image["image_adapter"]["seg_proj.3.fc.weight"].shape == (embed, width)
    assert image["image_adapter"]["det_proj.fc.weight"].shape == (embed, width)
    fresh = fresh_model(backbone, seed=1)
    fresh.text_adapter.load_state_dict(text["text_adapter"], strict=True)
    fresh.image_adapter.load_state_dict(image["image_adapter"], strict=True)
    for key, value in model.image_adapter.state_dict().items():
        torch.testing.assert_close(fresh.image_adapter.state_dict()[key], value, rtol=0, atol=0)

    # a new process resumes from the files left after epoch 2 and ends where the straight run did
    assert torch.load(later / "image_adapter.pth", weights_only=True)["epoch"] == 1
    assert not (later / "image_adapter_2.pth").exists()
    resumed_model = fresh_model(backbone, seed=2)
    phases = []
    resumed = train_aa_clip(resumed_model, records, cfg, later, resume=True,
                            progress=lambda phase, step, steps, losses: phases.append(phase))
    assert resumed.finished and resumed.epoch == 3 and phases == ["image", "image"]  # one image epoch, 2 steps
    assert [(h["stage"], h["stage_epoch"]) for h in resumed.history] == [(1, 1), (2, 1), (2, 2)]
    for name, module in (("text", resumed_model.text_adapter), ("image", resumed_model.image_adapter)):
        reference = getattr(model, f"{name}_adapter").state_dict()
        for key, value in module.state_dict().items():
            torch.testing.assert_close(value, reference[key], rtol=0, atol=0, msg=f"{name} {key}")


def test_should_stop_ends_a_run_after_its_checkpoint(backbone, records, tmp_path):
    cfg = AACLIPTrainConfig(text_epochs=1, image_epochs=1, text_batch_size=4)
    state = train_aa_clip(fresh_model(backbone), small(records), cfg, tmp_path, should_stop=lambda st: True)
    assert (state.epoch, state.stage, state.finished) == (1, 1, False)
    assert (tmp_path / "text_adapter.pth").is_file() and not (tmp_path / "image_adapter.pth").exists()


def test_validation_reports_class_mean_aurocs(backbone, records):
    model = fresh_model(backbone)
    cfg = AACLIPTrainConfig(val_map_size=64)
    anchors = class_anchors(model, [r.class_name for r in records])
    for stage in (1, 2):
        metrics = validate(model, small(records), stage, cfg, anchors)
        assert set(metrics) == {"pixel_auroc", "image_auroc"}
        assert all(0 <= v <= 1 for v in metrics.values()), metrics


def test_only_the_last_level_counts_in_faithful_stage_one(backbone, records):
    model = fresh_model(backbone)
    pixels, masks, _, names = fixed_batch(small(records))
    with torch.no_grad():
        faithful = stage1_losses(model, pixels, masks, names, AACLIPTrainConfig())
        summed = stage1_losses(model, pixels, masks, names, AACLIPTrainConfig(faithful=False))
    assert float(summed["seg"]) > 2 * float(faithful["seg"]) > 0
    torch.testing.assert_close(faithful["loss"], faithful["seg"] + 0.1 * faithful["orth"])
