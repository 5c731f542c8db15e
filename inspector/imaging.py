"""Image decoding and the model's preprocessing, shared by every front door.

Preprocessing matches the official Bayes-PFL test transform: PIL bicubic resize to S x S without
keeping the aspect ratio, ``uint8 / 255``, CLIP mean/std. Two deliberate differences, both no-ops for
ordinary RGB files without an EXIF orientation (what the benchmarks contain): the EXIF orientation is
applied, and the image is converted to RGB *before* resizing (PIL resizes palette images with nearest
neighbour, which would alias).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .backbone import CLIP_MEAN, CLIP_STD
from .errors import InspectorError

log = logging.getLogger(__name__)
ImageInput = str | os.PathLike | Image.Image
#: File suffixes (lower case) read as images: by intake, `score`, and the dataset readers (images and masks).
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class ImageDecodeError(InspectorError, ValueError):
    """A file that is not a usable image; the message says why."""


def open_image(source: ImageInput, name: str | None = None) -> Image.Image:
    """Decode fully (not lazily) to an RGB PIL image, with the EXIF orientation applied.

    ``source``: a path, a PIL image, or a binary file object (then ``name`` is used in messages).
    """
    if isinstance(source, Image.Image):
        image = source
    else:
        path = Path(name) if name is not None else Path(source)
        try:
            with Image.open(source if hasattr(source, "read") else path) as handle:
                handle.load()
                image = handle.copy() if handle.mode == "RGB" else handle
                image.load()
        except FileNotFoundError:
            raise ImageDecodeError(f"{path}: file not found") from None
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(f"{path}: refused, too many pixels ({exc})") from None
        except (OSError, SyntaxError, ValueError) as exc:
            if hasattr(source, "read") and isinstance(exc, OSError) and "cannot identify" in str(exc):
                raise ImageDecodeError(f"{path}: not an image file") from None
            raise ImageDecodeError(f"{path}: not a readable image ({exc})") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as exc:  # noqa: BLE001 - a broken EXIF block must not lose the image
        log.debug("ignoring an unreadable EXIF orientation: %s", exc)
    if image.mode.startswith("I;16") or image.mode == "I":
        array = np.asarray(image, dtype=np.float64)
        hi = max(float(array.max()), 1.0)
        image = Image.fromarray((array * (255.0 / (65535.0 if hi > 255 else 255.0))).clip(0, 255).astype(np.uint8))
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


_SCALE = torch.tensor([1.0 / (255.0 * s) for s in CLIP_STD]).view(3, 1, 1)
_SHIFT = torch.tensor([m / s for m, s in zip(CLIP_MEAN, CLIP_STD)]).view(3, 1, 1)


def to_model_input(image: Image.Image, size: int) -> torch.Tensor:
    """RGB PIL image -> normalised tensor [3, size, size] (float32).

    (x / 255 - mean) / std, computed as one multiply-subtract (equal to 3e-7).
    """
    resized = np.array(image.resize((size, size), Image.BICUBIC), dtype=np.uint8)
    return torch.from_numpy(resized).permute(2, 0, 1).float().mul_(_SCALE).sub_(_SHIFT)


def content_seed(pixels: torch.Tensor) -> int:
    """A 63-bit seed from the model input itself, so the same image always draws the same noise."""
    digest = hashlib.sha1(memoryview(pixels.contiguous().numpy()).cast("B"), usedforsecurity=False).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def preprocess(images: Iterable[ImageInput], size: int,
               to_input: Callable[[Image.Image], torch.Tensor] | None = None) -> torch.Tensor:
    """Images (paths or PIL) -> [N, 3, size, size], each by ``to_input`` (default: ``to_model_input``)."""
    tensors = [(to_input(open_image(image)) if to_input else to_model_input(open_image(image), size))
               for image in images]
    if not tensors:
        raise ValueError("no images given")
    return torch.stack(tensors)


def as_list(images: ImageInput | Sequence[ImageInput] | torch.Tensor) -> list:
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def map_to_png_bytes(anomaly_map: torch.Tensor, longest_side: int | None = None) -> bytes:
    """[S, S] map in [0, 1] -> 8-bit grayscale PNG bytes (optionally downscaled)."""
    import io

    array = (anomaly_map.detach().float().clamp(0, 1).cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    image = Image.fromarray(array, mode="L")
    if longest_side and max(image.size) > longest_side:
        image.thumbnail((longest_side, longest_side), Image.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=6)  # optimize=True costs 20x the time for ~5% bytes
    return buffer.getvalue()
