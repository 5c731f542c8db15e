"""AA-CLIP inference (CVPR 2025, "Anomaly-Aware CLIP"): frozen CLIP + residual adapters -> maps and scores.

The function computed is the official test path (github.com/Mwxinnn/AA-CLIP, ``test.py``) on identical weights.
Symbols (N images, G grid side, L = G·G patches, Wv vision width, Et text width, E joint width, S input
side, lambda = 0.1) -> code:

* W_i, the vision adapter after block i <= 6: ``image_adapter["layer_adapters"][i - 1]``, [Wv, Wv]
* W_i, the text adapter after block i <= 3: ``text_adapter[str(i - 1)]``, [Et, Et]
* lambda_v, lambda_t: ``image_adapter_weight``, ``text_adapter_weight`` (0.1)
* P, the learned text projection (replaces ``text_projection``): ``text_adapter[str(text_adapt_until)]``, [E, Et]
* S_l, D, the level and det projections: ``image_adapter["seg_proj"][l]``, ``image_adapter["det_proj"]``, [E, Wv]
* F_l = normalize(S_l LN_post(x_l)), level l: ``image_features(pixels)[0][l]``, [N, L, E]
* v = mean_p normalize(D LN_post(x_24)), not renormalised: ``image_features(pixels)[1]``, [N, E]
* T = [t_n, t_a], the text anchors: ``text_anchors(class_name)``, [E, 2]
* M, the pixel map: ``Prediction.anomaly_map``, [N, S, S]

Residual adapter after block i: ``x <- lambda·a·‖x‖/‖a‖ + (1 - lambda)·x`` with ``a = LeakyReLU(x W_i^T)``,
on every token. Anchors: per state, the normalised mean of the normalised sentence embeddings of the
official prompt ensemble (§4.1). Per level, ``m_l = (100·F_l t_a + 1 - 100·F_l t_n) / 2`` on the G×G grid,
Gaussian blur there (kornia's: reflect border, separable; kernel 7 / sigma 1 industrial, 9 / 1.5 medical),
bilinear upsampling to S with align_corners=True, and ``M = sum_l`` of the four. Image score
``s = (v·t_a + 1) / 2``.

How it is computed differs where the result does not:

* one vision pass per batch; the adapters run as a block hook inside the shared backbone forward;
* the level maps are blurred on the grid and summed there, then upsampled once (blur and upsampling are
  linear, so this is the official sum of upsampled maps up to fp32 rounding, ~1e-6);
* all 16 prompts of every new description go through the text tower in one call, cut after the longest
  EOT (exact under the causal mask); anchors are cached per description;
* attention: fused SDPA by default (``attention="auto"``). ``"explicit"`` runs the arithmetic of
  ``nn.MultiheadAttention(need_weights=True)`` that the official code runs. Although the map scales cosine
  differences by 200, the two agree to 3.3e-6 on the map at full ViT-L size (random weights, 518 px) and
  both stay within 5e-6 of the reference on the tiny test models, while the explicit path costs 1.5x on
  CPU (10.2 s against 6.8 s per ViT-L image); it stays available as the literal mode
  (``[aa_clip] attention``). No autograd in ``predict``. ``precision`` (``[model] precision``,
  ``inspector.runtime``): the vision tower under bf16 autocast where "auto" says so (CUDA, CPUs with
  native bf16); the taps from LN_post on, the text anchors and the maps always in fp32. "fp32": fp32
  throughout (parity).

Product outputs (no test-set statistics; §7 of the spec is the transductive metric-time fusion):

* ``probability_map = sigmoid((M - levels/2)·2/levels)``: the two-way softmax at the model's ×100
  temperature of the level-averaged blurred cosine difference (for 4 levels ``sigmoid((M - 2) / 2)``),
  a monotone map of M into [0, 1];
* ``topk_score``: the mean of the ``topk`` largest pixels of ``probability_map`` (default 100, about half
  a 14×14 patch at 518: a maximum that does not hang on one pixel, standing in for the official max);
* ``image_score``: industrial ``0.5·text_score + 0.5·topk_score``, medical ``topk_score`` (the official
  fusions without their per-class min-max).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...backbone import (
    BackboneSpec,
    ClipBackbone,
    build_openai_clip,
    read_model_config,
    read_openai_state_dict,
    tokenize,
)
from ...runtime import fp32, resolve
from ..base import Detector, EvalProtocol, Prediction, minmax
from .adapters import (
    HeadFormatError,
    build_image_adapter,
    build_text_adapter,
    count_parameters,
    init_adapters,
    load_strict,
    official_entry,
    read_torch_file,
    residual_mix,
)

log = logging.getLogger(__name__)

HEAD_FORMAT = "inspector-aa-clip"
HEAD_VERSION = 1

#: The official class-folder -> description table (AA-CLIP ``dataset/constants.py``: REAL_NAMES), per dataset.
OFFICIAL_DESCRIPTIONS: dict[str, dict[str, str]] = {
    "Brain": {"Brain": "scan"},
    "Liver": {"Liver": "scan"},
    "Retina": {"Retina": "scan"},
    "MVTec": {
        "bottle": "dark bottle",
        "cable": "top view of three cables",
        "capsule": "black and orange capsule",
        "carpet": "gray carpet",
        "grid": "metal or plastic mesh",
        "hazelnut": "single brown hazelnut",
        "leather": "brown leather",
        "metal_nut": "metal nut which has four notched edges",
        "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
        "screw": "screw",
        "tile": "speckled tile surface",
        "transistor": "a three-legged transistor placed vertically",
        "toothbrush": "toothbrush head",
        "wood": "wood surface",
        "zipper": "a black zipper",
    },
    "VisA": {
        "candle": "candle",
        "pcb3": "infrared sensor pcb module",
        "capsules": "capsules",
        "pipe_fryum": "pipe-shaped fryum",
        "pcb4": "battery charging pcb module",
        "macaroni2": "scattered yellow macaroni",
        "pcb2": "integrated circuits board",
        "chewinggum": "chewing gum",
        "macaroni1": "orange macaroni",
        "cashew": "cashew nut",
        "fryum": "wheel-shaped fryum snack",
        "pcb1": "dual ultrasonic distance sensor pcb module",
    },
    "Colon_clinicDB": {"Colon_clinicDB": "colon endoscopy image"},
    "Colon_colonDB": {"Colon_colonDB": "colon endoscopy image"},
    "Colon_cvc300": {"CVC-300": "colon endoscopy image"},
    "Colon_Kvasir": {"Kvasir": "colon endoscopy image"},
    "MPDD": {
        "connector": "metal clamps with black adjustment knobs",
        "tubes": "scattered metal objects",
        "metal_plate": "blue rectangular metal plate with a notch on one side",
        "bracket_white": "white, elongated triangular metal bracket with a smooth, matte finish",
        "bracket_brown": "brown L-shaped metal bracket with smooth, glossy finish and multiple mounting holes "
                         "along its arms",
        "bracket_black": "black ornamental metal bracket with spiral design attached to a rectangular frame",
    },
    "BTAD": {
        "01": "Bright concentric rings in neon yellow and blue tones against a dark blue background, resembling "
              "a stylized wave or energy field radiating outward.",
        "02": "vertical fabric lines in warm, dusty pink and beige tones",
        "03": "oval concentric circular rings in gradient shades of blue and white",
    },
}
#: folder name -> description over all datasets (the folder names do not collide)
CLASS_DESCRIPTIONS: dict[str, str] = {k: v for table in OFFICIAL_DESCRIPTIONS.values() for k, v in table.items()}

#: Prompt ensemble (official ``forward_utils.py``): state phrases, then sentence templates, state-major order.
NORMAL_STATES = ("{}", "a {}", "the {}")
ABNORMAL_STATES = ("a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage")
TEMPLATES = ("{}.", "a photo of {}.")

#: domain -> (blur kernel size, sigma) (official ``test.py``)
BLUR = {"industrial": (7, 1.0), "medical": (9, 1.5)}
LOGIT_SCALE = 100.0  # fixed, not exp(logit_scale)


def prompt_sentences(description: str) -> tuple[list[str], list[str]]:
    """(6 normal, 10 abnormal) sentences of a class description, in the official order."""
    def sentences(states: Iterable[str]) -> list[str]:
        return [template.format(state.format(description)) for state in states for template in TEMPLATES]

    return sentences(NORMAL_STATES), sentences(ABNORMAL_STATES)


def gaussian_kernel1d(size: int, sigma: float) -> torch.Tensor:
    """kornia's ``get_gaussian_kernel1d``: exp(-k^2 / 2 sigma^2) / sum, k = -r..r, fp32. [size]."""
    k = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-k.pow(2.0) / float(2 * sigma ** 2))
    return g / g.sum()


def gaussian_blur(maps: torch.Tensor, size: int, sigma: float) -> torch.Tensor:
    """maps: [B, C, G, G] -> blurred [B, C, G, G], as ``kornia.filters.gaussian_blur2d`` (0.6.x): reflect
    border (``F.pad`` mode "reflect": mirror without the edge pixel), an x pass then a y pass."""
    b, c, h, w = maps.shape
    kernel = gaussian_kernel1d(size, sigma).to(maps.device, maps.dtype)
    r = size // 2
    x = maps.reshape(b * c, 1, h, w)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), kernel.view(1, 1, 1, size))
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), kernel.view(1, 1, size, 1))
    return x.view(b, c, h, w)


def map_peak(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """The official metric-time image score: each map's maximum after min-max over every pixel of the
    class's maps (float32, and the official literal ``!= 1`` test: no rescaling when the top is exactly 1)."""
    highest = np.array([r["map_max"] for r in rows], dtype=np.float32)
    lowest = float(min(r["map_min"] for r in rows))
    top = float(highest.max())
    return highest if top == 1 else (highest - lowest) / (top - lowest)


def fuse_max(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """AA-CLIP, medical: the min-maxed map peak."""
    return map_peak(rows).astype(np.float64)


def fuse_text_max(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """AA-CLIP, industrial: 0.5 · min-maxed map peak + 0.5 · minmax(text score)."""
    text = np.array([r["text"] for r in rows], dtype=np.float32)
    return (0.5 * map_peak(rows) + 0.5 * minmax(text)).astype(np.float64)


def _check_domain(domain: str) -> str:
    key = str(domain).strip().lower()
    if key not in BLUR:
        raise ValueError(f"domain must be 'industrial' or 'medical', not '{domain}'")
    return key


class AACLIP(Detector):
    """Zero-shot anomaly detector. ``predict(images, class_names)`` -> ``Prediction`` (batched)."""

    name = "aa-clip"
    default_backbone = BackboneSpec(arch="ViT-L-14-336", pretrained="openai", image_size=518,
                                    feature_layers=(6, 12, 18, 24))
    trainable = True
    section = "aa_clip"
    describes_classes = True

    def __init__(self, backbone: ClipBackbone, *, text_adapter_weight: float = 0.1, image_adapter_weight: float = 0.1,
                 text_adapt_until: int = 3, image_adapt_until: int = 6, use_text_adapter: bool = True,
                 domain: str = "industrial", attention: str = "auto", topk: int = 100, precision: str = "fp32",
                 provenance: Mapping[str, Any] | None = None):
        super().__init__(backbone, precision, provenance)
        # adapters "after" blocks a tower does not have (a tiny test tower) are built, so the files keep the
        # official key layout, and never called: the official loop applies them only inside the tower
        if text_adapt_until < 0 or image_adapt_until < 0:
            raise ValueError(f"text/image_adapt_until must be >= 0, not {text_adapt_until}/{image_adapt_until}")
        if attention not in ("auto", "explicit", "sdpa"):
            raise ValueError(f"attention must be 'auto', 'explicit' or 'sdpa', not '{attention}'")
        if int(topk) < 1:
            raise ValueError(f"topk must be >= 1, not {topk}")
        self.levels = tuple(backbone.spec.feature_layers)
        self.text_adapter_weight = float(text_adapter_weight)
        self.image_adapter_weight = float(image_adapter_weight)
        self.text_adapt_until = int(text_adapt_until)
        self.image_adapt_until = int(image_adapt_until)
        self.use_text_adapter = bool(use_text_adapter)
        self.domain = _check_domain(domain)
        self.attention = attention
        self.topk = int(topk)
        wv, et, e = backbone.vision_width, backbone.text_width, backbone.embed_dim
        self.text_adapter = build_text_adapter(et, e, self.text_adapt_until)
        self.image_adapter = build_image_adapter(wv, e, self.image_adapt_until, len(self.levels))
        init_adapters(self.text_adapter)
        init_adapters(self.image_adapter)
        self._anchors: dict[tuple[str, bool], torch.Tensor] = {}  # (description, text adapter on) -> T [E, 2]

    # ---------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_official(cls, clip: str | Path, text_adapter: str | Path | None = None,
                      image_adapter: str | Path | None = None, model_config: str | Path | dict | None = None, *,
                      device: str = "cpu", domain: str = "industrial", image_size: int = 518,
                      **options: Any) -> AACLIP:
        """OpenAI ``ViT-L-14-336px.pt`` (TorchScript or plain state dict) + official adapter checkpoints.

        ``model_config``: an open_clip-style JSON (path, dict, or open_clip architecture name) used as the
        official loader uses its config: vision heads = width // head_width, text heads = text_cfg.heads,
        image size forced to ``image_size``. Without it the heads are width // 64 (what the OpenAI files
        imply). Weights are fp16-rounded like OpenAI's loader; exact GELU; the position embedding is resized
        bicubic + antialias. ``text_adapter=None``: the frozen text encoder with ``text_projection``, the
        official fallback when ``text_adapter.pth`` is missing. ``image_adapter=None``: untrained (warns).
        """
        from ...runtime import resolve_device

        state = read_openai_state_dict(clip)
        config = None
        if model_config is not None:
            config = read_model_config(model_config)
            if not isinstance(config.get("vision_cfg"), dict):
                raise ValueError(f"model config {model_config}: no 'vision_cfg' section")
            config["vision_cfg"] = {**config["vision_cfg"], "image_size": image_size}
        config_ref = ""  # what the spec (and so a model manifest) records: a resolved file or an architecture name
        if isinstance(model_config, (str, Path)):
            config_path = Path(model_config).expanduser()
            config_ref = str(config_path.resolve()) if config_path.is_file() else str(model_config)
        spec = BackboneSpec(arch="openai-checkpoint", pretrained=str(clip), clip_format="openai", activation="gelu",
                            image_size=image_size, feature_layers=cls.default_backbone.feature_layers,
                            model_config=config_ref)
        backbone = ClipBackbone(build_openai_clip(state, "gelu", config), spec)
        provenance = {"backbone": str(clip), "model_config": str(model_config) if model_config is not None else None,
                      "text_adapter_file": str(text_adapter) if text_adapter is not None else None,
                      "image_adapter_file": str(image_adapter) if image_adapter is not None else None,
                      "random_weights": image_adapter is None}
        model = cls(backbone, use_text_adapter=text_adapter is not None, domain=domain, provenance=provenance,
                    **options)
        if text_adapter is not None:
            load_strict(model.text_adapter, official_entry(text_adapter, "text_adapter"),
                        f"{text_adapter} ['text_adapter']")
        if image_adapter is not None:
            load_strict(model.image_adapter, official_entry(image_adapter, "image_adapter"),
                        f"{image_adapter} ['image_adapter']")
        else:
            warnings.warn("AA-CLIP without an image adapter file: the image adapters are at their random "
                          "initialisation and scores mean nothing", stacklevel=2)
        return model.to(resolve_device(device))

    @classmethod
    def from_settings(cls, backbone: ClipBackbone, head: str | Path | None, options: Any, *,
                      precision: str = "fp32", provenance: Mapping[str, Any] | None = None) -> AACLIP:
        """A detector on a loaded backbone, adapters from ``head`` (our format) or untrained (None), with the
        ``[aa_clip]`` options (``domain``, ``topk``, ``attention``)."""
        kwargs = {**cls.scoring_options(options, precision), "provenance": provenance}
        if head is None:
            return cls(backbone, **kwargs)
        payload = cls.load_head(head)
        c = payload["config"]
        model = cls(backbone, text_adapter_weight=c["text_adapter_weight"],
                    image_adapter_weight=c["image_adapter_weight"], text_adapt_until=c["text_adapt_until"],
                    image_adapt_until=c["image_adapt_until"], use_text_adapter=c["use_text_adapter"], **kwargs)
        model.load_head_state(payload, source=str(head))
        return model

    @classmethod
    def scoring_options(cls, options: Any, precision: str) -> dict[str, Any]:
        """The ``[aa_clip]`` options and the precision: what changes the numbers (a version's identity)."""
        return {"domain": options.domain, "topk": options.topk, "attention": options.attention,
                "precision": precision}

    @classmethod
    def trainer(cls) -> Any:
        from . import train

        return train.TRAINER

    @classmethod
    def import_official(cls, clip: Any, text_adapter: Any = None, image_adapter: Any = None,
                        model_config: Any = None, **unused: Any) -> tuple[AACLIP, dict[str, Any]]:
        """The official adapter files (``text_adapter.pth``, ``image_adapter_<epoch>.pth``) on an OpenAI CLIP."""
        from ...errors import UsageError
        from ...hashing import file_sha256

        given = [k for k, v in unused.items() if v is not None]
        if given:
            raise UsageError("AA-CLIP takes --image-adapter and --text-adapter, not "
                             + ", ".join("--" + k.replace("_", "-") for k in given))
        if image_adapter is None:
            raise UsageError("AA-CLIP needs --image-adapter (image_adapter_<epoch>.pth)")
        model = cls.from_official(clip=clip, text_adapter=text_adapter, image_adapter=image_adapter,
                                  model_config=model_config)
        origin = {"kind": "official-aa-clip", "image_adapter_file": str(Path(image_adapter).resolve()),
                  "image_adapter_sha256": file_sha256(image_adapter),
                  "text_adapter_file": str(Path(text_adapter).resolve()) if text_adapter else None,
                  "text_adapter_sha256": file_sha256(text_adapter) if text_adapter else None}
        return model, origin

    # ---------------------------------------------------------------------------------------------
    # our head format

    def head_config(self) -> dict[str, Any]:
        return {"text_adapter_weight": self.text_adapter_weight, "image_adapter_weight": self.image_adapter_weight,
                "text_adapt_until": self.text_adapt_until, "image_adapt_until": self.image_adapt_until,
                "use_text_adapter": self.use_text_adapter, "vision_width": self.backbone.vision_width,
                "text_width": self.backbone.text_width, "embed_dim": self.backbone.embed_dim,
                "feature_layers": list(self.levels)}

    def save_head(self, path: str | Path) -> None:
        """One torch file: {"format", "version", "text_adapter": state dict or None, "image_adapter", "config"}."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        def cpu(module: nn.Module) -> dict[str, torch.Tensor]:
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}

        payload = {"format": HEAD_FORMAT, "version": HEAD_VERSION,
                   "text_adapter": cpu(self.text_adapter) if self.use_text_adapter else None,
                   "image_adapter": cpu(self.image_adapter), "config": self.head_config()}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        tmp.replace(path)

    @classmethod
    def load_head(cls, path: str | Path) -> dict[str, Any]:
        """Read and check one of our head files; returns its payload (apply with ``load_head_state``)."""
        payload = read_torch_file(path, "AA-CLIP head file")
        if not isinstance(payload, Mapping) or payload.get("format") != HEAD_FORMAT:
            if isinstance(payload, Mapping) and ("image_adapter" in payload or "text_adapter" in payload):
                raise HeadFormatError(f"{path}: an official AA-CLIP checkpoint, not an inspector head; convert it "
                                      "with AACLIP.from_official(clip, text_adapter, image_adapter).save_head(path)")
            raise HeadFormatError(f"{path}: not an inspector AA-CLIP head (format '{HEAD_FORMAT}')")
        if payload.get("version") != HEAD_VERSION:
            raise HeadFormatError(f"{path}: head format version {payload.get('version')} is not supported "
                                  f"(this build reads {HEAD_VERSION})")
        config = payload.get("config")
        needed = ("text_adapter_weight", "image_adapter_weight", "text_adapt_until", "image_adapt_until",
                  "use_text_adapter")
        if not isinstance(config, Mapping) or any(k not in config for k in needed):
            raise HeadFormatError(f"{path}: the head config lacks some of {list(needed)}")
        if config["use_text_adapter"] and not isinstance(payload.get("text_adapter"), Mapping):
            raise HeadFormatError(f"{path}: config says use_text_adapter but the file has no text adapter")
        if not isinstance(payload.get("image_adapter"), Mapping):
            raise HeadFormatError(f"{path}: no image adapter state")
        return dict(payload)

    def load_head_state(self, payload: Mapping[str, Any], source: str = "head") -> None:
        """Load a payload from ``load_head`` strictly (its config must match this model's)."""
        c = payload["config"]
        for key in ("vision_width", "text_width", "embed_dim"):
            mine = getattr(self.backbone, key)
            if key in c and int(c[key]) != mine:
                raise HeadFormatError(f"{source}: head built for {key} {c[key]}, the backbone has {mine}")
        if "feature_layers" in c and tuple(c["feature_layers"]) != self.levels:
            raise HeadFormatError(f"{source}: head built for feature layers {tuple(c['feature_layers'])}, "
                                  f"the backbone gives {self.levels}")
        load_strict(self.image_adapter, payload["image_adapter"], f"{source} ['image_adapter']")
        self.use_text_adapter = bool(c["use_text_adapter"])
        if payload.get("text_adapter") is not None:
            load_strict(self.text_adapter, payload["text_adapter"], f"{source} ['text_adapter']")
        self.clear_caches()

    def describe_head(self) -> dict[str, Any]:
        """Parameter counts and config, for the model manifest."""
        text = count_parameters(self.text_adapter) if self.use_text_adapter else 0
        image = count_parameters(self.image_adapter)
        return {"format": HEAD_FORMAT, "version": HEAD_VERSION,
                "parameters": {"text_adapter": text, "image_adapter": image, "total": text + image},
                "config": self.head_config()}

    # ---------------------------------------------------------------------------------------------
    # properties and caches

    @property
    def eval_protocol(self) -> EvalProtocol:
        """The paper's metric-time fusion: min-maxed map max (+ min-maxed text score for industrial)."""
        return EvalProtocol(smooth_sigma=0.0, fusion=fuse_text_max if self.domain == "industrial" else fuse_max)

    def clear_caches(self) -> None:
        self._anchors.clear()

    def _attention(self) -> str:
        if self.attention != "auto":
            return self.attention
        return "sdpa"

    # ---------------------------------------------------------------------------------------------
    # text

    def class_description(self, class_name: str) -> str:
        """The site's description of the class (``set_class_descriptions``), else the official description of
        an MVTec/VisA/MPDD/BTAD/medical folder name; "object" and any other name are used as they are (a
        free-text product description)."""
        return self.class_descriptions.get(class_name) or CLASS_DESCRIPTIONS.get(class_name, class_name)

    def _tokenize(self, sentences: Sequence[str]) -> torch.Tensor:
        """[M, 77] token ids; refuses sentences longer than the context, as the official tokenizer."""
        tokens = tokenize(sentences)
        full = tokens[:, -1] != 0
        if bool(full.any()):
            from open_clip import tokenizer as oc_tokenizer

            encoder = getattr(oc_tokenizer, "_tokenizer", None)
            for sentence, is_full in zip(sentences, full.tolist()):
                if is_full and (encoder is None or len(encoder.encode(sentence)) + 2 > tokens.shape[1]):
                    raise ValueError(f"class description too long: the prompt '{sentence}' exceeds "
                                     f"{tokens.shape[1]} tokens")
        return tokens

    def _text_hook(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index <= self.text_adapt_until:
            x = residual_mix(self.text_adapter[str(index - 1)], x, self.text_adapter_weight)
        return x

    def encode_sentences(self, sentences: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings [M, E], not normalised: adapted tower + learned projection P, or (without
        the text adapter) the frozen tower + ``text_projection``."""
        tokens = self._tokenize(sentences).to(self.device)  # [M, 77]
        last = tokens.argmax(dim=-1)  # the EOT has the highest id
        x = self.backbone.token_embeddings(tokens[:, :int(last.max()) + 1])  # [M, T, Et]
        if not self.use_text_adapter:
            return self.backbone.encode_text(x, last, attention=self._attention(), project=True)
        x = self.backbone.encode_text(x, last, after_block=self._text_hook, attention=self._attention(),
                                      project=False)  # [M, Et] after LN_final
        return self.text_adapter[str(self.text_adapt_until)](x)

    def compute_anchors(self, descriptions: Sequence[str]) -> torch.Tensor:
        """Anchors T of K descriptions: [K, E, 2] (column 0 normal, 1 abnormal). Differentiable, uncached."""
        groups = [prompt_sentences(d) for d in descriptions]
        n_normal, n_abnormal = len(groups[0][0]), len(groups[0][1])
        e = self.encode_sentences([s for normal, abnormal in groups for s in normal + abnormal])
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.view(len(descriptions), n_normal + n_abnormal, -1)  # [K, 16, E]
        t_n = e[:, :n_normal].mean(1)
        t_a = e[:, n_normal:].mean(1)
        return torch.stack([t_n / t_n.norm(dim=-1, keepdim=True), t_a / t_a.norm(dim=-1, keepdim=True)], dim=-1)

    def _ensure_anchors(self, descriptions: Iterable[str]) -> None:
        todo = list(dict.fromkeys(d for d in descriptions if (d, self.use_text_adapter) not in self._anchors))
        if todo:
            # plain tensors (not inference tensors), so training code may also use the cached anchors
            with torch.inference_mode(False), torch.no_grad():
                anchors = self.compute_anchors(todo)
            for d, t in zip(todo, anchors):
                self._anchors[(d, self.use_text_adapter)] = t

    def text_anchors(self, class_name: str) -> torch.Tensor:
        """T [E, 2] of a class, cached per description (``clear_caches()`` after changing the text adapter
        weights; ``load_head_state`` and ``.to()`` do it)."""
        description = self.class_description(class_name)
        self._ensure_anchors([description])
        return self._anchors[(description, self.use_text_adapter)]

    # ---------------------------------------------------------------------------------------------
    # image

    def _vision_hook(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index <= self.image_adapt_until:
            x = residual_mix(self.image_adapter["layer_adapters"][index - 1], x, self.image_adapter_weight)
        return x

    def image_features(self, pixels: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """pixels [N, 3, S, S] -> ([F_l [N, L, E] L2-normalised per level], v [N, E] not renormalised).

        Taps after the block adapters (level 6 sees the block-6 adapter), CLS dropped, frozen LN_post."""
        taps = self.encode_graph("vision", pixels)  # 4 x [N, L, Wv]
        ln_post = self.backbone.clip.visual.ln_post
        # in fp32 even under autocast (bf16 scoring, training on CUDA): the maps scale cosines by 100
        with fp32(pixels.device):
            taps = [ln_post(t.float()) for t in taps]  # 4 x [N, L, Wv]
            features = [F.normalize(proj(t), dim=-1) for proj, t in zip(self.image_adapter["seg_proj"], taps)]
            det = F.normalize(self.image_adapter["det_proj"](taps[-1]), dim=-1).mean(1)
        return features, det

    def vision_taps(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The "vision" graph: pixels [N, 3, S, S] -> the residual stream after each feature layer, CLS
        dropped, the vision adapters applied inside the tower: [N, L, Wv] per level (before LN_post)."""
        tokens = self.backbone.embed_image(pixels)  # [N, 1 + L, Wv]
        _, taps = self.backbone.run_vision(tokens, self.levels, after_block=self._vision_hook,
                                           attention=self._attention())
        return tuple(taps)

    def scoring_graphs(self) -> dict[str, Any]:
        """The vision tower with its adapters and taps (the projections, anchors and maps stay in torch;
        the text anchors are computed once per class description, in torch)."""
        from ..base import ScoringGraph

        size = self.image_size
        taps = tuple(f"tap_{layer}" for layer in self.levels)
        return {"vision": ScoringGraph(self.vision_taps, ("pixels",), taps,
                                       lambda: (torch.randn(2, 3, size, size),),
                                       {"pixels": {0: "batch"}, **{t: {0: "batch"} for t in taps}})}

    def level_maps(self, features: Sequence[torch.Tensor], anchors: torch.Tensor) -> torch.Tensor:
        """F_l [N, L, E] and per-image T [N, E, 2] -> m_l = (Z_a + 1 - Z_n)/2 on the grid: [N, levels, G, G]."""
        n, grid = anchors.shape[0], self.backbone.grid
        maps = []
        for f in features:
            z = LOGIT_SCALE * torch.bmm(f, anchors)  # [N, L, 2]
            z = z.transpose(1, 2).reshape(n, 2, grid, grid)  # patch p = row·G + col
            maps.append((z[:, 1] + 1 - z[:, 0]) / 2)
        return torch.stack(maps, dim=1)

    def anomaly_maps(self, features: Sequence[torch.Tensor], anchors: torch.Tensor, domain: str,
                     size: int) -> torch.Tensor:
        """The official map M: [N, S, S] (sum over levels of upsampled blurred level maps)."""
        kernel, sigma = BLUR[domain]
        blurred = gaussian_blur(self.level_maps(features, anchors), kernel, sigma)  # [N, levels, G, G]
        summed = blurred.sum(dim=1, keepdim=True)  # linear: summing before upsampling changes only rounding
        return F.interpolate(summed, size=(size, size), mode="bilinear", align_corners=True)[:, 0]

    def probability(self, anomaly_map: torch.Tensor) -> torch.Tensor:
        """sigmoid(100 · level-mean blurred cosine difference) = sigmoid((M - levels/2)·2/levels)."""
        levels = len(self.levels)
        return torch.sigmoid((anomaly_map - levels / 2) * (2.0 / levels))

    def topk_scores(self, probability_map: torch.Tensor) -> torch.Tensor:
        flat = probability_map.flatten(1)
        return flat.topk(min(self.topk, flat.shape[1]), dim=1).values.mean(1)

    # ---------------------------------------------------------------------------------------------
    # scoring

    @torch.inference_mode()
    def predict_tensors(self, pixels: torch.Tensor, class_names: Sequence[str], seeds: Sequence[int] | None = None,
                        domain: str | None = None) -> Prediction:
        """pixels: [N, 3, S, S] CLIP-normalised -> Prediction (on the model's device). ``seeds`` is ignored
        (nothing is drawn); ``domain`` overrides the model's for this call."""
        del seeds
        class_names = list(class_names)
        if len(class_names) != pixels.shape[0]:
            raise ValueError(f"{pixels.shape[0]} images but {len(class_names)} class names")
        with self.autocast():  # the vision tower; taps on are fp32 (image_features)
            features, det = self.image_features(pixels.to(self.device, torch.float32))
        return self.score_features(features, det, class_names, domain=domain, size=pixels.shape[-1])

    @torch.inference_mode()
    def score_features(self, features: Sequence[torch.Tensor], det: torch.Tensor, class_names: Sequence[str],
                       domain: str | None = None, size: int | None = None) -> Prediction:
        """The scoring half of ``predict_tensors``, on ``image_features`` output (so one vision pass can be
        scored under both domains, or by models that differ only in their text side)."""
        domain = self.domain if domain is None else _check_domain(domain)
        class_names = list(class_names)
        if len(class_names) != det.shape[0]:
            raise ValueError(f"{det.shape[0]} images but {len(class_names)} class names")
        descriptions = [self.class_description(c) for c in class_names]
        self._ensure_anchors(descriptions)
        anchors = torch.stack([self._anchors[(d, self.use_text_adapter)] for d in descriptions])  # [N, E, 2]
        text_score = ((det[:, None, :] @ anchors)[:, 0, 1] + 1) / 2  # [N]
        anomaly_map = self.anomaly_maps(features, anchors, domain, size or self.image_size)
        probability_map = self.probability(anomaly_map)
        topk = self.topk_scores(probability_map)
        image_score = 0.5 * text_score + 0.5 * topk if domain == "industrial" else topk
        provenance = {**self.provenance, "detector": self.name, "domain": domain,
                      "precision": resolve(self.precision, self.device),
                      "text_adapter": self.use_text_adapter, "topk": self.topk}
        return Prediction(anomaly_map=anomaly_map, image_score=image_score, text_score=text_score,
                          topk_score=topk, provenance=provenance, probability_map=probability_map)
