"""A detector that lives only in the test suite: registered through ``inspector.detectors.KINDS`` alone, it
must run through every front door (``watch --once``, ``eval``, ``bench``, the dashboard) with no other
module knowing it.

Its score is plain arithmetic on the model input, so a test can compute the expected numbers itself:
the anomaly map is sigmoid of each pixel's channel mean, the image score the map's mean.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from inspector.backbone import BackboneSpec, ClipBackbone
from inspector.detectors.base import Detector, Prediction


def toy_map(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 3, S, S] -> [N, S, S] in (0, 1)."""
    return torch.sigmoid(pixels.float().mean(1))


class Toy(Detector):
    name = "toy"
    default_backbone = BackboneSpec(arch="test-tiny", pretrained="random", image_size=224, feature_layers=())

    @classmethod
    def from_settings(cls, backbone: ClipBackbone, head: Any, options: Any, *, precision: str = "fp32",
                      provenance: Mapping[str, Any] | None = None) -> Toy:
        return cls(backbone, precision, provenance)

    @torch.inference_mode()
    def predict_tensors(self, pixels: torch.Tensor, class_names: Sequence[str],
                        seeds: Sequence[int] | None = None, **options: Any) -> Prediction:
        anomaly_map = toy_map(pixels.to(self.device))
        score = anomaly_map.flatten(1).mean(1)
        return Prediction(anomaly_map=anomaly_map, image_score=score, text_score=score,
                          topk_score=anomaly_map.flatten(1).amax(1),
                          provenance={**self.provenance, "detector": self.name})
