"""The learnable part of Bayes-PFL (everything but the frozen CLIP), and its checkpoint formats.

Paper symbols -> attributes of ``BayesPFLHead`` (B bank size, P context tokens, Q state tokens,
K flow steps, E text width, W vision width, L feature levels):

=====================  ==========================================  =====================================
symbol                 attribute                                   shape
=====================  ==========================================  =====================================
C (context bank)       ``context``                                 [B, P, E]
S^n, S^a (state bank)  ``state_normal``, ``state_abnormal``        [B, Q, E]
tau_pix, tau_img       ``log_tau_pixel``, ``log_tau_image``        [] (the logit scale is exp of these)
ISD                    ``isd`` (base net + amortised u, w, b)       see flows.py
IAD                    ``iad_base`` (shared), ``iad_normal``,      see flows.py
                       ``iad_abnormal``
RCA                    ``rca``                                     see rca.py
class mapping          ``class_mapping``                           Linear(E, E)
stage-2 image head     ``fuse``, ``image_mapping``                 see rca.py, Linear(E, E)
=====================  ==========================================  =====================================

Checkpoints: our own file is ``{"format": FORMAT, "config": {...}, "state_dict": {...}}``. The official
``{'MyModel': state_dict}`` layout (131 keys, with duplicated and dead tensors) is read by
``head_from_official_state`` and written back by ``head_to_official_state``.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import HeadFormatError
from .flows import GaussianBase, ImageAgnosticFlow, ImageSpecificFlow
from .rca import GlobalFeatureFuse, ResidualCrossModalAttention

FORMAT = "inspector.bayes_pfl/1"


@dataclass(frozen=True)
class BayesPFLConfig:
    text_width: int = 768  # E (also the joint embedding width D; the method needs E == D)
    vision_width: int = 1024  # W
    bank_size: int = 3  # B
    context_len: int = 5  # P
    state_len: int = 5  # Q
    flow_steps: int = 10  # K
    levels: int = 4  # L
    stage: int = 2  # 1: image embedding v = g; 2: v = image_mapping(g + fuse(F))
    rca_heads: int = 4

    @property
    def base_hidden(self) -> int:
        return self.vision_width // 2


class BayesPFLHead(nn.Module):
    def __init__(self, config: BayesPFLConfig):
        super().__init__()
        c = config
        self.config = c
        e = c.text_width
        self.context = nn.Parameter(torch.empty(c.bank_size, c.context_len, e))
        self.state_normal = nn.Parameter(torch.empty(c.bank_size, c.state_len, e))
        self.state_abnormal = nn.Parameter(torch.empty(c.bank_size, c.state_len, e))
        self.log_tau_pixel = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.log_tau_image = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        self.isd = ImageSpecificFlow(e, c.base_hidden, c.flow_steps)
        self.iad_base = GaussianBase(e, c.base_hidden)
        self.iad_normal = ImageAgnosticFlow(e, c.flow_steps)
        self.iad_abnormal = ImageAgnosticFlow(e, c.flow_steps)
        self.rca = ResidualCrossModalAttention(e, c.vision_width, c.levels, c.rca_heads)
        self.class_mapping = nn.Linear(e, e)
        self.fuse = GlobalFeatureFuse(c.vision_width, e, c.levels)
        self.image_mapping = nn.Linear(e, e)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official initialisation: Linear N(0, 0.02) with zero bias, prompt banks truncated normal
        (context mean 0, normal states +0.5, abnormal states -0.5, std 0.02), IAD parameters N(0, 1)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.context, mean=0.0, std=0.02)
        nn.init.trunc_normal_(self.state_normal, mean=0.5, std=0.02)
        nn.init.trunc_normal_(self.state_abnormal, mean=-0.5, std=0.02)

    def image_embedding(self, g: torch.Tensor, patch_tokens: list[torch.Tensor]) -> torch.Tensor:
        """v: [N, E]: g (stage 1) or image_mapping(g + fuse(F)) (stage 2)."""
        if self.config.stage == 1:
            return g
        return self.image_mapping(g + self.fuse(patch_tokens))

    # ---------------------------------------------------------------------------------------------
    # our own checkpoint format

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().clone() for k, v in self.state_dict().items()}
        tmp = path.with_name(path.name + ".tmp")
        torch.save({"format": FORMAT, "config": dataclasses.asdict(self.config), "state_dict": state}, tmp)
        tmp.replace(path)

    @classmethod
    def load(cls, path: str | Path, stage: int | None = None) -> BayesPFLHead:
        """Read our format or the official one (detected from the content)."""
        path = Path(path)
        if not path.is_file():
            raise HeadFormatError(f"head checkpoint not found: {path}")
        try:
            blob = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise HeadFormatError(f"{path}: not a readable PyTorch checkpoint ({exc})") from None
        if isinstance(blob, dict) and blob.get("format") == FORMAT:
            config = BayesPFLConfig(**blob["config"])
            if stage is not None:
                config = dataclasses.replace(config, stage=stage)
            head = cls(config)
            head.load_state_dict(blob["state_dict"], strict=True)
            return head
        if isinstance(blob, dict) and "MyModel" in blob:
            return head_from_official_state(blob["MyModel"], stage=official_stage(path) if stage is None else stage,
                                            where=str(path))
        raise HeadFormatError(f"{path}: neither an inspector Bayes-PFL head nor an official {{'MyModel': ...}} file")


# -------------------------------------------------------------------------------------------------
# the official layout


def official_stage(path: str | Path) -> int:
    """The official test script's rule: a name containing ``epoch_post`` ends in ``_<stage>.pth``;
    any other name means stage 2."""
    text = str(path)
    if "epoch_post" in text:
        try:
            return int(text[:-4].split("_")[-1])
        except ValueError:
            raise HeadFormatError(f"{path}: 'epoch_post' files must end in _<stage>.pth") from None
    return 2


def _mlp_map(ours: str, theirs: str) -> dict[str, str]:
    return {f"{ours}.{i}.{p}": f"{theirs}.module.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}


def _key_map(levels: int) -> dict[str, str]:
    """our key -> official key, for every tensor we keep (reshapes are handled separately)."""
    m = {
        "context": "prompt_context",
        "state_normal": "prompt_state_normal",
        "state_abnormal": "prompt_state_abnormal",
        "log_tau_pixel": "temperature_pixel",
        "log_tau_image": "temperature_image",
        "rca.q_proj.weight": "RCA.q_proj_pre.weight",
        "rca.q_proj.bias": "RCA.q_proj_pre.bias",
        "fuse.proj_in.weight": "fuse.fuse_modules.weight",
        "fuse.proj_in.bias": "fuse.fuse_modules.bias",
        "fuse.score.weight": "fuse.compress.weight",
        "fuse.score.bias": "fuse.compress.bias",
        "fuse.proj_out.weight": "fuse.post_process.weight",
        "fuse.proj_out.bias": "fuse.post_process.bias",
    }
    for lin in ("class_mapping", "image_mapping"):
        m.update({f"{lin}.{p}": f"{lin}.{p}" for p in ("weight", "bias")})
    for i in range(levels):
        m[f"rca.patch_proj.{i}.weight"] = f"RCA.linear_proj.{i}.weight"
    m.update(_mlp_map("isd.base.mean_net", "context_encoder.weight_mean"))
    m.update(_mlp_map("isd.base.log_var_net", "context_encoder.weight_log_variance"))
    m.update(_mlp_map("iad_base.mean_net", "state_encoder.weight_mean"))
    m.update(_mlp_map("iad_base.log_var_net", "state_encoder.weight_log_variance"))
    for p in ("weight", "bias"):
        for a in ("u", "w", "b"):
            m[f"isd.amor_{a}.{p}"] = f"PFL_context.amor_{a}.{p}"
    for ours, theirs in (("iad_normal", "PFL_normal"), ("iad_abnormal", "PFL_abnormal")):
        m[f"{ours}.state"] = f"{theirs}.state"
        for a in ("u", "w", "b"):
            m[f"{ours}.{a}"] = f"{theirs}.amor_{a}"
    return m


def config_from_official_state(state: dict[str, torch.Tensor], stage: int = 2, where: str = "head") -> BayesPFLConfig:
    try:
        bank, context_len, width = state["prompt_context"].shape
        state_len = state["prompt_state_normal"].shape[1]
        steps = state["PFL_normal.amor_u"].shape[1]
        vision_width = state["RCA.linear_proj.0.weight"].shape[1]
    except (KeyError, ValueError) as exc:
        raise HeadFormatError(f"{where}: not an official Bayes-PFL state dict (missing or odd {exc})") from None
    levels = len([k for k in state if re.fullmatch(r"RCA\.linear_proj\.\d+\.weight", k)])
    return BayesPFLConfig(width, vision_width, bank, context_len, state_len, steps, levels, stage)


def head_from_official_state(state: dict[str, torch.Tensor], stage: int = 2, where: str = "head") -> BayesPFLHead:
    """Map an official ``MyModel`` state dict onto ``BayesPFLHead``; duplicated and dead keys are dropped."""
    config = config_from_official_state(state, stage, where)
    head = BayesPFLHead(config)
    ours = head.state_dict()
    mapped = {}
    for key, official in _key_map(config.levels).items():
        if official not in state:
            raise HeadFormatError(f"{where}: missing key '{official}'")
        tensor = state[official].float()
        try:
            mapped[key] = tensor.reshape(ours[key].shape)
        except RuntimeError:
            raise HeadFormatError(
                f"{where}: '{official}' has shape {tuple(tensor.shape)}, expected {tuple(ours[key].shape)}"
            ) from None
    head.load_state_dict(mapped, strict=True)
    return head


def head_to_official_state(head: BayesPFLHead) -> dict[str, torch.Tensor]:
    """The official ``MyModel`` layout, every key and shape of the official loader (strict=True).

    Dead tensors (decoders, p_mu) are written as zeros: the official code never uses them.
    """
    c = head.config
    e, hidden, k = c.text_width, c.base_hidden, c.flow_steps
    ours = head.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, official in _key_map(c.levels).items():
        out[official] = ours[key].detach().clone()
    out["RCA.q_proj_pre.weight"] = out["RCA.q_proj_pre.weight"].reshape(e, e, 1)
    for name in ("PFL_normal", "PFL_abnormal"):
        out[f"{name}.amor_u"] = out[f"{name}.amor_u"].reshape(1, k, e, 1)
        out[f"{name}.amor_w"] = out[f"{name}.amor_w"].reshape(1, k, 1, e)
        out[f"{name}.amor_b"] = out[f"{name}.amor_b"].reshape(1, k, 1, 1)
        out[f"{name}.state"] = out[f"{name}.state"].reshape(1, e)

    def dead_mlp(prefix: str) -> None:
        for i, (o, n) in enumerate(((hidden, e), (hidden, hidden), (e, hidden))):
            out[f"{prefix}.module.{2 * i}.weight"] = torch.zeros(o, n)
            out[f"{prefix}.module.{2 * i}.bias"] = torch.zeros(o)

    dead_mlp("context_decoder.weight_mean")
    dead_mlp("state_decoder.weight_mean")
    for pfl, encoder, decoder in (("PFL_context", "context", "context"), ("PFL_normal", "state", "state"),
                                  ("PFL_abnormal", "state", "state")):
        for key in list(out):
            if key.startswith(f"{encoder}_encoder."):
                out[f"{pfl}.encoder." + key.split(".", 1)[1]] = out[key]
            if key.startswith(f"{decoder}_decoder."):
                out[f"{pfl}.decoder." + key.split(".", 1)[1]] = out[key]
        out[f"{pfl}.p_mu.0.weight"] = torch.zeros(e, e)
        out[f"{pfl}.p_mu.0.bias"] = torch.zeros(e)
    return out


def describe(head: BayesPFLHead) -> dict[str, Any]:
    return {"config": dataclasses.asdict(head.config),
            "parameters": sum(p.numel() for p in head.parameters())}
