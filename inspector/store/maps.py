"""Anomaly maps in the database: 8-bit grayscale PNG (value = round(255 * p)), longest side configurable.

A binary mask is derived at read time for any threshold, so changing a threshold never rewrites results.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    import torch


def encode_map(anomaly_map: torch.Tensor, longest_side: int = 256) -> tuple[bytes, int, int]:
    """[S, S] in [0, 1] -> (PNG bytes, width, height)."""
    from ..imaging import map_to_png_bytes  # (torch only where maps are written: readers start fast)

    data = map_to_png_bytes(anomaly_map, longest_side)
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
    return data, width, height


def decode_map(data: bytes) -> np.ndarray:
    """PNG bytes -> float32 [H, W] in [0, 1] (quantised to 1/255)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("L"), dtype=np.float32) / 255.0


def mask_at(data: bytes, threshold: float) -> np.ndarray:
    """Boolean [H, W]: pixels whose abnormal probability reaches ``threshold``."""
    return decode_map(data) >= threshold
