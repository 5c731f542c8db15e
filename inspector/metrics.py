"""The field's metrics in plain numpy: image and pixel AUROC, AP and F1-max, and AUPRO, per class and mean.

Definitions (each checked against scikit-learn or scipy in ``tests/test_metrics.py``):

* ``auroc``: area under the ROC curve through every distinct score threshold with the trapezoid rule, so
  tied scores count one half (``sklearn.metrics.roc_auc_score``).
* ``average_precision``: sum over distinct thresholds of (R_n - R_{n-1}) P_n, no interpolation
  (``sklearn.metrics.average_precision_score``).
* ``f1_max``: the largest 2PR / (P + R) over the points of the precision-recall curve.
* ``aupro``: per-region overlap (PRO: the mean over ground-truth connected components of the share of the
  component predicted positive) against the false-positive rate on normal pixels, integrated with the
  trapezoid rule up to FPR 0.3 and divided by 0.3, so a perfect map scores 1.
* ``aupro_official``: the official Bayes-PFL helper's variant (200 thresholds, FPRs below 0.3 min-max
  rescaled to [0, 1]), kept for parity with the paper's tables.
* ``gaussian_smooth``: ``scipy.ndimage.gaussian_filter(sigma=8, mode="reflect", truncate=4.0)`` per map;
  ``evaluate`` smooths the maps with it before the pixel metrics, as the paper does.

Nothing here imports scipy or scikit-learn. The expensive step is one sort of the negative scores: every
metric is then read off the sorted scores with ``np.searchsorted``, which keeps a class of 100 maps of
518 x 518 pixels to a few seconds on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

IMAGE_METRICS = ("image_auroc", "image_ap", "image_f1_max")
PIXEL_METRICS = ("pixel_auroc", "pixel_ap", "pixel_f1_max", "pixel_aupro")

OFFICIAL_STEPS = 200
OFFICIAL_FPR_LIMIT = 0.3


# --------------------------------------------------------------------------------------------------------
# Scores split by label and sorted
# --------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ranked:
    """Scores split by label, each part sorted ascending.

    neg: [n_neg] scores of the negatives.
    pos: [n_pos] scores of the positives.
    mass: [n_pos + 1] prefix sums of the positives' weights in the order of ``pos`` (mass[0] = 0); the
        weights are 1 unless given, and for AUPRO they are 1 / (regions * region size).
    """

    neg: np.ndarray
    pos: np.ndarray
    mass: np.ndarray

    def neg_above(self, t: np.ndarray, strict: bool = False) -> np.ndarray:
        """[k] thresholds -> [k] number of negatives scoring >= t (> t when ``strict``)."""
        return self.neg.size - np.searchsorted(self.neg, t, side="right" if strict else "left")

    def pos_above(self, t: np.ndarray, strict: bool = False) -> np.ndarray:
        """[k] thresholds -> [k] number of positives scoring >= t (> t when ``strict``)."""
        return self.pos.size - np.searchsorted(self.pos, t, side="right" if strict else "left")

    def mass_above(self, t: np.ndarray, strict: bool = False) -> np.ndarray:
        """[k] thresholds -> [k] total weight of the positives scoring >= t (> t when ``strict``)."""
        return self.mass[-1] - self.mass[np.searchsorted(self.pos, t, side="right" if strict else "left")]

    def score_range(self) -> tuple[float, float]:
        """(min, max) over all scores, negatives and positives together (at least one score)."""
        parts = [p for p in (self.neg, self.pos) if p.size]
        return min(p[0] for p in parts), max(p[-1] for p in parts)


def _flatten(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """Any shapes with the same size -> (labels bool [n], scores float64 [n]); nonzero labels are positive."""
    labels = np.asarray(labels).ravel().astype(bool)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    return labels, scores


def _rank(labels: Any, scores: Any, weights: np.ndarray | None = None) -> _Ranked:
    """labels [...], scores [...] (same size), weights [n_pos] or None (in the positives' flat order)."""
    labels, scores = _flatten(labels, scores)
    neg = scores[~labels]  # a fresh copy, sorted in place
    neg.sort()
    pos = scores[labels]
    if weights is None:
        pos.sort()
        return _Ranked(neg, pos, np.arange(pos.size + 1, dtype=np.float64))
    order = np.argsort(pos, kind="stable")
    mass = np.concatenate([[0.0], np.cumsum(np.asarray(weights, dtype=np.float64)[order])])
    return _Ranked(neg, pos[order], mass)


def _distinct(sorted_values: np.ndarray) -> np.ndarray:
    """[n] ascending -> [k] its distinct values, ascending."""
    if sorted_values.size == 0:
        return sorted_values
    starts = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    return sorted_values[starts]


def _trapezoid(y: np.ndarray, x: np.ndarray) -> float:
    """Trapezoid-rule integral of y [n] over x [n] in the given order (negative if x decreases)."""
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def _curve(labels: Any, scores: Any) -> tuple[np.ndarray, np.ndarray]:
    """(true positives [k], false positives [k]) as floats at each distinct threshold from high to low.

    The threshold t counts a sample positive when its score is >= t; these are the vertices of the ROC
    and precision-recall curves (used for plotting).
    """
    ranked = _rank(labels, scores)
    thresholds = np.unique(np.concatenate([ranked.neg, ranked.pos]))[::-1]
    return ranked.pos_above(thresholds).astype(np.float64), ranked.neg_above(thresholds).astype(np.float64)


# --------------------------------------------------------------------------------------------------------
# Binary metrics
# --------------------------------------------------------------------------------------------------------


def _positive_points(r: _Ranked) -> tuple[np.ndarray, np.ndarray]:
    """(true positives [k], false positives [k]) at each distinct positive score, from high to low.

    Recall only changes at these thresholds, and between two of them lowering the threshold only adds
    false positives, so AP and the best F1 need no other points of the curve.
    """
    values = _distinct(r.pos)[::-1]
    return r.pos_above(values).astype(np.float64), r.neg_above(values).astype(np.float64)


def _auroc(r: _Ranked) -> float:
    """AUROC as the Mann-Whitney statistic: P(pos > neg) + P(pos = neg) / 2.

    This equals the trapezoidal area under the ROC curve over distinct thresholds exactly: a tie group
    holding a positives and b negatives adds a diagonal segment of area a * b / 2 / (n_pos * n_neg).
    """
    if r.pos.size == 0 or r.neg.size == 0:
        return float("nan")
    below = np.searchsorted(r.neg, r.pos, side="left").astype(np.int64)
    at_or_below = np.searchsorted(r.neg, r.pos, side="right").astype(np.int64)
    twice = int(np.sum(below + at_or_below))  # exact in int64 up to ~1e18
    return twice / (2.0 * r.pos.size * r.neg.size)


def _average_precision(r: _Ranked) -> float:
    """sum_n (R_n - R_{n-1}) P_n over distinct thresholds (terms where recall is unchanged are zero)."""
    if r.pos.size == 0:
        return float("nan")
    tp, fp = _positive_points(r)
    recall_steps = np.diff(np.concatenate([[0.0], tp])) / r.pos.size
    return float(np.sum(recall_steps * tp / (tp + fp)))


def _f1_max(r: _Ranked) -> float:
    """max over thresholds of 2PR / (P + R) = 2 TP / (TP + FP + n_pos)."""
    if r.pos.size == 0:
        return float("nan")
    tp, fp = _positive_points(r)
    return float(np.max(2.0 * tp / (tp + fp + r.pos.size)))


def auroc(labels: Any, scores: Any) -> float:
    """Area under the ROC curve, ties handled as ``sklearn.metrics.roc_auc_score`` does.

    labels: [...] 0/1 or bool (nonzero = positive); scores: [...] of the same size, higher = more anomalous.
    Returns NaN when only one class is present (undefined; scikit-learn raises instead).
    """
    return _auroc(_rank(labels, scores))


def average_precision(labels: Any, scores: Any) -> float:
    """Average precision as ``sklearn.metrics.average_precision_score``: sum_n (R_n - R_{n-1}) P_n.

    labels: [...] 0/1 or bool; scores: [...] of the same size. The sum runs over the distinct score
    thresholds with no interpolation of precision. Returns NaN when there are no positives.
    """
    return _average_precision(_rank(labels, scores))


def f1_max(labels: Any, scores: Any) -> float:
    """The largest F1 = 2PR / (P + R) over the points of the precision-recall curve (0 where P + R = 0).

    labels: [...] 0/1 or bool; scores: [...] of the same size. The curve has one point per distinct
    threshold, so this equals ``max(2 * p * r / (p + r + eps))`` over ``p, r, _ =
    sklearn.metrics.precision_recall_curve(labels, scores)`` up to eps: scikit-learn's extra end point
    (P = 1, R = 0) scores 0, and any points it drops after full recall score less than the first
    full-recall point. Returns NaN when there are no positives.
    """
    return _f1_max(_rank(labels, scores))


# --------------------------------------------------------------------------------------------------------
# Connected components
# --------------------------------------------------------------------------------------------------------


def _as_stack(masks: Any, dtype: Any) -> np.ndarray:
    """[H, W] or [N, H, W] -> [N, H, W] of ``dtype``."""
    arr = np.asarray(masks, dtype=dtype)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"expected [H, W] or [N, H, W], got shape {arr.shape}")
    return arr


def _neighbour_pairs(masks: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """masks bool [N, H, W], rank int [N, H, W] (index among foreground pixels) -> (u [E], v [E]).

    Each pair of 8-adjacent foreground pixels of the same image appears once (right, down and the two
    diagonal neighbours below).
    """
    shifts = (
        (np.s_[:, :, :-1], np.s_[:, :, 1:]),
        (np.s_[:, :-1, :], np.s_[:, 1:, :]),
        (np.s_[:, :-1, :-1], np.s_[:, 1:, 1:]),
        (np.s_[:, :-1, 1:], np.s_[:, 1:, :-1]),
    )
    us, vs = [], []
    for a, b in shifts:
        both = masks[a] & masks[b]
        us.append(rank[a][both])
        vs.append(rank[b][both])
    return np.concatenate(us), np.concatenate(vs)


def _flatten_forest(parent: np.ndarray) -> np.ndarray:
    """[F] parent pointers (parent[i] <= i) -> [F] each node's root, by pointer jumping."""
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand


def _roots(count: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Union-find over ``count`` nodes and edges (u [E], v [E]) -> [F] root of each node.

    Every round hooks the larger root of each edge whose ends still differ onto the smaller one, then
    flattens the forest; parents only ever point to smaller indices, so each root is its component's
    smallest node.
    """
    parent = np.arange(count)
    while u.size:
        root_u, root_v = parent[u], parent[v]
        differ = root_u != root_v
        u, v, root_u, root_v = u[differ], v[differ], root_u[differ], root_v[differ]
        parent[np.maximum(root_u, root_v)] = np.minimum(root_u, root_v)
        parent = _flatten_forest(parent)
    return parent


def label_regions(masks: Any) -> tuple[np.ndarray, int]:
    """8-connected components of each ground-truth mask.

    masks: bool [N, H, W] (or [H, W]). Returns (labels int64 of the same shape as ``masks`` made 3-D,
    0 for background and 1..count for the regions, count). Regions never span two images and are
    numbered in raster order over the stack, as ``scipy.ndimage.label`` numbers them image by image.
    """
    masks = _as_stack(masks, bool)
    labels = np.zeros(masks.shape, dtype=np.int64)
    count = int(masks.sum())
    if count == 0:
        return labels, 0
    rank = np.zeros(masks.shape, dtype=np.int64)
    rank[masks] = np.arange(count)
    roots = _roots(count, *_neighbour_pairs(masks, rank))
    unique_roots, region = np.unique(roots, return_inverse=True)
    labels[masks] = region.ravel() + 1
    return labels, int(unique_roots.size)


# --------------------------------------------------------------------------------------------------------
# AUPRO
# --------------------------------------------------------------------------------------------------------


def _rank_regions(masks: Any, maps: Any) -> _Ranked | None:
    """masks bool [N, H, W], maps [N, H, W] -> pixels ranked with region weights, or None if undefined.

    Each defect pixel weighs 1 / (regions * its region's size), so the weight of the defect pixels
    above a threshold is the PRO there. None when there is no region or no normal pixel.
    """
    masks = _as_stack(masks, bool)
    maps = _as_stack(maps, np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"masks {masks.shape} and maps {maps.shape} differ in shape")
    regions, count = label_regions(masks)
    if count == 0 or masks.all():
        return None
    sizes = np.bincount(regions.ravel(), minlength=count + 1)
    weights = 1.0 / (count * sizes[regions[masks]].astype(np.float64))
    return _rank(masks, maps, weights)


def _pro_curve_exact(r: _Ranked, fpr_limit: float) -> tuple[np.ndarray, np.ndarray]:
    """(fpr [m], pro [m]): the PRO curve through every distinct score, from (0, 0) to past ``fpr_limit``.

    The FPR only moves at normal-pixel scores: lowering the threshold onto a distinct normal score v moves
    from (FPR(> v), PRO(> v)) to (FPR(>= v), PRO(>= v)), one segment (diagonal when defect pixels tie
    with v). Between such segments the curve only rises at fixed FPR, which adds no area, so two vertices
    per distinct normal score describe it; only the scores among the top ``fpr_limit`` share of normal
    pixels are needed.
    """
    n = r.neg.size
    first = n - min(n, int(np.ceil(fpr_limit * n)) + 1)
    tail = r.neg[first:]
    starts = np.flatnonzero(np.concatenate([[True], tail[1:] != tail[:-1]]))
    values = tail[starts]
    # normals >= each value: from its run's start in ``neg`` (the lowest run may begin before the tail)
    starts = first + starts
    starts[0] = np.searchsorted(r.neg, values[0], side="left")
    at_or_above = n - starts
    above = np.concatenate([at_or_above[1:], [0]])
    fpr = np.stack([above, at_or_above], axis=1)[::-1].ravel() / n
    pro = np.stack([r.mass_above(values, strict=True), r.mass_above(values)], axis=1)[::-1].ravel()
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def _pro_curve_steps(r: _Ranked, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """(fpr [steps + 1], pro [steps + 1]) at ``steps`` thresholds evenly from max to min, after (0, 0)."""
    low, high = r.score_range()
    thresholds = np.linspace(high, low, steps)
    fpr = r.neg_above(thresholds) / r.neg.size
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], r.mass_above(thresholds)])


def _area_to_limit(x: np.ndarray, y: np.ndarray, limit: float) -> float:
    """Trapezoid area under the polyline (x [m] non-decreasing, y [m]) from x[0] to ``limit``.

    The polyline is cut at ``limit``, interpolating y linearly between the vertices on either side.
    """
    inside = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:inside], y[:inside]
    if inside < x.size and xs[-1] < limit:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        xs = np.concatenate([xs, [limit]])
        ys = np.concatenate([ys, [y0 + (y1 - y0) * (limit - x0) / (x1 - x0)]])
    return _trapezoid(ys, xs)


def _aupro(r: _Ranked, fpr_limit: float, steps: int | None) -> float:
    """Normalised area under PRO(FPR) up to ``fpr_limit`` for ranked, region-weighted pixels."""
    if not 0.0 < fpr_limit <= 1.0:
        raise ValueError(f"fpr_limit must be in (0, 1], not {fpr_limit}")
    if steps is None:
        fpr, pro = _pro_curve_exact(r, fpr_limit)
    elif steps >= 2:
        fpr, pro = _pro_curve_steps(r, steps)
    else:
        raise ValueError(f"steps must be None or at least 2, not {steps}")
    return _area_to_limit(fpr, pro, fpr_limit) / fpr_limit


def aupro(masks: Any, maps: Any, fpr_limit: float = 0.3, steps: int | None = None) -> float:
    """Area under the per-region-overlap curve up to ``fpr_limit``, divided by ``fpr_limit``.

    masks: bool [N, H, W] (or [H, W]) ground truth; maps: float [N, H, W] anomaly maps, higher = more
    anomalous. A pixel is predicted positive at threshold t when its score is >= t. At each threshold,
    PRO is the mean over all 8-connected ground-truth regions (of all images) of the share of the region
    predicted positive, and FPR is the share of normal pixels (mask False) predicted positive. The curve
    starts at (0, 0) (a threshold above every score) and is integrated with the trapezoid rule from FPR 0
    to ``fpr_limit``, interpolating it linearly at ``fpr_limit``; a perfect map scores 1.

    steps: None uses every distinct score as a threshold (exact, computed from one sort of the normal
    pixels); an integer uses that many thresholds evenly spaced from the largest to the smallest score
    (an approximation of the exact value). Returns NaN without defect regions or without normal pixels.
    """
    ranked = _rank_regions(masks, maps)
    return float("nan") if ranked is None else _aupro(ranked, fpr_limit, steps)


def _aupro_official(r: _Ranked) -> float:
    """The official variant on ranked, region-weighted pixels (see ``aupro_official``)."""
    low, high = r.score_range()
    if not high > low:
        return float("nan")
    thresholds = np.arange(low, high, (high - low) / OFFICIAL_STEPS)
    fpr = r.neg_above(thresholds, strict=True) / r.neg.size
    pro = r.mass_above(thresholds, strict=True)
    keep = fpr < OFFICIAL_FPR_LIMIT
    fpr, pro = fpr[keep], pro[keep]
    if fpr.size < 2 or fpr.max() == fpr.min():
        return float("nan")
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return -_trapezoid(pro, fpr)  # thresholds ascend, so FPR descends


def aupro_official(masks: Any, maps: Any) -> float:
    """AUPRO as the official Bayes-PFL helper computes it (for parity with published numbers).

    masks: bool [N, H, W] (or [H, W]); maps: float [N, H, W]. Thresholds are
    ``np.arange(min, max, (max - min) / 200)`` over the global min and max of ``maps`` (in float64), a
    pixel is positive when its score is strictly above the threshold, PRO and FPR are as in ``aupro``;
    the points with FPR < 0.3 are kept, their FPRs min-max rescaled to [0, 1], and the trapezoid area
    of PRO over the rescaled FPR is returned. NaN without regions, normal pixels or two distinct FPRs.
    """
    ranked = _rank_regions(masks, maps)
    return float("nan") if ranked is None else _aupro_official(ranked)


# --------------------------------------------------------------------------------------------------------
# Smoothing
# --------------------------------------------------------------------------------------------------------


def _gaussian_kernel(sigma: float, truncate: float) -> np.ndarray:
    """[2r + 1] normalised Gaussian taps with r = int(truncate * sigma + 0.5), as scipy.ndimage builds them."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def _reflect_index(size: int, radius: int) -> np.ndarray:
    """[size + 2 * radius] source index of each padded position for scipy's 'reflect' mode.

    The signal is extended by mirroring about the outer edge of the end pixels (d c b a | a b c d |
    d c b a), which repeats with period 2 * size, so pads longer than the signal work too.
    """
    period = np.mod(np.arange(-radius, size + radius), 2 * size)
    return np.where(period < size, period, 2 * size - 1 - period)


def _fft_length(n: int) -> int:
    """The smallest integer >= n whose only prime factors are 2, 3 and 5 (fast for numpy's FFT)."""
    while True:
        m = n
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return n
        n += 1


def _smooth_axis(maps: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Correlate float64 maps [..., L, ...] with symmetric taps [2r + 1] along ``axis`` ('reflect' edges).

    The reflected signal [..., L + 2r, ...] is convolved by FFT; circular wrap-around only touches the
    first 2r outputs, which are dropped, so the result equals the direct sum to rounding (~1e-15).
    """
    size, radius = maps.shape[axis], taps.size // 2
    padded = np.take(maps, _reflect_index(size, radius), axis=axis)
    length = _fft_length(padded.shape[axis])
    spectrum = np.fft.rfft(taps, length)
    shape = [1] * maps.ndim
    shape[axis] = spectrum.size
    full = np.fft.irfft(np.fft.rfft(padded, length, axis=axis) * spectrum.reshape(shape), length, axis=axis)
    return np.take(full, np.arange(2 * radius, 2 * radius + size), axis=axis)


def gaussian_smooth(maps: Any, sigma: float = 8.0, truncate: float = 4.0, chunk: int = 16) -> np.ndarray:
    """Gaussian filter of each map, matching ``scipy.ndimage.gaussian_filter(m, sigma, mode="reflect",
    truncate=truncate)`` on every [H, W] map.

    maps: float [..., H, W]. Returns float64 [..., H, W]. Separable: one pass along W, then one along H,
    each with edges extended by reflection about the outer pixel edge. ``chunk`` maps are filtered at a
    time to bound memory; sigma <= 0 returns the maps unchanged (as float64).
    """
    maps = np.asarray(maps, dtype=np.float64)
    if maps.ndim < 2:
        raise ValueError(f"expected [..., H, W], got shape {maps.shape}")
    if sigma <= 0:
        return maps.copy()
    taps = _gaussian_kernel(sigma, truncate)
    flat = maps.reshape(-1, *maps.shape[-2:])
    out = np.empty_like(flat)
    for start in range(0, flat.shape[0], chunk):
        block = _smooth_axis(flat[start:start + chunk], taps, axis=2)
        out[start:start + chunk] = _smooth_axis(block, taps, axis=1)
    return out.reshape(maps.shape)


# --------------------------------------------------------------------------------------------------------
# Per-class evaluation
# --------------------------------------------------------------------------------------------------------


def _defined(value: float) -> float | None:
    """NaN (undefined) -> None, else the float."""
    return None if np.isnan(value) else float(value)


def _image_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Image AUROC, AP and F1-max over the rows' labels and scores; None unless both labels occur."""
    labels = np.array([int(r["label"]) for r in rows])
    if not 0 < labels.sum() < labels.size:
        return dict.fromkeys(IMAGE_METRICS)
    ranked = _rank(labels, np.array([r["score"] for r in rows], dtype=np.float64))
    return {"image_auroc": _defined(_auroc(ranked)), "image_ap": _defined(_average_precision(ranked)),
            "image_f1_max": _defined(_f1_max(ranked))}


def _pixel_metrics(rows: Sequence[dict[str, Any]], smooth: bool, sigma: float,
                   fpr_limit: float) -> dict[str, float | None]:
    """Pixel AUROC, AP, F1-max and AUPRO over all pixels of the rows that have both a map and a mask.

    None when no row has both, or the pixels hold no defect region or no normal pixel.
    """
    usable = [r for r in rows if r.get("map") is not None and r.get("mask") is not None]
    if not usable:
        return dict.fromkeys(PIXEL_METRICS)
    masks = np.stack([np.asarray(r["mask"], dtype=bool) for r in usable])
    maps = np.stack([np.asarray(r["map"], dtype=np.float64) for r in usable])
    if smooth:
        maps = gaussian_smooth(maps, sigma)
    ranked = _rank_regions(masks, maps)
    if ranked is None:
        return dict.fromkeys(PIXEL_METRICS)
    return {"pixel_auroc": _defined(_auroc(ranked)), "pixel_ap": _defined(_average_precision(ranked)),
            "pixel_f1_max": _defined(_f1_max(ranked)),
            "pixel_aupro": _defined(_aupro(ranked, fpr_limit, None))}


def _class_means(per_class: dict[str, dict[str, float | None]]) -> dict[str, float | None]:
    """Unweighted mean over classes of each metric, skipping classes where it is None."""
    mean: dict[str, float | None] = {}
    for metric in IMAGE_METRICS + PIXEL_METRICS:
        values = [m[metric] for m in per_class.values() if m[metric] is not None]
        mean[metric] = float(np.mean(values)) if values else None
    return mean


def evaluate(records: Sequence[dict[str, Any]], smooth: bool = True, sigma: float = 8.0,
             fpr_limit: float = 0.3) -> dict[str, Any]:
    """Per-class and mean metrics of scored images.

    records: one dict per image with ``class_name`` (str), ``label`` (0/1), ``score`` (float), ``map``
    (float [H, W] or None) and ``mask`` (bool [H, W] or None; all False for a normal image).

    Returns ``{"per_class": {class: {metric: float or None}}, "mean": {metric: float or None}}`` with the
    metrics ``IMAGE_METRICS + PIXEL_METRICS``. Image metrics are None for a class without both labels;
    pixel metrics are computed over all pixels of the class's images that have a map and a mask (the
    maps first smoothed by ``gaussian_smooth(sigma)`` when ``smooth``, as the paper does) and are None
    without such images or without both defect and normal pixels. AUPRO uses exact thresholds up to
    ``fpr_limit``. Means are unweighted over the classes where the metric is not None.
    """
    by_class: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_class.setdefault(str(record["class_name"]), []).append(record)
    per_class = {name: {**_image_metrics(rows), **_pixel_metrics(rows, smooth, sigma, fpr_limit)}
                 for name, rows in sorted(by_class.items())}
    return {"per_class": per_class, "mean": _class_means(per_class)}


def spearman(a: Any, b: Any) -> float:
    """Spearman rank correlation of two score vectors (arrays or CPU tensors; no ties expected for
    continuous scores); NaN for fewer than two."""
    x, y = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if x.size < 2:
        return float("nan")
    rx, ry = x.argsort().argsort().astype(np.float64), y.argsort().argsort().astype(np.float64)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (np.linalg.norm(rx) * np.linalg.norm(ry)))
