"""The one small interface every detector implements, and the result it returns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class Prediction:
    """Batched detector output; the first dimension of every tensor is the image index n.

    anomaly_map: [N, S, S] in [0, 1], model-input resolution, unsmoothed.
    image_score: [N] per-image score usable on a live line (needs no test set).
    text_score:  [N] the detector's image-level text/prompt score (s_text for Bayes-PFL).
    topk_score:  [N] mean of the k largest map values.
    provenance:  what produced the numbers (detector, backbone source, random weights, samples, mode).
    """

    anomaly_map: torch.Tensor
    image_score: torch.Tensor
    text_score: torch.Tensor
    topk_score: torch.Tensor
    provenance: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.image_score.shape[0]

    def cpu(self) -> Prediction:
        return Prediction(
            self.anomaly_map.float().cpu(), self.image_score.float().cpu(), self.text_score.float().cpu(),
            self.topk_score.float().cpu(), dict(self.provenance),
        )


@runtime_checkable
class Detector(Protocol):
    """Scores preprocessed images of named classes. The backbone is shared and frozen."""

    name: str

    def predict_tensors(self, pixels: torch.Tensor, class_names: Sequence[str], **options: Any) -> Prediction:
        """pixels: [N, 3, S, S] normalised on the detector's device -> Prediction."""
        ...
