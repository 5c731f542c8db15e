"""inspector.metrics against scikit-learn and scipy, hand-computed AUPRO cases, and evaluate()."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from inspector import metrics
from inspector.metrics import (
    aupro,
    aupro_official,
    auroc,
    average_precision,
    evaluate,
    f1_max,
    gaussian_smooth,
    label_regions,
)

EIGHT = np.ones((3, 3), dtype=bool)


def sklearn_f1_max(labels, scores) -> float:
    p, r, _ = precision_recall_curve(labels, scores)
    return float(np.max(2 * p * r / (p + r + 1e-12)))


def assert_binary_metrics_match(labels, scores) -> None:
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    assert f1_max(labels, scores) == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# AUROC, AP, F1-max


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("ties", ["none", "some", "heavy"])
def test_binary_metrics_match_sklearn(seed, ties):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 700)
    scores = rng.normal(size=700) + 0.8 * labels
    if ties == "some":
        scores = np.round(scores, 1)
    elif ties == "heavy":
        scores = np.clip(np.round(scores), -1, 2)  # four distinct values
    assert_binary_metrics_match(labels, scores)


def test_binary_metrics_on_rare_positives_and_2d_input():
    rng = np.random.default_rng(7)
    labels = rng.random((40, 50)) < 0.02
    scores = rng.random((40, 50)) + labels * 0.2
    assert_binary_metrics_match(labels.ravel(), scores.ravel())
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels.ravel(), scores.ravel()), abs=1e-12)


@pytest.mark.parametrize("labels, scores", [
    ([0, 1, 0, 1, 1], [0.3] * 5),                  # one threshold: a single diagonal ROC segment
    ([0, 0, 0, 1], [0.1, 0.2, 0.3, 0.4]),          # a single positive, perfectly ranked
    ([1, 0, 0, 0], [0.1, 0.2, 0.3, 0.4]),          # a single positive, ranked last
    ([0, 1, 1, 0], [0.2, 0.2, 0.9, 0.1]),          # a positive tied with a negative
    ([0, 1], [0.5, 0.5]),
])
def test_degenerate_but_defined_cases_match_sklearn(labels, scores):
    assert_binary_metrics_match(labels, scores)


def test_all_tied_values_by_hand():
    labels, scores = [0, 1, 0, 1, 1], [0.3] * 5
    assert auroc(labels, scores) == 0.5
    assert average_precision(labels, scores) == pytest.approx(3 / 5)
    assert f1_max(labels, scores) == pytest.approx(2 * 0.6 * 1.0 / 1.6)


def test_one_class_is_undefined():
    assert np.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(auroc([0, 0], [0.1, 0.2]))
    assert np.isnan(average_precision([0, 0], [0.1, 0.2]))
    assert np.isnan(f1_max([0, 0], [0.1, 0.2]))
    assert average_precision([1, 1], [0.1, 0.2]) == 1.0


def test_bad_input_is_rejected():
    with pytest.raises(ValueError):
        auroc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError):
        auroc([0, 1], [0.1, np.nan])


def test_curve_vertices_match_sklearn_roc_curve():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 2, 200)
    scores = np.round(rng.random(200), 1)
    tps, fps = metrics._curve(labels, scores)
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(tps / tps[-1], tpr[1:])
    np.testing.assert_allclose(fps / fps[-1], fpr[1:])


# ---------------------------------------------------------------------------------------------------------
# Gaussian smoothing


@pytest.mark.parametrize("shape, sigma", [((3, 60, 70), 8), ((2, 9, 5), 8), ((1, 40, 33), 2.5), ((7, 11), 8)])
def test_gaussian_smooth_matches_scipy_reflect(shape, sigma):
    maps = np.random.default_rng(3).random(shape)
    flat = maps.reshape(-1, *shape[-2:])
    expected = np.stack([gaussian_filter(m, sigma=sigma, mode="reflect", truncate=4.0) for m in flat])
    got = gaussian_smooth(maps, sigma)
    assert got.shape == maps.shape and got.dtype == np.float64
    np.testing.assert_allclose(got.reshape(flat.shape), expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got.reshape(flat.shape), expected, rtol=0, atol=1e-12)  # FFT rounding only


def test_gaussian_smooth_keeps_constants_and_chunks_agree():
    assert np.allclose(gaussian_smooth(np.full((2, 20, 30), 0.25)), 0.25)
    maps = np.random.default_rng(9).random((5, 24, 24))
    np.testing.assert_allclose(gaussian_smooth(maps, chunk=2), gaussian_smooth(maps), atol=1e-14)
    np.testing.assert_array_equal(gaussian_smooth(maps, sigma=0), maps)


# ---------------------------------------------------------------------------------------------------------
# Connected components


def scipy_labels(masks: np.ndarray) -> np.ndarray:
    """Per-image scipy labels (8-connectivity) renumbered across the stack."""
    out, offset = np.zeros(masks.shape, dtype=np.int64), 0
    for i, mask in enumerate(masks):
        lab, n = label(mask, structure=EIGHT)
        out[i] = np.where(lab > 0, lab + offset, 0)
        offset += n
    return out


@pytest.mark.parametrize("density", [0.2, 0.45, 0.6])
def test_label_regions_matches_scipy_8_connectivity(density):
    masks = np.random.default_rng(int(density * 100)).random((4, 37, 41)) < density
    labels, count = label_regions(masks)
    expected = scipy_labels(masks)
    np.testing.assert_array_equal(labels, expected)
    assert count == expected.max()


def test_label_regions_diagonals_spirals_and_image_borders():
    masks = np.zeros((2, 9, 9), bool)
    masks[0, [0, 1, 2], [0, 1, 2]] = True  # a diagonal line: one region with 8-connectivity
    masks[0, 8, :] = True  # the bottom row of image 0 ...
    masks[1, 0, :] = True  # ... and the top row of image 1 must stay separate
    masks[1, 2:8, 2] = masks[1, 2, 2:8] = masks[1, 2:8, 7] = masks[1, 7, 4:8] = masks[1, 4:8, 4] = True
    labels, count = label_regions(masks)
    assert count == 4
    np.testing.assert_array_equal(labels, scipy_labels(masks))
    assert label_regions(np.zeros((3, 3), bool))[1] == 0


# ---------------------------------------------------------------------------------------------------------
# AUPRO


def hand_case() -> tuple[np.ndarray, np.ndarray]:
    """One 6x6 image: region A (2x2, rows 0-1, cols 0-1) and region B (1x2, row 4, cols 4-5); 30 normal pixels.

    Scores are integers so that evenly spaced thresholds hit them exactly:
      A: 9, 9, 5, 2      B: 7, 5      normals: three at 8, nine at 5, eighteen at 1.
    """
    mask = np.zeros((1, 6, 6), bool)
    mask[0, :2, :2] = True
    mask[0, 4, 4:] = True
    m = np.ones((1, 6, 6))
    m[0, 0, 0], m[0, 0, 1], m[0, 1, 0], m[0, 1, 1] = 9, 9, 5, 2
    m[0, 4, 4], m[0, 4, 5] = 7, 5
    normal = np.flatnonzero(~mask.ravel())
    m.ravel()[normal[:3]] = 8
    m.ravel()[normal[3:12]] = 5
    return mask, m


def test_aupro_by_hand():
    mask, m = hand_case()
    # Thresholds from high to low (a pixel is positive when its score >= t), PRO = mean of (A share, B share):
    #   t > 9: FPR 0,      PRO 0
    #   t = 9: FPR 0,      PRO (2/4 + 0/2) / 2 = 0.25
    #   t = 8: FPR 3/30,   PRO 0.25
    #   t = 7: FPR 3/30,   PRO (2/4 + 1/2) / 2 = 0.5
    #   t = 5: FPR 12/30,  PRO (3/4 + 2/2) / 2 = 0.875   (normal and defect pixels tie: a diagonal segment)
    #   t = 2: FPR 12/30,  PRO 1
    #   t = 1: FPR 1,      PRO 1
    # Area up to FPR 0.3: 0.1 * 0.25 on [0, 0.1]; on [0.1, 0.3] the diagonal from (0.1, 0.5) to (0.4, 0.875)
    # reaches 0.5 + 0.375 * (0.2 / 0.3) = 0.75 at 0.3, so 0.2 * (0.5 + 0.75) / 2 = 0.125.
    # Total 0.15, divided by 0.3: 0.5.
    assert aupro(mask, m) == pytest.approx(0.5, abs=1e-12)
    # thresholds 9, 8, ..., 1 include every distinct score, so the stepped curve is the exact one
    assert aupro(mask, m, steps=9) == pytest.approx(0.5, abs=1e-12)
    # up to FPR 0.1 only the first flat stretch counts: 0.1 * 0.25 / 0.1
    assert aupro(mask, m, fpr_limit=0.1) == pytest.approx(0.25, abs=1e-12)
    # the whole curve: 0.025 + 0.3 * (0.5 + 0.875) / 2 + 0.6 * 1 = 0.83125
    assert aupro(mask, m, fpr_limit=1.0) == pytest.approx(0.83125, abs=1e-12)
    assert aupro(mask[0], m[0]) == aupro(mask, m)  # a single [H, W] image


def test_aupro_perfect_detector_scores_one():
    mask = np.zeros((3, 12, 12), bool)
    mask[0, 1:3, 1:3] = True
    mask[0, 6:11, 2:4] = True
    mask[2, 5:12, 5:12] = True  # image 1 is normal
    assert aupro(mask, mask.astype(float)) == pytest.approx(1.0, abs=1e-12)
    assert aupro(mask, mask * 0.7 + 0.1, steps=50) == pytest.approx(1.0, abs=1e-12)
    assert aupro(mask, 1.0 - mask) == pytest.approx(0.0, abs=1e-12)


def test_aupro_undefined_without_regions_or_normals():
    assert np.isnan(aupro(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4))))
    assert np.isnan(aupro(np.ones((1, 4, 4), bool), np.zeros((1, 4, 4))))
    with pytest.raises(ValueError):
        aupro(np.ones((1, 4, 4), bool), np.zeros((1, 4, 5)))


def brute_force_pro_curve(masks, maps, thresholds, strict=False):
    """(fpr, pro) at each threshold by direct counting over scipy-labelled regions."""
    regions = [(i, lab == k) for i, m in enumerate(masks) for lab, n in [label(m, structure=EIGHT)]
               for k in range(1, n + 1)]
    fprs, pros = [], []
    for t in thresholds:
        positive = maps > t if strict else maps >= t
        fprs.append((positive & ~masks).sum() / (~masks).sum())
        pros.append(np.mean([positive[i][r].sum() / r.sum() for i, r in regions]))
    return np.array(fprs), np.array(pros)


def brute_force_aupro(masks, maps, limit=0.3):
    fpr, pro = brute_force_pro_curve(masks, maps, np.unique(maps)[::-1])
    fpr, pro = np.r_[0.0, fpr], np.r_[0.0, pro]
    area = 0.0
    for x0, x1, y0, y1 in zip(fpr[:-1], fpr[1:], pro[:-1], pro[1:]):
        if x0 >= limit or x1 == x0:
            continue
        xe = min(x1, limit)
        area += (xe - x0) * (y0 + y0 + (y1 - y0) * (xe - x0) / (x1 - x0)) / 2
    return area / limit


def random_case(seed, decimals=None):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 20, 24), bool)
    masks[0, 2:6, 3:9] = True
    masks[0, 12:14, 15:23] = True
    masks[1, 8:19, 4:6] = True
    masks[1, 9, 6:8] = True
    maps = rng.random(masks.shape) + masks * 0.4 + gaussian_filter(rng.random(masks.shape), 2)
    return masks, (np.round(maps, decimals) if decimals is not None else maps)


@pytest.mark.parametrize("seed, decimals", [(0, None), (1, 1), (2, 2)])
def test_aupro_matches_brute_force(seed, decimals):
    masks, maps = random_case(seed, decimals)
    assert aupro(masks, maps) == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)


def test_aupro_steps_approaches_exact():
    masks, maps = random_case(3)
    exact = aupro(masks, maps)
    assert abs(aupro(masks, maps, steps=4000) - exact) < 2e-3
    with pytest.raises(ValueError):
        aupro(masks, maps, steps=1)


def reference_official_aupro(masks, maps):
    """The official helper's recipe written out: arange thresholds, amap > th, FPR < 0.3, rescale, auc."""
    low, high = maps.min(), maps.max()
    thresholds = np.arange(low, high, (high - low) / 200)
    fpr, pro = brute_force_pro_curve(masks, maps, thresholds, strict=True)
    keep = fpr < 0.3
    fpr, pro = fpr[keep], pro[keep]
    fpr = (fpr - fpr.min()) / (fpr.max() - fpr.min())
    return -np.sum(np.diff(fpr) * (pro[1:] + pro[:-1]) / 2)  # fpr decreases as thresholds rise


@pytest.mark.parametrize("seed", [0, 1])
def test_aupro_official_matches_its_recipe(seed):
    masks, maps = random_case(seed, decimals=2)
    value = aupro_official(masks, maps)
    assert value == pytest.approx(reference_official_aupro(masks, maps), abs=1e-9)
    assert 0.0 <= value <= 1.0
    separated = masks * 0.5 + np.random.default_rng(seed).random(masks.shape) * 0.5
    assert aupro_official(masks, separated) == pytest.approx(1.0, abs=1e-9)
    # the helper's recipe is undefined when fewer than two distinct FPRs fall below 0.3
    assert np.isnan(aupro_official(masks, masks + maps * 1e-3))


# ---------------------------------------------------------------------------------------------------------
# evaluate()


def synthetic_records() -> list[dict]:
    rng = np.random.default_rng(5)
    records = []
    for cls, shift in (("a", 2.0), ("b", 0.3)):
        for i in range(8):
            label_ = i % 2
            mask = np.zeros((16, 16), bool)
            if label_:
                mask[4:8, 4 + i:8 + i] = True
            records.append({"class_name": cls, "label": label_, "score": label_ * shift + rng.random(),
                            "map": mask * shift + rng.random((16, 16)), "mask": mask})
    # "c": only anomalous images and no maps; "d": both labels, maps but no masks
    records += [{"class_name": "c", "label": 1, "score": 0.5, "map": None, "mask": None},
                {"class_name": "c", "label": 1, "score": 0.7, "map": None, "mask": None}]
    records += [{"class_name": "d", "label": k, "score": 0.2 + 0.5 * k, "map": rng.random((16, 16)), "mask": None}
                for k in (0, 1, 0)]
    return records


def test_evaluate_structure_none_and_means():
    records = synthetic_records()
    report = evaluate(records, smooth=False)
    names = set(metrics.IMAGE_METRICS + metrics.PIXEL_METRICS)
    assert set(report) == {"per_class", "mean"} and set(report["mean"]) == names
    assert list(report["per_class"]) == ["a", "b", "c", "d"]
    a, b, c, d = (report["per_class"][k] for k in "abcd")
    assert all(set(m) == names for m in (a, b, c, d))
    assert a["image_auroc"] == 1.0 and a["pixel_auroc"] == 1.0 and a["pixel_aupro"] == pytest.approx(1.0)
    assert all(c[k] is None for k in names)  # one label only, no masks: None, not 0
    assert d["image_auroc"] == 1.0 and all(d[k] is None for k in metrics.PIXEL_METRICS)
    for metric in names:  # unweighted class means over the classes where the metric is defined
        values = [m[metric] for m in (a, b, c, d) if m[metric] is not None]
        assert report["mean"][metric] == pytest.approx(np.mean(values))
    assert report["mean"]["image_auroc"] == pytest.approx((1.0 + b["image_auroc"] + 1.0) / 3)
    assert report["mean"]["pixel_ap"] == pytest.approx((a["pixel_ap"] + b["pixel_ap"]) / 2)
    json.dumps(report, allow_nan=False)  # no NaN leaks into the report


def test_evaluate_pools_pixels_and_smooths():
    records = [r for r in synthetic_records() if r["class_name"] == "b"]
    masks = np.stack([r["mask"] for r in records])
    labels = np.array([r["label"] for r in records])
    scores = np.array([r["score"] for r in records])
    for smooth in (False, True):
        maps = np.stack([r["map"] for r in records])
        if smooth:
            maps = gaussian_filter(maps, sigma=(0, 8, 8), mode="reflect", truncate=4.0)
        got = evaluate(records, smooth=smooth)["per_class"]["b"]
        assert got["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
        assert got["image_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-12)
        assert got["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-9)
        assert got["pixel_ap"] == pytest.approx(average_precision_score(masks.ravel(), maps.ravel()), abs=1e-9)
        assert got["pixel_f1_max"] == pytest.approx(sklearn_f1_max(masks.ravel(), maps.ravel()), abs=1e-9)
        assert got["pixel_aupro"] == pytest.approx(brute_force_aupro(masks, maps), abs=1e-9)


def test_metrics_module_needs_neither_scipy_nor_sklearn():
    tree = ast.parse(Path(metrics.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert not {name for name in imported if name.split(".")[0] in ("scipy", "sklearn")}
