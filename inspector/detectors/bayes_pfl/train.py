"""Retraining Bayes-PFL's learnable parts on auxiliary data (official ``train.py``). The CLIP backbone stays frozen and
no gradient is computed for its weights (features under ``no_grad``; the text tower is differentiated
only with respect to its inputs, the prompts).

Stage 1 (all learnable parts): L = L_cls + L_seg + 0.01·(KL_ISD + KL_n + KL_a) + L_orth, with
* L_cls: cross-entropy of the pair (l_beta,n, l_beta,a) for one bank index beta drawn per step;
* L_seg: sum over levels of focal (gamma 2; fg mean + bg mean) + dice on softmax of the upsampled pair;
* KL: log q0(z0) - log N(zK; 0, I) - sum_k log|det J_k|, averaged over images (the official code divides
  the IAD log-det term by the image batch size too; kept for parity, ``iad_logdet_per_image=False``);
* L_orth: mean over (image, b, b') of cos^2 between bank entries of the same state, diagonal zeroed.
Stage 2: L_cls only, on class_mapping, image_mapping and fuse (v = image_mapping(g + fuse(F))).

Optimiser: Adam(0.5, 0.999); groups prompts 1e-3, temperatures 1e-2, flow parameters 1e-3, the rest 1e-4;
linear warm-up over 10 % of the steps, then cosine. Stage 2: Adam 1e-4 constant.

Model selection: a validation split held out from the *auxiliary* data (the official code selects on the
target dataset's test set). Stage 1 tracks mean pixel AP, stage 2 mean image AP; after ``patience``
epochs without improvement the best weights are restored and the next stage starts (or training stops).

Every epoch writes a checkpoint (weights, optimiser, schedule, history). Data order, augmentation and noise
come from generators seeded by (seed, epoch, step), so ``--resume`` continues to the same result.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os
import pickle
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageFilter

from ...config import TrainSettings
from ...data.splits import load_mask, split_records
from ...errors import UsageError
from ...imaging import open_image, to_model_input
from ...runtime import training_autocast
from ..base import Trainer
from .model import BayesPFL

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(TrainSettings):
    """[train] settings plus the recipe's constants (learning rates, schedule, loss weights)."""

    lr_prompt: float = 1e-3
    lr_temperature: float = 1e-2
    lr_flow: float = 1e-3
    lr_other: float = 1e-4
    lr_stage2: float = 1e-4
    warmup_fraction: float = 0.1
    kl_weight: float = 0.01
    iad_logdet_per_image: bool = False

    @classmethod
    def from_settings(cls, train: TrainSettings, text_epochs: int | None = None) -> TrainConfig:
        """Every ``[train]`` key is Bayes-PFL's; ``text_epochs`` (AA-CLIP's first stage) is refused."""
        if text_epochs is not None:
            raise UsageError("--text-epochs is AA-CLIP's (its text-adapter stage); Bayes-PFL trains both flow "
                             "stages within --epochs, switching on validation")
        return cls(**dataclasses.asdict(train))


# -------------------------------------------------------------------------------------------------
# data


def augment(image: Image.Image, mask: Image.Image, rng: random.Random) -> tuple[Image.Image, Image.Image]:
    """The paper's augmentation, applied jointly to image and mask, each with probability 0.5."""
    if rng.random() < 0.5:
        angle = rng.uniform(-30, 30)
        image = image.rotate(angle, resample=Image.BILINEAR)
        mask = mask.rotate(angle, resample=Image.NEAREST)
    if rng.random() < 0.5:
        turns = rng.choice([Image.ROTATE_90, Image.ROTATE_180, Image.ROTATE_270])
        image, mask = image.transpose(turns), mask.transpose(turns)
    if rng.random() < 0.5:
        image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.8, 1.2))
    if rng.random() < 0.5:
        array = np.asarray(image, dtype=np.float32)
        noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, rng.uniform(3, 12), array.shape)
        image = Image.fromarray(np.clip(array + noise, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        choice = rng.randrange(3)
        if choice == 0:
            image = image.filter(ImageFilter.BoxBlur(1))
        elif choice == 1:
            image = ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))
        else:
            image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    return image, mask


def load_example(record: Any, size: int, rng: random.Random | None) -> tuple[torch.Tensor, torch.Tensor]:
    image = open_image(record.image)
    mask_image = (Image.open(record.mask).convert("L") if record.mask is not None
                  else Image.new("L", image.size, 0)).resize(image.size, Image.NEAREST)
    if rng is not None:
        image, mask_image = augment(image, mask_image, rng)
    mask = mask_image.resize((size, size), Image.BILINEAR)
    return to_model_input(image, size), (torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0) > 0.5).float()


def mosaic_example(records: Sequence[Any], size: int, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
    """A 2x2 mosaic of four anomalous images of one class, with their masks (the paper's MVTec trick)."""
    half = size // 2
    canvas, masks = Image.new("RGB", (size, size)), Image.new("L", (size, size))
    for k, r in enumerate(rng.sample(list(records), 4) if len(records) >= 4 else [rng.choice(records)] * 4):
        x, y = (k % 2) * half, (k // 2) * half
        canvas.paste(open_image(r.image).resize((half, half), Image.BICUBIC), (x, y))
        m = Image.open(r.mask).convert("L").resize((half, half), Image.BILINEAR) if r.mask else Image.new("L", (half, half))
        masks.paste(m, (x, y))
    pixels = to_model_input(canvas, size)
    return pixels, (torch.from_numpy(np.asarray(masks, dtype=np.float32) / 255.0) > 0.5).float()


# -------------------------------------------------------------------------------------------------
# losses


def focal_loss(prob_abnormal: torch.Tensor, target: torch.Tensor, gamma: float = 2.0) -> torch.Tensor:
    """Per pixel -(1 - p_t)^gamma log(p_t); mean over foreground pixels + mean over background pixels."""
    p_t = torch.where(target > 0.5, prob_abnormal, 1 - prob_abnormal)
    loss = -((1 - p_t) ** gamma) * torch.log(p_t + 1e-8)
    fg, bg = target > 0.5, target <= 0.5
    total = loss.new_zeros(())
    if fg.any():
        total = total + loss[fg].mean()
    if bg.any():
        total = total + loss[bg].mean()
    return total


def dice_loss(prob_abnormal: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    inter = (prob_abnormal * target).sum()
    return 1 - (2 * inter + 1e-5) / (prob_abnormal.sum() + target.sum() + 1e-5)


def flow_kl(out: dict[str, torch.Tensor], images: int, logdet_divisor: int | None = None) -> torch.Tensor:
    """KL(q_K || N(0, I)) up to constants, averaged over images (official ``train.py`` and ``loss.py``).

    out: z0, zk [..., E], mu, var (broadcastable), log_det [...]. ``logdet_divisor`` reproduces the official
    IAD quirk (its single log-det divided by the image batch size).
    """
    log_q0 = -0.5 * (torch.log(out["var"]) + (out["z0"] - out["mu"]) ** 2 / out["var"]).sum(-1)
    log_p = -0.5 * (out["zk"] ** 2).sum(-1)
    first = (log_q0 - log_p).sum() / images if logdet_divisor is None else (log_q0 - log_p).mean()
    return first - out["log_det"].sum() / (logdet_divisor or images)


def orthogonality_loss(t: torch.Tensor, bank: int) -> torch.Tensor:
    """t: [N, 2B, E] normalised -> mean over states of mean_{n,b,b'} cos^2 (diagonal zeroed, counted)."""
    total = t.new_zeros(())
    for s in range(2):
        ts = t[:, s * bank:(s + 1) * bank]
        cos = ts @ ts.transpose(1, 2)
        cos = cos - torch.diag_embed(torch.diagonal(cos, dim1=1, dim2=2))
        total = total + (cos ** 2).mean()
    return total


def classification_loss(model: BayesPFL, g: torch.Tensor, patch_tokens: Sequence[torch.Tensor], t: torch.Tensor,
                        labels: torch.Tensor, pair: list[int]) -> torch.Tensor:
    """L_cls: cross-entropy of (l_beta,n, l_beta,a) with l = exp(tau_img)·cos(class_mapping(t), v)."""
    head = model.head
    v = F.normalize(head.image_embedding(g, list(patch_tokens)).float(), dim=-1)
    text = F.normalize(head.class_mapping(t[:, pair]), dim=-1)  # [N, 2, E]
    logits = head.log_tau_image.exp() * torch.einsum("nse,ne->ns", text, v)
    return F.cross_entropy(logits, labels.long())


def _frozen_features(model: BayesPFL, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(g [N, E] fp32, [F_l]) from the frozen backbone, without autograd."""
    with torch.no_grad():
        g, patch_tokens = model.backbone.encode_image(pixels)
    return g.float(), patch_tokens


def stage1_losses(model: BayesPFL, pixels: torch.Tensor, masks: torch.Tensor, labels: torch.Tensor,
                  class_names: Sequence[str], gen: torch.Generator, cfg: TrainConfig) -> dict[str, torch.Tensor]:
    head, c = model.head, model.config
    n, e, bank = pixels.shape[0], c.text_width, c.bank_size
    g, patch_tokens = _frozen_features(model, pixels)
    eps = torch.randn(n, 1, e, generator=gen).to(pixels.device)
    isd = head.isd(g, eps)
    eps_iad = torch.randn(2, 1, e, generator=gen).to(pixels.device)
    iad_n = head.iad_normal(head.iad_base, eps_iad[0])
    iad_a = head.iad_abnormal(head.iad_base, eps_iad[1])
    states = model.state_inputs_from_samples(iad_n["zk"], iad_a["zk"])  # [2, 1, B, Q, E]
    t = model.encode_prompt_samples(isd["zk"], class_names, [states] * n)  # [N, 2B, E]
    beta = int(torch.randint(bank, (1,), generator=gen))
    pair = [beta, bank + beta]
    loss_cls = classification_loss(model, g, patch_tokens, t, labels, pair)
    query = head.rca.q_proj(t)
    size, grid = pixels.shape[-1], model.backbone.grid
    loss_seg = t.new_zeros(())
    for level, tokens in enumerate(patch_tokens):
        patches = head.rca.project_patches(level, tokens)
        refined = head.rca(t, query, patches)[:, pair]  # [N, 2, E]
        z = head.log_tau_pixel.exp() * patches @ refined.transpose(1, 2)  # [N, G*G, 2]
        z = z.transpose(1, 2).reshape(n, 2, grid, grid)
        prob = torch.softmax(F.interpolate(z, size=(size, size), mode="bilinear", align_corners=True), dim=1)[:, 1]
        loss_seg = loss_seg + focal_loss(prob, masks) + dice_loss(prob, masks)
    divisor = None if cfg.iad_logdet_per_image else n
    loss_kl = cfg.kl_weight * (flow_kl(isd, n) + flow_kl(iad_n, 1, divisor) + flow_kl(iad_a, 1, divisor))
    loss_orth = orthogonality_loss(t, bank)
    total = loss_cls + loss_seg + loss_kl + loss_orth
    return {"loss": total, "cls": loss_cls.detach(), "seg": loss_seg.detach(), "kl": loss_kl.detach(),
            "orth": loss_orth.detach()}


def stage2_losses(model: BayesPFL, pixels: torch.Tensor, labels: torch.Tensor, class_names: Sequence[str],
                  gen: torch.Generator) -> dict[str, torch.Tensor]:
    c = model.config
    n, e, bank = pixels.shape[0], c.text_width, c.bank_size
    g, patch_tokens = _frozen_features(model, pixels)
    with torch.no_grad():  # stage 2 trains the image head only: the prompts are fixed
        eps = torch.randn(n, 1, e, generator=gen).to(pixels.device)
        eps_iad = torch.randn(2, 1, e, generator=gen)
        states = model._state_inputs(eps_iad[0], eps_iad[1])
        t = model.encode_prompts(g, eps, class_names, [states] * n)
    beta = int(torch.randint(bank, (1,), generator=gen))
    loss = classification_loss(model, g, patch_tokens, t, labels, [beta, bank + beta])
    return {"loss": loss, "cls": loss.detach()}


# -------------------------------------------------------------------------------------------------
# optimisation


def parameter_groups(model: BayesPFL, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The official groups: prompts 1e-3, temperatures 1e-2, flow parameters 1e-3, everything else 1e-4."""
    groups: dict[str, list[torch.nn.Parameter]] = {"prompt": [], "temperature": [], "flow": [], "other": []}
    for name, p in model.head.named_parameters():
        if name in ("context", "state_normal", "state_abnormal"):
            groups["prompt"].append(p)
        elif name.startswith("log_tau"):
            groups["temperature"].append(p)
        elif name.startswith(("isd.amor_", "iad_normal.", "iad_abnormal.")):
            groups["flow"].append(p)
        else:
            groups["other"].append(p)
    lrs = {"prompt": cfg.lr_prompt, "temperature": cfg.lr_temperature, "flow": cfg.lr_flow, "other": cfg.lr_other}
    return [{"params": ps, "lr": lrs[k], "name": k} for k, ps in groups.items() if ps]


def warmup_cosine(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def stage2_parameters(model: BayesPFL) -> list[torch.nn.Parameter]:
    head = model.head
    return [*head.class_mapping.parameters(), *head.image_mapping.parameters(), *head.fuse.parameters()]


# -------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainState:
    epoch: int = 0
    stage: int = 1
    best: float = -1.0
    bad_epochs: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    finished: bool = False


def validate(model: BayesPFL, records: Sequence[Any], samples: int, batch_size: int) -> dict[str, float]:
    """Mean over classes of pixel AP (maps, unsmoothed) and image AP (text score)."""
    from ...metrics import average_precision

    size = model.backbone.image_size
    per_class: dict[str, dict[str, list]] = {}
    model.eval()
    model.clear_caches()
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        pixels = torch.stack([to_model_input(open_image(r.image), size) for r in chunk])
        pred = model.predict_tensors(pixels, [r.class_name for r in chunk], samples=samples).cpu()
        for j, r in enumerate(chunk):
            d = per_class.setdefault(r.class_name, {"labels": [], "scores": [], "masks": [], "maps": []})
            d["labels"].append(r.label)
            d["scores"].append(float(pred.text_score[j]))
            d["masks"].append(load_mask(r, size).numpy().ravel() > 0.5)
            d["maps"].append(pred.anomaly_map[j].numpy().ravel())
    pixel, image = [], []
    for d in per_class.values():
        masks = np.concatenate(d["masks"])
        if masks.any() and not masks.all():
            pixel.append(average_precision(masks, np.concatenate(d["maps"])))
        if 0 < sum(d["labels"]) < len(d["labels"]):
            image.append(average_precision(np.array(d["labels"]), np.array(d["scores"])))
    model.clear_caches()
    return {"pixel_ap": float(np.mean(pixel)) if pixel else float("nan"),
            "image_ap": float(np.mean(image)) if image else float("nan")}


def train(model: BayesPFL, records: Sequence[Any], cfg: TrainConfig, run_dir: Path, resume: bool = False,
          progress: Callable[[str, int, int, dict[str, float]], None] | None = None,
          should_stop: Callable[[TrainState], bool] | None = None) -> TrainState:
    """Train ``model.head`` in place; checkpoints in ``run_dir``. Returns the final state (best weights loaded).

    ``should_stop(state)`` is asked after each epoch's checkpoint (Ctrl-C handling; tests of ``resume``)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    device = model.device
    train_records, val_records = split_records(records, cfg.val_fraction, cfg.seed)
    if not train_records:
        raise UsageError("no training images after the validation split")
    anomalous = [r for r in train_records if r.label == 1 and r.mask is not None]
    steps_per_epoch = math.ceil(len(train_records) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    model.backbone.requires_grad_(False)
    model.head.requires_grad_(True)
    optimizer = torch.optim.Adam(parameter_groups(model, cfg), betas=(0.5, 0.999))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, cfg.warmup_fraction))
    optimizer2 = torch.optim.Adam(stage2_parameters(model), lr=cfg.lr_stage2, betas=(0.5, 0.999))
    state = TrainState()
    best_head = copy.deepcopy(model.head.state_dict())
    checkpoint = run_dir / "checkpoint.pt"
    if resume and checkpoint.is_file():
        blob = load_checkpoint(checkpoint)
        model.head.load_state_dict(blob["head"])
        optimizer.load_state_dict(blob["optimizer"])
        optimizer2.load_state_dict(blob["optimizer2"])
        schedule.load_state_dict(blob["schedule"])
        best_head = blob["best_head"]
        state = TrainState(**blob["state"])
        log.info("resumed from %s at epoch %d (stage %d)", checkpoint, state.epoch, state.stage)
    model.head.to(device)
    while state.epoch < cfg.epochs and not state.finished:
        epoch = state.epoch
        # stage 1 scores images with v = g, stage 2 with v = image_mapping(g + fuse(F)) (official ``VPB.py``)
        model.head.config = dataclasses.replace(model.head.config, stage=state.stage)
        model.head.train()
        model.clear_caches()
        order = list(range(len(train_records)))
        random.Random(f"{cfg.seed}-order-{epoch}").shuffle(order)
        sums: dict[str, float] = {}
        for step in range(steps_per_epoch):
            rng = random.Random(f"{cfg.seed}-aug-{epoch}-{step}")
            gen = torch.Generator().manual_seed(hash((cfg.seed, epoch, step)) & ((1 << 62) - 1))
            batch = [train_records[i] for i in order[step * cfg.batch_size:(step + 1) * cfg.batch_size]]
            examples = []
            for r in batch:
                if anomalous and cfg.mosaic and rng.random() < cfg.mosaic:
                    same = [a for a in anomalous if a.class_name == r.class_name] or anomalous
                    examples.append((*mosaic_example(same, model.backbone.image_size, rng), 1, r.class_name))
                else:
                    examples.append((*load_example(r, model.backbone.image_size, rng if cfg.augment else None),
                                     r.label, r.class_name))
            pixels = torch.stack([x[0] for x in examples]).to(device)
            masks = torch.stack([x[1] for x in examples]).to(device)
            labels = torch.tensor([x[2] for x in examples], device=device)
            names = [x[3] for x in examples]
            with training_autocast(device):
                if state.stage == 1:
                    losses = stage1_losses(model, pixels, masks, labels, names, gen, cfg)
                    opt = optimizer
                else:
                    losses = stage2_losses(model, pixels, labels, names, gen)
                    opt = optimizer2
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            schedule.step()  # keeps stepping in stage 2, as the official code does (no effect there)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if progress:
                progress("train", step + 1, steps_per_epoch, {k: sums[k] / (step + 1) for k in sums})
        metrics = validate(model, val_records, cfg.val_samples, cfg.batch_size) if val_records else {}
        tracked = metrics.get("pixel_ap" if state.stage == 1 else "image_ap", float("nan"))
        entry = {"epoch": epoch, "stage": state.stage, **{k: v / steps_per_epoch for k, v in sums.items()}, **metrics}
        state.history.append(entry)
        log.info("epoch %d stage %d: %s", epoch, state.stage, {k: round(v, 4) for k, v in entry.items()
                                                               if isinstance(v, float)})
        if not val_records or math.isnan(tracked) or tracked > state.best:
            state.best = tracked if not math.isnan(tracked) else state.best
            state.bad_epochs = 0
            best_head = copy.deepcopy(model.head.state_dict())
        else:
            state.bad_epochs += 1
            if state.bad_epochs > cfg.patience:
                model.head.load_state_dict(best_head)
                if state.stage == 1:
                    log.info("stage 1 stopped improving: best weights restored, stage 2 starts")
                    state.stage, state.best, state.bad_epochs = 2, -1.0, 0
                else:
                    state.finished = True
        state.epoch = epoch + 1
        _save_checkpoint(checkpoint, model, optimizer, optimizer2, schedule, best_head, state)
        if should_stop is not None and should_stop(state):
            log.info("stopping after epoch %d; `--resume` continues from %s", epoch, checkpoint)
            return state
    model.head.load_state_dict(best_head)
    model.head.config = dataclasses.replace(model.head.config, stage=state.stage)
    model.head.eval()
    model.clear_caches()
    return state


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A resumable checkpoint, read with ``weights_only=True``: tensors, numbers, strings and plain containers
    only, so a crafted file cannot run code (what :func:`_save_checkpoint` writes is all of that kind)."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"Unsupported (?:global|operand)[^\n]*", str(exc))
        raise UsageError(f"{path}: refusing a checkpoint that holds more than tensors and plain data "
                         f"({found.group(0) if found else str(exc).splitlines()[0]}); delete it or train without "
                         "--resume") from None
    if not isinstance(blob, dict) or not {"head", "state"} <= set(blob):
        raise UsageError(f"{path}: not a retrain checkpoint; delete it or train without --resume")
    return blob


def _save_checkpoint(path: Path, model: BayesPFL, optimizer, optimizer2, schedule, best_head, state) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"head": model.head.state_dict(), "optimizer": optimizer.state_dict(),
                "optimizer2": optimizer2.state_dict(), "schedule": schedule.state_dict(),
                "best_head": best_head, "state": dataclasses.asdict(state)}, tmp)
    os.replace(tmp, path)


TRAINER = Trainer(config=TrainConfig.from_settings, fit=train)
