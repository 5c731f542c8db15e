"""Metrics against scikit-learn and a hand-computed AUPRO case."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from inspector.metrics import aupro, aupro_official, auroc, average_precision, evaluate, f1_max, gaussian_smooth


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_match_sklearn(ties, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 500)
    scores = rng.normal(size=500) + labels * 0.7
    if ties:
        scores = np.round(scores, 1)
    assert auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
    assert average_precision(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-6)
    p, r, _ = precision_recall_curve(labels, scores)
    assert f1_max(labels, scores) == pytest.approx(np.max(2 * p * r / (p + r + 1e-12)), abs=1e-6)


def test_degenerate_cases():
    assert np.isnan(auroc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert auroc([0, 0, 1, 1], [0.1, 0.2, 0.8, 0.9]) == 1.0


def test_gaussian_smooth_matches_scipy_reflect():
    maps = np.random.default_rng(3).random((2, 60, 70))
    expected = np.stack([gaussian_filter(m, sigma=8, mode="reflect", truncate=4.0) for m in maps])
    np.testing.assert_allclose(gaussian_smooth(maps, 8), expected, atol=1e-6)


def test_aupro_by_hand():
    # one 6x6 image, one defect region of 4 pixels (rows 0-1, cols 0-1); 32 normal pixels.
    mask = np.zeros((1, 6, 6), bool)
    mask[0, :2, :2] = True
    m = np.zeros((1, 6, 6))
    m[0, 0, 0], m[0, 0, 1] = 0.9, 0.8  # two defect pixels score high
    m[0, 5, 5] = 0.85  # one normal pixel in between
    m[0, 1, 0], m[0, 1, 1] = 0.3, 0.3  # the rest of the defect scores like 6 normal pixels below
    m[0, 2:4, 2:5] = 0.3  # six normal pixels at 0.3
    # thresholds high -> low: 0.9: fpr 0, pro 1/4; 0.85: fpr 1/32, pro 1/4; 0.8: fpr 1/32, pro 2/4;
    # 0.3: fpr 7/32, pro 1; 0.0: fpr 1, pro 1.  Curve to 0.3: trapezoids
    #   [0, 0] pro 0->0.25 (zero width), [0, 1/32] at 0.25, [1/32, 1/32] jump, [1/32, 7/32] 0.5->1,
    #   [7/32, 0.3] at pro 1 (interpolating towards (1, 1)).
    area = (1 / 32) * 0.25 + (6 / 32) * (0.5 + 1) / 2 + (0.3 - 7 / 32) * 1.0
    assert aupro(mask, m) == pytest.approx(area / 0.3, abs=1e-9)


def test_aupro_perfect_and_two_regions():
    mask = np.zeros((2, 8, 8), bool)
    mask[0, 1:3, 1:3] = True
    mask[1, 5:8, 5:8] = True
    assert aupro(mask, mask.astype(float)) == pytest.approx(1.0)
    noisy = mask * 0.6 + np.random.default_rng(0).random(mask.shape) * 0.5
    value = aupro(mask, noisy)
    assert 0.5 < value <= 1.0
    assert 0 <= aupro_official(mask, noisy) <= 1.0


def test_evaluate_structure_and_means():
    rng = np.random.default_rng(5)
    records = []
    for cls, shift in (("a", 2.0), ("b", 0.0)):
        for i in range(10):
            label = i % 2
            mask = np.zeros((16, 16), bool)
            if label:
                mask[4:8, 4:8] = True
            records.append({"class_name": cls, "label": label, "score": label * shift + rng.random(),
                            "map": mask * shift + rng.random((16, 16)), "mask": mask})
    records.append({"class_name": "c", "label": 1, "score": 0.5, "map": None, "mask": None})
    report = evaluate(records, smooth=False)
    assert report["per_class"]["a"]["image_auroc"] == 1.0
    assert report["per_class"]["c"]["image_auroc"] is None and report["per_class"]["c"]["pixel_ap"] is None
    mean = np.mean([report["per_class"][c]["image_auroc"] for c in ("a", "b")])
    assert report["mean"]["image_auroc"] == pytest.approx(mean)
    assert set(report["mean"]) == {"image_auroc", "image_ap", "image_f1_max", "pixel_auroc", "pixel_ap",
                                   "pixel_f1_max", "pixel_aupro"}
