"""The one surface every detector implements, and the result it returns.

A detector owns only its learnable (or reference) parts; the frozen CLIP ``ClipBackbone`` is shared. The
watcher, the store, the dashboard, ``eval``, ``bench`` and the CLI see nothing but ``Detector``:

* class facts: ``name`` (its key in ``inspector.detectors.KINDS``), ``default_backbone`` (its paper's),
  ``trainable``, ``section`` (its ``[section]`` of the settings, whose dataclass are its typed options, or
  None), ``eval_protocol`` (how its paper evaluates);
* construction: ``from_settings(backbone, head, options, precision=..., provenance=...)`` with the typed
  options of its section, and ``scoring_options(options, precision)``: what changes the numbers (the model
  version's identity);
* scoring: ``to_input(image)`` (its paper's preprocessing of one PIL image), ``predict_tensors(pixels,
  class_names, seeds=None) -> Prediction`` (batched) and ``predict(images, class_names)`` (files or PIL);
* what the base owns for all: ``backbone``, ``precision``, ``provenance``, ``image_size``, ``device``,
  ``autocast()``, ``encode_floor(pixels)`` (the floor ``inspector bench`` measures against) and
  ``clear_caches()`` (also run on ``.to(device)``);
* optional hooks, with defaults here: ``save_head`` / ``describe_head`` (the registry), ``trainer()``
  (``inspector retrain``), ``import_official(...)`` (``inspector models import-official``), ``sample_options`` (``--samples``),
  ``bench_plan`` / ``bench_main_case`` / ``bench_report`` (``inspector bench``), ``score_closed_pool`` and
  ``eval_session`` (``inspector eval`` of detectors whose score belongs to a set of images, MuSc), and
  ``on_reviews`` (reviewer verdicts, for detectors that learn from the line);
* class descriptions: a detector whose text prompts name the class (``describes_classes``) takes a site's
  own words for a class (``set_class_descriptions({"head CT": "brain CT slice"})``, from a ``[[sources]]``
  ``class_description``) in place of the name; they are part of the model version's identity
  (``versions.with_class_descriptions``), so every result knows what it was scored with;
* exported runtimes (``inspector export``, ``[model] runtime``): ``scoring_graphs()`` names the encoder calls
  of the scoring path (the vision tower with the taps the detector reads, Bayes-PFL's text tower), each a
  method of the detector; the detector calls them through ``encode_graph(name, *inputs)``, which runs the
  method in torch, or the exported graph once ``inspector.exported`` has attached one (``exported``). The
  head and the post-processing always stay in torch.

Adding a detector means its folder, one line in ``inspector.detectors.KINDS`` and its settings section.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..backbone import BackboneSpec, ClipBackbone
from ..imaging import ImageInput, as_list, preprocess, to_model_input
from ..runtime import autocast, check


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


def fuse_live(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """The per-image product score as stored: no test-set statistics."""
    return np.array([r["live"] for r in rows], dtype=np.float64)


@dataclass(frozen=True)
class EvalProtocol:
    """How a method's paper turns raw outputs into metrics (``inspector eval``, official mode).

    smooth_sigma: Gaussian sigma applied to the maps before pixel metrics (0: none).
    fusion: the transductive image score over one class's test images, a function of its rows (each with
    ``text``, ``topk``, ``live``, ``map_max`` and ``map_min`` of ``anomaly_map``) to one score per row; a
    detector's own rule lives in its folder.
    """

    smooth_sigma: float = 0.0
    fusion: Callable[[Sequence[dict[str, Any]]], np.ndarray] = fuse_live

    def scores(self, rows: Sequence[dict[str, Any]]) -> np.ndarray:
        """Image scores of rows of any classes: ``fusion`` over the rows of each class."""
        out = np.empty(len(rows))
        for name in sorted({r["class_name"] for r in rows}):
            idx = [i for i, r in enumerate(rows) if r["class_name"] == name]
            out[idx] = self.fusion([rows[i] for i in idx])
        return out


BenchPlan = list[tuple[str, Callable[[], Any]]]


@dataclass(frozen=True)
class ScoringGraph:
    """One encoder call of a detector's scoring path, as ``inspector export`` traces it.

    fn:      a method of the detector, ``fn(*inputs) -> tuple of tensors`` (in the order of ``outputs``); the
             same method scores in torch, so the exported graph is the torch arithmetic, traced
    inputs:  input names, in call order; outputs: output names
    example: ``() -> inputs`` on the CPU, for tracing (any size along the ``dynamic`` axes)
    dynamic: {input or output name: {axis: symbolic name}}: the axes that vary at run time (the batch,
             Bayes-PFL's prompt count and length, WinCLIP's window count and size)
    """

    fn: Callable[..., Sequence[torch.Tensor]]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    example: Callable[[], tuple[torch.Tensor, ...]]
    dynamic: Mapping[str, Mapping[int, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Trainer:
    """How ``inspector retrain`` fits a detector (``Detector.trainer()``), the same for every detector.

    config: ``(train, text_epochs=None) -> config``: the trainer's config dataclass from the ``[train]``
            settings (flags already applied); a setting or flag the trainer cannot honour is refused with a
            ``UsageError``, never silently ignored.
    fit:    ``(model, records, config, run_dir, resume=False, progress=None) -> state`` with ``history``,
            ``epoch`` and ``stage``; trains the model in place, checkpoints in ``run_dir``.
    """

    config: Callable[..., Any]
    fit: Callable[..., Any]


class Detector(nn.Module, ABC):
    """Scores preprocessed images of named classes on a shared, frozen backbone."""

    name: ClassVar[str]
    default_backbone: ClassVar[BackboneSpec]
    trainable: ClassVar[bool] = False
    #: the settings section whose dataclass are this detector's options (None: it has none)
    section: ClassVar[str | None] = None
    eval_protocol: EvalProtocol = EvalProtocol()
    #: whether its text prompts name the class (then ``class_descriptions`` change its numbers)
    describes_classes: ClassVar[bool] = False

    def __init__(self, backbone: ClipBackbone, precision: str = "fp32",
                 provenance: Mapping[str, Any] | None = None):
        super().__init__()
        self.backbone = backbone
        self.precision = check(precision)
        self.provenance = dict(provenance or {})
        #: class name -> the words its text prompts use instead of the name (``set_class_descriptions``)
        self.class_descriptions: dict[str, str] = {}
        #: the exported graphs that replace ``scoring_graphs()`` (``inspector.exported.attach``), or None: torch
        self.exported: Any = None

    # ---------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def options_from(cls, settings: Any) -> Any:
        """This detector's typed options: the dataclass of its section of ``settings`` (None without one)."""
        return settings.section(cls.section) if cls.section else None

    @classmethod
    @abstractmethod
    def from_settings(cls, backbone: ClipBackbone, head: Any, options: Any, *, precision: str = "fp32",
                      provenance: Mapping[str, Any] | None = None) -> Detector:
        """A ready detector on ``backbone`` with its learnable part read from ``head`` (a file, or None:
        untrained or training-free) and its typed ``options``."""

    @classmethod
    def scoring_options(cls, options: Any, precision: str) -> dict[str, Any]:
        """What changes the numbers (part of a model version's identity): by default every field of the
        options and the precision setting."""
        fields = asdict(options) if is_dataclass(options) else {}
        return {**fields, "precision": precision}

    # ---------------------------------------------------------------------------------------------
    # what every detector shares

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def device(self) -> torch.device:
        return self.backbone.clip.visual.conv1.weight.device

    def autocast(self) -> contextlib.AbstractContextManager:
        """The autocast region of this detector's precision on its device (``inspector.runtime``)."""
        return autocast(self.device, self.precision)

    @torch.inference_mode()
    def encode_floor(self, pixels: torch.Tensor) -> torch.Tensor:
        """The plain backbone forward on [N, 3, S, S] (the floor ``inspector bench`` reports ratios to)."""
        with self.autocast():
            return self.backbone.encode_image_floor(pixels.to(self.device))

    def scoring_graphs(self) -> dict[str, ScoringGraph]:
        """The encoder calls of the scoring path, by name (``inspector export`` writes one graph each).
        Default: none (such a detector cannot be exported)."""
        return {}

    def encode_graph(self, name: str, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Run the scoring graph ``name`` on ``inputs``: the exported graph when one is attached and no
        gradient is asked for (training always runs in torch), else the detector's own method."""
        if self.exported is not None and not torch.is_grad_enabled():
            return self.exported.run(name, *inputs)
        return tuple(self.scoring_graphs()[name].fn(*inputs))

    def clear_caches(self) -> None:
        """Forget what was derived from weights or settings (text embeddings, anchors, ...)."""

    def set_class_descriptions(self, descriptions: Mapping[str, str]) -> None:
        """Describe classes in the site's words in the text prompts ({class name: description}); the text
        derived from the previous ones is forgotten. A detector without text prompts (``describes_classes``
        False) keeps them and scores as before."""
        self.class_descriptions = {str(k): str(v) for k, v in descriptions.items()}
        self.clear_caches()

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .half() must not keep stale cached tensors
        self.clear_caches()
        return super()._apply(fn, *args, **kwargs)

    def to_input(self, image: Any) -> torch.Tensor:
        """One RGB PIL image -> [3, S, S], this detector's paper's preprocessing (default: PIL bicubic resize
        of the 8-bit image to S x S, CLIP mean/std, as Bayes-PFL's and AA-CLIP's official code)."""
        return to_model_input(image, self.image_size)

    def preprocess(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """Images (paths or PIL) -> [N, 3, S, S] by ``to_input``."""
        return preprocess(images, self.image_size, self.to_input)

    @abstractmethod
    def predict_tensors(self, pixels: torch.Tensor, class_names: Sequence[str],
                        seeds: Sequence[int] | None = None, **options: Any) -> Prediction:
        """pixels: [N, 3, S, S] as ``to_input`` makes them -> Prediction. ``seeds``: per-image content seeds
        for detectors that draw noise (others ignore them)."""

    def predict(self, images: ImageInput | Sequence[ImageInput], class_names: str | Sequence[str],
                **options: Any) -> Prediction:
        """Score PIL images or file paths of the named classes (one name for all, or one per image)."""
        images = as_list(images)
        if isinstance(class_names, str):
            class_names = [class_names] * len(images)
        return self.predict_tensors(self.preprocess(images), class_names, **options)

    # ---------------------------------------------------------------------------------------------
    # optional hooks

    def save_head(self, path: Any) -> None:
        raise NotImplementedError(f"{self.name} is training-free: it has no head to save")

    def describe_head(self) -> dict[str, Any]:
        """What the registry writes about the learnable part in a manifest."""
        return {"training_free": not self.trainable}

    @classmethod
    def trainer(cls) -> Any:
        """The trainer ``inspector retrain`` calls (a ``Trainer``), or None for a training-free detector."""
        return None

    @classmethod
    def import_official(cls, clip: Any, **files: Any) -> tuple[Any, dict[str, Any]] | None:
        """``inspector models import-official``: (a ready detector, origin facts for the manifest) from the
        published checkpoint files, or None when the method publishes none."""
        return None

    def bench_main_case(self, samples: int) -> str:
        """The name of the case ``inspector bench`` compares across precisions and with the pipeline."""
        return self.name

    def sample_options(self, samples: int | None) -> dict[str, Any]:
        """Keyword options of ``predict_tensors`` for ``--samples`` (Monte-Carlo samples, for detectors that
        draw them; None: the detector's own). Default: none."""
        return {}

    def bench_plan(self, pixels: torch.Tensor, class_names: Sequence[str], samples: int,
                   references: int = 0) -> BenchPlan:
        """Timed cases besides the floor: (label, call). Default: one case named after the detector."""
        return [(self.name, lambda: self.predict_tensors(pixels, class_names))]

    def bench_report(self, pixels: torch.Tensor, class_names: Sequence[str], samples: int) -> dict[str, Any] | None:
        """Detector-specific facts for the bench report (agreements of approximate modes, memory, ...)."""
        return None

    @contextlib.contextmanager
    def isolated(self) -> Iterator[Detector]:
        """Predictions inside leave no state behind (bench agreement checks; MuSc: nothing joins its pools)."""
        yield self

    #: whether ``inspector eval`` (official mode) scores each class's test split as one closed pool
    closed_pool: ClassVar[bool] = False

    def score_closed_pool(self, pixels: torch.Tensor, class_name: str, dataset_classes: Sequence[str] = ()
                          ) -> Prediction:
        """The paper's transductive setting: all of one class's images [N, 3, S, S] scored as one set."""
        raise NotImplementedError(f"{self.name} scores images one by one, not as a closed pool")

    @contextlib.contextmanager
    def eval_session(self) -> Iterator[None]:
        """``inspector eval`` scores inside this (a detector with state restores it afterwards)."""
        yield

    def on_reviews(self, reviews: Sequence[Any], normals: Sequence[Any] = ()) -> None:
        """Reviewer verdicts from the line (for detectors that learn from it): ``reviews``, the images judged
        defects, and ``normals``, those accepted as normal, each a (class name, path, content key) tuple
        (``store.pool_reviews.PoolReview``), each image once by its latest verdict."""
