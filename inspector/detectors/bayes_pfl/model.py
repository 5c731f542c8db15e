"""Bayes-PFL inference: frozen CLIP + ``BayesPFLHead`` -> anomaly maps and image scores.

The function computed is the official test path (github.com/xiaozhen228/Bayes-PFL: ``test.py``, ``VPB.py``, ``PFL.py``) on identical weights and noise; the way
it is computed is not:

* one text-encoder call per batch for all 2·B·R prompts of all N images, sequences cut right after
  their EOT (exact under the causal mask) and padded to the longest class name of the batch;
* logit *differences* upsampled (bilinear is linear, so sigmoid(up(Z_a - Z_n)) equals the official
  two-way softmax of the upsampled logits), B·R channels per level instead of 2·B·R;
* everything stays on the device; autocast as ``[model] precision`` says (``inspector.runtime``: bf16 on
  CUDA and on CPUs with native bf16 under "auto"), logit differences and upsampling in fp32; no autograd;
* whatever depends only on the class (token embeddings, IAD samples, state-token inputs) is cached.

Sequence order inside a batch is the official one: text embedding index m = s·(B·R) + r·B + b for
state s (0 normal, 1 abnormal), sample r and bank entry b.

Noise. ``noise = {"isd": [N, R, E], "iad_normal": [R, E], "iad_abnormal": [R, E]}`` supplies the
standard-normal draws epsilon before ``mu + sigma * epsilon``. Without it, IAD draws are made once per
(class, R) from ``seed`` and kept, and each image's ISD draws come from a generator seeded by ``seed``
and the image's own pixels, so an image gets the same score whatever batch it arrives in.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ...backbone import EOT_TOKEN, BackboneSpec, ClipBackbone, load_backbone, tokenize
from ...imaging import ImageInput, as_list, content_seed
from ...runtime import fp32, resolve, resolve_device
from ..base import BenchPlan, Detector, EvalProtocol, Prediction, minmax
from .head import BayesPFLConfig, BayesPFLHead, describe

log = logging.getLogger(__name__)

#: Folder names the official code maps to other prompt names (official ``VPB.py`` prompt names); anything else is lower-cased.
CLASS_PROMPT_NAMES = {
    "macaroni1": "macaroni", "macaroni2": "macaroni",
    "pcb1": "printed circuit board", "pcb2": "printed circuit board",
    "pcb3": "printed circuit board", "pcb4": "printed circuit board",
    "pipe_fryum": "pipe fryum", "chewinggum": "chewing gum", "metal_nut": "metal nut",
}
#: Classes whose defects are small: the official top-k uses k = 20 for them, 2000 for all others.
SMALL_DEFECT_CLASSES = {"capsules", "macaroni1", "macaroni2", "pipe_fryum", "screw", "cashew", "chewinggum",
                        "macaroni", "pipe fryum", "chewing gum"}


def prompt_name(class_name: str) -> str:
    """The class name as the official code writes it into the prompt."""
    return CLASS_PROMPT_NAMES.get(class_name, class_name).lower()


def official_topk(class_name: str) -> int:
    return 20 if class_name.strip().lower() in SMALL_DEFECT_CLASSES else 2000


def _seed_of(*parts: Any) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


#: Bayes-PFL's paper evaluates maps smoothed with a Gaussian (sigma 8) before pixel metrics, and the image
#: score as the per-class min-max fusion of s_text and s_topk
def fuse_text_topk(rows: Sequence[dict[str, Any]]) -> np.ndarray:
    """0.5·minmax(s_text) + 0.5·minmax(s_topk) over one class's rows (float64)."""
    text = np.array([r["text"] for r in rows], dtype=np.float64)
    topk = np.array([r["topk"] for r in rows], dtype=np.float64)
    return 0.5 * minmax(text) + 0.5 * minmax(topk)


OFFICIAL_PROTOCOL = EvalProtocol(smooth_sigma=8.0, fusion=fuse_text_topk)


def official_image_scores(text_scores: torch.Tensor, topk_scores: torch.Tensor,
                          class_names: Sequence[str]) -> torch.Tensor:
    """The official transductive fusion (``models/metric_and_visualization.py``, called from ``test.py``), for evaluation parity only.

    0.5·minmax_c(s_text) + 0.5·minmax_c(s_topk), min-max over all test images of the same class c
    (+1e-8 in the denominator). It needs the whole test set, so a live line cannot use it. The same
    function as ``inspector eval`` uses (``BayesPFL.eval_protocol``), on tensors; float64 [N].
    """
    rows = [{"class_name": c, "text": float(t), "topk": float(k)}
            for c, t, k in zip(class_names, text_scores.tolist(), topk_scores.tolist(), strict=True)]
    return torch.from_numpy(OFFICIAL_PROTOCOL.scores(rows))


@dataclass
class _ClassPrompt:
    """What one class contributes to every prompt, cached.

    sos: [1, E] embedding of the start token (original position 0)
    suffix: [L_c, E] embeddings of the class-name tokens and EOT (original positions 2..EOT)
    last: index of the EOT after the P+Q learned tokens are inserted (original EOT + P + Q - 1)
    """

    sos: torch.Tensor
    suffix: torch.Tensor
    last: int


class BayesPFL(Detector):
    """Zero-shot anomaly detector. ``predict(images, class_names)`` -> ``Prediction`` (batched)."""

    name = "bayes-pfl"
    default_backbone = BackboneSpec(arch="ViT-L-14-336", pretrained="openai", image_size=518,
                                    feature_layers=(6, 12, 18, 24))
    trainable = True
    section = "bayes_pfl"
    eval_protocol = OFFICIAL_PROTOCOL
    describes_classes = True

    def __init__(self, backbone: ClipBackbone, head: BayesPFLHead, *, samples: int = 10, seed: int = 333,
                 topk: int = 0, text_cache: str = "none", precision: str = "fp32", prototype_images: int = 8,
                 provenance: Mapping[str, Any] | None = None):
        super().__init__(backbone, precision, provenance)
        c = head.config
        if backbone.embed_dim != backbone.text_width:
            raise ValueError(f"Bayes-PFL needs a CLIP whose embedding width ({backbone.embed_dim}) equals its "
                             f"text width ({backbone.text_width}): sampled prompts live in both spaces")
        if (c.text_width, c.vision_width) != (backbone.text_width, backbone.vision_width):
            raise ValueError(f"head built for text/vision widths {c.text_width}/{c.vision_width}, backbone has "
                             f"{backbone.text_width}/{backbone.vision_width}")
        if c.levels != len(backbone.spec.feature_layers):
            raise ValueError(f"head has {c.levels} feature levels, backbone gives {len(backbone.spec.feature_layers)}")
        if text_cache not in ("none", "class"):
            raise ValueError(f"text_cache must be 'none' or 'class', not '{text_cache}'")
        self.head = head.eval().requires_grad_(False)
        self.samples, self.seed, self.topk = samples, seed, topk
        self.text_cache = text_cache
        self.prototype_images = prototype_images
        self._prompts: dict[str, _ClassPrompt] = {}
        self._iad: dict[tuple[str, int], torch.Tensor] = {}  # (class, R) -> state-token inputs [2, R, B, Q, E]
        self._prototypes: dict[str, torch.Tensor] = {}  # class -> g_bar [E]
        self._class_text: dict[tuple[str, int], torch.Tensor] = {}  # (class, R) -> t [M, E] normalised

    # ---------------------------------------------------------------------------------------------
    # construction

    @classmethod
    def from_official(cls, clip: str | Path, head: str | Path, stage: int | None = None, *,
                      device: str = "auto", feature_layers: Sequence[int] = (6, 12, 18, 24),
                      **options: Any) -> BayesPFL:
        """An OpenAI CLIP checkpoint (``ViT-L-14-336px.pt``) + an official ``{'MyModel': ...}`` head file.

        The stage follows the official rule (file name) unless given; exact GELU as the checkpoints need.
        """
        head_module = BayesPFLHead.load(head, stage=stage)
        spec = BackboneSpec(arch="openai-checkpoint", pretrained=str(clip), clip_format="openai",
                            feature_layers=tuple(feature_layers))
        backbone = load_backbone(spec)
        provenance = {"backbone": str(clip), "head": str(head), "stage": head_module.config.stage,
                      "random_weights": False}
        return cls(backbone, head_module, provenance=provenance, **options).to(resolve_device(device))

    @classmethod
    def from_settings(cls, backbone: ClipBackbone, head: str | Path | None, options: Any, *,
                      precision: str = "fp32", provenance: Mapping[str, Any] | None = None) -> BayesPFL:
        """``head``: our head file or the official ``{'MyModel': ...}`` file; None = the official
        initialisation (untrained, drawn from ``[bayes_pfl] seed`` without touching the global generator).
        ``options``: the ``[bayes_pfl]`` section."""
        if head is not None:
            module = BayesPFLHead.load(head)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(options.seed)
                module = BayesPFLHead(BayesPFLConfig(text_width=backbone.text_width,
                                                     vision_width=backbone.vision_width,
                                                     levels=len(backbone.spec.feature_layers)))
        return cls(backbone, module, provenance=provenance, **cls.scoring_options(options, precision))

    @classmethod
    def trainer(cls) -> Any:
        from . import train

        return train.TRAINER

    @classmethod
    def import_official(cls, clip: Any, head: Any = None, stage: int | None = None, model_config: Any = None,
                        **unused: Any) -> tuple[BayesPFL, dict[str, Any]]:
        """The official head file (``train_visa.pth`` / ``train_mvtec.pth``) on an OpenAI CLIP checkpoint."""
        from ...errors import UsageError
        from ...hashing import file_sha256

        given = [k for k, v in unused.items() if v is not None]
        if given:
            raise UsageError(f"Bayes-PFL takes --head (and --stage), not {', '.join('--' + k.replace('_', '-') for k in given)}")
        if head is None:
            raise UsageError("Bayes-PFL needs --head (train_visa.pth or train_mvtec.pth)")
        head_module = BayesPFLHead.load(head, stage=stage)
        spec = BackboneSpec(arch="openai-checkpoint", pretrained=str(clip), clip_format="openai", activation="gelu",
                            model_config=str(Path(model_config).resolve()) if model_config else "")
        backbone = load_backbone(spec)
        if head_module.config.vision_width != backbone.vision_width:
            raise UsageError(f"{head} was trained for a vision width of {head_module.config.vision_width}, "
                             f"{clip} has {backbone.vision_width}")
        origin = {"kind": "official-bayes-pfl", "head_file": str(Path(head).resolve()),
                  "head_file_sha256": file_sha256(head), "stage": head_module.config.stage}
        model = cls(backbone, head_module, provenance={"backbone": str(clip), "random_weights": False})
        return model, origin

    @classmethod
    def scoring_options(cls, options: Any, precision: str) -> dict[str, Any]:
        """The ``[bayes_pfl]`` options and the precision: what changes the numbers (a version's identity)."""
        return {"samples": options.samples, "seed": options.seed, "topk": options.topk,
                "text_cache": options.text_cache, "precision": precision, "prototype_images": options.prototype_images}

    def save_head(self, path: str | Path) -> None:
        self.head.save(path)

    def describe_head(self) -> dict[str, Any]:
        return describe(self.head)

    @property
    def config(self):
        return self.head.config

    def clear_caches(self) -> None:
        self._prompts.clear()
        self._iad.clear()
        self._class_text.clear()

    def _apply(self, fn, *args, **kwargs):  # .to(device) / .half(): caches cleared (base), prototypes follow
        self._prototypes = {k: fn(v) for k, v in self._prototypes.items()}
        return super()._apply(fn, *args, **kwargs)

    # ---------------------------------------------------------------------------------------------
    # per-class caches

    def _class_prompt(self, class_name: str) -> _ClassPrompt:
        cached = self._prompts.get(class_name)
        if cached is None:
            c = self.config
            inserted = c.context_len + c.state_len
            words = self.class_descriptions.get(class_name) or prompt_name(class_name)  # the site's, else the name
            tokens = tokenize(["X " + words])[0]  # [77]
            eot = int((tokens == EOT_TOKEN).nonzero()[0])
            last = eot + inserted - 1
            if last >= self.backbone.context_length:
                raise ValueError(f"class name '{class_name}' is too long: the prompt would lose its end token "
                                 f"({eot} tokens + {inserted} learned ones > {self.backbone.context_length})")
            embedded = self.backbone.token_embeddings(tokens[:eot + 1].to(self.device)).float()  # [EOT+1, E]
            # position 1 holds "X", the placeholder the P+Q learned tokens replace
            cached = self._prompts[class_name] = _ClassPrompt(sos=embedded[:1], suffix=embedded[2:], last=last)
        return cached

    def draw_iad_noise(self, class_name: str, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The seeded IAD draws of a class: (eps_normal [R, E], eps_abnormal [R, E])."""
        gen = torch.Generator().manual_seed(_seed_of(self.seed, "iad", class_name))
        eps = torch.randn(2, samples, self.config.text_width, generator=gen)
        return eps[0], eps[1]

    def _state_inputs(self, eps_normal: torch.Tensor, eps_abnormal: torch.Tensor) -> torch.Tensor:
        """S^s_b + z_r^s for both states: [2, R, B, Q, E], from IAD draws eps_s [R, E]."""
        head = self.head
        return self.state_inputs_from_samples(
            head.iad_normal(head.iad_base, eps_normal.to(self.device).float())["zk"],
            head.iad_abnormal(head.iad_base, eps_abnormal.to(self.device).float())["zk"])

    def state_inputs_from_samples(self, z_normal: torch.Tensor, z_abnormal: torch.Tensor) -> torch.Tensor:
        """S^s_b + z_r^s from IAD samples z_s [R, E] (differentiable): [2, R, B, Q, E]."""
        banks = torch.stack([self.head.state_normal, self.head.state_abnormal])  # [2, B, Q, E]
        return banks[:, None] + torch.stack([z_normal, z_abnormal])[:, :, None, None, :]

    def _class_state_inputs(self, class_name: str, samples: int) -> torch.Tensor:
        key = (class_name, samples)
        if key not in self._iad:
            self._iad[key] = self._state_inputs(*self.draw_iad_noise(class_name, samples))
        return self._iad[key]

    def draw_isd_noise(self, pixels: torch.Tensor, samples: int, seeds: Sequence[int] | None = None) -> torch.Tensor:
        """The seeded ISD draws of each image, from its own pixels (``content_seed``, which callers may
        compute ahead, off the scoring thread): [N, R, E]."""
        if seeds is None:
            seeds = [content_seed(image) for image in pixels.detach().float().cpu()]
        draws = []
        for seed in seeds:
            gen = torch.Generator().manual_seed(_seed_of(self.seed, "isd", seed))
            draws.append(torch.randn(samples, self.config.text_width, generator=gen))
        return torch.stack(draws)

    # ---------------------------------------------------------------------------------------------
    # text

    def encode_prompts(self, g_isd: torch.Tensor, eps_isd: torch.Tensor, class_names: Sequence[str],
                       state_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """All 2·B·R prompts of N images in one text-encoder call.

        g_isd: [N, E] image embedding that conditions the ISD (the image's own g, or a class prototype)
        eps_isd: [N, R, E] standard-normal draws; state_inputs: per image [2, R, B, Q, E]
        Returns t: [N, M, E] L2-normalised, M = 2·B·R, index s·(B·R) + r·B + b.
        """
        z_isd = self.head.isd(g_isd.float(), eps_isd.to(self.device).float())["zk"]  # [N, R, E]
        return self.encode_prompt_samples(z_isd, class_names, state_inputs)

    def encode_prompt_samples(self, z_isd: torch.Tensor, class_names: Sequence[str],
                              state_inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """Like ``encode_prompts``, from ISD samples z_isd: [N, R, E] (differentiable; training uses it)."""
        c = self.config
        n, samples, e = z_isd.shape
        context = self.head.context[None, None] + z_isd[:, :, None, None, :]  # [N, R, B, P, E]
        context = context[:, None].expand(n, 2, samples, c.bank_size, c.context_len, e)
        states = torch.stack(list(state_inputs))  # [N, 2, R, B, Q, E]
        prompts = [self._class_prompt(name) for name in class_names]
        length = max(p.last for p in prompts) + 1
        tail = length - 1 - c.context_len - c.state_len
        suffix = torch.zeros(n, tail, e, device=self.device)
        for i, p in enumerate(prompts):
            suffix[i, :p.suffix.shape[0]] = p.suffix
        sos = torch.stack([p.sos for p in prompts])  # [N, 1, E]
        seq = torch.cat([
            sos[:, None, None, None].expand(n, 2, samples, c.bank_size, 1, e),
            context, states,
            suffix[:, None, None, None].expand(n, 2, samples, c.bank_size, tail, e),
        ], dim=-2).reshape(-1, length, e)  # [N·2·R·B, length, E]
        last = torch.tensor([p.last for p in prompts], device=self.device)
        last = last.repeat_interleave(2 * samples * c.bank_size)
        (t,) = self.encode_graph("text", seq, last)  # [N·M, E]
        return F.normalize(t.float(), dim=-1).view(n, 2 * samples * c.bank_size, -1)

    def set_prototype(self, class_name: str, images: Sequence[ImageInput] | torch.Tensor) -> None:
        """Class prototype g_bar for ``text_cache = "class"``: the mean global embedding of ``images``
        (paths, PIL images, or a tensor of embeddings [K, E])."""
        if isinstance(images, torch.Tensor) and images.dim() == 2:
            g = images.to(self.device).float()
        else:
            pixels = self.preprocess(as_list(images)).to(self.device)
            with torch.inference_mode():
                g = self.encode_graph("vision", pixels)[0].float()
        self._prototypes[class_name] = g.mean(0)
        self._class_text = {k: v for k, v in self._class_text.items() if k[0] != class_name}

    def _class_text_embeddings(self, class_name: str, samples: int, g_first: torch.Tensor) -> torch.Tensor:
        """Cached t [M, E] of a class in "class" mode (ISD from the prototype with per-class draws)."""
        key = (class_name, samples)
        if key not in self._class_text:
            if class_name not in self._prototypes:
                g_first = g_first[:self.prototype_images]
                log.info("class '%s': prototype = mean embedding of the first %d image(s) of its first batch "
                         "(set_prototype() to choose reference images)", class_name, g_first.shape[0])
                self._prototypes[class_name] = g_first.float().mean(0)
            gen = torch.Generator().manual_seed(_seed_of(self.seed, "isd-class", class_name))
            eps = torch.randn(1, samples, self.config.text_width, generator=gen)
            t = self.encode_prompts(self._prototypes[class_name][None], eps, [class_name],
                                    [self._class_state_inputs(class_name, samples)])
            self._class_text[key] = t[0]
        return self._class_text[key]

    # ---------------------------------------------------------------------------------------------
    # the encoder calls (``scoring_graphs``: what ``inspector export`` writes)

    def vision_outputs(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The "vision" graph: pixels [N, 3, S, S] -> (g [N, D], F_l [N, G*G, W] for each feature layer)."""
        with self.autocast():
            g, taps = self.backbone.encode_image(pixels)
        return (g, *taps)

    def text_outputs(self, prompts: torch.Tensor, last_index: torch.Tensor) -> tuple[torch.Tensor]:
        """The "text" graph: sampled prompt embeddings [S, L, E] (positional embedding not added) and each
        one's EOT index [S] -> text embeddings [S, D], not normalised."""
        with self.autocast():
            return (self.backbone.encode_text(prompts, last_index),)

    def scoring_graphs(self) -> dict[str, Any]:
        """The vision tower with its taps, and the text tower over sampled prompts.

        Nothing random is in either graph. The Monte-Carlo draws (``draw_isd_noise``, ``draw_iad_noise``:
        seeded from the image content and the class) and the flows that turn them into prompt vectors
        (``mu + sigma·eps`` through the head) stay in torch, and the sampled prompts are the text graph's input
        ``prompts`` [S, L, E], S = N·2·B·R sequences of L tokens (both axes dynamic: any R, any class name).
        So an exported model scores every R and seed the torch one does, with the same draws. In
        ``text_cache = "class"`` mode the text embeddings of a class are computed once (through the same graph)
        and cached per class, so only the vision graph runs per image."""
        from ..base import ScoringGraph

        bb, c = self.backbone, self.config
        taps = tuple(f"tap_{layer}" for layer in bb.spec.feature_layers)
        length = min(8, bb.context_length)
        return {
            "vision": ScoringGraph(
                self.vision_outputs, ("pixels",), ("g", *taps),
                lambda: (torch.randn(2, 3, bb.image_size, bb.image_size),),
                {"pixels": {0: "batch"}, "g": {0: "batch"}, **{t: {0: "batch"} for t in taps}}),
            "text": ScoringGraph(
                self.text_outputs, ("prompts", "last_index"), ("text",),
                lambda: (torch.randn(3, length, c.text_width), torch.tensor([length - 1, length // 2, 1])),
                {"prompts": {0: "sequences", 1: "length"}, "last_index": {0: "sequences"},
                 "text": {0: "sequences"}}),
        }

    # ---------------------------------------------------------------------------------------------
    # scoring

    def score_text_embeddings(self, t: torch.Tensor, g: torch.Tensor, patch_tokens: Sequence[torch.Tensor],
                              image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t: [N, M, E] normalised; g: [N, E]; F_l: [N, G*G, W] -> (s_text [N], map [N, S, S]).

        s_text = mean_{b,r} sigmoid(l_a - l_n), l = exp(tau_img)·<normalize(class_mapping(t)), normalize(v)>.
        map = mean_{l,b,r} sigmoid(up(Z_l,a - Z_l,n)), Z_l = exp(tau_pix)·F'_l·T'_l^T (RCA-refined text).
        """
        head = self.head
        n, m, _ = t.shape
        half = m // 2
        device = t.device
        with self.autocast():
            v = F.normalize(head.image_embedding(g, list(patch_tokens)).float(), dim=-1)  # [N, E]
            text = F.normalize(head.class_mapping(t).float(), dim=-1)  # [N, M, E]
            with fp32(device):  # logits scaled by exp(tau) ~ 100, then their difference: fp32
                logits = head.log_tau_image.exp() * torch.einsum("nme,ne->nm", text, v)
                text_score = torch.sigmoid(logits[:, half:] - logits[:, :half]).mean(-1)  # [N]
            query = head.rca.q_proj(t)  # [N, M, E], shared by all levels
            grid = self.backbone.grid
            anomaly_map = torch.zeros(n, image_size, image_size, device=device)
            for level, tokens in enumerate(patch_tokens):
                patches = head.rca.project_patches(level, tokens)  # F'_l [N, G*G, E]
                refined = head.rca(t, query, patches).float()  # T'_l [N, M, E]
                # Z_a - Z_n = exp(tau_pix)·F'_l·(T'_a - T'_n)^T: one product instead of two, and no
                # cancellation of two large low-precision logits; the difference and its product in fp32
                with fp32(device):
                    delta = head.log_tau_pixel.exp() * (refined[:, half:] - refined[:, :half])  # [N, B·R, E]
                    diff = patches.float() @ delta.transpose(1, 2)  # [N, G*G, B·R]
                    diff = diff.transpose(1, 2).reshape(n, half, grid, grid)
                    anomaly_map += upsampled_sigmoid_sum(diff, image_size)
        return text_score.float(), anomaly_map / (len(patch_tokens) * half)

    def topk_scores(self, anomaly_map: torch.Tensor, class_names: Sequence[str]) -> torch.Tensor:
        """Mean of the k largest values of each unsmoothed map: [N, S, S] -> [N]."""
        flat = anomaly_map.flatten(1)
        out = []
        for i, name in enumerate(class_names):
            k = min(self.topk or official_topk(name), flat.shape[1])
            out.append(flat[i].topk(k).values.mean())
        return torch.stack(out)

    @torch.inference_mode()
    def predict_tensors(self, pixels: torch.Tensor, class_names: Sequence[str], samples: int | None = None,
                        noise: Mapping[str, torch.Tensor] | None = None,
                        seeds: Sequence[int] | None = None) -> Prediction:
        """pixels: [N, 3, S, S] normalised -> Prediction (fields on the model's device).

        ``seeds``: ``imaging.content_seed`` of each image, if the caller already computed them."""
        samples = self.samples if samples is None else int(samples)
        class_names = list(class_names)
        n = pixels.shape[0]
        if len(class_names) != n:
            raise ValueError(f"{n} images but {len(class_names)} class names")
        if samples < 1:
            raise ValueError("samples must be >= 1")
        c = self.config
        eps_isd = None
        if noise is not None:
            eps_isd = noise["isd"]
            expected = (n, samples, c.text_width)
            for key, shape in (("isd", expected), ("iad_normal", expected[1:]), ("iad_abnormal", expected[1:])):
                if tuple(noise[key].shape) != shape:
                    raise ValueError(f"noise['{key}'] has shape {tuple(noise[key].shape)}, expected {shape}")
        elif self.text_cache == "none":
            eps_isd = self.draw_isd_noise(pixels, samples, seeds)
        pixels = pixels.to(self.device)
        g, *patch_tokens = self.encode_graph("vision", pixels)
        g = g.float()
        if noise is not None:
            states = self._state_inputs(noise["iad_normal"], noise["iad_abnormal"])
            state_inputs = [states] * n
        else:
            state_inputs = [self._class_state_inputs(name, samples) for name in class_names]
        if self.text_cache == "class" and noise is None:
            t = torch.stack([self._class_text_embeddings(name, samples, g[[i for i, c in enumerate(class_names)
                                                                           if c == name]])
                             for name in class_names])
        else:
            g_isd = g
            if self.text_cache == "class":  # reproducible call in class mode: prototype, caller's noise
                for name in set(class_names):
                    if name not in self._prototypes:
                        own = g[[i for i, c in enumerate(class_names) if c == name]]
                        self._prototypes[name] = own[:self.prototype_images].mean(0)
                g_isd = torch.stack([self._prototypes[name] for name in class_names])
            t = self.encode_prompts(g_isd, eps_isd, class_names, state_inputs)
        text_score, anomaly_map = self.score_text_embeddings(t, g, patch_tokens, pixels.shape[-1])
        topk = self.topk_scores(anomaly_map, class_names)
        provenance = {**self.provenance, "detector": self.name, "samples": samples, "text_cache": self.text_cache,
                      "seed": self.seed, "noise": "given" if noise is not None else "seeded",
                      "precision": resolve(self.precision, self.device)}
        return Prediction(anomaly_map=anomaly_map, text_score=text_score, topk_score=topk,
                          image_score=0.5 * text_score + 0.5 * topk, provenance=provenance)

    # ---------------------------------------------------------------------------------------------
    # bench hooks

    def bench_main_case(self, samples: int) -> str:
        return f"exact R={samples}"

    def sample_options(self, samples: int | None) -> dict[str, Any]:
        return {} if samples is None else {"samples": samples}

    def bench_plan(self, pixels: torch.Tensor, class_names: Sequence[str], samples: int,
                   references: int = 0) -> BenchPlan:
        """The exact path at R = 1 and R = ``samples``, and the class-cache mode at R = ``samples`` (its first
        call, the warm-up, fills the cache)."""
        def exact(r: int) -> Prediction:
            return self.predict_tensors(pixels, class_names, samples=r)

        def class_cache() -> Prediction:
            self.text_cache = "class"
            try:
                return exact(samples)
            finally:
                self.text_cache = "none"

        self.clear_caches()
        return [("exact R=1", lambda: exact(1)), (f"exact R={samples}", lambda: exact(samples)),
                (f"class-cache R={samples}", class_cache)]

    def bench_report(self, pixels: torch.Tensor, class_names: Sequence[str], samples: int) -> dict[str, Any]:
        """Agreement of the class-cache mode with the exact path on the same images."""
        from ...metrics import spearman

        exact = self.predict_tensors(pixels, class_names, samples=samples)
        self.text_cache = "class"
        try:
            self.clear_caches()
            for name in set(class_names):
                self._prototypes.pop(name, None)
            cached = self.predict_tensors(pixels, class_names, samples=samples)
        finally:
            self.text_cache = "none"
        return {"class_cache_agreement": {
            "images": len(class_names),
            "spearman_image_score": spearman(exact.image_score.cpu(), cached.image_score.cpu()),
            "max_abs_map_diff": float((exact.anomaly_map - cached.anomaly_map).abs().max()),
            "max_abs_image_score_diff": float((exact.image_score - cached.image_score).abs().max())}}


def bilinear_matrix(grid: int, size: int, device: torch.device) -> torch.Tensor:
    """A: [size, grid] with (A X A^T) = bilinear upsampling of X [grid, grid], align_corners=True."""
    pos = torch.arange(size, dtype=torch.float64) * (grid - 1) / (size - 1)
    low = pos.floor().clamp(max=grid - 2).long()
    frac = pos - low
    rows = torch.arange(size)
    matrix = torch.zeros(size, grid, dtype=torch.float64)
    matrix[rows, low] = 1 - frac
    matrix[rows, low + 1] += frac
    return matrix.float().to(device)


def upsampled_sigmoid_sum(diff: torch.Tensor, size: int, block_rows: int | None = None) -> torch.Tensor:
    """sum_c sigmoid(up(diff[:, c])): [N, C, G, G] logit differences -> [N, S, S], in fp32.

    Bilinear upsampling (align_corners=True) is separable, so up(X) = A X A^T. Doing it as two matrix
    products over blocks of output rows keeps each [C, rows, S] block in cache on the CPU (twice as fast
    as ``F.interpolate`` followed by the sigmoid); on CUDA the whole map is one block.
    """
    n, _, grid, _ = diff.shape
    with fp32(diff.device):
        matrix = bilinear_matrix(grid, size, diff.device)  # [S, G]
        half_up = diff.float() @ matrix.T  # [N, C, G, S]: columns upsampled
        if block_rows is None:
            block_rows = size if diff.device.type == "cuda" else 32
        if block_rows >= size:  # one block: [N, C, S, S] at once (GPU memory is not the constraint)
            return torch.sigmoid_(matrix @ half_up).sum(1)
        out = torch.empty(n, size, size, device=diff.device)
        for i in range(n):
            for start in range(0, size, block_rows):
                rows = matrix[start:start + block_rows] @ half_up[i]  # [C, rows, S]
                out[i, start:start + block_rows] = rows.sigmoid_().sum(0)
    return out
