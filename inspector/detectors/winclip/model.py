"""WinCLIP / WinCLIP+ (Jeong et al., CVPR 2023): training-free zero- and few-shot anomaly detection on CLIP.

The function computed is the one of anomalib's ``WinClipModel`` (anomalib 2.7,
``anomalib/models/image/winclip``), preprocessing included: the 8-bit image as a float tensor in [0, 1],
an antialiased bicubic resize of that tensor to 240 x 240, CLIP mean/std (``to_input``). The way it is computed is not: every window of every image of a batch goes through the transformer in a few large
batched calls (one per window size, chunked by ``window_batch``), not one call per window.

Symbols (the paper's, mapped once):

* N images, G grid side (image_size // patch), W vision width, D joint embedding width, K references
* s a window scale in patches (2, 3); M_s = (G - s + 1)^2 windows at stride 1 on the G x G grid
* tokens: the vision input sequence [N, 1 + G*G, W] after the position embedding and **before** ``ln_pre``
  (what anomalib's hook on ``patch_dropout`` captures). A window's sequence is the CLS token plus the
  window's s*s patch tokens, each with its position embedding; it passes ``ln_pre`` and *all* blocks again
* f^W_s: window embeddings LN_post(CLS) @ W_proj, [N, M_s, D]; f^I the whole-image embedding [N, D]
* f^P: patch tokens after the last block and LN_post, **not** projected, [N, G*G, W] (few-shot only)
* t = [t_n, t_a]: mean of the *raw* (un-normalised) text embeddings of the 7 x 21 normal and 4 x 21
  anomalous prompts of a class, [2, D]
* ascore_0(f) = softmax(cos(f, t) / 0.07)[anomalous] (the paper's Eq. 1)
* harmonic aggregation (Eq. 3): a patch's score is (windows covering it) / sum over them of 1 / score
* zero-shot map at grid resolution: harmonic mean of [ascore_0(f^I) broadcast, agg(ascore_0(f^W_2)),
  agg(ascore_0(f^W_3))]
* few-shot (WinCLIP+, Eq. 4): association score (1 - max cos to the reference memory) / 2, where the
  memory R^P is the f^P of *all* patches of all K references, and R^W_s all K * M_s reference windows of
  scale s (a nearest neighbour over every position, not the same position); few-shot map = mean of
  [assoc(f^P, R^P), agg(assoc(f^W_2, R^W_2)), agg(assoc(f^W_3, R^W_3))]
* final map = mean(zero-shot map, few-shot map), upsampled bilinearly (align_corners=False) to S x S;
  image score = mean(ascore_0(f^I), max of the few-shot grid map); zero-shot only: the map and
  ascore_0(f^I) themselves

Both maps and scores are probabilities in [0, 1]. ``text_score`` is ascore_0(f^I) in both modes;
``topk_score`` is the mean of the k largest values of the final S x S map, k = ``topk`` or, by default,
1 % of the pixels (576 at 240 px), about the area of one 3 x 3 window of 16-px patches.

Few-shot references come from a ``ReferenceStore`` (read lazily per class, re-read when its fingerprint
changes, the first ``k_shot`` files by name or all with 0), or are pinned with ``set_references``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...backbone import CLIP_MEAN, CLIP_STD, BackboneSpec, ClipBackbone, tokenize
from ...imaging import ImageInput, as_list
from ...references import ReferenceStore, cached_encoding
from ...runtime import fp32, resolve
from ..base import BenchPlan, Detector, Prediction

log = logging.getLogger(__name__)

_MEAN = torch.tensor(CLIP_MEAN).view(3, 1, 1)
_STD = torch.tensor(CLIP_STD).view(3, 1, 1)

TEMPERATURE = 0.07
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without flaw", "{} without defect",
                 "{} without damage")
ANOMALOUS_STATES = ("damaged {}", "{} with flaw", "{} with defect", "{} with damage")
TEMPLATES = (
    "a cropped photo of the {}.", "a close-up photo of a {}.", "a close-up photo of the {}.",
    "a bright photo of a {}.", "a bright photo of the {}.", "a dark photo of the {}.", "a dark photo of a {}.",
    "a jpeg corrupted photo of the {}.", "a jpeg corrupted photo of the {}.",  # twice, as in anomalib
    "a blurry photo of the {}.", "a blurry photo of a {}.", "a photo of a {}.", "a photo of the {}.",
    "a photo of a small {}.", "a photo of the small {}.", "a photo of a large {}.", "a photo of the large {}.",
    "a photo of the {} for visual inspection.", "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.", "a photo of a {} for anomaly detection.",
)


def prompt_ensemble(class_name: str) -> tuple[list[str], list[str]]:
    """(normal, anomalous) sentences: every state word filled with the class name, in every template
    (state-major order). The class name is used as given (anomalib: ``class_name`` or the category)."""
    normal = [t.format(s.format(class_name)) for s in NORMAL_STATES for t in TEMPLATES]
    anomalous = [t.format(s.format(class_name)) for s in ANOMALOUS_STATES for t in TEMPLATES]
    return normal, anomalous


def window_indices(grid: int, scale: int) -> torch.Tensor:
    """Patch indices of every scale x scale window at stride 1: [M_s, scale*scale], M_s = (grid-scale+1)^2.

    Window m = r·(grid-scale+1) + c has its top-left patch at (r, c); its patches are listed row-major
    (the order of ``F.unfold`` on the index grid, which anomalib uses). Patch p = row·grid + col.
    """
    if not 1 <= scale <= grid:
        raise ValueError(f"window scale {scale} does not fit a {grid} x {grid} patch grid")
    side = grid - scale + 1
    top_left = (torch.arange(side)[:, None] * grid + torch.arange(side)[None, :]).reshape(-1)  # [M_s]
    offsets = (torch.arange(scale)[:, None] * grid + torch.arange(scale)[None, :]).reshape(-1)  # [s*s]
    return top_left[:, None] + offsets[None, :]


def covering_windows(grid: int, scale: int) -> torch.Tensor:
    """For each patch, the windows that cover it: [G*G, scale*scale], padded with M_s (a sentinel)."""
    windows = window_indices(grid, scale)
    count = windows.shape[0]
    cover = torch.full((grid * grid, scale * scale), count, dtype=torch.long)
    filled = torch.zeros(grid * grid, dtype=torch.long)
    for m, patches in enumerate(windows.tolist()):
        for p in patches:
            cover[p, filled[p]] = m
            filled[p] += 1
    return cover


def harmonic_aggregation(scores: torch.Tensor, cover: torch.Tensor, grid: int) -> torch.Tensor:
    """Window scores [N, M_s] -> patch scores [N, G, G]: (windows covering p) / sum_{m covers p} 1 / score_m.

    A zero window score makes the patch 0 (1/0 = inf), as in anomalib.
    """
    n, count = scores.shape
    inverse = torch.cat([scores.reciprocal(), scores.new_zeros(n, 1)], dim=1)  # [N, M_s + 1], sentinel = 0
    covering = (cover < count).sum(1).to(scores.dtype)  # [G*G]
    total = inverse[:, cover].sum(-1)  # [N, G*G]
    return (covering / total).nan_to_num(posinf=0.0).view(n, grid, grid)


def class_probability(embeddings: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """ascore_0: embeddings [..., D], text [..., 2, D] (broadcast over the leading dims of embeddings
    without the last) -> softmax(cos / 0.07)[anomalous], [...]."""
    cos = torch.einsum("...d,...kd->...k", F.normalize(embeddings, dim=-1), F.normalize(text, dim=-1))
    return (cos / TEMPERATURE).softmax(dim=-1)[..., 1]


def association(features: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """(1 - max cos to any memory entry) / 2: features [N, P, C], memory [R, C] L2-normalised -> [N, P]."""
    cos = F.normalize(features, dim=-1) @ memory.T.to(features.dtype)  # [N, P, R]
    return (1 - cos.amax(dim=-1)) / 2


@dataclass
class _References:
    """Few-shot memory of one class: R^P [K*G*G, W] and R^W_s [K*M_s, D], all L2-normalised."""

    patches: torch.Tensor
    windows: list[torch.Tensor]
    count: int
    fingerprint: tuple[str, ...] | None  # None: pinned with ``set_references``


class WinCLIP(Detector):
    """Training-free detector. ``predict(images, class_names)`` -> ``Prediction`` (batched)."""

    name = "winclip"
    default_backbone = BackboneSpec(arch="ViT-B-16-plus-240", pretrained="laion400m_e31", image_size=240,
                                    feature_layers=())
    trainable = False
    section = "winclip"
    describes_classes = True

    def __init__(self, backbone: ClipBackbone, *, scales: Sequence[int] = (2, 3), k_shot: int = 0,
                 references: ReferenceStore | None = None, window_batch: int = 1024, topk: int = 0,
                 precision: str = "fp32", provenance: Mapping[str, Any] | None = None):
        super().__init__(backbone, precision, provenance)
        if k_shot < 0:
            raise ValueError("k_shot must be >= 0 (0: every stored reference)")
        if window_batch < 1:
            raise ValueError("window_batch must be >= 1")
        self.scales = tuple(int(s) for s in scales)
        self.k_shot = int(k_shot)
        self.references = references
        self.window_batch = int(window_batch)
        self.topk = int(topk)
        grid = backbone.grid
        for i, scale in enumerate(self.scales):
            windows = window_indices(grid, scale)
            # token positions of each window's sequence: CLS (0) then its patches (+1 for the CLS slot)
            self.register_buffer(f"_sequence_{i}", torch.cat([torch.zeros(len(windows), 1, dtype=torch.long),
                                                              windows + 1], dim=1), persistent=False)
            self.register_buffer(f"_cover_{i}", covering_windows(grid, scale), persistent=False)
        self._text: dict[str, torch.Tensor] = {}  # class -> t [2, D]
        self._memory: dict[str, _References] = {}  # class -> few-shot memory

    # ---------------------------------------------------------------------------------------------
    # construction and the detector contract

    @classmethod
    def from_settings(cls, backbone: ClipBackbone, head: Any, options: Any, *, precision: str = "fp32",
                      provenance: Mapping[str, Any] | None = None) -> WinCLIP:
        """A WinCLIP on ``backbone`` with the ``[winclip]`` options (``references`` folder, empty = none;
        ``k_shot``; ``scales``); ``head`` is ignored (training-free)."""
        if head:
            log.warning("WinCLIP is training-free: ignoring head %s", head)
        return cls(backbone, scales=tuple(options.scales), k_shot=options.k_shot,
                   references=ReferenceStore(options.references) if options.references else None,
                   precision=precision, provenance=provenance)

    @classmethod
    def scoring_options(cls, options: Any, precision: str) -> dict[str, Any]:
        """The options that change the numbers (part of a model version's identity), the reference set
        included: adding or removing reference images makes another version."""
        store = ReferenceStore(options.references) if options.references else None
        references = {name: list(store.fingerprint(name)) for name in store.classes()} if store else {}
        return {"scales": [int(v) for v in options.scales], "k_shot": int(options.k_shot), "precision": precision,
                "references": options.references or None, "reference_set": references}

    def describe_head(self) -> dict[str, Any]:
        return {"training_free": True, "scales": list(self.scales), "k_shot": self.k_shot,
                "references": str(self.references.folder) if self.references is not None else None,
                "temperature": TEMPERATURE,
                "prompts": {"normal_states": len(NORMAL_STATES), "anomalous_states": len(ANOMALOUS_STATES),
                            "templates": len(TEMPLATES)}}

    def to_input(self, image: Any) -> torch.Tensor:
        """One RGB PIL image -> [3, S, S] as anomalib feeds WinCLIP: the 8-bit image as float32 in [0, 1], an
        antialiased bicubic resize of that tensor (torchvision's ``Resize(antialias=True)`` arithmetic), then
        (x - mean) / std."""
        x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        x = F.interpolate(x[None], size=(self.image_size, self.image_size), mode="bicubic", align_corners=False,
                          antialias=True)[0]
        return (x - _MEAN) / _STD

    def clear_caches(self) -> None:
        """Forget text embeddings and store-derived references (pinned references are kept)."""
        self._text.clear()
        self._memory = {k: v for k, v in self._memory.items() if v.fingerprint is None}

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .half(): no stale cached tensors
        self._text.clear()
        self._memory = {k: _References(fn(v.patches), [fn(w) for w in v.windows], v.count, v.fingerprint)
                        for k, v in self._memory.items()}
        return super()._apply(fn, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------
    # text

    def text_embeddings(self, class_name: str) -> torch.Tensor:
        """t = [t_n, t_a]: [2, D], the mean raw text embedding of each prompt group (cached per class), the
        class named by its description when the site gave one (``set_class_descriptions``)."""
        cached = self._text.get(class_name)
        if cached is None:
            normal, anomalous = prompt_ensemble(self.class_descriptions.get(class_name) or class_name)
            tokens = tokenize(normal + anomalous).to(self.device)  # [P, 77]
            last = tokens.argmax(dim=-1)  # the first EOT (the largest token id), where CLIP reads the text
            # cut after the longest EOT: positions after a sequence's EOT cannot reach it under the causal mask
            embedded = self.backbone.token_embeddings(tokens[:, :int(last.max()) + 1])
            with fp32(self.device):  # once per class and cached: fp32, whatever the precision
                t = self.backbone.encode_text(embedded.float(), last).float()  # [P, D]
            cached = self._text[class_name] = torch.stack([t[:len(normal)].mean(0), t[len(normal):].mean(0)])
        return cached

    # ---------------------------------------------------------------------------------------------
    # vision

    def encode(self, pixels: torch.Tensor, patches: bool = True
               ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """pixels [N, 3, S, S] -> (f^I [N, D], [f^W_s [N, M_s, D] per scale], f^P [N, G*G, W] or None)."""
        tokens, image, patch = self.encode_graph("vision", pixels)
        return image, self.window_embeddings(tokens), patch if patches else None

    def vision_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The "vision" graph: pixels [N, 3, S, S] -> (tokens [N, 1 + G*G, W] before ln_pre, the windows'
        source; f^I [N, D]; f^P = LN_post of the patch tokens [N, G*G, W])."""
        tokens = self.backbone.embed_image(pixels)  # [N, 1 + G*G, W], before ln_pre
        with self.autocast():
            x, _ = self.backbone.run_vision(tokens)
            image = self.backbone.pool(x).float()
            patch = self.backbone.clip.visual.ln_post(x[:, 1:]).float()
        return tokens, image, patch

    def window_outputs(self, windows: torch.Tensor) -> tuple[torch.Tensor]:
        """The "windows" graph: window sequences [B, 1 + s*s, W] (CLS and a window's tokens from
        ``vision_outputs``) -> their pooled embeddings [B, D]."""
        with self.autocast():
            x, _ = self.backbone.run_vision(windows)
            return (self.backbone.pool(x).float(),)

    def scoring_graphs(self) -> dict[str, Any]:
        """The vision tower (tokens, f^I, f^P) and the tower over window sequences (any count, any scale);
        the text embeddings are computed once per class, in torch."""
        from ..base import ScoringGraph

        size, width = self.image_size, self.backbone.vision_width
        return {
            "vision": ScoringGraph(self.vision_outputs, ("pixels",), ("tokens", "image", "patches"),
                                   lambda: (torch.randn(2, 3, size, size),),
                                   {"pixels": {0: "batch"}, "tokens": {0: "batch"}, "image": {0: "batch"},
                                    "patches": {0: "batch"}}),
            "windows": ScoringGraph(self.window_outputs, ("windows",), ("embeddings",),
                                    lambda: (torch.randn(3, 5, width),),
                                    {"windows": {0: "windows", 1: "length"}, "embeddings": {0: "windows"}}),
        }

    def window_embeddings(self, tokens: torch.Tensor) -> list[torch.Tensor]:
        """tokens [N, 1 + G*G, W] (before ln_pre) -> [f^W_s: [N, M_s, D] per scale].

        All N·M_s windows of a scale go through the transformer together, ``window_batch`` sequences of
        1 + s*s tokens per call.
        """
        n = tokens.shape[0]
        out = []
        for i in range(len(self.scales)):
            sequence = getattr(self, f"_sequence_{i}")  # [M_s, 1 + s*s]
            count = sequence.shape[0]
            flat = torch.empty(n * count, self.backbone.embed_dim, device=tokens.device)
            for start in range(0, n * count, self.window_batch):
                index = torch.arange(start, min(start + self.window_batch, n * count), device=tokens.device)
                chunk = tokens[(index // count)[:, None], sequence[index % count]]  # [B, 1 + s*s, W]
                flat[start:start + len(index)] = self.encode_graph("windows", chunk)[0]
            out.append(flat.view(n, count, -1))
        return out

    # ---------------------------------------------------------------------------------------------
    # few-shot references

    def _encode_references(self, pixels: torch.Tensor, fingerprint: tuple[str, ...] | None,
                           chunk: int = 8) -> _References:
        patches, windows = [], [[] for _ in self.scales]
        for start in range(0, pixels.shape[0], chunk):
            _, f_w, f_p = self.encode(pixels[start:start + chunk].to(self.device))
            patches.append(f_p.flatten(0, 1))
            for i, f in enumerate(f_w):
                windows[i].append(f.flatten(0, 1))
        return _References(F.normalize(torch.cat(patches), dim=-1),
                           [F.normalize(torch.cat(w), dim=-1) for w in windows], pixels.shape[0], fingerprint)

    def set_references(self, class_name: str, images: Sequence[ImageInput] | torch.Tensor | None) -> None:
        """Pin the few-shot references of a class: paths / PIL images, or pixels [K, 3, S, S] normalised.
        Pinned references win over the store; ``None`` unpins (the store, if any, applies again)."""
        if images is None:
            self._memory.pop(class_name, None)
            return
        if isinstance(images, torch.Tensor):
            pixels = images
            if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[0] == 0:
                raise ValueError(f"reference pixels must be [K, 3, S, S] with K >= 1, got {tuple(pixels.shape)}")
        else:
            images = as_list(images)
            if not images:
                raise ValueError("no reference images given (use None to unpin)")
            pixels = self.preprocess(images)
        with torch.inference_mode():
            self._memory[class_name] = self._encode_references(pixels, None)

    def reference_memory(self, class_name: str) -> _References | None:
        """The few-shot memory of a class: pinned, or from the store (re-read when it changed), or None."""
        def encode(paths: list[Path], fingerprint: tuple[str, ...]) -> _References:
            pixels = self.preprocess(paths)
            log.info("class '%s': few-shot on %d reference image(s) from %s", class_name, pixels.shape[0],
                     self.references.folder)
            with torch.inference_mode():
                return self._encode_references(pixels, fingerprint)

        return cached_encoding(self.references, class_name, self._memory, encode, limit=self.k_shot)

    # ---------------------------------------------------------------------------------------------
    # scoring

    def zero_shot(self, image: torch.Tensor, windows: Sequence[torch.Tensor], text: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """f^I [N, D], f^W_s [N, M_s, D], t [N, 2, D] -> (ascore_0(f^I) [N], zero-shot map [N, G, G])."""
        grid = self.backbone.grid
        score = class_probability(image, text)  # [N]
        maps = [score[:, None, None].expand(-1, grid, grid)]
        for i, f_w in enumerate(windows):
            maps.append(harmonic_aggregation(class_probability(f_w, text[:, None]), getattr(self, f"_cover_{i}"),
                                             grid))
        return score, len(maps) / torch.stack(maps).reciprocal().sum(0)

    def few_shot(self, patches: torch.Tensor, windows: Sequence[torch.Tensor], memory: _References
                 ) -> torch.Tensor:
        """f^P [N, G*G, W], f^W_s [N, M_s, D] and a class's memory -> few-shot map [N, G, G]."""
        grid = self.backbone.grid
        maps = [association(patches, memory.patches).view(-1, grid, grid)]
        for i, (f_w, r_w) in enumerate(zip(windows, memory.windows, strict=True)):
            maps.append(harmonic_aggregation(association(f_w, r_w), getattr(self, f"_cover_{i}"), grid))
        return torch.stack(maps).mean(0)

    def topk_scores(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """Mean of the k largest values of each map [N, S, S] -> [N] (k = ``topk`` or 1 % of the pixels)."""
        flat = anomaly_map.flatten(1)
        k = min(self.topk or max(1, flat.shape[1] // 100), flat.shape[1])
        return flat.topk(k, dim=1).values.mean(1)

    @torch.inference_mode()
    def predict_tensors(self, pixels: torch.Tensor, class_names: Sequence[str],
                        seeds: Sequence[int] | None = None) -> Prediction:
        """pixels: [N, 3, S, S] CLIP-normalised -> Prediction (on the model's device). ``seeds`` is unused
        (nothing is random)."""
        del seeds
        class_names = list(class_names)
        n, size = pixels.shape[0], self.image_size
        if len(class_names) != n:
            raise ValueError(f"{n} images but {len(class_names)} class names")
        if pixels.dim() != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"pixels must be [N, 3, {size}, {size}], got {tuple(pixels.shape)}")
        memories = {name: self.reference_memory(name) for name in dict.fromkeys(class_names)}
        few = [i for i, name in enumerate(class_names) if memories[name] is not None]
        image, windows, patches = self.encode(pixels.to(self.device), patches=bool(few))
        text = torch.stack([self.text_embeddings(name) for name in class_names])  # [N, 2, D]
        text_score, grid_map = self.zero_shot(image, windows, text)
        image_score = text_score.clone()
        for name in dict.fromkeys(class_names[i] for i in few):
            idx = torch.tensor([i for i, c in enumerate(class_names) if c == name], device=self.device)
            few_map = self.few_shot(patches[idx], [w[idx] for w in windows], memories[name])
            grid_map[idx] = (grid_map[idx] + few_map) / 2
            image_score[idx] = (text_score[idx] + few_map.amax(dim=(-2, -1))) / 2
        anomaly_map = F.interpolate(grid_map[:, None], size=(size, size), mode="bilinear",
                                    align_corners=False)[:, 0]
        provenance = {**self.provenance, "detector": self.name, "scales": list(self.scales),
                      "precision": resolve(self.precision, self.device),
                      "references": {name: (m.count if m is not None else 0) for name, m in memories.items()}}
        return Prediction(anomaly_map=anomaly_map, image_score=image_score, text_score=text_score,
                          topk_score=self.topk_scores(anomaly_map), provenance=provenance)

    # ---------------------------------------------------------------------------------------------
    # bench hook

    def bench_plan(self, pixels: torch.Tensor, class_names: Sequence[str], samples: int,
                   references: int = 0) -> BenchPlan:
        """Zero-shot, and with ``references`` > 0 few-shot on that many shifted copies of the bench images."""
        plan = super().bench_plan(pixels, class_names, samples, references)
        if references:
            refs = torch.roll(pixels, shifts=7, dims=-1).repeat(-(-references // len(pixels)), 1, 1, 1)[:references]

            def few_shot() -> Prediction:
                self.set_references(class_names[0], refs)
                try:
                    return self.predict_tensors(pixels, class_names)
                finally:
                    self.set_references(class_names[0], None)

            plan.append((f"winclip k={references}", few_shot))
        return plan
