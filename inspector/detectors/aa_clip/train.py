"""Training AA-CLIP's adapters: the official two-stage recipe (github.com/Mwxinnn/AA-CLIP, ``train.py``).

Stage 1 ("text", 5 epochs, batch 16, Adam lr 1e-5, betas (0.5, 0.999), no schedule) trains only the text
adapters (adapters after the first text blocks + the learned projection that replaces ``text_projection``).
The image side is a frozen CLIP whose blocks 6-24 use V-V attention (CLIP Surgery's trick, here as a single
path that keeps the FFN); it runs without autograd. For each tapped level l (6/12/18/24):

    f_l = normalize(ln_post(x_l[:, 1:]) @ proj) + normalize(g)        g: the unmodified CLIP's image embedding

(the sum is not re-normalised). ``z = 100 · f_l · T`` against the per-class anchors T [E, 2] (col 0 normal,
col 1 abnormal) is bilinearly upsampled (align_corners=True) to the input size and softmaxed over the two
anchors. Loss = focal + dice(abnormal, mask) + dice(normal, 1 - mask), plus
``text_norm_weight · (mean_n <t_normal, t_abnormal>)²`` (the disentangle loss). The anchors are recomputed,
with gradient, for every step.

Stage 2 ("image", 20 epochs, batch 2, Adam lr 5e-4, betas (0.5, 0.999), MultiStepLR ×0.5 at steps 16k and
32k) trains only the image adapters, against anchors computed once from the trained text side and frozen.
Loss = CE(det · T, label) (plain cosines, no temperature; det is not re-normalised) + the segmentation loss
summed over the 4 levels of ``AACLIP.image_features``.

Official quirks, kept by default and switchable:

* ``faithful=True``: the official stage-1 loop *overwrites* the loss at each level, so only the last level
  (24) contributes; ``faithful=False`` sums the 4 levels, as the paper describes.
* ``vv_axis="batch"``: the official V-V module receives the sequence-first tensor [L, B, W] but reads it as
  [B, N, C], so each token attends over the *images of the batch* at the same position (value·valueᵀ), not
  over the tokens of its own image. The features therefore depend on the batch composition (with batch 1
  the attention is the identity: out_proj(v)). ``vv_axis="tokens"`` is the CLIP-Surgery/AnomalyCLIP intent.

Deliberate differences from the official ``train.py``:

* the loss functions, augmentation and loop are our own code (same formulas: focal of the Hsuxu loss toolbox
  with smooth 1e-5, mean over all pixels; per-image dice with smooth 1, averaged over the batch);
* a validation split (``val_fraction`` per class and label, as ``inspector.train.split_records``) is held
  out, and pixel/image AUROC on it is recorded after every epoch (``history``; ``state.best_epoch``). No
  weights are restored: as in the official code the last epoch is what ``image_adapter.pth`` holds and every
  epoch has its own ``image_adapter_<epoch>.pth``;
* resuming restores the MultiStepLR position (epoch × steps per epoch; the official code restarts it), and
  does not skip the last text epoch (the official ``text_start_epoch == text_epoch - 1`` test does);
* data order and augmentation are drawn from generators seeded by (seed, stage, epoch, step), so a resumed
  run continues to the same result as an uninterrupted one;
* bf16 autocast on CUDA (``amp``) for the vision transformer passes only: the text side, the anchors, the
  V-V features' projection, the ×100 similarities and the losses stay in fp32 (a bf16 logit of 100·cos has
  a resolution of 0.5, coarser than the cosine differences that matter); fp32 throughout on CPU.

Files in ``run_dir`` (loadable by the official ``test.py``):

* ``text_adapter.pth``: {"epoch", "text_adapter", "text_optimizer"}, after every text epoch;
* ``image_adapter.pth`` and ``image_adapter_<epoch>.pth``: {"epoch", "image_adapter", "image_optimizer"},
  after every image epoch (epoch counted from 1);
* ``train_state.json``: our history and validation results (not needed by ``test.py``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance

from ...backbone import ClipBackbone, _run_block
from ...config import TrainSettings
from ...data.splits import load_mask_nearest, split_records
from ...errors import UsageError
from ...imaging import open_image, to_model_input
from ...runtime import fp32, training_autocast
from ..base import Trainer

if TYPE_CHECKING:
    from .model import AACLIP

log = logging.getLogger(__name__)

TEXT_FILE = "text_adapter.pth"
IMAGE_FILE = "image_adapter.pth"
STATE_FILE = "train_state.json"

Progress = Callable[[str, int, int, dict[str, float]], None]


@dataclass
class AACLIPTrainConfig:
    """The official recipe's constants (``train.py`` defaults) plus our validation and switches."""

    text_epochs: int = 5
    image_epochs: int = 20
    text_lr: float = 1e-5
    image_lr: float = 5e-4
    betas: tuple[float, float] = (0.5, 0.999)
    text_batch_size: int = 16
    image_batch_size: int = 2
    text_norm_weight: float = 0.1
    milestones: tuple[int, ...] = (16000, 32000)
    lr_gamma: float = 0.5
    augment: bool = True
    seed: int = 111
    val_fraction: float = 0.2
    #: official stage-1 loss: only the last level counts (the loop overwrites the loss); False sums levels
    faithful: bool = True
    #: V-V attention over the images of the batch ("batch", the official code) or over tokens ("tokens")
    vv_axis: str = "batch"
    #: number of final vision blocks whose attention is V-V (official DPAM_layer=20 -> 19: blocks 6-24)
    vv_blocks: int = 19
    #: bf16 autocast of the vision passes on CUDA (ignored on CPU)
    amp: bool = True
    #: validation: maps are scored at this side (at most the model's input size); batch size of stage 2
    val_map_size: int = 256
    val_batch_size: int = 8

    @classmethod
    def from_settings(cls, train: TrainSettings, text_epochs: int | None = None) -> AACLIPTrainConfig:
        """The official recipe, with what a user changed in ``[train]`` (or by flag): ``epochs`` -> the image
        stage's epochs, ``batch_size`` -> its batch size, ``seed``, ``augment``, ``val_fraction``; the text
        stage's epochs from ``text_epochs``. A changed key AA-CLIP's recipe has no use for (``patience``,
        ``mosaic``, ``val_samples``: Bayes-PFL's) is refused."""
        default = TrainSettings()
        unused = [k for k in ("patience", "mosaic", "val_samples") if getattr(train, k) != getattr(default, k)]
        if unused:
            raise UsageError(f"AA-CLIP's trainer has no use for [train] {', '.join(unused)} (Bayes-PFL's); "
                             "set them back to their defaults")
        moved = {"epochs": "image_epochs", "batch_size": "image_batch_size", "seed": "seed", "augment": "augment",
                 "val_fraction": "val_fraction"}
        changes = {mine: getattr(train, key) for key, mine in moved.items() if getattr(train, key) != getattr(default, key)}
        if text_epochs is not None:
            changes["text_epochs"] = text_epochs
        return cls(**changes)

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)
        self.milestones = tuple(self.milestones)
        if self.vv_axis not in ("batch", "tokens"):
            raise ValueError(f"vv_axis must be 'batch' or 'tokens', not '{self.vv_axis}'")
        if min(self.text_epochs, self.image_epochs) < 0 or min(self.text_batch_size, self.image_batch_size) < 1:
            raise ValueError("epochs must be >= 0 and batch sizes >= 1")


@dataclass
class AACLIPTrainState:
    """Where training stands. ``epoch`` counts finished epochs of both stages (text first)."""

    text_epoch: int = 0
    image_epoch: int = 0
    stage: int = 1
    best: float = -1.0
    best_epoch: int | None = None  # image epoch (1-based, as in ``image_adapter_<epoch>.pth``)
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False

    @property
    def epoch(self) -> int:
        return self.text_epoch + self.image_epoch


# -------------------------------------------------------------------------------------------------
# data


def sparse_noise(image: Image.Image, rng: random.Random) -> Image.Image:
    """The official "Gaussian noise": on the pixels where a standard normal exceeds 3 (about 0.13 %), every
    channel is multiplied by a standard normal draw, then clipped to [0, 1]."""
    gen = np.random.default_rng(rng.randrange(1 << 62))
    array = np.asarray(image, dtype=np.float32) / 255.0
    hit = gen.standard_normal(array.shape[:2]) > 3
    noisy = np.where(hit[..., None], array * gen.standard_normal(array.shape).astype(np.float32), array)
    return Image.fromarray(np.round(np.clip(noisy, 0, 1) * 255).astype(np.uint8))


def photometric(image: Image.Image, rng: random.Random, colour: bool) -> Image.Image:
    """Noise (p 0.5), then in stage 2 brightness, contrast and saturation jitter (each p 0.5, factor in
    [0.5, 1.5]), on the PIL image before resizing, in the official order."""
    if rng.random() >= 0.5:
        image = sparse_noise(image, rng)
    if colour:
        for enhancer in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            if rng.random() < 0.5:
                image = enhancer(image).enhance(rng.uniform(0.5, 1.5))
    return image


def _rotate_nearest(x: torch.Tensor, degrees: float) -> torch.Tensor:
    """x: [C, H, W] rotated about its centre (counter-clockwise), nearest sampling, zeros outside."""
    angle = math.radians(degrees)
    cos, sin = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0]], dtype=torch.float32)[None]
    grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
    return F.grid_sample(x[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0]


def _shift(x: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """x: [C, H, W] moved by (dx, dy) whole pixels, zeros where nothing comes in."""
    out = torch.zeros_like(x)
    _, h, w = x.shape
    if abs(dx) >= w or abs(dy) >= h:
        return out
    src_y, dst_y = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
    src_x, dst_x = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
    out[:, dst_y, dst_x] = x[:, src_y, src_x]
    return out


def geometric(pixels: torch.Tensor, mask: torch.Tensor, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint image/mask augmentation on the normalised tensors (zeros fill: the CLIP mean colour):
    rotation in [-30°, 30°] (p 0.5), translation up to 15 % per axis in whole pixels (p 0.5), horizontal
    and vertical flips (p 0.5 each); nearest sampling, so the mask stays binary."""
    x = torch.cat([pixels, mask[None]], dim=0)
    if rng.random() < 0.5:
        x = _rotate_nearest(x, rng.uniform(-30.0, 30.0))
    if rng.random() < 0.5:
        h, w = x.shape[-2:]
        dx = round(rng.uniform(-0.15 * w, 0.15 * w))
        dy = round(rng.uniform(-0.15 * h, 0.15 * h))
        x = _shift(x, dx, dy)
    if rng.random() < 0.5:
        x = x.flip(-1)
    if rng.random() < 0.5:
        x = x.flip(-2)
    return x[:3].contiguous(), x[3].contiguous()


def load_example(record: Any, size: int, rng: random.Random | None, colour: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels [3, S, S] CLIP-normalised, mask [S, S] 0/1) with the official augmentation of a stage
    (``colour``: stage 2's jitter) when ``rng`` is given."""
    image = open_image(record.image)
    if rng is not None:
        image = photometric(image, rng, colour)
    pixels, mask = to_model_input(image, size), load_mask_nearest(record, size)
    if rng is not None:
        pixels, mask = geometric(pixels, mask, rng)
    return pixels, mask


def _batch(records: Sequence[Any], size: int, rng: random.Random | None, colour: bool,
           device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    examples = [load_example(r, size, rng, colour) for r in records]
    pixels = torch.stack([e[0] for e in examples]).to(device)
    masks = torch.stack([e[1] for e in examples]).to(device)
    labels = torch.tensor([int(r.label) for r in records], device=device)
    return pixels, masks, labels, [r.class_name for r in records]


# -------------------------------------------------------------------------------------------------
# stage-1 image features: frozen CLIP with V-V attention


def _vv_block(block: torch.nn.Module, x: torch.Tensor, axis: str) -> torch.Tensor:
    """One vision block with value·valueᵀ attention (weights of the block's own MHA), FFN kept.

    x: [N, T, W]. ``axis="tokens"``: each token attends over the tokens of its image; ``"batch"``: over the
    images of the batch at the same token position (the official code's behaviour)."""
    attn = block.attn
    n, t, width = x.shape
    heads = attn.num_heads
    h = block.ln_1(x)
    bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
    v = F.linear(h, attn.in_proj_weight[2 * width:], bias).view(n, t, heads, width // heads)
    if axis == "tokens":
        v = v.permute(0, 2, 1, 3)  # [N, H, T, d]
        out = F.scaled_dot_product_attention(v, v, v).permute(0, 2, 1, 3)
    else:
        v = v.permute(1, 2, 0, 3)  # [T, H, N, d]
        out = F.scaled_dot_product_attention(v, v, v).permute(2, 0, 1, 3)
    x = x + block.ls_1(attn.out_proj(out.reshape(n, t, width)))
    return x + block.ls_2(block.mlp(block.ln_2(x)))


@torch.no_grad()
def surgery_features(backbone: ClipBackbone, pixels: torch.Tensor, layers: Sequence[int], vv_blocks: int = 19,
                     axis: str = "batch") -> list[torch.Tensor]:
    """Stage 1's patch features: [N, G*G, D] per level in ``layers``, each
    normalize(ln_post(tokens) @ proj) + normalize(g), with the last ``vv_blocks`` blocks using V-V attention
    and g the image embedding of the unmodified CLIP (both paths share the blocks before the first V-V one)."""
    visual = backbone.clip.visual
    blocks = visual.transformer.resblocks
    first_vv = len(blocks) - vv_blocks + 1
    x = visual.ln_pre(backbone.embed_image(pixels))
    plain, taps = x, []
    for index, block in enumerate(blocks, start=1):
        if index < first_vv:
            x = plain = _run_block(block, x, causal=False)
        else:
            plain = _run_block(block, plain, causal=False)
            x = _vv_block(block, x, axis)
        if index in layers:
            taps.append(x[:, 1:])
    with fp32("cuda"):
        g = F.normalize(visual.ln_post(plain[:, 0].float()) @ visual.proj.float(), dim=-1)
        return [F.normalize(visual.ln_post(t.float()) @ visual.proj.float(), dim=-1) + g[:, None] for t in taps]


# -------------------------------------------------------------------------------------------------
# losses


def similarity_probabilities(features: torch.Tensor, anchors: torch.Tensor, size: int) -> torch.Tensor:
    """features [N, L, E], anchors [N, E, 2] -> [N, 2, S, S]: softmax over (normal, abnormal) of
    100·features·anchors, bilinearly upsampled (align_corners=True) before the softmax (official training)."""
    n, length, _ = features.shape
    grid = math.isqrt(length)
    with fp32("cuda"):
        z = 100.0 * torch.bmm(features.float(), anchors.float())  # [N, L, 2]
        z = z.transpose(1, 2).reshape(n, 2, grid, grid)
        z = F.interpolate(z, size=(size, size), mode="bilinear", align_corners=True)
        return z.softmax(dim=1)


def focal_loss(probs: torch.Tensor, mask: torch.Tensor, gamma: float = 2.0, smooth: float = 1e-5) -> torch.Tensor:
    """probs [N, 2, H, W] (softmax), mask [N, H, W] 0/1 -> mean over all pixels of -(1 - p_t)^γ log p_t,
    with the one-hot target clamped to [smooth, 1 - smooth] and p_t += smooth (the official FocalLoss)."""
    target = mask > 0.5
    p_normal, p_abnormal = probs[:, 0], probs[:, 1]
    hi, lo = 1.0 - smooth, smooth
    p_t = torch.where(target, lo * p_normal + hi * p_abnormal, hi * p_normal + lo * p_abnormal) + smooth
    return (-((1.0 - p_t) ** gamma) * torch.log(p_t)).mean()


def dice_loss(pred: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """pred, target [N, H, W] -> 1 - mean over images of (2|P∩T| + 1) / (|P| + |T| + 1)."""
    pred, target = pred.flatten(1), target.flatten(1).to(pred.dtype)
    dice = (2 * (pred * target).sum(1) + smooth) / (pred.sum(1) + target.sum(1) + smooth)
    return 1.0 - dice.mean()


def segmentation_loss(probs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """focal + dice(normal, 1 - mask) + dice(abnormal, mask)."""
    mask = mask.to(probs.dtype)
    return focal_loss(probs, mask) + dice_loss(probs[:, 0], 1 - mask) + dice_loss(probs[:, 1], mask)


def disentangle_loss(anchors: torch.Tensor) -> torch.Tensor:
    """anchors [N, E, 2] -> (mean over n of <t_normal, t_abnormal>)²."""
    return (anchors[:, :, 0] * anchors[:, :, 1]).sum(1).mean() ** 2


def batch_anchors(model: AACLIP, class_names: Sequence[str]) -> torch.Tensor:
    """[N, E, 2]: the anchors of each image's class, computed once per distinct class (differentiable)."""
    distinct = list(dict.fromkeys(class_names))
    anchors = model.compute_anchors([model.class_description(c) for c in distinct])
    return anchors[[distinct.index(c) for c in class_names]]


def stage1_losses(model: AACLIP, pixels: torch.Tensor, masks: torch.Tensor, class_names: Sequence[str],
                  cfg: AACLIPTrainConfig) -> dict[str, torch.Tensor]:
    """The text stage's loss on one batch: seg (last level only when ``cfg.faithful``) + w·disentangle."""
    backbone = model.backbone
    layers = tuple(backbone.spec.feature_layers)
    used = layers[-1:] if cfg.faithful else layers
    features = surgery_features(backbone, pixels, used, cfg.vv_blocks, cfg.vv_axis)
    with fp32("cuda"):  # the text side is small: kept in fp32 under CUDA autocast
        anchors = batch_anchors(model, class_names).float()
    size = pixels.shape[-1]
    seg = sum(segmentation_loss(similarity_probabilities(f, anchors, size), masks) for f in features)
    orth = disentangle_loss(anchors)
    total = seg + cfg.text_norm_weight * orth
    return {"loss": total, "seg": seg.detach(), "orth": orth.detach()}


def stage2_losses(model: AACLIP, pixels: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                  anchors: torch.Tensor) -> dict[str, torch.Tensor]:
    """The image stage's loss on one batch; ``anchors`` [N, E, 2] fixed. CE(det·T) + Σ_levels seg."""
    levels, det = model.image_features(pixels)
    anchors = anchors.float()
    with fp32("cuda"):
        logits = torch.bmm(det.float()[:, None], anchors)[:, 0]  # [N, 2]
        cls = F.cross_entropy(logits, labels.long())
    size = pixels.shape[-1]
    seg = sum(segmentation_loss(similarity_probabilities(f, anchors, size), masks) for f in levels)
    return {"loss": cls + seg, "cls": cls.detach(), "seg": seg.detach()}


# -------------------------------------------------------------------------------------------------
# validation


def _class_auroc(per_class: dict[str, dict[str, list]]) -> dict[str, float]:
    from ...metrics import auroc

    pixel, image = [], []
    for d in per_class.values():
        masks, maps = np.concatenate(d["masks"]), np.concatenate(d["maps"])
        if masks.any() and not masks.all():
            pixel.append(auroc(masks, maps))
        labels = np.array(d["labels"])
        if 0 < labels.sum() < labels.size:
            image.append(auroc(labels, np.array(d["scores"])))
    return {"pixel_auroc": float(np.mean(pixel)) if pixel else float("nan"),
            "image_auroc": float(np.mean(image)) if image else float("nan")}


@torch.no_grad()
def validate(model: AACLIP, records: Sequence[Any], stage: int, cfg: AACLIPTrainConfig,
             anchors: dict[str, torch.Tensor]) -> dict[str, float]:
    """Mean over classes of pixel and image AUROC on held-out records (monitoring only; no transductive
    fusion). Stage 1 scores what it trains: the abnormal probability of the V-V features
    (levels as in the loss, averaged), image score = its maximum. Stage 2 uses the inference map (blurred
    level maps summed, ``AACLIP.anomaly_maps``) and image score (det·t_a + 1)/2."""
    device = model.device
    size = model.backbone.image_size
    out_size = min(cfg.val_map_size, size)
    layers = tuple(model.backbone.spec.feature_layers)
    batch_size = cfg.text_batch_size if stage == 1 else cfg.val_batch_size
    per_class: dict[str, dict[str, list]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        pixels = torch.stack([to_model_input(open_image(r.image), size) for r in chunk]).to(device)
        t = torch.stack([anchors[r.class_name] for r in chunk]).float()
        with training_autocast(device, cfg.amp):
            if stage == 1:
                used = layers[-1:] if cfg.faithful else layers
                feats = surgery_features(model.backbone, pixels, used, cfg.vv_blocks, cfg.vv_axis)
            else:
                feats, det = model.image_features(pixels)
        feats = [f.float() for f in feats]
        if stage == 1:
            maps = sum(similarity_probabilities(f, t, out_size)[:, 1] for f in feats) / len(feats)
            scores = maps.flatten(1).amax(1)
        else:
            maps = model.anomaly_maps(feats, t, model.domain, out_size)
            scores = (torch.bmm(det.float()[:, None], t)[:, 0, 1] + 1) / 2
        for j, r in enumerate(chunk):
            d = per_class.setdefault(r.class_name, {"labels": [], "scores": [], "masks": [], "maps": []})
            d["labels"].append(int(r.label))
            d["scores"].append(float(scores[j]))
            d["masks"].append(load_mask_nearest(r, out_size).numpy().ravel() > 0.5)
            d["maps"].append(maps[j].float().cpu().numpy().ravel())
    return _class_auroc(per_class)


# -------------------------------------------------------------------------------------------------
# checkpoints


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _write_state(run_dir: Path, state: AACLIPTrainState, cfg: AACLIPTrainConfig) -> None:
    tmp = run_dir / (STATE_FILE + ".tmp")
    blob = {"text_epoch": state.text_epoch, "image_epoch": state.image_epoch, "stage": state.stage,
            "best": state.best, "best_epoch": state.best_epoch, "history": state.history,
            "finished": state.finished, "config": asdict(cfg)}
    tmp.write_text(json.dumps(blob, indent=1, default=float), encoding="utf-8")
    os.replace(tmp, run_dir / STATE_FILE)


def _read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        log.warning("%s unreadable; training history starts empty", path)
        return {}


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


# -------------------------------------------------------------------------------------------------
# the loop


def _order(n: int, seed: int, stage: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}-aa-clip-{stage}-order-{epoch}").shuffle(order)
    return order


def class_anchors(model: AACLIP, class_names: Sequence[str]) -> dict[str, torch.Tensor]:
    """class -> anchors [E, 2] (fp32, no autograd) of every distinct class name."""
    names = sorted(set(class_names))
    with torch.no_grad():  # fp32: they stay fixed for the whole image stage
        anchors = model.compute_anchors([model.class_description(c) for c in names]).float()
    return {c: anchors[i] for i, c in enumerate(names)}


def train_aa_clip(model: AACLIP, records: Sequence[Any], cfg: AACLIPTrainConfig, run_dir: Path,
                  resume: bool = False, progress: Progress | None = None,
                  should_stop: Callable[[AACLIPTrainState], bool] | None = None) -> AACLIPTrainState:
    """Train ``model``'s text adapters (stage 1) then its image adapters (stage 2) in place.

    ``records``: objects with ``image``, ``mask`` (path or None), ``class_name`` and ``label``. Checkpoints
    go to ``run_dir`` in the official format; ``resume=True`` continues from them. ``progress(phase, step,
    steps, mean losses)`` is called after every step (phase "text" or "image"); ``should_stop(state)`` after
    every epoch's checkpoint (return True to stop there; ``resume`` continues).
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    device = model.device
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
    if not train_records:
        raise UsageError("no training images after the validation split")
    classes = [r.class_name for r in records]
    model.backbone.requires_grad_(False)
    model.text_adapter.requires_grad_(False)
    model.image_adapter.requires_grad_(False)
    model.eval()  # as the official code: nothing in the adapters depends on the mode

    text_opt = torch.optim.Adam(model.text_adapter.parameters(), lr=cfg.text_lr, betas=cfg.betas)
    image_opt = torch.optim.Adam(model.image_adapter.parameters(), lr=cfg.image_lr, betas=cfg.betas)
    schedule = torch.optim.lr_scheduler.MultiStepLR(image_opt, milestones=list(cfg.milestones), gamma=cfg.lr_gamma)
    text_steps = math.ceil(len(train_records) / cfg.text_batch_size)
    image_steps = math.ceil(len(train_records) / cfg.image_batch_size)

    state = AACLIPTrainState()
    if resume:
        saved = _read_state(run_dir)
        if (run_dir / TEXT_FILE).is_file():
            blob = _load(run_dir / TEXT_FILE)
            model.text_adapter.load_state_dict(blob["text_adapter"])
            text_opt.load_state_dict(blob["text_optimizer"])
            state.text_epoch = int(blob["epoch"])
        if (run_dir / IMAGE_FILE).is_file():
            blob = _load(run_dir / IMAGE_FILE)
            model.image_adapter.load_state_dict(blob["image_adapter"])
            image_opt.load_state_dict(blob["image_optimizer"])
            state.image_epoch = int(blob["epoch"])
            schedule.last_epoch = state.image_epoch * image_steps  # the lr itself comes with the optimizer
        state.history = [h for h in saved.get("history", [])
                         if (h["stage"] == 1 and h["stage_epoch"] <= state.text_epoch)
                         or (h["stage"] == 2 and h["stage_epoch"] <= state.image_epoch)]
        if saved.get("best_epoch") is not None and saved["best_epoch"] <= state.image_epoch:
            state.best, state.best_epoch = float(saved["best"]), int(saved["best_epoch"])
        log.info("resumed from %s: text epoch %d, image epoch %d", run_dir, state.text_epoch, state.image_epoch)
    elif any((run_dir / name).exists() for name in (TEXT_FILE, IMAGE_FILE)):
        log.warning("%s already holds checkpoints; starting afresh and overwriting them", run_dir)
    autocast = partial(training_autocast, device, cfg.amp)

    # the official code trains against the plain CLIP text encoder when there is no text stage
    model.use_text_adapter = cfg.text_epochs > 0 or state.text_epoch > 0
    try:
        stopped = _text_stage(model, train_records, val_records, classes, cfg, state, text_opt, text_steps, run_dir,
                              autocast, progress, should_stop)
        if not stopped:
            _image_stage(model, train_records, val_records, classes, cfg, state, image_opt, schedule, image_steps,
                         run_dir, autocast, progress, should_stop)
    finally:
        model.text_adapter.requires_grad_(False)
        model.image_adapter.requires_grad_(False)
        model.clear_caches()  # cached anchors predate the trained text adapters
    if state.text_epoch >= cfg.text_epochs and state.image_epoch >= cfg.image_epochs:
        state.finished = True
        _write_state(run_dir, state, cfg)
    return state


def _text_stage(model, train_records, val_records, classes, cfg, state, text_opt, text_steps, run_dir, autocast,
                progress, should_stop) -> bool:
    """Stage 1: the text adapters against the V-V features. Returns True when ``should_stop`` stopped it."""
    model.text_adapter.requires_grad_(True)
    while state.text_epoch < cfg.text_epochs:
        state.stage, epoch = 1, state.text_epoch
        sums, seconds = _train_epoch(
            model, train_records, cfg, 1, epoch, cfg.text_batch_size, text_steps, text_opt, autocast, progress,
            lambda pixels, masks, labels, names: stage1_losses(model, pixels, masks, names, cfg))
        state.text_epoch = epoch + 1
        _atomic_save({"epoch": state.text_epoch, "text_adapter": model.text_adapter.state_dict(),
                      "text_optimizer": text_opt.state_dict()}, run_dir / TEXT_FILE)
        metrics = validate(model, val_records, 1, cfg, class_anchors(model, classes)) if val_records else {}
        _record(state, 1, epoch + 1, sums, text_steps, metrics, cfg.text_lr, seconds)
        _write_state(run_dir, state, cfg)
        if should_stop is not None and should_stop(state):
            return True
    model.text_adapter.requires_grad_(False)
    return False


def _image_stage(model, train_records, val_records, classes, cfg, state, image_opt, schedule, image_steps, run_dir,
                 autocast, progress, should_stop) -> None:
    """Stage 2: the image adapters against anchors computed once and frozen."""
    if state.image_epoch >= cfg.image_epochs:
        return
    anchors = class_anchors(model, classes)
    model.image_adapter.requires_grad_(True)
    while state.image_epoch < cfg.image_epochs:
        state.stage, epoch = 2, state.image_epoch
        sums, seconds = _train_epoch(
            model, train_records, cfg, 2, epoch, cfg.image_batch_size, image_steps, image_opt, autocast, progress,
            lambda pixels, masks, labels, names: stage2_losses(model, pixels, masks, labels,
                                                               torch.stack([anchors[c] for c in names])),
            schedule)
        state.image_epoch = epoch + 1
        blob = {"epoch": state.image_epoch, "image_adapter": model.image_adapter.state_dict(),
                "image_optimizer": image_opt.state_dict()}
        _atomic_save(blob, run_dir / IMAGE_FILE)
        _atomic_save(blob, run_dir / f"image_adapter_{state.image_epoch}.pth")
        metrics = validate(model, val_records, 2, cfg, anchors) if val_records else {}
        lr = image_opt.param_groups[0]["lr"]
        _record(state, 2, epoch + 1, sums, image_steps, metrics, lr, seconds)
        values = [v for v in metrics.values() if not math.isnan(v)]
        if values and float(np.mean(values)) > state.best:
            state.best, state.best_epoch = float(np.mean(values)), state.image_epoch
        _write_state(run_dir, state, cfg)
        if should_stop is not None and should_stop(state):
            return


def _train_epoch(model, records, cfg, stage: int, epoch: int, batch_size: int, steps: int, optimizer, autocast,
                 progress, loss_fn, schedule=None) -> tuple[dict[str, float], float]:
    """One epoch of one stage: order and augmentation seeded by (seed, stage, epoch, step), colour jitter in
    stage 2 only, ``loss_fn(pixels, masks, labels, names)`` under ``autocast``, one optimiser (and schedule)
    step per batch. Returns (summed losses, seconds)."""
    order = _order(len(records), cfg.seed, stage, epoch)
    sums: dict[str, float] = {}
    started = time.perf_counter()
    for step in range(steps):
        rng = random.Random(f"{cfg.seed}-aa-clip-{stage}-aug-{epoch}-{step}") if cfg.augment else None
        batch = [records[i] for i in order[step * batch_size:(step + 1) * batch_size]]
        pixels, masks, labels, names = _batch(batch, model.backbone.image_size, rng, stage == 2, model.device)
        with autocast():
            losses = loss_fn(pixels, masks, labels, names)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
        _accumulate(sums, losses, step, steps, "text" if stage == 1 else "image", progress)
    return sums, time.perf_counter() - started


def _accumulate(sums: dict[str, float], losses: dict[str, torch.Tensor], step: int, steps: int, phase: str,
                progress: Progress | None) -> None:
    for k, v in losses.items():
        sums[k] = sums.get(k, 0.0) + float(v.detach())
    if progress is not None:
        progress(phase, step + 1, steps, {k: sums[k] / (step + 1) for k in sums})


def _record(state: AACLIPTrainState, stage: int, stage_epoch: int, sums: dict[str, float], steps: int,
            metrics: dict[str, float], lr: float, seconds: float) -> None:
    entry = {"epoch": state.epoch - 1, "stage": stage, "stage_epoch": stage_epoch, "lr": lr,
             "seconds": round(seconds, 3), **{k: v / steps for k, v in sums.items()}, **metrics}
    state.history.append(entry)
    log.info("%s epoch %d: %s", "text" if stage == 1 else "image", stage_epoch,
             {k: round(v, 4) for k, v in entry.items() if isinstance(v, float)})


TRAINER = Trainer(config=AACLIPTrainConfig.from_settings, fit=train_aa_clip)
