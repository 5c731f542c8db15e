"""The one small interface every detector implements, and the result it returns.

A detector owns only its learnable (or reference) parts; the frozen CLIP ``ClipBackbone`` is shared. The
watcher, the store, the dashboard, ``eval`` and ``bench`` see nothing but this interface:

* ``name`` ("bayes-pfl", "aa-clip", "winclip"), ``provenance`` (what produced the numbers), ``backbone``,
  ``image_size`` and ``device``;
* ``predict_tensors(pixels, class_names, seeds=None) -> Prediction``, batched;
* ``encode_floor(pixels)``: the plain backbone forward, the floor ``inspector bench`` measures against;
* ``eval_protocol``: how the method's paper evaluates (map smoothing, transductive image-score fusion);
* optional, for detectors whose score belongs to a set of images (MuSc): ``score_closed_pool(pixels,
  class_name, dataset_classes) -> Prediction``, which ``eval`` (official mode) calls once per class with its
  whole test split, and ``eval_session()``, a context manager ``eval`` scores inside (fresh state, restored).

Adding a detector means a module that implements this and one line in ``inspector.detectors.KINDS``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch


@dataclass
class Prediction:
    """Batched detector output; the first dimension of every tensor is the image index n.

    anomaly_map: [N, S, S] the detector's own map at model-input resolution (Bayes-PFL, WinCLIP: an
                 abnormal probability in [0, 1]; AA-CLIP: the official unbounded map).
    image_score: [N] per-image score usable on a live line (needs no test set), in [0, 1].
    text_score:  [N] the detector's image-level text/prompt score (s_text for Bayes-PFL).
    topk_score:  [N] mean of the k largest values of ``probability_map``.
    provenance:  what produced the numbers (detector, backbone source, random weights, samples, mode).
    probability_map: [N, S, S] in [0, 1], a monotone function of ``anomaly_map`` (itself when that is
                 already a probability): what is stored, shown and thresholded.
    """

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    text_score: torch.Tensor
    topk_score: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)
    probability_map: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.probability_map is None:
            self.probability_map = self.anomaly_map

    def __len__(self) -> int:
        return self.image_score.shape[0]

    def cpu(self) -> Prediction:
        same = self.probability_map is self.anomaly_map
        anomaly_map = self.anomaly_map.float().cpu()
        return Prediction(
            anomaly_map, self.image_score.float().cpu(), self.text_score.float().cpu(),
            self.topk_score.float().cpu(), dict(self.provenance),
            anomaly_map if same else self.probability_map.float().cpu(),
        )


def minmax(values: np.ndarray, lo: float | None = None, hi: float | None = None) -> np.ndarray:
    lo = float(np.min(values)) if lo is None else lo
    hi = float(np.max(values)) if hi is None else hi
    return (values - lo) / (hi - lo + 1e-8)


@dataclass(frozen=True)
class EvalProtocol:
    """How a method's paper turns raw outputs into metrics (``inspector eval``, official mode).

    smooth_sigma: Gaussian sigma applied to the maps before pixel metrics (0: none).
    fusion: the transductive image score over one class's test images. Rows carry ``text``, ``topk``,
    ``live``, ``map_max`` and ``map_min`` (of ``anomaly_map``); returns one score per row.
    """

    smooth_sigma: float = 0.0
    fusion: str = "live"

    def scores(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        """Image scores of rows of any classes: ``fuse`` over the rows of each class."""
        out = np.empty(len(rows))
        for name in sorted({r["class_name"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["class_name"] == name]
            out[idx] = self.fuse([rows[i] for i in idx])
        return out

    def fuse(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        """Image scores of rows of one class."""
        text = np.array([r["text"] for r in rows], dtype=np.float64)
        topk = np.array([r["topk"] for r in rows], dtype=np.float64)
        if self.fusion == "live":
            return np.array([r["live"] for r in rows], dtype=np.float64)
        if self.fusion == "text+topk":  # Bayes-PFL: 0.5 minmax(s_text) + 0.5 minmax(s_topk)
            return 0.5 * minmax(text) + 0.5 * minmax(topk)
        # AA-CLIP: maps min-maxed over all pixels of the class, then the per-image maximum
        highest = np.array([r["map_max"] for r in rows], dtype=np.float32)
        lowest = float(min(r["map_min"] for r in rows))
        top = float(highest.max())
        peak = highest if top == 1 else (highest - lowest) / (top - lowest)  # the official literal `!= 1` test
        if self.fusion == "text+max":
            return (0.5 * peak + 0.5 * minmax(text.astype(np.float32))).astype(np.float64)
        if self.fusion == "max":
            return peak.astype(np.float64)
        raise ValueError(f"unknown fusion '{self.fusion}'")


@runtime_checkable
class Detector(Protocol):
    """Scores preprocessed images of named classes. The backbone is shared and frozen."""

    name: str
    provenance: dict[str, Any]
    eval_protocol: EvalProtocol

    @property
    def image_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def predict_tensors(self, pixels: torch.Tensor, class_names: Sequence[str],
                        seeds: Sequence[int] | None = None, **options: Any) -> Prediction:
        """pixels: [N, 3, S, S] CLIP-normalised -> Prediction. ``seeds``: per-image content seeds for
        detectors that draw noise (others ignore them)."""
        ...

    def encode_floor(self, pixels: torch.Tensor) -> torch.Tensor:
        """The plain backbone forward on [N, 3, S, S] (the floor ``inspector bench`` reports ratios to)."""
        ...
