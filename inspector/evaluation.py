"""`inspector eval`: score a labelled dataset and report the field's metrics, per class and mean.

Every detector says how its paper evaluates (``detector.eval_protocol``): by default image metrics use
that paper's transductive fusion (Bayes-PFL: min-max per class of s_text and s_topk; AA-CLIP: min-max of the
map maximum and the text score; WinCLIP: the image score itself) and pixel metrics the paper's map
(Bayes-PFL smooths it with a Gaussian of sigma 8; AA-CLIP and WinCLIP do not smooth), so numbers compare with
the papers. ``score="live"`` uses the per-image score inspector stores instead.

A transductive detector (MuSc) scores a class as a whole: when it has ``score_closed_pool(pixels,
class_name, dataset_classes)`` (``detectors.base``), the official mode gives it each class's test split as
one pool, as its paper does; ``score="live"`` scores the same images in file order through
``predict_tensors``, as a line would.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .data.splits import load_mask
from .detectors.base import EvalProtocol
from .errors import UsageError
from .imaging import open_image


def score_dataset(model: Any, records: Sequence[Any], samples: int | None = None, batch_size: int = 8,
                  progress: Callable[[int], None] | None = None, score: str = "official") -> list[dict[str, Any]]:
    """One dict per image: class_name, label, text, topk, live score, map [S, S] float32 (the detector's
    own map), map_max / map_min of it, mask [S, S] bool. ``score="official"`` and a detector with
    ``score_closed_pool``: one call per class with all its images (rows still in record order)."""
    options = model.sample_options(samples)
    closed = model.score_closed_pool if score == "official" and model.closed_pool else None
    if closed is not None:
        classes = list(dict.fromkeys(r.class_name for r in records))
        chunks = [[i for i, r in enumerate(records) if r.class_name == name] for name in classes]
    else:
        chunks = [list(range(start, min(start + batch_size, len(records))))
                  for start in range(0, len(records), batch_size)]
    by_index: dict[int, dict[str, Any]] = {}
    with model.eval_session():  # a detector with state (MuSc's pools): a fresh one
        _score_chunks(model, records, chunks, closed, classes if closed is not None else [], options, progress,
                      by_index)
    return [by_index[i] for i in range(len(records))]


def _score_chunks(model: Any, records: Sequence[Any], chunks: list[list[int]], closed: Any, classes: list[str],
                  options: dict[str, Any], progress: Callable[[int], None] | None,
                  by_index: dict[int, dict[str, Any]]) -> None:
    size = model.image_size
    for indices in chunks:
        chunk = [records[i] for i in indices]
        pixels = torch.stack([model.to_input(open_image(r.image)) for r in chunk])
        if closed is not None:
            pred = closed(pixels, chunk[0].class_name, classes).cpu()
        else:
            pred = model.predict_tensors(pixels, [r.class_name for r in chunk], **options).cpu()
        for j, (i, r) in enumerate(zip(indices, chunk)):
            by_index[i] = {"path": str(r.image), "class_name": r.class_name, "label": int(r.label),
                           "text": float(pred.text_score[j]), "topk": float(pred.topk_score[j]),
                           "live": float(pred.image_score[j]), "map": pred.anomaly_map[j].numpy(),
                           "map_max": float(pred.anomaly_map[j].max()), "map_min": float(pred.anomaly_map[j].min()),
                           "mask": load_mask(r, size).numpy() > 0.5 if r.mask is not None or r.label == 0 else None}
        if progress:
            progress(len(chunk))


class ProgressLines:
    """``progress(n)`` callback that writes a line (``scoring 120/1000 images (12%), 34 s``) every ``step`` of the
    total and at least every ``seconds``, and at the end: progress where no bar can be drawn (a log, CI, nohup)."""

    def __init__(self, total: int, write: Callable[[str], None], what: str = "scoring", step: float = 0.1,
                 seconds: float = 30.0, clock: Callable[[], float] | None = None):
        import time

        self.total, self.write, self.what, self.step, self.seconds = total, write, what, step, seconds
        self.clock = clock or time.monotonic
        self.start = self.last_time = self.clock()
        self.done = self.last_done = 0

    def __call__(self, n: int) -> None:
        self.done += n
        now = self.clock()
        if (self.done >= self.total or self.done - self.last_done >= self.step * self.total
                or now - self.last_time >= self.seconds):
            share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
            self.write(f"{self.what} {self.done}/{self.total} images{share}, {now - self.start:.0f} s")
            self.last_done, self.last_time = self.done, now


def image_scores(rows: list[dict[str, Any]], protocol: EvalProtocol, score: str = "official") -> np.ndarray:
    """One image score per row: the protocol's per-class fusion ("official") or the stored score ("live")."""
    if score == "live":
        return np.array([r["live"] for r in rows], dtype=np.float64)
    if score != "official":
        raise UsageError(f"score must be 'official' or 'live', not '{score}'")
    return protocol.scores(rows)


def evaluate_rows(rows: list[dict[str, Any]], protocol: EvalProtocol, score: str = "official") -> dict[str, Any]:
    """Per-class and mean metrics of scored rows under ``protocol`` (the detector's ``eval_protocol``)."""
    from .metrics import evaluate

    fused = image_scores(rows, protocol, score)
    records = [{"class_name": r["class_name"], "label": r["label"], "score": float(s), "map": r["map"],
                "mask": r["mask"]} for r, s in zip(rows, fused)]
    return evaluate(records, smooth=protocol.smooth_sigma > 0, sigma=protocol.smooth_sigma or 8.0)


def _plot(curves: list[tuple[str, np.ndarray, np.ndarray]], title: str, xlabel: str, ylabel: str,
          path) -> None:
    """A small line plot as PNG with Pillow (no plotting dependency): unit square axes, one line per curve."""
    from PIL import Image, ImageDraw

    size, pad = 420, 48
    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    x0, y0, x1, y1 = pad, size - pad, size - 12, 28
    draw.rectangle([x0, y1, x1, y0], outline="black")
    for t in (0.25, 0.5, 0.75):
        gx, gy = x0 + t * (x1 - x0), y0 - t * (y0 - y1)
        draw.line([gx, y0, gx, y1], fill=(225, 225, 225))
        draw.line([x0, gy, x1, gy], fill=(225, 225, 225))
    draw.text((x0, 8), title, fill="black")
    draw.text(((x0 + x1) // 2 - 20, y0 + 18), xlabel, fill="black")
    draw.text((4, (y0 + y1) // 2), ylabel, fill="black")
    for k, tick in enumerate(("0", "0.5", "1")):
        draw.text((x0 + k * (x1 - x0) / 2 - 6, y0 + 4), tick, fill="black")
        draw.text((x0 - 24, y0 - k * (y0 - y1) / 2 - 6), tick, fill="black")
    colours = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
    for i, (label, xs, ys) in enumerate(curves):
        colour = colours[i % len(colours)]
        points = [(x0 + float(x) * (x1 - x0), y0 - float(y) * (y0 - y1)) for x, y in zip(xs, ys)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        draw.text((x1 - 150, y1 + 6 + 12 * i), label, fill=colour)
    image.save(path)


def write_plots(rows: list[dict[str, Any]], out_dir, protocol: EvalProtocol, score: str = "official") -> list:
    """Image-level ROC and precision-recall curves, one line per class, as PNG files in ``out_dir``."""
    from pathlib import Path

    from .metrics import _curve

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scores = image_scores(rows, protocol, score)
    roc, pr = [], []
    for name in sorted({r["class_name"] for r in rows}):
        idx = [i for i, r in enumerate(rows) if r["class_name"] == name]
        labels = np.array([rows[i]["label"] for i in idx])
        if not 0 < labels.sum() < labels.size:
            continue
        tps, fps = _curve(labels, scores[idx])
        roc.append((name, np.r_[0, fps / fps[-1]], np.r_[0, tps / tps[-1]]))
        pr.append((name, np.r_[0, tps / tps[-1]], np.r_[1, tps / (tps + fps)]))
    paths = [out / "roc.png", out / "pr.png"]
    _plot(roc, "image ROC", "false positive rate", "TPR", paths[0])
    _plot(pr, "image precision-recall", "recall", "prec.", paths[1])
    return paths
