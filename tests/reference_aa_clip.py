"""Independent, deliberately naive reference of the official AA-CLIP *test* path.

Written from notes taken on the official code (github.com/Mwxinnn/AA-CLIP; "spec §N" below names sections of
those notes), never from the package under test: nothing from
``inspector`` is imported here. It follows the structure of the official code, not ours:

* a CLIP of its own built from an open_clip-style config dict: sequence-first
  ``nn.MultiheadAttention(W, W // head_width)`` (text: ``text_cfg["heads"]``) called with
  ``need_weights=True``, pre-LN blocks, exact erf GELU, LayerNorm eps 1e-5 (spec §2.3);
* weights from an OpenAI-layout state dict: linear/conv/attention/projection tensors rounded through
  fp16, the vision position embedding resized bicubic + antialias with the CLS row kept (spec §2.1-2.2);
* full 77-token text sequences with the additive -inf causal mask, EOT at ``argmax(token ids)`` (§4);
* residual adapters mixed after each early block, per token, ``a·‖x‖/‖a‖`` without epsilon (§4.3, §5);
* per level ``(100·z_a + 1 - 100·z_n)/2`` on the grid, its own Gaussian blur (``F.pad`` reflect, then an
  x and a y convolution with exp(-k²/2σ²)/Σ), ``F.interpolate`` bilinear align_corners=True to S, and
  ``cat(levels).sum`` (§6.2); image score ``(det·t_a + 1)/2`` with det not renormalised (§6.1).

``MISTAKES`` lists single deliberate deviations (one switch each) that the parity tests use to show
that the tolerances can fail.

Plus the random-weight factories of the tests: an OpenAI-layout CLIP state dict, an open_clip-style
config, and official adapter state dicts with the official keys (spec §9).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# spec §4.1: the class descriptions the tests use (official table entries), "object" kept as is
DESCRIPTIONS = {
    "pipe_fryum": "pipe-shaped fryum",
    "pill": "oval white pill with small red speckles and the letters 'FF' engraved",
    "metal_nut": "metal nut which has four notched edges",
    "Brain": "scan",
    "object": "object",
}
NORMAL_STATES = ["{}", "a {}", "the {}"]
ABNORMAL_STATES = ["a damaged {}", "a broken {}", "a {} with flaw", "a {} with defect", "a {} with damage"]
TEMPLATES = ["{}.", "a photo of {}."]

MISTAKES = ("quick_gelu", "no_causal_mask", "zero_pad_blur", "align_corners_false", "renormalised_det",
            "mean_of_levels")


# =================================================================================================
# random weights and config
# =================================================================================================


def _randn(gen, shape, std, mean=0.0):
    return torch.randn(tuple(shape), generator=gen) * std + mean


def _block_state(gen, prefix, width, out):
    out[prefix + "ln_1.weight"] = _randn(gen, (width,), 0.1, 1.0)
    out[prefix + "ln_1.bias"] = _randn(gen, (width,), 0.05)
    out[prefix + "attn.in_proj_weight"] = _randn(gen, (3 * width, width), width ** -0.5)
    out[prefix + "attn.in_proj_bias"] = _randn(gen, (3 * width,), 0.02)
    out[prefix + "attn.out_proj.weight"] = _randn(gen, (width, width), 0.5 * width ** -0.5)
    out[prefix + "attn.out_proj.bias"] = _randn(gen, (width,), 0.02)
    out[prefix + "ln_2.weight"] = _randn(gen, (width,), 0.1, 1.0)
    out[prefix + "ln_2.bias"] = _randn(gen, (width,), 0.05)
    out[prefix + "mlp.c_fc.weight"] = _randn(gen, (4 * width, width), width ** -0.5)
    out[prefix + "mlp.c_fc.bias"] = _randn(gen, (4 * width,), 0.02)
    out[prefix + "mlp.c_proj.weight"] = _randn(gen, (width, 4 * width), 0.5 * (4 * width) ** -0.5)
    out[prefix + "mlp.c_proj.bias"] = _randn(gen, (width,), 0.02)


def random_openai_state(vision_width=64, vision_layers=24, patch=14, grid=24, text_width=64, text_layers=3,
                        embed_dim=64, vocab_size=49408, context_length=77, seed=0):
    """Random tensors under the OpenAI CLIP ViT keys (spec §2.1), fp32, with its three integer entries."""
    gen = torch.Generator().manual_seed(seed)
    wv, wt = vision_width, text_width
    s = {
        "visual.class_embedding": _randn(gen, (wv,), wv ** -0.5),
        "visual.positional_embedding": _randn(gen, (grid * grid + 1, wv), wv ** -0.5),
        "visual.proj": _randn(gen, (wv, embed_dim), wv ** -0.5),
        "visual.conv1.weight": _randn(gen, (wv, 3, patch, patch), 0.02),
        "visual.ln_pre.weight": _randn(gen, (wv,), 0.1, 1.0),
        "visual.ln_pre.bias": _randn(gen, (wv,), 0.05),
        "visual.ln_post.weight": _randn(gen, (wv,), 0.1, 1.0),
        "visual.ln_post.bias": _randn(gen, (wv,), 0.05),
    }
    for i in range(vision_layers):
        _block_state(gen, f"visual.transformer.resblocks.{i}.", wv, s)
    s["token_embedding.weight"] = _randn(gen, (vocab_size, wt), 0.02)
    s["positional_embedding"] = _randn(gen, (context_length, wt), 0.01)
    for i in range(text_layers):
        _block_state(gen, f"transformer.resblocks.{i}.", wt, s)
    s["ln_final.weight"] = _randn(gen, (wt,), 0.1, 1.0)
    s["ln_final.bias"] = _randn(gen, (wt,), 0.05)
    s["text_projection"] = _randn(gen, (wt, embed_dim), wt ** -0.5)
    s["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    s["input_resolution"] = torch.tensor(grid * patch)
    s["context_length"] = torch.tensor(context_length)
    s["vocab_size"] = torch.tensor(vocab_size)
    return s


def tiny_config(vision_width=64, vision_layers=24, patch=14, head_width=32, text_width=64, text_layers=3,
                text_heads=2, embed_dim=64, image_size=336):
    """An open_clip-style model config (what the official code reads from model_configs/*.json)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": vision_layers, "width": vision_width,
                       "head_width": head_width, "patch_size": patch},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": text_width, "heads": text_heads,
                     "layers": text_layers},
    }


def _xavier_like(gen, rows, cols):
    bound = math.sqrt(6.0 / (rows + cols))
    return (torch.rand((rows, cols), generator=gen) * 2 - 1) * bound


def random_adapter_states(vision_width=64, text_width=64, embed_dim=64, levels=4, image_until=6, text_until=3,
                          seed=0):
    """(text_adapter, image_adapter) state dicts with the official keys and shapes (spec §9)."""
    gen = torch.Generator().manual_seed(seed)
    text = {f"{i}.fc.0.weight": _xavier_like(gen, text_width, text_width) for i in range(text_until)}
    text[f"{text_until}.fc.0.weight"] = _xavier_like(gen, embed_dim, text_width)
    image = {f"layer_adapters.{i}.fc.0.weight": _xavier_like(gen, vision_width, vision_width)
             for i in range(image_until)}
    for level in range(levels):
        image[f"seg_proj.{level}.fc.weight"] = _xavier_like(gen, embed_dim, vision_width)
    image["det_proj.fc.weight"] = _xavier_like(gen, embed_dim, vision_width)
    return text, image


# =================================================================================================
# CLIP, official structure (sequence-first)
# =================================================================================================


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class ResidualBlock(nn.Module):
    def __init__(self, width, heads, act):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(width, 4 * width)), ("gelu", act()),
                                              ("c_proj", nn.Linear(4 * width, width))]))

    def forward(self, x, attn_mask=None):  # x: [L, B, W]
        y = self.ln_1(x)
        out, _weights = self.attn(y, y, y, need_weights=True, attn_mask=attn_mask)
        x = x + out
        return x + self.mlp(self.ln_2(x))


class Tower(nn.Module):
    def __init__(self, width, layers, heads, act):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualBlock(width, heads, act) for _ in range(layers)])


class Visual(nn.Module):
    def __init__(self, cfg, embed_dim, act):
        super().__init__()
        width, patch = cfg["width"], cfg["patch_size"]
        grid = cfg["image_size"] // patch
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch, stride=patch, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(width))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Tower(width, cfg["layers"], width // cfg.get("head_width", 64), act)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(torch.zeros(width, embed_dim))


class ReferenceCLIP(nn.Module):
    def __init__(self, config, quick_gelu=False):
        super().__init__()
        act = QuickGELU if quick_gelu else nn.GELU
        t = config["text_cfg"]
        self.visual = Visual(config["vision_cfg"], config["embed_dim"], act)
        self.token_embedding = nn.Embedding(t["vocab_size"], t["width"])
        self.positional_embedding = nn.Parameter(torch.zeros(t["context_length"], t["width"]))
        self.transformer = Tower(t["width"], t["layers"], t["heads"], act)
        self.ln_final = nn.LayerNorm(t["width"])
        self.text_projection = nn.Parameter(torch.zeros(t["width"], config["embed_dim"]))
        self.logit_scale = nn.Parameter(torch.zeros(()))
        mask = torch.empty(t["context_length"], t["context_length"])
        mask.fill_(float("-inf"))
        mask.triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)


def _fp16_tensor(key):
    if key in ("text_projection", "visual.proj", "visual.conv1.weight"):
        return True
    return any(key.endswith(s) for s in ("attn.in_proj_weight", "attn.in_proj_bias", "attn.out_proj.weight",
                                          "attn.out_proj.bias", "mlp.c_fc.weight", "mlp.c_fc.bias",
                                          "mlp.c_proj.weight", "mlp.c_proj.bias"))


def _resize_pos(pos, grid):
    old = round(math.sqrt(pos.shape[0] - 1))
    if old == grid:
        return pos
    cls_row, rest = pos[:1], pos[1:]
    rest = rest.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    rest = F.interpolate(rest, size=(grid, grid), mode="bicubic", antialias=True, align_corners=False)
    rest = rest.permute(0, 2, 3, 1).reshape(grid * grid, -1)
    return torch.cat([cls_row, rest], dim=0)


def load_reference_clip(state, config, image_size=518, quick_gelu=False):
    """The official loader's net effect (spec §2.1): fp16 rounding, config with image_size, resize, strict."""
    config = {**config, "vision_cfg": {**config["vision_cfg"], "image_size": image_size}}
    model = ReferenceCLIP(config, quick_gelu=quick_gelu)
    weights = {}
    for key, value in state.items():
        if key in ("input_resolution", "context_length", "vocab_size"):
            continue
        value = value.float()
        if _fp16_tensor(key):
            value = value.half().float()
        weights[key] = value
    grid = image_size // config["vision_cfg"]["patch_size"]
    weights["visual.positional_embedding"] = _resize_pos(weights["visual.positional_embedding"], grid)
    model.load_state_dict(weights, strict=True)
    return model.eval()


# =================================================================================================
# AA-CLIP
# =================================================================================================


def reference_preprocess(image, size=518):
    """convert("RGB") -> PIL bicubic resize to size×size -> ToTensor -> Normalize (spec §3)."""
    image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    mean = torch.tensor(CLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(CLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def _adapt(x, weight, lam):
    """Residual adapter on block output x (every token): spec §4.3."""
    a = F.leaky_relu(x @ weight.t(), negative_slope=0.01)
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
    return lam * a + (1 - lam) * x


def _gauss_kernel(size, sigma):
    k = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(k ** 2) / (2 * sigma ** 2))
    return torch.tensor(g / g.sum(), dtype=torch.float32)


def reference_blur(m, size, sigma, zero_pad=False):
    """m: [B, 1, H, W]; reflect-padded (mirror without the edge), separable Gaussian (spec §6.2 step 4)."""
    r = size // 2
    kernel = _gauss_kernel(size, sigma)
    if zero_pad:
        padded = F.pad(m, (r, r, r, r), mode="constant", value=0.0)
    else:
        padded = F.pad(m, (r, r, r, r), mode="reflect")
    x = F.conv2d(padded, kernel.view(1, 1, 1, size))
    return F.conv2d(x, kernel.view(1, 1, size, 1))


class ReferenceAACLIP:
    """The official ``AdaptedCLIP`` test path on a ``ReferenceCLIP`` and raw adapter state dicts."""

    def __init__(self, clip, text_state, image_state, text_until=3, image_until=6, text_weight=0.1,
                 image_weight=0.1, levels=(6, 12, 18, 24), mistakes=()):
        unknown = set(mistakes) - set(MISTAKES)
        assert not unknown, unknown
        self.clip = clip
        self.text_state = text_state  # None: frozen text encoder with text_projection
        self.image_state = image_state
        self.text_until, self.image_until = text_until, image_until
        self.text_weight, self.image_weight = text_weight, image_weight
        self.levels = levels
        self.mistakes = set(mistakes)

    @torch.no_grad()
    def encode_image(self, pixels):
        """pixels [B, 3, S, S] -> ([seg_l [B, L, E]], det [B, E])."""
        v = self.clip.visual
        x = v.conv1(pixels)
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, L, W]
        cls_tok = v.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
        x = torch.cat([cls_tok, x], dim=1) + v.positional_embedding
        x = v.ln_pre(x).permute(1, 0, 2)  # [1 + L, B, W]
        taps = []
        for i, block in enumerate(v.transformer.resblocks):
            x = block(x, attn_mask=None)
            if i < self.image_until:
                x = _adapt(x, self.image_state[f"layer_adapters.{i}.fc.0.weight"], self.image_weight)
            if i + 1 in self.levels:
                taps.append(x[1:])
        taps = [v.ln_post(t.permute(1, 0, 2)) for t in taps]
        seg = [F.normalize(t @ self.image_state[f"seg_proj.{i}.fc.weight"].t(), dim=-1) for i, t in enumerate(taps)]
        det = F.normalize(taps[-1] @ self.image_state["det_proj.fc.weight"].t(), dim=-1).mean(1)
        return seg, det

    @torch.no_grad()
    def encode_text(self, tokens):
        """tokens [M, 77] -> [M, E]."""
        c = self.clip
        x = c.token_embedding(tokens) + c.positional_embedding
        x = x.permute(1, 0, 2)  # [77, M, Et]
        mask = None if "no_causal_mask" in self.mistakes else c.attn_mask
        for i, block in enumerate(c.transformer.resblocks):
            x = block(x, attn_mask=mask)
            if self.text_state is not None and i < self.text_until:
                x = _adapt(x, self.text_state[f"{i}.fc.0.weight"], self.text_weight)
        x = c.ln_final(x.permute(1, 0, 2))
        eot = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
        if self.text_state is None:
            return eot @ c.text_projection
        return F.leaky_relu(eot @ self.text_state[f"{self.text_until}.fc.0.weight"].t(), negative_slope=0.01)

    def anchors(self, class_name):
        """T [E, 2]: normalised mean of normalised sentence embeddings, per state (spec §4.4)."""
        description = DESCRIPTIONS.get(class_name, class_name)
        columns = []
        for states in (NORMAL_STATES, ABNORMAL_STATES):
            sentences = []
            for state in states:
                for template in TEMPLATES:
                    sentences.append(template.format(state.format(description)))
            e = self.encode_text(open_clip.tokenize(sentences))
            e = e / e.norm(dim=-1, keepdim=True)
            m = e.mean(dim=0)
            columns.append(m / m.norm())
        return torch.stack(columns, dim=1)

    @torch.no_grad()
    def predict(self, pixels, class_name, domain="industrial", features=None):
        """pixels [B, 3, S, S] (one class) -> (map [B, S, S], score [B]); ``features`` reuses encode_image."""
        seg, det = self.encode_image(pixels) if features is None else features
        if "renormalised_det" in self.mistakes:
            det = F.normalize(det, dim=-1)
        T = self.anchors(class_name)
        score = ((det @ T)[:, 1] + 1) / 2
        size = pixels.shape[-1]
        kernel, sigma = (7, 1.0) if domain == "industrial" else (9, 1.5)
        per_level = []
        for f in seg:
            z = 100.0 * torch.matmul(f, T)  # [B, L, 2]
            b, length, c = z.shape
            g = int(math.sqrt(length))
            z = z.permute(0, 2, 1).reshape(b, c, g, g)
            m = ((z[:, 1] + 1 - z[:, 0]) / 2).unsqueeze(1)
            m = reference_blur(m, kernel, sigma, zero_pad="zero_pad_blur" in self.mistakes)
            m = F.interpolate(m, size=size, mode="bilinear",
                              align_corners="align_corners_false" not in self.mistakes)
            per_level.append(m)
        stacked = torch.cat(per_level, dim=1)
        maps = stacked.mean(1) if "mean_of_levels" in self.mistakes else stacked.sum(1)
        return maps, score
