"""The MuSc detector: the official pool function (``score_pool``) and a rolling pool per class for a line.

See the package docstring (``inspector.detectors.musc``) for the paper, the symbols and the pool design.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...backbone import BackboneSpec, ClipBackbone, build_openai_clip, read_openai_state_dict
from ...imaging import ImageInput, as_list
from ...references import ReferenceStore, cached_encoding
from ...runtime import resolve
from ..base import BenchPlan, Detector, Prediction
from .ops import (
    FRACTION,
    K_LIST_MVTEC,
    dataset_k_list,
    lnamd,
    nearest_distances,
    nearest_distances_cdist,
    official_k,
    rscin,
    top_min_mean,
    upsample,
)
from .persist import PoolFiles

log = logging.getLogger(__name__)

#: the distance between two unit vectors never exceeds 2: the map of an image that had no reference
UNSCORED = 2.0
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_APPROX = ("none", "subsample")
#: images of a class scored before the drift check has its baseline / needs for a verdict: ``drift_window``
MIN_DRIFT_REFERENCES = 4  # images scored against fewer references are not counted (their scores run high)
#: verdicts remembered per class (``MuSc.on_reviews``): older ones are taken into account again after a restart
REVIEW_MEMORY = 4096


@dataclass
class _Drift:
    """Pool-level drift check of one class (``MuSc._drift_update``): the frozen baseline of image scores, the
    scores of the most recent images and whether joining the pool is paused."""

    baseline: list[float] = field(default_factory=list)
    recent: deque = field(default_factory=deque)
    drifting: bool = False

    def state(self) -> dict[str, Any]:
        return {"baseline": list(self.baseline), "recent": list(self.recent), "drifting": self.drifting}


@dataclass
class PoolScores:
    """``score_pool`` of one closed pool of N images (the paper's setting), on the model's device.

    anomaly_map:    [N, S, S] float64, the official map (mean nearest-patch distance, in [0, 2])
    grid_map:       [N, G, G] float64, the same before upsampling
    map_max:        [N] float64, the raw image score a_i (maximum of the S x S map)
    official_score: [N] float32, the official image score after RsCIN over the pool
    embeddings:     [N, E] the unit image embeddings RsCIN used
    """

    anomaly_map: torch.Tensor
    grid_map: torch.Tensor
    map_max: torch.Tensor
    official_score: torch.Tensor
    embeddings: torch.Tensor
    k_list: tuple[int, ...] = K_LIST_MVTEC


@dataclass
class _Pool:
    """Pooled images of one class: Z [capacity, R*T, L, C] (``count`` filled), unit g [capacity, E], content
    hashes and join ages (larger = newer) per slot, and the hashes a reviewer accepted as normal. Once full,
    a newcomer replaces the ``victim``: the oldest image no reviewer accepted, else the oldest."""

    features: torch.Tensor
    embeddings: torch.Tensor
    hashes: list[str] = field(default_factory=list)
    ages: list[int] = field(default_factory=list)
    accepted: set[str] = field(default_factory=set)
    fingerprint: tuple[str, ...] | None = None  # reference-store pools: the listing they were read from

    def __post_init__(self) -> None:
        if len(self.ages) != len(self.hashes):  # slot order is join order
            self.ages = list(range(len(self.hashes)))

    @property
    def count(self) -> int:
        return len(self.hashes)

    def next_age(self) -> int:
        return max(self.ages, default=-1) + 1

    def oldest_first(self) -> list[int]:
        return sorted(range(self.count), key=self.ages.__getitem__)

    def eviction_order(self) -> list[int]:
        """Slots in the order they leave a full pool: unaccepted images oldest first, then accepted ones."""
        return sorted(range(self.count), key=lambda s: (self.hashes[s] in self.accepted, self.ages[s]))


def _quantile(values: Sequence[float], q: float) -> float:
    """The q quantile of values, linear between order statistics (numpy's default)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def content_hash(pixels: torch.Tensor) -> str:
    """A short hash of one preprocessed image [3, S, S] (identical inputs = the same image)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=12).hexdigest()


class MuSc(Detector):
    """Training-free, text-free zero-shot detector. ``score_pool(images)``: the official function of a
    closed pool; ``predict(images, class_names)`` / ``predict_tensors``: live scoring with a rolling pool."""

    name = "musc"
    trainable = False
    default_backbone = BackboneSpec(arch="ViT-L-14-336", pretrained="openai", image_size=518,
                                    feature_layers=(6, 12, 18, 24), pos_embed_antialias=False)
    section = "musc"
    closed_pool = True

    def __init__(self, backbone: ClipBackbone, r_list: Sequence[int] = (1, 3, 5), fraction: float = FRACTION,
                 k_list: Sequence[int] = K_LIST_MVTEC, pool_size: int = 50, msm: str = "matmul",
                 memory_mb: int = 256, references: ReferenceStore | None = None, join_pool: bool = True,
                 pool_dtype: str = "float32", topk: int = 0, precision: str = "fp32", attention: str = "auto",
                 approx: str = "none", patch_budget: int = 256, drift_window: int = 16, drift_share: float = 0.5,
                 drift_quantile: float = 0.95, pool_dir: str | Path | None = None,
                 eval_k_list: Sequence[int] = (), provenance: Mapping[str, Any] | None = None):
        super().__init__(backbone, precision, provenance)
        if not backbone.spec.feature_layers:
            raise ValueError("MuSc needs feature layers (the official taps are blocks 6, 12, 18, 24)")
        if any(r < 1 or r % 2 == 0 for r in r_list):
            raise ValueError(f"LNAMD degrees must be odd and >= 1, got {list(r_list)}")
        if msm not in ("matmul", "cdist"):
            raise ValueError(f"msm must be 'matmul' or 'cdist', not '{msm}'")
        if attention not in ("auto", "sdpa", "explicit"):
            raise ValueError(f"attention must be 'auto', 'sdpa' or 'explicit', not '{attention}'")
        if pool_dtype not in _DTYPES:
            raise ValueError(f"pool_dtype must be one of {', '.join(_DTYPES)}, not '{pool_dtype}'")
        if pool_size < 0 or memory_mb < 1 or not 0 < fraction <= 1:
            raise ValueError("pool_size must be >= 0, memory_mb >= 1 and 0 < fraction <= 1")
        if approx not in _APPROX:
            raise ValueError(f"approx must be 'none' or 'subsample', not '{approx}'")
        if patch_budget < 1 or drift_window < 0 or not 0 < drift_share <= 1 or not 0 < drift_quantile <= 1:
            raise ValueError("patch_budget must be >= 1, drift_window >= 0, 0 < drift_share <= 1 and "
                             "0 < drift_quantile <= 1")
        self.layers = tuple(backbone.spec.feature_layers)
        self.r_list = tuple(int(r) for r in r_list)
        self.fraction = float(fraction)
        self.k_list = tuple(int(k) for k in k_list)
        self.pool_size = int(pool_size)
        self.msm = msm
        self.memory_mb = int(memory_mb)
        self.references = references
        self.join_pool = bool(join_pool)
        self.pool_dtype = pool_dtype
        self.topk = int(topk)
        self.attention = attention
        self.approx = approx
        self.patch_budget = int(patch_budget)
        self.drift_window, self.drift_share, self.drift_quantile = int(drift_window), float(drift_share), \
            float(drift_quantile)
        self.eval_k_list = tuple(int(k) for k in eval_k_list)
        self.bench_pools: tuple[int, ...] = (10, 50, 100, 200)
        self._pools: dict[str, _Pool] = {}  # class -> rolling pool of earlier images
        self._pinned: dict[str, _Pool] = {}  # class -> reference images (store or ``set_references``)
        self._drift: dict[str, _Drift] = {}  # class -> drift check state
        self._reviewed: dict[str, dict[str, str]] = {}  # class -> review key -> verdict taken into account
        self.files = PoolFiles(pool_dir) if pool_dir else None
        self._restored: set[str] = set()  # classes whose stored pool was read (or that were cleared)
        self._forget_disk = False  # clear_pools() of every class: nothing more is read from disk
        self._bench_agreement: dict[str, Any] | None = None

    # ---------------------------------------------------------------------------------------------
    # construction and the detector contract

    @classmethod
    def from_settings(cls, backbone: ClipBackbone, head: Any, options: Any, *, precision: str = "fp32",
                      provenance: Mapping[str, Any] | None = None) -> MuSc:
        """A MuSc on ``backbone`` with the ``[musc]`` options; ``head`` is ignored (training-free). The
        position embedding is resized again with ``[musc] pos_embed_antialias`` (plain bicubic by default,
        as the official loader) if the backbone was loaded with the other kernel."""
        if head:
            log.warning("MuSc is training-free: ignoring head %s", head)
        o = cls.scoring_options(options, precision)
        backbone.set_pos_embed_antialias(o["pos_embed_antialias"])
        pool_dir = (Path(options.pool_dir).expanduser() / cls.pool_key(o, backbone.spec)) if options.pool_dir else None
        o.pop("pos_embed_antialias")
        o.pop("reference_images")
        folder = o.pop("references")
        return cls(backbone, references=ReferenceStore(folder) if folder else None, provenance=provenance,
                   pool_dir=pool_dir, eval_k_list=list(options.eval_k_list), **o)

    @staticmethod
    def pool_key(options: Mapping[str, Any], spec: BackboneSpec) -> str:
        """The folder name of a model version's stored pools: a digest of the scoring options and the backbone
        (its weights by SHA-256 when they are a file, as the version identity in ``inspector.versions``)."""
        from ...hashing import cached_file_sha256 as file_sha256
        from ...hashing import digest_of

        source = Path(spec.pretrained).expanduser()
        weights = f"sha256:{file_sha256(source)}" if source.is_file() else spec.pretrained
        backbone = {"arch": spec.arch, "weights": weights, "clip_format": spec.clip_format,
                    "activation": spec.activation, "model_config": spec.model_config,
                    "image_size": spec.image_size, "feature_layers": list(spec.feature_layers)}
        return digest_of({"options": dict(options), "backbone": backbone})[:16]

    @classmethod
    def scoring_options(cls, options: Any, precision: str) -> dict[str, Any]:
        """The options that change the numbers (part of a model version's identity): ``[musc]``, the
        position-embedding kernel, the precision and the reference set. (The rolling pool is state, not
        identity: a score depends on the images before it, as the method does; so are its folder and the
        eval k list.)"""
        store = ReferenceStore(options.references) if options.references else None
        return {"r_list": [int(r) for r in options.r_list], "fraction": float(options.fraction),
                "k_list": [int(k) for k in options.k_list], "pool_size": int(options.pool_size),
                "join_pool": bool(options.join_pool), "msm": options.msm, "memory_mb": int(options.memory_mb),
                "pool_dtype": options.pool_dtype, "topk": int(options.topk), "attention": options.attention,
                "approx": options.approx, "patch_budget": int(options.patch_budget),
                "drift_window": int(options.drift_window), "drift_share": float(options.drift_share),
                "drift_quantile": float(options.drift_quantile), "precision": precision,
                "pos_embed_antialias": bool(options.pos_embed_antialias), "references": options.references,
                "reference_images": {name: list(store.fingerprint(name)) for name in store.classes()} if store else {}}

    @classmethod
    def from_official(cls, clip: str | Path, model_config: str | Path | dict | None = None, image_size: int = 518,
                      device: str | torch.device = "cpu", **options: Any) -> MuSc:
        """MuSc on OpenAI's CLIP file (``ViT-L-14-336px.pt``, TorchScript or state dict) as the official
        loader builds it: fp16-rounded weights run in fp32, exact GELU, the position embedding resized
        bicubic without antialias from the checkpoint's grid. ``model_config``: an open_clip JSON for
        checkpoints whose attention heads are not 64 wide. ``options``: the constructor's keywords."""
        spec = BackboneSpec(arch="ViT-L-14-336", pretrained=str(clip), clip_format="openai", activation="gelu",
                            image_size=image_size, feature_layers=(6, 12, 18, 24),
                            model_config=str(model_config) if isinstance(model_config, (str, Path)) else "",
                            pos_embed_antialias=False)
        # built at the checkpoint's own size, so that the one resize is ClipBackbone's (without antialias)
        model = build_openai_clip(read_openai_state_dict(clip), "gelu", model_config or None, image_size=None)
        provenance = {"model": None, "backbone": f"official:{Path(clip).name}", "random_weights": False}
        return cls(ClipBackbone(model, spec), provenance=provenance, **options).to(device)

    def save_head(self, path: str | Path) -> None:
        raise NotImplementedError("MuSc is training-free: it has no head to save (its pool lives in memory; "
                                  "reference images in the reference store, `inspector references add`)")

    def describe_head(self) -> dict[str, Any]:
        return {"training_free": True, "r_list": list(self.r_list), "fraction": self.fraction,
                "k_list": list(self.k_list), "pool_size": self.pool_size, "msm": self.msm,
                "pool_dtype": self.pool_dtype, "pos_embed_antialias": self.backbone.spec.pos_embed_antialias,
                "approx": self.approx, "patch_budget": self.patch_budget if self.approx != "none" else None,
                "bytes_per_pooled_image": self.bytes_per_pooled_image(),
                "pool_dir": str(self.files.folder) if self.files else None}

    def bytes_per_pooled_image(self) -> int:
        """Memory of one pooled image: R*T LNAMD maps of L' x C values in ``pool_dtype`` (+ its embedding);
        L' = L, or ``patch_budget`` with ``approx = "subsample"``."""
        width = self.backbone.vision_width
        item = torch.empty((), dtype=_DTYPES[self.pool_dtype]).element_size()
        return len(self.r_list) * len(self.layers) * self.memory_length * width * item + self.backbone.embed_dim * 4

    @property
    def memory_length(self) -> int:
        """Patches of an image as a reference (L, or the subsample budget L' = min(patch_budget, L))."""
        length = self.backbone.grid ** 2
        return length if self.approx == "none" else min(self.patch_budget, length)

    def patch_subset(self, digest: str) -> torch.Tensor:
        """The patches an image keeps as a reference with ``approx = "subsample"``: ``memory_length`` indices
        of its L patches, drawn without replacement from a generator seeded by its content hash (the same
        image always keeps the same patches, whatever pool or slot it is in), sorted."""
        length = self.backbone.grid ** 2
        gen = torch.Generator().manual_seed(int(digest[:15], 16))
        return torch.randperm(length, generator=gen)[:self.memory_length].sort().values

    def as_memory(self, z: torch.Tensor, hashes: Sequence[str]) -> torch.Tensor:
        """Z [M, R*T, L, C] of images used as references -> [M, R*T, L', C]: itself (exact mode), or each
        image's ``patch_subset`` (approximate mode: the nearest-patch search runs over L' patches)."""
        if self.approx == "none" or self.memory_length == z.shape[2]:
            return z
        index = torch.stack([self.patch_subset(h) for h in hashes]).to(z.device)  # [M, L']
        return torch.stack([z[i][:, index[i]] for i in range(z.shape[0])]) if len(hashes) else z[:, :, :0]

    def _apply(self, fn, *args, **kwargs):
        """``.to(device)``: the pooled features follow the model. Unlike other detectors' caches the pools are
        state, not derived values, so ``Detector._apply``'s ``clear_caches`` (``clear_pools`` here, which also
        stops reading ``pool_dir``) is skipped: the CLI moves every model to its device after loading it."""
        for pools in (self._pools, self._pinned):
            for key, p in pools.items():
                pools[key] = _Pool(fn(p.features), fn(p.embeddings), p.hashes, p.ages, p.accepted, p.fingerprint)
        return nn.Module._apply(self, fn, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------
    # features

    def features(self, pixels: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [N, 3, S, S] -> (Z [N, R*T, L, C] fp32 unit rows, index r_index * T + t_index; g/|g| [N, E]).

        The backbone's raw residual stream after each tap (no ln_post), then LNAMD per r."""
        grid = self.backbone.grid
        z, g = [], []
        for start in range(0, pixels.shape[0], chunk):
            pooled, *taps = self.encode_graph("vision", pixels[start:start + chunk].to(self.device))
            g.append(F.normalize(pooled.float(), dim=-1))
            z.append(torch.stack([lnamd(t.float(), grid, r) for r in self.r_list for t in taps], dim=1))
        if not z:
            length, width = grid * grid, self.backbone.vision_width
            return (torch.empty(0, len(self.r_list) * len(self.layers), length, width, device=self.device),
                    torch.empty(0, self.backbone.embed_dim, device=self.device))
        return torch.cat(z), torch.cat(g)

    def vision_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The "vision" graph: pixels [N, 3, S, S] -> (g [N, E] not normalised, the raw residual stream after
        each tap layer, CLS dropped: [N, L, W] per layer)."""
        attention = "sdpa" if self.attention == "auto" else self.attention
        tokens = self.backbone.embed_image(pixels)
        with self.autocast():
            x, taps = self.backbone.run_vision(tokens, self.layers, attention=attention)
            return (self.backbone.pool(x), *taps)

    def scoring_graphs(self) -> dict[str, Any]:
        """The vision tower with its taps (LNAMD, the mutual scoring and the pools stay in torch)."""
        from ..base import ScoringGraph

        size = self.image_size
        taps = tuple(f"tap_{layer}" for layer in self.layers)
        return {"vision": ScoringGraph(self.vision_outputs, ("pixels",), ("g", *taps),
                                       lambda: (torch.randn(2, 3, size, size),),
                                       {"pixels": {0: "batch"}, "g": {0: "batch"}, **{t: {0: "batch"} for t in taps}})}

    # ---------------------------------------------------------------------------------------------
    # mutual scoring

    def _nearest(self, query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        if self.msm == "cdist":
            return nearest_distances_cdist(query, memory)
        return nearest_distances(query, memory, self.memory_mb * 2**20)

    def mutual_scores(self, query: torch.Tensor, sources: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      k: torch.Tensor) -> torch.Tensor:
        """query Z [B, R*T, L, C]; sources: (Z [M_s, R*T, L, C], excluded [B, M_s]) -> grid map [B, G, G]
        float64: per (r, tap) the mean of the k_i smallest nearest-patch distances, then the mean over
        taps and over r."""
        grid, taps = self.backbone.grid, len(self.layers)
        excluded = torch.cat([e for _, e in sources], dim=1)
        per_r = []
        for ri in range(len(self.r_list)):
            per_tap = []
            for ti in range(taps):
                c = ri * taps + ti
                d = torch.cat([self._nearest(query[:, c], z[:, c]) for z, _ in sources], dim=-1)  # [B, L, M]
                per_tap.append(top_min_mean(d, excluded, k).double())
            per_r.append(torch.stack(per_tap).mean(0))
        return torch.stack(per_r).mean(0).view(-1, grid, grid)

    @torch.inference_mode()
    def score_pool(self, images: Sequence[ImageInput] | torch.Tensor, class_name: str | None = None,
                   k_list: Sequence[int] | None = None) -> PoolScores:
        """The official function of one closed pool of N >= 5 images of a class (paths, PIL images or
        pixels [N, 3, S, S]): every image against all the others (self excluded by position, duplicates
        not, as the official code), then RsCIN with ``k_list`` (default ``[musc] k_list``; the official
        code takes [1, 8, 9] for VisA, ``ops.official_k_list``). Nothing is pooled; ``class_name`` is
        only recorded by callers."""
        del class_name
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(as_list(images))
        n = pixels.shape[0]
        k = official_k(n - 1, self.fraction)
        if k < 1:
            raise ValueError(f"MuSc needs a pool of at least {self._minimum_pool()} images, got {n} "
                             "(the official code returns NaN maps)")
        z, g = self.features(pixels)
        excluded = torch.eye(n, dtype=torch.bool, device=z.device)
        memory = self.as_memory(z, [content_hash(p) for p in pixels]) if self.approx != "none" else z
        grid_map = self.mutual_scores(z, [(memory, excluded)], torch.full((n,), k, device=z.device))
        anomaly_map = upsample(grid_map, self.image_size)
        map_max = anomaly_map.flatten(1).amax(1)
        k_list = tuple(self.k_list if k_list is None else k_list)
        return PoolScores(anomaly_map, grid_map, map_max, rscin(map_max, g, k_list), g, k_list)

    @torch.inference_mode()
    def score_closed_pool(self, pixels: torch.Tensor, class_name: str, dataset_classes: Sequence[str] = ()
                          ) -> Prediction:
        """The eval hook of a transductive detector (``inspector.evaluation.score_dataset``, official mode):
        one class's whole test split [N, 3, S, S] as one closed pool, as the paper evaluates. ``image_score``
        is the RsCIN score, with ``[musc] eval_k_list`` or, when that is empty, the k list the official code
        would pick for the dataset (``dataset_k_list(dataset_classes)``: [1, 8, 9] for VisA, else [1, 2, 3]),
        each k clamped to N; ``anomaly_map`` is the official map, ``probability_map`` = map / 2. The rolling
        pools are neither used nor changed."""
        n = pixels.shape[0]
        chosen = self.eval_k_list or dataset_k_list(list(dataset_classes) or [class_name])
        k_list = tuple(min(int(k), n) for k in chosen)
        if k_list != tuple(chosen):
            log.warning("MuSc class '%s': %d images, RsCIN k list %s clamped to %s", class_name, n, list(chosen),
                        list(k_list))
        scores = self.score_pool(pixels, class_name, k_list=k_list)
        anomaly_map = scores.anomaly_map.float()
        probability_map = (anomaly_map / 2).clamp(0, 1)
        image_score = scores.official_score.float()
        provenance = {**self.provenance, "detector": self.name, "precision": resolve(self.precision, self.device),
                      "mode": "closed pool (the paper's batch setting): the class's images score each other, "
                      "image score after RsCIN", "k_list": list(k_list), "pool": n, "approx": self.approx,
                      "map_max": scores.map_max.tolist()}
        return Prediction(anomaly_map=anomaly_map, image_score=image_score, text_score=image_score.clone(),
                          topk_score=self.topk_scores(probability_map), provenance=provenance,
                          probability_map=probability_map)

    def _minimum_pool(self) -> int:
        n = 2
        while official_k(n - 1, self.fraction) < 1:
            n += 1
        return n

    # ---------------------------------------------------------------------------------------------
    # pools for live scoring

    def _empty_pool(self, capacity: int) -> _Pool:
        length, width = self.memory_length, self.backbone.vision_width
        combos = len(self.r_list) * len(self.layers)
        return _Pool(torch.empty(capacity, combos, length, width, dtype=_DTYPES[self.pool_dtype], device=self.device),
                     torch.empty(capacity, self.backbone.embed_dim, device=self.device))

    def _push(self, pool: _Pool, z: torch.Tensor, g: torch.Tensor, digest: str, capacity: int,
              accepted: bool = False) -> _Pool:
        """Add one image (Z [R*T, L, C]) to a pool (growing by doubling up to ``capacity``, then replacing the
        pool's ``victim``: the oldest image no reviewer accepted, else the oldest); in approximate mode only
        its ``patch_subset`` is kept. ``accepted``: a reviewer accepted it as normal."""
        z = self.as_memory(z[None], [digest])[0]
        age = pool.next_age()
        if pool.count < capacity:
            if pool.count == pool.features.shape[0]:
                bigger = self._empty_pool(min(capacity, max(4, 2 * pool.count)))
                bigger.features[:pool.count] = pool.features[:pool.count]
                bigger.embeddings[:pool.count] = pool.embeddings[:pool.count]
                bigger.hashes, bigger.ages, bigger.accepted = pool.hashes, pool.ages, pool.accepted
                pool = bigger
            slot = pool.count
            pool.hashes.append(digest)
            pool.ages.append(age)
        else:
            slot = pool.eviction_order()[0]
            pool.accepted.discard(pool.hashes[slot])
            pool.hashes[slot] = digest
            pool.ages[slot] = age
        if accepted:
            pool.accepted.add(digest)
        pool.features[slot] = z.to(pool.features.dtype)
        pool.embeddings[slot] = g
        return pool

    def pool_add(self, class_name: str, images: Sequence[ImageInput] | torch.Tensor) -> int:
        """Add images (paths, PIL or pixels [K, 3, S, S]) to the rolling pool of a class without scoring
        them (a lot of known-good parts, or a pool rebuilt after a restart); duplicates are skipped.
        Returns the pool's size."""
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(as_list(images))
        with torch.inference_mode():
            z, g = self.features(pixels)
            if self._join(class_name, z, g, [content_hash(p) for p in pixels]):
                self._save(class_name)
        return self.pool_count(class_name)

    def _join(self, class_name: str, z: torch.Tensor, g: torch.Tensor, hashes: Sequence[str]) -> bool:
        """Push the images that are neither pooled nor references; whether the pool changed."""
        if self.pool_size == 0:
            return False
        pool = self._rolling(class_name) or self._empty_pool(0)
        pinned = self._pinned.get(class_name)
        known = set(pool.hashes) | set(pinned.hashes if pinned else ())
        changed = False
        for i, digest in enumerate(hashes):
            if digest not in known:
                pool = self._push(pool, z[i], g[i], digest, self.pool_size)
                known.add(digest)
                changed = True
        self._pools[class_name] = pool
        return changed

    def pool_count(self, class_name: str) -> int:
        pool = self._rolling(class_name)
        return pool.count if pool is not None else 0

    def pool_hashes(self, class_name: str) -> list[str]:
        """Content hashes of the rolling pool of a class, oldest first."""
        pool = self._rolling(class_name)
        if pool is None:
            return []
        return [pool.hashes[s] for s in pool.oldest_first()]

    def pool_accepted(self, class_name: str) -> list[str]:
        """Content hashes of the rolling pool's images that a reviewer accepted as normal, oldest first."""
        pool = self._rolling(class_name)
        return [] if pool is None else [h for h in self.pool_hashes(class_name) if h in pool.accepted]

    # ---------------------------------------------------------------------------------------------
    # pools on disk (``persist.py``): read on a class's first use, written after each change

    def _rolling(self, class_name: str) -> _Pool | None:
        """The rolling pool of a class, read from ``pool_dir`` the first time the class is used."""
        if self.files is not None and class_name not in self._restored and not self._forget_disk:
            self._restored.add(class_name)
            combos = len(self.r_list) * len(self.layers)
            shape = (combos, self.memory_length, self.backbone.vision_width)
            stored = self.files.load(class_name, self.device, shape, _DTYPES[self.pool_dtype])
            if stored is not None:
                pool = _Pool(stored["features"], stored["embeddings"], list(stored["hashes"]), list(stored["ages"]),
                             set(stored["accepted"]) & set(stored["hashes"]))
                if pool.count > max(self.pool_size, 0):  # the cap applies to what was stored too
                    keep = sorted(pool.eviction_order()[pool.count - self.pool_size:])
                    index = torch.tensor(keep, dtype=torch.long, device=pool.features.device)
                    pool = _Pool(pool.features[index], pool.embeddings[index.to(pool.embeddings.device)],
                                 [pool.hashes[i] for i in keep], [pool.ages[i] for i in keep], pool.accepted)
                    pool.accepted &= set(pool.hashes)
                hashes = pool.hashes
                if hashes:
                    self._pools[class_name] = pool
                self._reviewed[class_name] = dict(stored["reviewed"])
                drift = stored["drift"]
                if drift:
                    self._drift[class_name] = _Drift([float(v) for v in drift.get("baseline", [])],
                                                     deque((float(v) for v in drift.get("recent", [])),
                                                           maxlen=max(self.drift_window, 1)),
                                                     bool(drift.get("drifting", False)))
                log.info("class '%s': MuSc pool of %d image(s) restored from %s", class_name, len(hashes),
                         self.files.class_dir(class_name))
        return self._pools.get(class_name)

    def _save(self, class_name: str) -> None:
        """Write the pool and drift state of a class to ``pool_dir`` (nothing without one)."""
        if self.files is None:
            return
        pool = self._pools.get(class_name) or self._empty_pool(0)
        count = pool.count
        features = {pool.hashes[i]: pool.features[i] for i in range(count)}
        drift = self._drift.get(class_name)
        self.files.save(class_name, features, list(pool.hashes), list(pool.ages), pool.embeddings[:count],
                        drift.state() if drift else {}, accepted=sorted(pool.accepted),
                        reviewed=self._reviewed.get(class_name, {}))

    def on_reviews(self, defects: Sequence[Sequence[str]], normals: Sequence[Sequence[str]] = ()) -> int:
        """Reviewer verdicts from the line (``pipeline.Models.sync_reviews``, ``store.pool_reviews``), each a
        (class name, image path[, content key]) tuple, each image once by its latest verdict:

        * ``defects``: a rejected image leaves its class's rolling pool (by content), so a rejected part is
          never a reference of normality;
        * ``normals``: an accepted image is marked *accepted* in the pool, and evicted last (a full pool
          replaces its oldest unaccepted image first; only a pool of accepted images replaces an accepted
          one). An accepted image that is not pooled (evicted already, kept out while the class drifted, or
          scored by another model version) is admitted again, without scoring; only the newest
          ``pool_size`` accepted images of a class per call are considered.

        Only classes with a rolling pool (in memory or in ``pool_dir``) are concerned: the verdicts of other
        lines' classes are ignored.

        A verdict taken into account is remembered by its key (the file's SHA-256 from the store) and
        stored with the pool, so a restarted worker, which is sent every review again, neither re-reads
        those images nor changes its pool. Returns how many pool entries were removed; an image that is
        gone or unreadable is skipped (and tried again at the next restart)."""
        removed, touched = 0, set()
        for entry in defects:
            class_name, path = entry[0], entry[1]
            key = entry[2] if len(entry) > 2 else path
            pool = self._rolling(class_name)
            if pool is None or self._reviewed.get(class_name, {}).get(key) == "defect":
                continue  # a class this model has no pool of (another line's), or a verdict already applied
            try:
                removed += self.pool_remove(class_name, [path])
            except (OSError, ValueError) as exc:
                log.warning("MuSc: cannot take rejected %s out of the %s pool: %s", path, class_name, exc)
                continue
            self._remember(class_name, key, "defect")
            touched.add(class_name)
        for class_name in touched:
            self._save(class_name)
        for class_name in dict.fromkeys(e[0] for e in normals):
            if self._rolling(class_name) is None:
                continue  # a class this model has no pool of: nothing is admitted before it scores one
            wanted = [e for e in normals if e[0] == class_name][-self.pool_size:] if self.pool_size else []
            seen = self._reviewed.setdefault(class_name, {})
            fresh = [e for e in wanted if seen.get(e[2] if len(e) > 2 else e[1]) != "normal"]
            if fresh:
                self._accept(class_name, fresh)
        return removed

    def _accept(self, class_name: str, entries: Sequence[Sequence[str]]) -> None:
        """Mark reviewer-accepted images of a class (already pooled) or admit them (not pooled); see
        ``on_reviews``. Admission ignores a drift pause: a reviewer vouched for these images."""
        pool = self._rolling(class_name) or self._empty_pool(0)
        pinned = self._pinned.get(class_name)
        pixels, digests, keys = [], [], []
        for entry in entries:
            key = entry[2] if len(entry) > 2 else entry[1]
            try:
                x = self.preprocess(as_list([entry[1]]))[0]
            except (OSError, ValueError) as exc:
                log.warning("MuSc: cannot read accepted %s for the %s pool: %s", entry[1], class_name, exc)
                continue
            digest = content_hash(x)
            keys.append(key)
            if digest in pool.hashes:
                pool.accepted.add(digest)
            elif not (pinned and digest in pinned.hashes) and digest not in digests:
                pixels.append(x)
                digests.append(digest)
        if digests:
            with torch.inference_mode():
                z, g = self.features(torch.stack(pixels))
                for i, digest in enumerate(digests):
                    pool = self._push(pool, z[i], g[i], digest, self.pool_size, accepted=True)
            log.info("class '%s': %d reviewer-accepted image(s) admitted to the MuSc pool", class_name, len(digests))
        if pool.count:
            self._pools[class_name] = pool
        for key in keys:
            self._remember(class_name, key, "normal")
        self._save(class_name)

    def _remember(self, class_name: str, key: str, verdict: str) -> None:
        """Record a verdict taken into account (bounded: the newest ``REVIEW_MEMORY`` keys of a class)."""
        seen = self._reviewed.setdefault(class_name, {})
        seen.pop(key, None)
        seen[key] = verdict
        for old in list(seen)[:max(0, len(seen) - REVIEW_MEMORY)]:
            del seen[old]

    def pool_remove(self, class_name: str, images: Sequence[ImageInput] | torch.Tensor) -> int:
        """Take images out of the rolling pool of a class (a reviewer rejected them as defects), by
        content. Returns how many were removed."""
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(as_list(images))
        drop = {content_hash(p) for p in pixels}
        pool = self._rolling(class_name)
        if pool is None:
            return 0
        keep = [slot for slot in pool.oldest_first() if pool.hashes[slot] not in drop]
        if len(keep) == pool.count:
            return 0
        fresh = self._empty_pool(max(len(keep), 1))
        index = torch.tensor(keep, dtype=torch.long, device=pool.features.device)
        fresh.features[:len(keep)] = pool.features[index]
        fresh.embeddings[:len(keep)] = pool.embeddings[index]
        fresh.hashes = [pool.hashes[s] for s in keep]
        fresh.ages = [pool.ages[s] for s in keep]
        fresh.accepted = pool.accepted & set(fresh.hashes)
        self._pools[class_name] = fresh
        self._save(class_name)
        return pool.count - len(keep)

    def clear_pools(self, class_name: str | None = None) -> None:
        """Forget the rolling pool and drift state of one class (or all) and the reference images read from
        the store, in memory: the files in ``pool_dir`` stay until the class's pool next changes (then they
        are replaced), and are not read again by this instance."""
        for pools in (self._pools, self._pinned, self._drift, self._reviewed):
            for key in [class_name] if class_name is not None else list(pools):
                pools.pop(key, None)
        if class_name is None:
            self._forget_disk = True
        else:
            self._restored.add(class_name)

    clear_caches = clear_pools

    def set_references(self, class_name: str, images: Sequence[ImageInput] | torch.Tensor | None) -> None:
        """Pin reference images (normal parts) of a class: always in its pool, never replaced. ``None``
        unpins (the reference store, if any, applies again)."""
        if images is None:
            self._pinned.pop(class_name, None)
            return
        pixels = images if isinstance(images, torch.Tensor) else self.preprocess(as_list(images))
        if pixels.shape[0] == 0:
            raise ValueError("no reference images given (use None to unpin)")
        self._pinned[class_name] = self._reference_pool(pixels, None)

    def _reference_pool(self, pixels: torch.Tensor, fingerprint: tuple[str, ...] | None) -> _Pool:
        with torch.inference_mode():
            z, g = self.features(pixels)
        pool = _Pool(z.to(_DTYPES[self.pool_dtype]), g, [content_hash(p) for p in pixels], fingerprint=fingerprint)
        return pool

    def reference_pool(self, class_name: str) -> _Pool | None:
        """The pinned references of a class, or those of the reference store (re-read when it changed)."""
        def encode(paths: list[Path], fingerprint: tuple[str, ...]) -> _Pool:
            log.info("class '%s': MuSc pool seeded with %d reference image(s) from %s", class_name, len(paths),
                     self.references.folder)
            return self._reference_pool(self.preprocess(paths), fingerprint)

        return cached_encoding(self.references, class_name, self._pinned, encode)

    # ---------------------------------------------------------------------------------------------
    # live scoring

    def topk_scores(self, probability_map: torch.Tensor) -> torch.Tensor:
        flat = probability_map.flatten(1)
        k = min(self.topk or max(1, flat.shape[1] // 100), flat.shape[1])
        return flat.topk(k, dim=1).values.mean(1)

    def _score_class(self, z: torch.Tensor, hashes: list[str], class_name: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """Z of a class's batch images -> (grid map [B, G, G] float64, references per image [B])."""
        b = z.shape[0]
        same = torch.tensor([[a == c for c in hashes] for a in hashes], dtype=torch.bool, device=z.device)
        sources = [(self.as_memory(z, hashes), same | torch.eye(b, dtype=torch.bool, device=z.device))]
        batch = set(hashes)
        for pool in (self.reference_pool(class_name), self._rolling(class_name)):
            if pool is not None and pool.count:
                # an entry with the content of any batch image is left out: that image is a reference
                # already (or the query itself), and each content counts once
                known = torch.tensor([c in batch for c in pool.hashes], dtype=torch.bool, device=z.device)
                sources.append((pool.features[:pool.count], known[None].expand(b, -1)))
        excluded = torch.cat([e for _, e in sources], dim=1)
        references = (~excluded).sum(1)
        # small pools: at least the nearest image (the official k = int(0.3 m) is 0 below m = 4: NaN)
        k = torch.tensor([max(1, official_k(int(m), self.fraction)) for m in references], device=z.device)
        grid_map = self.mutual_scores(z, sources, k)
        grid_map[references == 0] = UNSCORED
        return grid_map, references

    @torch.inference_mode()
    def predict_tensors(self, pixels: torch.Tensor, class_names: Sequence[str],
                        seeds: Sequence[int] | None = None) -> Prediction:
        """pixels [N, 3, S, S] CLIP-normalised -> Prediction. Each image is scored against the other images
        of its class in this batch and the class's pool (reference images + earlier images); then the batch
        joins the pool. ``seeds`` is unused (nothing is random)."""
        del seeds
        class_names = list(class_names)
        n, size = pixels.shape[0], self.image_size
        if len(class_names) != n:
            raise ValueError(f"{n} images but {len(class_names)} class names")
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [N, 3, {size}, {size}], got {tuple(pixels.shape)}")
        z, g = self.features(pixels)
        hashes = [content_hash(p) for p in pixels]
        grid_map = torch.empty(n, self.backbone.grid, self.backbone.grid, dtype=torch.float64, device=z.device)
        references = torch.zeros(n, dtype=torch.long, device=z.device)
        for name in dict.fromkeys(class_names):
            idx = [i for i, c in enumerate(class_names) if c == name]
            index = torch.tensor(idx, device=z.device)
            grid_map[index], references[index] = self._score_class(z[index], [hashes[i] for i in idx], name)
        anomaly_map = upsample(grid_map, size).float()
        probability_map = (anomaly_map / 2).clamp(0, 1)
        image_score = probability_map.flatten(1).amax(1)
        drift = {}
        for name in dict.fromkeys(class_names):
            idx = [i for i, c in enumerate(class_names) if c == name]
            counted = [float(image_score[i]) for i in idx if int(references[i]) >= MIN_DRIFT_REFERENCES]
            drift[name] = self._drift_update(name, counted)
            if self.join_pool:
                index = torch.tensor(idx, device=z.device)
                joined = not drift[name]["drifting"] and self._join(name, z[index], g[index],
                                                                    [hashes[i] for i in idx])
                drift[name]["joined"] = not drift[name]["drifting"]
                if joined or counted:
                    self._save(name)
        unscored = references == 0
        provenance = {**self.provenance, "detector": self.name, "precision": resolve(self.precision, self.device),
                      "text_score": "none (MuSc has no text): "
                      "the image score", "references": references.tolist(), "unscored": int(unscored.sum()),
                      "pool": {name: self.pool_count(name) for name in dict.fromkeys(class_names)},
                      "pool_drift": drift, "approx": self.approx}
        if unscored.any():
            log.warning("MuSc: %d image(s) had no other image of their class to be compared with (warm-up); "
                        "they get the highest score (flagged for review)", int(unscored.sum()))
        return Prediction(anomaly_map=anomaly_map, image_score=image_score, text_score=image_score.clone(),
                          topk_score=self.topk_scores(probability_map), provenance=provenance,
                          probability_map=probability_map)

    def _drift_update(self, class_name: str, scores: Sequence[float]) -> dict[str, Any]:
        """The pool-level drift check of a class after a batch; ``scores``: its image scores (of images with
        at least ``MIN_DRIFT_REFERENCES`` references). The rule:

        * baseline: the first ``drift_window`` such scores of the class (of this model version), frozen;
          threshold t = their ``drift_quantile`` quantile (0.95: about the largest normal score);
        * recent: the scores of the last ``drift_window`` images, joined or not;
        * drift when the recent window is full and a share >= ``drift_share`` (0.5) of it is above t: a run
          of images unlike the class's early production. While drifting the class's images do **not** join
          the pool (it cannot learn a systematic defect as normal), a warning is logged for every batch and
          ``provenance["pool_drift"][class]["drifting"]`` is true; it ends by itself once the recent share
          falls below ``drift_share`` again (the line is back to normal), or with ``drift_reset``.

        A defect pattern scores high while it is new; without the pause it would score low once about
        ``fraction`` of the pool showed it. ``drift_window = 0`` turns the check off."""
        if self.drift_window == 0:
            return {"state": "off", "drifting": False}
        state = self._drift.get(class_name)
        if state is None:
            state = self._drift[class_name] = _Drift(recent=deque(maxlen=self.drift_window))
        for value in scores:
            if len(state.baseline) < self.drift_window:
                state.baseline.append(float(value))
            else:
                state.recent.append(float(value))
        if len(state.baseline) < self.drift_window:
            return {"state": "collecting baseline", "drifting": False, "baseline": len(state.baseline),
                    "window": self.drift_window}
        threshold = _quantile(state.baseline, self.drift_quantile)
        high = sum(v > threshold for v in state.recent)
        share = high / len(state.recent) if state.recent else 0.0
        was = state.drifting
        state.drifting = len(state.recent) == self.drift_window and share >= self.drift_share
        if state.drifting:
            log.warning("MuSc class '%s': POOL DRIFT: %d of the last %d images score above %.4f (the %.2f quantile "
                        "of the class's first %d); these images do not join the pool until the share falls "
                        "below %.2f (a run of one defect would otherwise be learned as normal)", class_name,
                        high, len(state.recent), threshold, self.drift_quantile, self.drift_window, self.drift_share)
        elif was:
            log.warning("MuSc class '%s': pool drift over (%d of the last %d above %.4f); joining resumes",
                        class_name, high, len(state.recent), threshold)
        return {"state": "drift" if state.drifting else "ok", "drifting": state.drifting, "share": share,
                "threshold": threshold, "window": self.drift_window}

    def drift_reset(self, class_name: str) -> None:
        """Forget the drift baseline and window of a class (after a product change, say): the next
        ``drift_window`` scores form a new baseline."""
        self._rolling(class_name)
        self._drift.pop(class_name, None)
        self._save(class_name)

    @contextlib.contextmanager
    def isolated(self):
        """Predictions that leave the rolling pools as they were (nothing joins them)."""
        join, self.join_pool = self.join_pool, False
        try:
            yield self
        finally:
            self.join_pool = join

    @contextlib.contextmanager
    def eval_session(self):
        """``inspector eval`` (``evaluation.score_dataset``): score a dataset from empty rolling pools held in
        memory only (no stored pool read or written, so an eval never mixes with a line's pools), then give the
        instance back its pools as they were."""
        saved = (self.files, self._pools, self._drift, self._reviewed, self._restored, self._forget_disk)
        self.files, self._pools, self._drift, self._reviewed, self._restored, self._forget_disk = \
            None, {}, {}, {}, set(), False
        try:
            yield self
        finally:
            self.files, self._pools, self._drift, self._reviewed, self._restored, self._forget_disk = saved

    # ---------------------------------------------------------------------------------------------
    # bench hooks (``inspector bench``)

    def bench_plan(self, pixels: torch.Tensor, class_names: Sequence[str], samples: int = 0,
                   references: int = 0) -> BenchPlan:
        """Timed cases for ``inspector bench``: the batch scored live against a pool of N - 1 earlier images
        (N = ``pool_size`` + 1 as "musc", and each N of ``bench_pools``). The pool images are shifted copies
        of the bench images, encoded once outside the timing; the pool is restored after each call, and no
        stored pool is read for the bench class. With ``approx = "none"`` and a ``patch_budget`` below L, one
        more case times the subsampled search at the largest N, and ``bench_report()["approx_agreement"]``
        compares the two modes."""
        name = class_names[0]
        self._restored.add(name)
        sizes = [self.pool_size + 1] + [s for s in self.bench_pools if s != self.pool_size + 1]
        needed = max(sizes) - 1
        copies = [pixels[i % pixels.shape[0]].roll((7 * (i + 1), 3 * (i + 1)), dims=(-2, -1)) for i in range(needed)]
        with torch.inference_mode():
            z, g = self.features(torch.stack(copies)) if copies else self.features(pixels[:0])
        hashes = [f"{i:024x}" for i in range(needed)]
        memories = {self.approx: self.as_memory(z, hashes).to(_DTYPES[self.pool_dtype])}
        if self.approx == "none":  # the subsampled pool of the approximate case, cut outside the timing
            self.approx = "subsample"
            try:
                memories["subsample"] = self.as_memory(z, hashes).to(_DTYPES[self.pool_dtype])
            finally:
                self.approx = "none"

        def case(count: int) -> Callable[[], Any]:
            def run() -> Any:
                saved, join = self._pools.get(name), self.join_pool
                self._pools[name] = _Pool(memories[self.approx][:count], g[:count], hashes[:count])
                self.join_pool = False
                try:
                    return self.predict_tensors(pixels, [name] * pixels.shape[0])
                finally:
                    self.join_pool = join
                    if saved is None:
                        self._pools.pop(name, None)
                    else:
                        self._pools[name] = saved
            return run

        plan = [("musc" if i == 0 else f"musc N={s}", case(s - 1)) for i, s in enumerate(sizes)]
        self._bench_agreement = self._approx_agreement(z, hashes)
        if self.approx == "none" and self._bench_agreement is not None:
            def fast(run: Callable[[], Any]) -> Callable[[], Any]:
                def timed() -> Any:
                    self.approx = "subsample"
                    try:
                        return run()
                    finally:
                        self.approx = "none"
                return timed

            largest = max(sizes)  # the subsampled search at the largest pool
            plan.append((f"musc N={largest} subsample {self._bench_budget()}", fast(case(largest - 1))))
        return plan

    def _bench_budget(self) -> int:
        return min(self.patch_budget, self.backbone.grid ** 2)

    def _approx_agreement(self, z: torch.Tensor, hashes: list[str], images: int = 16) -> dict[str, Any] | None:
        """Agreement of ``approx = "subsample"`` with the exact search on a closed pool of up to ``images`` of
        the bench pool's images (features already computed): Spearman of the raw image scores, max and mean
        absolute difference of the probability maps (map / 2) and of the image scores."""
        from ...metrics import spearman

        count = min(images, z.shape[0])
        k = official_k(count - 1, self.fraction)
        if k < 1 or self.patch_budget >= self.backbone.grid ** 2:
            return None
        z, hashes = z[:count], hashes[:count]
        excluded = torch.eye(count, dtype=torch.bool, device=z.device)
        ks = torch.full((count,), k, device=z.device)
        saved = self.approx
        try:
            out = {}
            for mode in ("none", "subsample"):
                self.approx = mode
                with torch.inference_mode():
                    grid_map = self.mutual_scores(z, [(self.as_memory(z, hashes), excluded)], ks)
                out[mode] = upsample(grid_map, self.image_size) / 2
        finally:
            self.approx = saved
        exact, fast = out["none"], out["subsample"]
        diff = (exact - fast).abs()
        a, b = exact.flatten(1).amax(1), fast.flatten(1).amax(1)
        return {"images": count, "patch_budget": self._bench_budget(), "patches": self.backbone.grid ** 2,
                "spearman_image_score": spearman(a.cpu(), b.cpu()), "max_abs_map_diff": float(diff.max()),
                "mean_abs_map_diff": float(diff.mean()), "max_abs_image_score_diff": float((a - b).abs().max()),
                "mean_signed_image_score_diff": float((b - a).mean()),
                "what": "closed pool of the bench's pool images, exact vs subsampled references (probability "
                        "maps = map / 2); a subsample can only raise a nearest distance"}

    def bench_report(self, pixels: torch.Tensor | None = None, class_names: Sequence[str] = (),
                     samples: int = 0) -> dict[str, Any]:
        """Memory per pooled image here, the full-size cost model (ViT-L/14 at 518: L = 1369, C = 1024, spec
        §12) and, under ``summary``, the lines ``inspector bench`` prints under its table."""
        length, width = self.backbone.grid ** 2, self.backbone.vision_width
        combos = len(self.r_list) * len(self.layers)
        full = {n: 2 * 12 * (n - 1) * 1369 ** 2 * (1024 + 2) / 1e9 for n in (10, 50, 100, 200)}
        backbone_tflop = 2 * 24 * (12 * 1369 * 1024 ** 2 + 2 * 1369 ** 2 * 1024) / 1e12
        per_image = self.bytes_per_pooled_image()
        full_fp16, full_fp32 = 12 * 1369 * 1024 * 2, 12 * 1369 * 1024 * 4
        report = {"bytes_per_pooled_image": per_image, "approx": self.approx,
                  "approx_agreement": self._bench_agreement, "pool_size": self.pool_size,
                  "pool_bytes_per_class": per_image * self.pool_size, "pool_dtype": self.pool_dtype,
                  "msm_gflop_per_image_per_other_image": 2 * combos * length ** 2 * (width + 2) / 1e9,
                  "full_size": {"bytes_per_pooled_image_fp16": full_fp16, "bytes_per_pooled_image_fp32": full_fp32,
                                "backbone_tflop_per_image": backbone_tflop,
                                "msm_gflop_per_image": full,
                                "msm_to_backbone": {n: v / 1e3 / backbone_tflop for n, v in full.items()},
                                "subsample_patch_budget": self.patch_budget,
                                "msm_gflop_per_image_subsample": {n: v * min(self.patch_budget, 1369) / 1369
                                                                  for n, v in full.items()}}}
        f = report["full_size"]
        pool = (f"MuSc pool: {per_image / 1e6:.2f} MB per pooled image here ({self.pool_dtype}), at most "
                f"pool_size = {self.pool_size} per class ({per_image * self.pool_size / 1e6:.1f} MB)")
        sizes = f"MuSc full size (ViT-L/14 @ 518): {full_fp16 / 1e6:.1f} MB fp16 / {full_fp32 / 1e6:.1f} MB fp32 per pooled image"
        lines = [pool, sizes,
                 f"MuSc full size: backbone {backbone_tflop:.2f} TFLOP/image; mutual scoring 46 GFLOP x (N - 1):"]
        lines += [f"  N = {n}: {v / 1e3:.2f} TFLOP/image, {f['msm_to_backbone'][n]:.1f}x the backbone"
                  for n, v in full.items()]
        a = self._bench_agreement
        if a:
            lines.append(f"MuSc subsample ({a['patch_budget']}/{a['patches']} patches) vs exact, {a['images']} "
                         f"images: Spearman {a['spearman_image_score']:.3f}, max map diff {a['max_abs_map_diff']:.4f}")
        report["summary"] = lines
        return report
