"""The MuSc detector: the official pool function (``score_pool``) and a rolling pool per class for a line.

See the package docstring (``inspector.detectors.musc``) for the paper, the symbols and the pool design.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...backbone import BackboneSpec, ClipBackbone, build_openai_clip, read_openai_state_dict
from ...imaging import ImageInput, as_list, preprocess
from ...precision import autocast, check, resolve
from ...references import ReferenceStore
from ..base import EvalProtocol, Prediction
from .ops import (
    FRACTION,
    K_LIST_MVTEC,
    lnamd,
    nearest_distances,
    nearest_distances_cdist,
    official_k,
    rscin,
    top_min_mean,
    upsample,
)

log = logging.getLogger(__name__)

#: the distance between two unit vectors never exceeds 2: the map of an image that had no reference
UNSCORED = 2.0
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


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
    """Pooled images of one class: Z [capacity, R*T, L, C] (``count`` filled), unit g [capacity, E],
    content hashes; a ring buffer once full (``start`` = the oldest slot)."""

    features: torch.Tensor
    embeddings: torch.Tensor
    hashes: list[str] = field(default_factory=list)
    start: int = 0
    fingerprint: tuple[str, ...] | None = None  # reference-store pools: the listing they were read from

    @property
    def count(self) -> int:
        return len(self.hashes)


def content_hash(pixels: torch.Tensor) -> str:
    """A short hash of one preprocessed image [3, S, S] (identical inputs = the same image)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return hashlib.blake2b(data, digest_size=12).hexdigest()


class MuSc(nn.Module):
    """Training-free, text-free zero-shot detector. ``score_pool(images)``: the official function of a
    closed pool; ``predict(images, class_names)`` / ``predict_tensors``: live scoring with a rolling pool."""

    name = "musc"
    trainable = False
    default_backbone = BackboneSpec(arch="ViT-L-14-336", pretrained="openai", image_size=518,
                                    feature_layers=(6, 12, 18, 24), pos_embed_antialias=False)
    eval_protocol = EvalProtocol(smooth_sigma=0.0, fusion="live")

    def __init__(self, backbone: ClipBackbone, r_list: Sequence[int] = (1, 3, 5), fraction: float = FRACTION,
                 k_list: Sequence[int] = K_LIST_MVTEC, pool_size: int = 50, msm: str = "matmul",
                 memory_mb: int = 256, references: ReferenceStore | None = None, join_pool: bool = True,
                 pool_dtype: str = "float32", topk: int = 0, precision: str = "fp32", attention: str = "auto",
                 provenance: Mapping[str, Any] | None = None):
        super().__init__()
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
        self.backbone = backbone
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
        self.precision = check(precision)
        self.attention = attention
        self.provenance = dict(provenance or {})
        self.bench_pools: tuple[int, ...] = (10, 50, 100, 200)
        self._pools: dict[str, _Pool] = {}  # class -> rolling pool of earlier images
        self._pinned: dict[str, _Pool] = {}  # class -> reference images (store or ``set_references``)

    # ---------------------------------------------------------------------------------------------
    # construction and the detector contract

    @classmethod
    def from_settings(cls, backbone: ClipBackbone, head: Any, settings: Any,
                      provenance: Mapping[str, Any] | None) -> MuSc:
        """A MuSc on ``backbone`` with the options of ``[musc]``; ``head`` is ignored (training-free). The
        position embedding is resized again with ``[musc] pos_embed_antialias`` (plain bicubic by default,
        as the official loader) if the backbone was loaded with the other kernel."""
        if head:
            log.warning("MuSc is training-free: ignoring head %s", head)
        o = cls.scoring_options(settings)
        backbone.set_pos_embed_antialias(o.pop("pos_embed_antialias"))
        o.pop("reference_images")
        folder = o.pop("references")
        return cls(backbone, references=ReferenceStore(folder) if folder else None, provenance=provenance, **o)

    @classmethod
    def scoring_options(cls, settings: Any) -> dict[str, Any]:
        """The options that change the numbers (part of a model version's identity): ``[musc]``, the
        position-embedding kernel, ``[model] precision`` and the reference set. (The rolling pool is state,
        not identity: a score depends on the images before it, as the method does.)"""
        o = getattr(settings, "musc", None)
        folder = getattr(o, "references", "references")
        store = ReferenceStore(folder) if folder else None
        return {"r_list": [int(r) for r in getattr(o, "r_list", (1, 3, 5))],
                "fraction": float(getattr(o, "fraction", FRACTION)),
                "k_list": [int(k) for k in getattr(o, "k_list", K_LIST_MVTEC)],
                "pool_size": int(getattr(o, "pool_size", 50)), "join_pool": bool(getattr(o, "join_pool", True)),
                "msm": getattr(o, "msm", "matmul"), "memory_mb": int(getattr(o, "memory_mb", 256)),
                "pool_dtype": getattr(o, "pool_dtype", "float32"), "topk": int(getattr(o, "topk", 0)),
                "attention": getattr(o, "attention", "auto"),
                "precision": getattr(getattr(settings, "model", None), "precision", "fp32"),
                "pos_embed_antialias": bool(getattr(o, "pos_embed_antialias", False)),
                "references": folder,
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
                "bytes_per_pooled_image": self.bytes_per_pooled_image()}

    @property
    def image_size(self) -> int:
        return self.backbone.image_size

    @property
    def device(self) -> torch.device:
        return self.backbone.clip.visual.conv1.weight.device

    @torch.inference_mode()
    def encode_floor(self, pixels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            return self.backbone.encode_image_floor(pixels)

    def bytes_per_pooled_image(self) -> int:
        """Memory of one pooled image: R*T LNAMD maps of L x C values in ``pool_dtype`` (+ its embedding)."""
        length, width = self.backbone.grid ** 2, self.backbone.vision_width
        item = torch.empty((), dtype=_DTYPES[self.pool_dtype]).element_size()
        return len(self.r_list) * len(self.layers) * length * width * item + self.backbone.embed_dim * 4

    def _apply(self, fn, *args, **kwargs):  # .to(device): pooled features follow the model
        for pools in (self._pools, self._pinned):
            for key, p in pools.items():
                pools[key] = _Pool(fn(p.features), fn(p.embeddings), p.hashes, p.start, p.fingerprint)
        return super()._apply(fn, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------
    # features

    def features(self, pixels: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        """pixels [N, 3, S, S] -> (Z [N, R*T, L, C] fp32 unit rows, index r_index * T + t_index; g/|g| [N, E]).

        The backbone's raw residual stream after each tap (no ln_post), then LNAMD per r."""
        attention = "sdpa" if self.attention == "auto" else self.attention
        grid = self.backbone.grid
        z, g = [], []
        for start in range(0, pixels.shape[0], chunk):
            tokens = self.backbone.embed_image(pixels[start:start + chunk].to(self.device))
            with autocast(self.device, self.precision):
                x, taps = self.backbone.run_vision(tokens, self.layers, attention=attention)
                g.append(F.normalize(self.backbone.pool(x).float(), dim=-1))
            z.append(torch.stack([lnamd(t.float(), grid, r) for r in self.r_list for t in taps], dim=1))
        if not z:
            length, width = grid * grid, self.backbone.vision_width
            return (torch.empty(0, len(self.r_list) * len(self.layers), length, width, device=self.device),
                    torch.empty(0, self.backbone.embed_dim, device=self.device))
        return torch.cat(z), torch.cat(g)

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
        pixels = images if isinstance(images, torch.Tensor) else preprocess(as_list(images), self.image_size)
        n = pixels.shape[0]
        k = official_k(n - 1, self.fraction)
        if k < 1:
            raise ValueError(f"MuSc needs a pool of at least {self._minimum_pool()} images, got {n} "
                             "(the official code returns NaN maps)")
        z, g = self.features(pixels)
        excluded = torch.eye(n, dtype=torch.bool, device=z.device)
        grid_map = self.mutual_scores(z, [(z, excluded)], torch.full((n,), k, device=z.device))
        anomaly_map = upsample(grid_map, self.image_size)
        map_max = anomaly_map.flatten(1).amax(1)
        k_list = tuple(self.k_list if k_list is None else k_list)
        return PoolScores(anomaly_map, grid_map, map_max, rscin(map_max, g, k_list), g, k_list)

    def _minimum_pool(self) -> int:
        n = 2
        while official_k(n - 1, self.fraction) < 1:
            n += 1
        return n

    # ---------------------------------------------------------------------------------------------
    # pools for live scoring

    def _empty_pool(self, capacity: int) -> _Pool:
        length, width = self.backbone.grid ** 2, self.backbone.vision_width
        combos = len(self.r_list) * len(self.layers)
        return _Pool(torch.empty(capacity, combos, length, width, dtype=_DTYPES[self.pool_dtype], device=self.device),
                     torch.empty(capacity, self.backbone.embed_dim, device=self.device))

    def _push(self, pool: _Pool, z: torch.Tensor, g: torch.Tensor, digest: str, capacity: int) -> _Pool:
        """Add one image to a pool (growing by doubling up to ``capacity``, then replacing the oldest)."""
        if pool.count < capacity:
            if pool.count == pool.features.shape[0]:
                bigger = self._empty_pool(min(capacity, max(4, 2 * pool.count)))
                bigger.features[:pool.count] = pool.features[:pool.count]
                bigger.embeddings[:pool.count] = pool.embeddings[:pool.count]
                bigger.hashes = pool.hashes
                pool = bigger
            slot = pool.count
            pool.hashes.append(digest)
        else:
            slot = pool.start
            pool.hashes[slot] = digest
            pool.start = (pool.start + 1) % capacity
        pool.features[slot] = z.to(pool.features.dtype)
        pool.embeddings[slot] = g
        return pool

    def pool_add(self, class_name: str, images: Sequence[ImageInput] | torch.Tensor) -> int:
        """Add images (paths, PIL or pixels [K, 3, S, S]) to the rolling pool of a class without scoring
        them (a lot of known-good parts, or a pool rebuilt after a restart); duplicates are skipped.
        Returns the pool's size."""
        pixels = images if isinstance(images, torch.Tensor) else preprocess(as_list(images), self.image_size)
        with torch.inference_mode():
            z, g = self.features(pixels)
            self._join(class_name, z, g, [content_hash(p) for p in pixels])
        return self.pool_count(class_name)

    def _join(self, class_name: str, z: torch.Tensor, g: torch.Tensor, hashes: Sequence[str]) -> None:
        if self.pool_size == 0:
            return
        pool = self._pools.get(class_name) or self._empty_pool(0)
        pinned = self._pinned.get(class_name)
        known = set(pool.hashes) | set(pinned.hashes if pinned else ())
        for i, digest in enumerate(hashes):
            if digest not in known:
                pool = self._push(pool, z[i], g[i], digest, self.pool_size)
                known.add(digest)
        self._pools[class_name] = pool

    def pool_count(self, class_name: str) -> int:
        pool = self._pools.get(class_name)
        return pool.count if pool is not None else 0

    def pool_remove(self, class_name: str, images: Sequence[ImageInput] | torch.Tensor) -> int:
        """Take images out of the rolling pool of a class (a reviewer rejected them as defects), by
        content. Returns how many were removed."""
        pixels = images if isinstance(images, torch.Tensor) else preprocess(as_list(images), self.image_size)
        drop = {content_hash(p) for p in pixels}
        pool = self._pools.get(class_name)
        if pool is None:
            return 0
        order = [(pool.start + i) % pool.count for i in range(pool.count)]  # oldest first
        keep = [slot for slot in order if pool.hashes[slot] not in drop]
        if len(keep) == pool.count:
            return 0
        fresh = self._empty_pool(max(len(keep), 1))
        index = torch.tensor(keep, dtype=torch.long, device=pool.features.device)
        fresh.features[:len(keep)] = pool.features[index]
        fresh.embeddings[:len(keep)] = pool.embeddings[index]
        fresh.hashes = [pool.hashes[s] for s in keep]
        self._pools[class_name] = fresh
        return pool.count - len(keep)

    def clear_pools(self, class_name: str | None = None) -> None:
        """Forget the rolling pool of one class (or all) and the reference images read from the store."""
        for pools in (self._pools, self._pinned):
            for key in [class_name] if class_name is not None else list(pools):
                pools.pop(key, None)

    clear_caches = clear_pools

    def set_references(self, class_name: str, images: Sequence[ImageInput] | torch.Tensor | None) -> None:
        """Pin reference images (normal parts) of a class: always in its pool, never replaced. ``None``
        unpins (the reference store, if any, applies again)."""
        if images is None:
            self._pinned.pop(class_name, None)
            return
        pixels = images if isinstance(images, torch.Tensor) else preprocess(as_list(images), self.image_size)
        if pixels.shape[0] == 0:
            raise ValueError("no reference images given (use None to unpin)")
        self._pinned[class_name] = self._reference_pool(pixels, None)

    def _reference_pool(self, pixels: torch.Tensor, fingerprint: tuple[str, ...] | None) -> _Pool:
        with torch.inference_mode():
            z, g = self.features(pixels)
        pool = _Pool(z.to(_DTYPES[self.pool_dtype]), g, [content_hash(p) for p in pixels], 0, fingerprint)
        return pool

    def reference_pool(self, class_name: str) -> _Pool | None:
        """The pinned references of a class, or those of the reference store (re-read when it changed)."""
        cached = self._pinned.get(class_name)
        if cached is not None and cached.fingerprint is None:
            return cached
        if self.references is None:
            return None
        paths = self.references.list(class_name)
        fingerprint = tuple(p.name for p in paths)
        if not paths:
            self._pinned.pop(class_name, None)
            return None
        if cached is None or cached.fingerprint != fingerprint:
            log.info("class '%s': MuSc pool seeded with %d reference image(s) from %s", class_name, len(paths),
                     self.references.folder)
            cached = self._pinned[class_name] = self._reference_pool(preprocess(paths, self.image_size),
                                                                     fingerprint)
        return cached

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
        sources = [(z, same | torch.eye(b, dtype=torch.bool, device=z.device))]
        for pool in (self.reference_pool(class_name), self._pools.get(class_name)):
            if pool is not None and pool.count:
                known = torch.tensor([[a == c for c in pool.hashes] for a in hashes], dtype=torch.bool,
                                     device=z.device)
                sources.append((pool.features[:pool.count], known))
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
        if self.join_pool:
            for name in dict.fromkeys(class_names):
                idx = [i for i, c in enumerate(class_names) if c == name]
                index = torch.tensor(idx, device=z.device)
                self._join(name, z[index], g[index], [hashes[i] for i in idx])
        anomaly_map = upsample(grid_map, size).float()
        probability_map = (anomaly_map / 2).clamp(0, 1)
        image_score = probability_map.flatten(1).amax(1)
        unscored = references == 0
        provenance = {**self.provenance, "detector": self.name, "precision": resolve(self.precision, self.device),
                      "text_score": "none (MuSc has no text): "
                      "the image score", "references": references.tolist(), "unscored": int(unscored.sum()),
                      "pool": {name: self.pool_count(name) for name in dict.fromkeys(class_names)}}
        if unscored.any():
            log.warning("MuSc: %d image(s) had no other image of their class to be compared with (warm-up); "
                        "they get the highest score (flagged for review)", int(unscored.sum()))
        return Prediction(anomaly_map=anomaly_map, image_score=image_score, text_score=image_score.clone(),
                          topk_score=self.topk_scores(probability_map), provenance=provenance,
                          probability_map=probability_map)

    def predict(self, images: ImageInput | Sequence[ImageInput], class_names: str | Sequence[str]) -> Prediction:
        """Score PIL images or file paths of the named classes (one name for all, or one per image)."""
        images = as_list(images)
        if isinstance(class_names, str):
            class_names = [class_names] * len(images)
        return self.predict_tensors(preprocess(images, self.image_size), class_names)

    # ---------------------------------------------------------------------------------------------
    # bench hooks (``inspector bench``)

    def bench_plan(self, pixels: torch.Tensor, class_names: Sequence[str]
                   ) -> list[tuple[str, Callable[[], Any]]]:
        """Timed cases for ``inspector bench``: the batch scored live against a pool of N - 1 earlier images
        (N = ``pool_size`` + 1 as "musc", and each N of ``bench_pools``). The pool images are shifted copies
        of the bench images, encoded once outside the timing; the pool is restored after each call."""
        name = class_names[0]
        sizes = [self.pool_size + 1] + [s for s in self.bench_pools if s != self.pool_size + 1]
        needed = max(sizes) - 1
        copies = [pixels[i % pixels.shape[0]].roll((7 * (i + 1), 3 * (i + 1)), dims=(-2, -1)) for i in range(needed)]
        with torch.inference_mode():
            z, g = self.features(torch.stack(copies)) if copies else self.features(pixels[:0])

        def case(count: int) -> Callable[[], Any]:
            def run() -> Any:
                saved, join = self._pools.get(name), self.join_pool
                self._pools[name] = _Pool(z[:count].to(_DTYPES[self.pool_dtype]), g[:count],
                                          [f"bench-{i}" for i in range(count)])
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

        return [("musc" if i == 0 else f"musc N={s}", case(s - 1)) for i, s in enumerate(sizes)]

    def bench_report(self) -> dict[str, Any]:
        """Memory per pooled image here and the full-size cost model (ViT-L/14 at 518: L = 1369, C = 1024)."""
        length, width = self.backbone.grid ** 2, self.backbone.vision_width
        combos = len(self.r_list) * len(self.layers)
        full = {n: 2 * 12 * (n - 1) * 1369 ** 2 * (1024 + 2) / 1e9 for n in (10, 50, 100, 200)}
        return {"bytes_per_pooled_image": self.bytes_per_pooled_image(),
                "msm_gflop_per_image_per_other_image": 2 * combos * length ** 2 * (width + 2) / 1e9,
                "full_size": {"bytes_per_pooled_image_fp16": 12 * 1369 * 1024 * 2,
                              "backbone_tflop_per_image": 2 * 24 * (12 * 1369 * 1024 ** 2 + 2 * 1369 ** 2 * 1024)
                              / 1e12,
                              "msm_gflop_per_image": full}}
