"""The field's metrics: image and pixel AUROC, AP and F1-max, and AUPRO, per class and mean.

Definitions (checked against scikit-learn in the tests):
* AUROC: trapezoidal area under the ROC curve over distinct score thresholds (ties handled as sklearn).
* AP: sum_n (R_n - R_{n-1}) P_n over distinct thresholds, no interpolation (sklearn's average_precision).
* F1-max: max over PR points of 2PR / (P + R) (0 where P + R = 0).
* AUPRO: per-region overlap (PRO, the mean over ground-truth connected components of the share of the
  component predicted positive) against the false-positive rate on normal pixels, integrated with the
  trapezoid rule up to FPR 0.3 and divided by 0.3 (the standard definition; a perfect map scores 1).
  ``aupro_official`` keeps the official Bayes-PFL helper's variant (200 thresholds, FPRs below 0.3
  min-max rescaled to [0, 1]) for parity.
Pixel metrics use maps smoothed by a Gaussian of sigma 8 (truncate 4, reflect), as the paper does.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def _curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative (true positives, false positives) at each distinct threshold, from high to low."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    order = np.argsort(-scores, kind="mergesort")
    scores, labels = scores[order], labels[order]
    last_of_run = np.r_[np.nonzero(np.diff(scores))[0], scores.size - 1]
    tps = np.cumsum(labels)[last_of_run]
    fps = (last_of_run + 1) - tps
    return tps.astype(np.float64), fps.astype(np.float64)


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    tps, fps = _curve(labels, scores)
    if tps[-1] == 0 or fps[-1] == 0:
        return float("nan")  # one class only: undefined
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.trapezoid(tpr, fpr) if hasattr(np, "trapezoid") else np.trapz(tpr, fpr))


def _precision_recall(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    tps, fps = _curve(labels, scores)
    precision = tps / np.maximum(tps + fps, 1)
    recall = tps / tps[-1] if tps[-1] > 0 else np.zeros_like(tps)
    return precision, recall


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    precision, recall = _precision_recall(labels, scores)
    if recall.size == 0 or recall[-1] == 0:
        return float("nan")
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """max over the precision-recall curve of 2PR / (P + R) (sklearn's curve plus epsilon gives the same)."""
    precision, recall = _precision_recall(labels, scores)
    denom = precision + recall
    f1 = np.where(denom > 0, 2 * precision * recall / np.where(denom > 0, denom, 1), 0.0)
    return float(f1.max()) if f1.size else float("nan")


def gaussian_smooth(maps: np.ndarray, sigma: float = 8.0) -> np.ndarray:
    """[..., H, W] -> the same, Gaussian-filtered over the last two axes (scipy's reflect mode, truncate 4)."""
    from scipy.ndimage import gaussian_filter

    maps = np.asarray(maps, dtype=np.float64)
    sigmas = (0,) * (maps.ndim - 2) + (sigma, sigma)
    return gaussian_filter(maps, sigma=sigmas, mode="reflect", truncate=4.0)


def _regions(masks: np.ndarray) -> tuple[np.ndarray, int]:
    """Connected components (8-connectivity) of each mask: labels [N, H, W] unique across images."""
    from scipy.ndimage import label

    out = np.zeros(masks.shape, dtype=np.int64)
    count = 0
    for i, mask in enumerate(masks):
        lab, n = label(mask, structure=np.ones((3, 3), dtype=bool))
        out[i] = np.where(lab > 0, lab + count, 0)
        count += n
    return out, count


def _pro_curve(masks: np.ndarray, maps: np.ndarray, thresholds: np.ndarray | None = None):
    """(fpr, pro) for thresholds from high to low (every distinct map value when ``thresholds`` is None)."""
    masks = np.asarray(masks, dtype=bool)
    maps = np.asarray(maps, dtype=np.float64)
    regions, count = _regions(masks)
    if count == 0 or masks.all():
        return None
    flat_maps, flat_regions = maps.ravel(), regions.ravel()
    normal = ~masks.ravel()
    sizes = np.bincount(flat_regions, minlength=count + 1)[1:].astype(np.float64)
    if thresholds is None:
        order = np.argsort(-flat_maps, kind="mergesort")
        values = flat_maps[order]
        last = np.r_[np.nonzero(np.diff(values))[0], values.size - 1]
        fp = np.cumsum(normal[order])[last] / normal.sum()
        # per-region cumulative hits, averaged over regions: sum_r hits_r / size_r
        weights = np.where(flat_regions[order] > 0, 1.0 / sizes[np.maximum(flat_regions[order] - 1, 0)], 0.0)
        pro = np.cumsum(weights)[last] / count
        return fp, pro
    fprs, pros = [], []
    for t in thresholds:
        positive = flat_maps >= t
        fprs.append((positive & normal).sum() / normal.sum())
        hits = np.bincount(flat_regions[positive], minlength=count + 1)[1:]
        pros.append(float(np.mean(hits / sizes)))
    return np.array(fprs), np.array(pros)


def aupro(masks: np.ndarray, maps: np.ndarray, fpr_limit: float = 0.3) -> float:
    """Area under PRO(FPR) from 0 to ``fpr_limit``, divided by ``fpr_limit`` (exact thresholds)."""
    curve = _pro_curve(masks, maps)
    if curve is None:
        return float("nan")
    fpr, pro = np.r_[0.0, curve[0]], np.r_[0.0, curve[1]]
    keep = fpr <= fpr_limit
    x, y = fpr[keep], pro[keep]
    if x[-1] < fpr_limit and keep.sum() < fpr.size:  # interpolate the curve exactly at the limit
        j = keep.sum()
        x0, x1, y0, y1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        x = np.r_[x, fpr_limit]
        y = np.r_[y, y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)]
    area = np.trapezoid(y, x) if hasattr(np, "trapezoid") else np.trapz(y, x)
    return float(area / fpr_limit)


def aupro_official(masks: np.ndarray, maps: np.ndarray) -> float:
    """The official helper's variant (spec §9): 200 thresholds between the global min and max, points with
    FPR < 0.3 kept, their FPRs min-max rescaled to [0, 1], trapezoid area."""
    maps = np.asarray(maps, dtype=np.float64)
    thresholds = np.linspace(maps.min(), maps.max(), 200)
    curve = _pro_curve(masks, maps, thresholds)
    if curve is None:
        return float("nan")
    fpr, pro = curve
    keep = fpr < 0.3
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or fpr.max() == fpr.min():
        return float("nan")
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    order = np.argsort(fpr, kind="mergesort")
    area = np.trapezoid(pro[order], fpr[order]) if hasattr(np, "trapezoid") else np.trapz(pro[order], fpr[order])
    return float(area)


IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")


def evaluate(records: Sequence[dict[str, Any]], smooth: bool = True) -> dict[str, Any]:
    """records: {class_name, label, score, map [H, W] or None, mask [H, W] bool or None} per image.

    Returns {"per_class": {class: {metric: value or None}}, "mean": {metric: unweighted class mean}}.
    Image metrics need both labels in a class; pixel metrics need masks with some defect pixels.
    """
    by_class: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_class.setdefault(r["class_name"], []).append(r)
    per_class: dict[str, dict[str, float | None]] = {}
    for name, rows in sorted(by_class.items()):
        labels = np.array([r["label"] for r in rows])
        scores = np.array([r["score"] for r in rows], dtype=np.float64)
        m: dict[str, float | None] = dict.fromkeys(IMAGE_METRICS + PIXEL_METRICS)
        if 0 < labels.sum() < labels.size:
            m.update(image_auroc=auroc(labels, scores), image_ap=average_precision(labels, scores),
                     image_f1_max=f1_max(labels, scores))
        with_masks = [r for r in rows if r.get("mask") is not None and r.get("map") is not None]
        if with_masks:
            masks = np.stack([np.asarray(r["mask"], dtype=bool) for r in with_masks])
            maps = np.stack([np.asarray(r["map"], dtype=np.float64) for r in with_masks])
            if smooth:
                maps = gaussian_smooth(maps)
            if masks.any() and not masks.all():
                m.update(pixel_auroc=auroc(masks, maps), pixel_ap=average_precision(masks, maps),
                         pixel_f1_max=f1_max(masks, maps), pixel_aupro=aupro(masks, maps))
        per_class[name] = m
    mean = {}
    for metric in IMAGE_METRICS + PIXEL_METRICS:
        values = [v[metric] for v in per_class.values() if v[metric] is not None and v[metric] == v[metric]]
        mean[metric] = float(np.mean(values)) if values else None
    return {"per_class": per_class, "mean": mean}
