"""Synthetic anomaly data in MVTec AD layout, for tests and demos.

Each class is a generated texture or object: class 0 wavy stripes, class 1 a round part on a plain
background, class 2 a mesh; further classes cycle through the three kinds with other colours, frequencies
and angles. Anomalous test images carry one defect each (a scratch, a stain blob, a missing patch or a
colour spot) and a mask that is exactly 255 on the changed pixels and 0 everywhere else. The same seed
always gives the same files. Layout::

    <out>/synth_<c>/train/good/000.png ...
    <out>/synth_<c>/test/good/000.png ...
    <out>/synth_<c>/test/<defect>/<nnn>.png
    <out>/synth_<c>/ground_truth/<defect>/<nnn>_mask.png

Anomalous images are numbered across defect types (``scratch/000``, ``blob/001``, ``hole/002`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import UsageError

KINDS = ("texture", "object", "mesh")
DEFECTS = ("scratch", "blob", "hole", "spot")


@dataclass(frozen=True)
class ClassStyle:
    """How the images of one synthetic class look."""

    kind: str  # one of KINDS
    base: tuple[float, float, float]  # main colour
    accent: tuple[float, float, float]  # second colour: stripes, part, mesh wires
    frequency: float  # stripes or mesh cells across the image
    angle: float  # orientation of the pattern, radians


def class_name(index: int) -> str:
    """The folder name of synthetic class ``index``."""
    return f"synth_{index}"


def class_style(index: int, seed: int) -> ClassStyle:
    """The style of class ``index``: the kind cycles, colours and geometry come from the seed."""
    rng = np.random.default_rng([seed, index, 0])
    base = tuple(float(v) for v in rng.uniform(50, 150, 3))
    accent = tuple(float(v) for v in np.clip(np.array(base) + rng.choice([-1, 1]) * rng.uniform(50, 90, 3), 0, 255))
    return ClassStyle(kind=KINDS[index % len(KINDS)], base=base, accent=accent,
                      frequency=float(rng.uniform(5, 9) + index // len(KINDS)),
                      angle=float(rng.uniform(-0.4, 0.4) + 0.3 * (index // len(KINDS))))


def coordinates(size: int, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in [0, 1), rotated by ``angle`` about the centre."""
    yy, xx = (np.mgrid[0:size, 0:size] + 0.5) / size - 0.5
    cos, sin = np.cos(angle), np.sin(angle)
    return xx * cos - yy * sin + 0.5, xx * sin + yy * cos + 0.5


def blend(base: tuple[float, ...], accent: tuple[float, ...], weight: np.ndarray) -> np.ndarray:
    """An RGB image mixing two colours by a [0, 1] weight map."""
    return np.array(base) * (1 - weight[..., None]) + np.array(accent) * weight[..., None]


def render_normal(style: ClassStyle, rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A defect-free float RGB image and its foreground (where defects may go)."""
    x, y = coordinates(size, style.angle + rng.normal(0, 0.03))
    phase = rng.uniform(0, 2 * np.pi)
    if style.kind == "texture":
        wave = np.sin(2 * np.pi * style.frequency * x + 1.5 * np.sin(2 * np.pi * 1.5 * y + phase) + phase)
        image, foreground = blend(style.base, style.accent, (wave + 1) / 2), np.ones((size, size), bool)
    elif style.kind == "object":
        cx, cy = 0.5 + rng.normal(0, 0.02, 2)
        radius = np.hypot(x - cx, y - cy)
        foreground = radius < 0.34
        shading = np.clip(1 - radius / 0.34, 0, 1) ** 0.5 * (1 - 0.3 * (np.abs(radius - 0.17) < 0.015))
        image = blend(style.base, style.accent, np.where(foreground, 0.4 + 0.6 * shading, 0.0))
    else:
        cells_x = (style.frequency * x + phase / (2 * np.pi)) % 1
        cells_y = (style.frequency * y + phase / (2 * np.pi)) % 1
        wires = np.maximum(np.exp(-((cells_x - 0.5) / 0.08) ** 2), np.exp(-((cells_y - 0.5) / 0.08) ** 2))
        image, foreground = blend(style.base, style.accent, wires), np.ones((size, size), bool)
    image = image * rng.uniform(0.93, 1.07) + rng.normal(0, 3, (size, size, 1)) + rng.normal(0, 2, image.shape)
    return np.clip(image, 0, 255), foreground


def defect_region(defect: str, rng: np.random.Generator, size: int, foreground: np.ndarray) -> np.ndarray:
    """The boolean region of one defect, inside the foreground and never empty."""
    candidates = np.argwhere(erode(foreground, max(1, size // 10)))
    if len(candidates) == 0:
        candidates = np.argwhere(foreground)
    cy, cx = candidates[rng.integers(len(candidates))]
    yy, xx = np.mgrid[0:size, 0:size].astype(float)
    if defect == "scratch":
        angle, half = rng.uniform(0, np.pi), rng.uniform(0.12, 0.22) * size
        along = (xx - cx) * np.cos(angle) + (yy - cy) * np.sin(angle)
        across = -(xx - cx) * np.sin(angle) + (yy - cy) * np.cos(angle) + 0.002 * size * np.sin(along / 3)
        region = (np.abs(along) < half) & (np.abs(across) < max(0.75, size / 150))
    elif defect == "blob":
        theta = np.arctan2(yy - cy, xx - cx)
        radius = rng.uniform(0.05, 0.09) * size * (1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 2 * np.pi)))
        region = np.hypot(yy - cy, xx - cx) < np.maximum(radius, 1.5)
    elif defect == "hole":
        h, w = (rng.uniform(0.06, 0.14, 2) * size).clip(1.5)
        region = (np.abs(yy - cy) < h) & (np.abs(xx - cx) < w)
    else:
        region = np.hypot(yy - cy, xx - cx) < max(1.5, rng.uniform(0.025, 0.05) * size)
    region &= foreground
    region[cy, cx] = True
    return region


def erode(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` shrunk by ``steps`` pixels (4-neighbourhood), to keep defects off the foreground's edge."""
    out = mask.copy()
    for _ in range(steps):
        inner = out.copy()
        inner[1:, :] &= out[:-1, :]
        inner[:-1, :] &= out[1:, :]
        inner[:, 1:] &= out[:, :-1]
        inner[:, :-1] &= out[:, 1:]
        inner[[0, -1], :] = False
        inner[:, [0, -1]] = False
        out = inner
    return out


def paint_defect(image: np.ndarray, region: np.ndarray, defect: str, rng: np.random.Generator) -> np.ndarray:
    """A copy of ``image`` with the defect painted on ``region`` and every other pixel untouched."""
    out = image.copy()
    pixels = out[region]
    if defect == "scratch":
        tone = 245.0 if pixels.mean() < 128 else 15.0
        out[region] = 0.15 * pixels + 0.85 * tone
    elif defect == "blob":
        out[region] = 0.3 * pixels + 0.7 * np.array([70.0, 45.0, 20.0])
    elif defect == "hole":
        out[region] = rng.uniform(5, 20) + rng.normal(0, 1.5, pixels.shape)
    else:
        colour = np.array([230.0, 30.0, 40.0]) if pixels[:, 0].mean() < 150 else np.array([30.0, 80.0, 230.0])
        out[region] = 0.2 * pixels + 0.8 * colour
    return out


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Round a float image to 8 bits."""
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render_defective(style: ClassStyle, rng: np.random.Generator, size: int,
                     defect: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The 8-bit defect-free image, the same image with a defect, and the defect's 0/255 mask.

    The two images differ exactly on the mask: a pixel the paint happened to leave unchanged is inverted.
    """
    normal, foreground = render_normal(style, rng, size)
    region = defect_region(defect, rng, size, foreground)
    clean, defective = to_uint8(normal), to_uint8(paint_defect(normal, region, defect, rng))
    unchanged = region & (defective == clean).all(axis=-1)
    defective[unchanged] = 255 - clean[unchanged]
    return clean, defective, np.where(region, 255, 0).astype(np.uint8)


def write_class(root: Path, index: int, counts: tuple[int, int, int], size: int, seed: int) -> None:
    """All images and masks of synthetic class ``index``."""
    train_good, test_good, test_bad = counts
    style, folder = class_style(index, seed), root / class_name(index)
    for split, count, code in (("train", train_good, 1), ("test", test_good, 2)):
        for i in range(count):
            image, _ = render_normal(style, np.random.default_rng([seed, index, code, i]), size)
            save(to_uint8(image), folder / split / "good" / f"{i:03d}.png")
    for i in range(test_bad):
        defect = DEFECTS[i % len(DEFECTS)]
        _, defective, mask = render_defective(style, np.random.default_rng([seed, index, 3, i]), size, defect)
        save(defective, folder / "test" / defect / f"{i:03d}.png")
        save(mask, folder / "ground_truth" / defect / f"{i:03d}_mask.png")


def save(array: np.ndarray, path: Path) -> None:
    """Write an 8-bit array as PNG, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, compress_level=1)


def make_synthetic(out: Path, classes: int = 3, train_good: int = 6, test_good: int = 4, test_bad: int = 6,
                   size: int = 256, seed: int = 0) -> Path:
    """Write an MVTec AD layout dataset of ``classes`` synthetic classes under ``out``; returns ``out``.

    Each class gets ``train_good`` normal training images, ``test_good`` normal and ``test_bad``
    anomalous test images of ``size`` x ``size`` pixels, with a 0/255 mask per anomalous image.
    """
    if classes < 1 or size < 16 or min(train_good, test_good, test_bad) < 0:
        raise UsageError("need classes >= 1, size >= 16 and non-negative image counts")
    out = Path(out)
    for index in range(classes):
        write_class(out, index, (train_good, test_good, test_bad), size, seed)
    return out
