"""Synthetic anomaly data in MVTec AD layout: textures and objects with defects and exact masks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

DEFECTS = ("scratch", "blob", "hole")


def _texture(rng: np.random.Generator, kind: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    colour = rng.uniform(60, 190, size=3)
    if kind % 3 == 0:  # stripes
        pattern = np.sin(2 * np.pi * (8 + kind) * (xx + 0.1 * np.sin(6 * yy)))
    elif kind % 3 == 1:  # a disc on a background
        cy, cx = 0.5 + rng.uniform(-0.05, 0.05, 2)
        pattern = np.where((yy - cy) ** 2 + (xx - cx) ** 2 < 0.12, 1.0, -1.0)
    else:  # a grid
        pattern = np.maximum(np.sin(2 * np.pi * 10 * xx), np.sin(2 * np.pi * 10 * yy))
    image = colour + pattern[..., None] * 30 + rng.normal(0, 4, (size, size, 3))
    return image


def _defect(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    cy, cx = rng.integers(size // 5, 4 * size // 5, 2)
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        d = np.abs((yy - cy) * np.cos(angle) - (xx - cx) * np.sin(angle))
        along = np.abs((yy - cy) * np.sin(angle) + (xx - cx) * np.cos(angle))
        return (d < size / 80 + 1) & (along < size / 6)
    r = rng.uniform(size / 20, size / 10)
    return (yy - cy) ** 2 + (xx - cx) ** 2 < r * r


def make_synthetic(out: Path, classes: int = 3, train_good: int = 6, test_good: int = 4, test_bad: int = 6,
                   size: int = 256, seed: int = 0) -> Path:
    """Write ``classes`` classes (synth_0, synth_1, ...) with defects and exact 0/255 masks; returns ``out``."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    for c in range(classes):
        name = f"synth_{c}"
        kind = c
        for split, count in (("train", train_good), ("test", test_good)):
            folder = out / name / split / "good"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                Image.fromarray(np.clip(_texture(rng, kind, size), 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
        for i in range(test_bad):
            defect = DEFECTS[i % len(DEFECTS)]
            image = _texture(rng, kind, size)
            mask = _defect(rng, defect, size)
            if defect == "hole":
                image[mask] = 15
            elif defect == "blob":
                image[mask] = image[mask] * 0.3 + np.array([220, 60, 40]) * 0.7
            else:
                image[mask] = 245
            folder = out / name / "test" / defect
            truth = out / name / "ground_truth" / defect
            folder.mkdir(parents=True, exist_ok=True)
            truth.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
            Image.fromarray(mask.astype(np.uint8) * 255).save(truth / f"{i:03d}_mask.png")
    return out
