"""The review page's pictures: the image fitted to the screen, its anomaly map as a heat overlay on which low
values are transparent, and a full-resolution crop around the map's peak.

Pure numpy and PIL (no Streamlit): ``render`` turns the file's bytes and the stored map into encoded
pictures that the page caches by image and result.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

#: Map values at or below the floor are fully transparent; above it the alpha rises linearly to ``opacity``
#: at 1. The stored maps are abnormal probabilities, so 0.5 means "as likely abnormal as not".
FLOOR = 0.5
OPACITY = 0.65
#: A small image is enlarged at most this much on screen (never blown up to the column width)...
MAX_UPSCALE = 2.0
#: ... unless that leaves it shorter than this on its long side (a thumbnail): then by a whole factor.
MIN_SIDE = 256
#: Side of the zoom crop, in pixels of the original image.
ZOOM = 256
#: Yellow -> orange -> red, from just above the floor to the map's maximum.
RAMP = np.array([[255, 235, 60], [255, 140, 0], [215, 25, 28]], dtype=np.float64)


@dataclass(frozen=True)
class Views:
    """What the review page shows of one result. Pictures are encoded (JPEG for the fitted views, PNG for the
    lossless zoom crop); sizes are (width, height) in pixels; ``peak`` is (x, y) in original pixels."""

    original: bytes
    overlay: bytes
    zoom: bytes
    native: tuple[int, int]
    shown: tuple[int, int]
    peak: tuple[int, int]
    peak_value: float
    zoom_box: tuple[int, int, int, int]
    zoom_scale: int


def fit(size: tuple[int, int], box: tuple[int, int], max_upscale: float = MAX_UPSCALE,
        min_side: int = MIN_SIDE) -> tuple[int, int]:
    """(width, height) of an image of ``size`` scaled to fit ``box``: enlarged at most ``max_upscale`` times,
    except a thumbnail whose long side is under ``min_side``, which is enlarged by the whole factor that
    brings it there (its pixels stay square and sharp), never beyond the box."""
    width, height = size
    upscale = max_upscale
    if max(width, height) * max_upscale < min_side:
        upscale = float(-(-min_side // max(width, height)))
    scale = min(box[0] / width, box[1] / height, upscale)
    return max(1, round(width * scale)), max(1, round(height * scale))


def heat_rgba(values: np.ndarray, floor: float = FLOOR, opacity: float = OPACITY) -> np.ndarray:
    """[H, W] map in [0, 1] -> [H, W, 4] uint8: transparent at or below ``floor``, then the ramp's colour and
    an alpha rising linearly with the value, to ``opacity`` at 1."""
    strength = np.clip((np.asarray(values, dtype=np.float64) - floor) / max(1.0 - floor, 1e-6), 0.0, 1.0)
    x = strength * (len(RAMP) - 1)
    low = np.floor(x).astype(int).clip(0, len(RAMP) - 2)
    frac = (x - low)[..., None]
    rgb = RAMP[low] * (1 - frac) + RAMP[low + 1] * frac
    alpha = (strength * opacity * 255.0)[..., None]
    return np.concatenate([rgb, alpha], axis=-1).round().astype(np.uint8)


def peak(values: np.ndarray) -> tuple[int, int]:
    """(row, col) of the map's maximum after a 5 x 5 mean (one hot pixel is not a peak)."""
    smooth = Image.fromarray((np.clip(values, 0, 1) * 255).astype(np.uint8)).filter(ImageFilter.BoxBlur(2))
    flat = int(np.argmax(np.asarray(smooth)))
    return divmod(flat, values.shape[1])


def zoom_box(size: tuple[int, int], centre: tuple[int, int], side: int = ZOOM) -> tuple[int, int, int, int]:
    """(left, top, right, bottom): a square of ``side`` (less when the image is smaller) around ``centre``
    (x, y), moved inside the image."""
    width, height = size
    w, h = min(side, width), min(side, height)
    left = min(max(0, centre[0] - w // 2), width - w)
    top = min(max(0, centre[1] - h // 2), height - h)
    return left, top, left + w, top + h


def _encode(image: Image.Image, lossless: bool) -> bytes:
    out = io.BytesIO()
    if lossless:
        image.save(out, format="PNG", compress_level=1)
    else:
        image.convert("RGB").save(out, format="JPEG", quality=90, subsampling=0)
    return out.getvalue()


def render(image: Image.Image, anomaly_map: np.ndarray, box: tuple[int, int], threshold: float | None = None,
           floor: float = FLOOR, opacity: float = OPACITY, zoom_side: int = ZOOM,
           zoom_width: int = ZOOM) -> Views:
    """The views of one result.

    image: the decoded RGB original; anomaly_map: [h, w] in [0, 1] (the stored map, any size: it covers the
    whole image); box: (width, height) the fitted views may take on screen. The overlay marks the contour of
    the map at ``threshold`` (white) and the zoom crop's place (cyan). The crop is cut from the original at
    full resolution and enlarged by an integer factor (nearest neighbour, pixels stay visible) to about
    ``zoom_width`` when it is smaller.
    """
    native = image.size
    shown = fit(native, box)
    resample = Image.Resampling.LANCZOS if shown[0] < native[0] else Image.Resampling.NEAREST
    fitted = image.resize(shown, resample, reducing_gap=3.0) if shown != native else image
    values = np.asarray(Image.fromarray((np.clip(anomaly_map, 0, 1) * 255).astype(np.uint8)).resize(
        shown, Image.Resampling.BILINEAR), dtype=np.float64) / 255.0
    heat = Image.fromarray(heat_rgba(values, floor, opacity), mode="RGBA")
    overlay = Image.alpha_composite(fitted.convert("RGBA"), heat)
    if threshold is not None:
        mask = Image.fromarray(((values >= threshold) * 255).astype(np.uint8))
        edge = np.asarray(mask.filter(ImageFilter.MaxFilter(3)), dtype=np.int16) - np.asarray(
            mask.filter(ImageFilter.MinFilter(3)), dtype=np.int16)
        array = np.array(overlay)
        array[edge > 0] = (255, 255, 255, 255)
        overlay = Image.fromarray(array, mode="RGBA")
    row, col = peak(np.asarray(anomaly_map, dtype=np.float64))
    map_h, map_w = np.asarray(anomaly_map).shape
    centre = (min(native[0] - 1, int((col + 0.5) * native[0] / map_w)),
              min(native[1] - 1, int((row + 0.5) * native[1] / map_h)))
    box_native = zoom_box(native, centre, zoom_side)
    sx, sy = shown[0] / native[0], shown[1] / native[1]
    ImageDraw.Draw(overlay).rectangle([box_native[0] * sx, box_native[1] * sy, box_native[2] * sx - 1,
                                      box_native[3] * sy - 1], outline=(0, 220, 255, 255), width=2)
    crop = image.crop(box_native)
    scale = max(1, zoom_width // max(crop.size))
    if scale > 1:
        crop = crop.resize((crop.width * scale, crop.height * scale), Image.Resampling.NEAREST)
    return Views(original=_encode(fitted, lossless=False), overlay=_encode(overlay, lossless=False),
                 zoom=_encode(crop, lossless=True), native=native, shown=shown, peak=centre,
                 peak_value=float(np.asarray(anomaly_map)[row, col]), zoom_box=box_native, zoom_scale=scale)
