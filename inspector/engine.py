"""The one scoring path every front door uses (``score``, ``watch``, ``eval``, ``bench``, the dashboard).

``Engine.score`` takes (image, class name) pairs, decodes them in a small thread pool, preprocesses them
exactly as the model expects, scores them in batches on the detector's device and yields one
``Scored`` record per input, in input order. A file that cannot be decoded becomes a record with an
``error``; it never stops the others.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .imaging import ImageDecodeError, ImageInput, open_image, to_model_input


@dataclass
class Scored:
    """The outcome for one input image."""

    source: Any
    class_name: str
    image_score: float | None = None
    text_score: float | None = None
    topk_score: float | None = None
    anomaly_map: torch.Tensor | None = None  # [S, S] float32 on the CPU, in [0, 1]
    latency_ms: float | None = None  # share of the batch's wall time, decoding included
    error: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self, with_map: bool = False) -> dict[str, Any]:
        out = {"path": str(self.source) if not hasattr(self.source, "size") else "<image>",
               "class_name": self.class_name, "image_score": self.image_score, "text_score": self.text_score,
               "topk_score": self.topk_score, "latency_ms": self.latency_ms, "error": self.error}
        if with_map and self.anomaly_map is not None:
            out["anomaly_map"] = self.anomaly_map.tolist()
        return out


def _decode(source: ImageInput, size: int) -> torch.Tensor | str:
    try:
        return to_model_input(open_image(source), size)
    except ImageDecodeError as exc:
        return str(exc)
    except (OSError, ValueError, MemoryError) as exc:  # anything a broken file can raise in PIL/numpy
        return f"{source}: cannot decode ({type(exc).__name__}: {exc})"


class Engine:
    """Batched scoring with a detector (``predict_tensors(pixels, class_names, samples=...)``)."""

    def __init__(self, detector: Any, batch_size: int = 8, decode_threads: int = 2):
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.detector = detector
        self.batch_size = batch_size
        self.decode_threads = decode_threads

    @property
    def image_size(self) -> int:
        return self.detector.backbone.image_size

    def score(self, items: Iterable[tuple[ImageInput, str]], samples: int | None = None,
              on_batch: Callable[[int], None] | None = None) -> Iterator[Scored]:
        """Yield a ``Scored`` for every (image, class name), in order; ``on_batch(n)`` after each batch."""
        batch: list[tuple[ImageInput, str]] = []
        with ThreadPoolExecutor(self.decode_threads, thread_name_prefix="decode") as pool:
            for item in items:
                batch.append(item)
                if len(batch) == self.batch_size:
                    yield from self._score_batch(batch, pool, samples)
                    if on_batch:
                        on_batch(len(batch))
                    batch = []
            if batch:
                yield from self._score_batch(batch, pool, samples)
                if on_batch:
                    on_batch(len(batch))

    def _score_batch(self, batch: Sequence[tuple[ImageInput, str]], pool: ThreadPoolExecutor,
                     samples: int | None) -> list[Scored]:
        start = time.perf_counter()
        decoded = list(pool.map(lambda item: _decode(item[0], self.image_size), batch))
        good = [i for i, d in enumerate(decoded) if isinstance(d, torch.Tensor)]
        records = [Scored(source, name) for source, name in batch]
        for i, d in enumerate(decoded):
            if isinstance(d, str):
                records[i].error = d
        if good:
            pixels = torch.stack([decoded[i] for i in good])
            prediction = self.detector.predict_tensors(pixels, [batch[i][1] for i in good], samples=samples).cpu()
            per_image = (time.perf_counter() - start) * 1000 / len(good)
            for j, i in enumerate(good):
                r = records[i]
                r.image_score = float(prediction.image_score[j])
                r.text_score = float(prediction.text_score[j])
                r.topk_score = float(prediction.topk_score[j])
                r.anomaly_map = prediction.anomaly_map[j]
                r.latency_ms = per_image
                r.provenance = prediction.provenance
        return records
