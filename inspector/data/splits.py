"""Validation splits and pixel masks of dataset records, shared by the trainers and ``inspector eval``."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image


def split_records(records: Sequence[Any], val_fraction: float, seed: int) -> tuple[list[Any], list[Any]]:
    """Hold out ``val_fraction`` of each (class, label) group for validation, deterministically."""
    groups: dict[tuple[str, int], list[Any]] = {}
    for r in records:
        groups.setdefault((r.class_name, r.label), []).append(r)
    train, val = [], []
    rng = random.Random(seed)
    for key in sorted(groups):
        items = sorted(groups[key], key=lambda r: str(r.image))
        rng.shuffle(items)
        k = round(len(items) * val_fraction) if len(items) > 1 else 0
        val.extend(items[:k])
        train.extend(items[k:])
    return train, val


def load_mask(record: Any, size: int) -> torch.Tensor:
    """[S, S] float 0/1 by bilinear resize and threshold 0.5 (Bayes-PFL's official transform and the metric
    masks of ``inspector eval``); zeros for normal images."""
    if record.mask is None:
        return torch.zeros(size, size)
    mask = Image.open(record.mask).convert("L").resize((size, size), Image.BILINEAR)
    return (torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0) > 0.5).float()


def load_mask_nearest(record: Any, size: int) -> torch.Tensor:
    """[S, S] float 0/1 by nearest resize, non-zero -> 1 (AA-CLIP's official transform); zeros without a mask."""
    if record.mask is None or not record.label:
        return torch.zeros(size, size)
    mask = Image.open(record.mask).convert("L").resize((size, size), Image.NEAREST)
    return torch.from_numpy(np.asarray(mask) != 0).float()
