"""`inspector eval`: score a labelled dataset and report the field's metrics, per class and mean.

Image metrics use the official transductive fusion (min-max per class of s_text and s_topk, spec §5.3)
by default, so numbers compare with the paper; ``score="live"`` uses the per-image product score instead.
Pixel metrics use the maps smoothed with a Gaussian of sigma 8, as the paper does.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .detectors.bayes_pfl import official_image_scores
from .imaging import open_image, to_model_input
from .train import load_mask


def score_dataset(model: Any, records: Sequence[Any], samples: int | None = None, batch_size: int = 8,
                  progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """One dict per image: class_name, label, text, topk, live score, map [S, S] float32, mask [S, S] bool."""
    size = model.backbone.image_size
    rows: list[dict[str, Any]] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start:start + batch_size]
        pixels = torch.stack([to_model_input(open_image(r.image), size) for r in chunk])
        pred = model.predict_tensors(pixels, [r.class_name for r in chunk], samples=samples).cpu()
        for j, r in enumerate(chunk):
            rows.append({"path": str(r.image), "class_name": r.class_name, "label": int(r.label),
                         "text": float(pred.text_score[j]), "topk": float(pred.topk_score[j]),
                         "live": float(pred.image_score[j]), "map": pred.anomaly_map[j].numpy(),
                         "mask": load_mask(r, size).numpy() > 0.5 if r.mask is not None or r.label == 0 else None})
        if progress:
            progress(len(chunk))
    return rows


def evaluate_rows(rows: list[dict[str, Any]], score: str = "official") -> dict[str, Any]:
    from .metrics import evaluate

    if score == "official":
        fused = official_image_scores(torch.tensor([r["text"] for r in rows]), torch.tensor([r["topk"] for r in rows]),
                                      [r["class_name"] for r in rows]).numpy()
    elif score == "live":
        fused = np.array([r["live"] for r in rows])
    else:
        raise ValueError(f"score must be 'official' or 'live', not '{score}'")
    records = [{"class_name": r["class_name"], "label": r["label"], "score": float(s), "map": r["map"],
                "mask": r["mask"]} for r, s in zip(rows, fused)]
    return evaluate(records, smooth=True)
