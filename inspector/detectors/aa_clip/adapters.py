"""The learnable part of AA-CLIP: residual adapters, level projections, and the official file layouts.

Two small module types, laid out so that ``state_dict()`` keys are exactly the official ones:

* ``LeakyLinear`` (``fc.0.weight``): ``LeakyReLU_0.01(x W^T)``, bias-free. Used as a residual adapter
  inside a transformer (``residual_mix``) and as the learned text projection P.
* ``Projection`` (``fc.weight``): a bias-free ``x W^T``, the per-level seg projections S_l and the det
  projection D.

Official containers (as AA-CLIP's ``train.py`` writes them):

==========================  ==================================================  ==========
key                         meaning                                             shape
==========================  ==================================================  ==========
text ``{i}.fc.0.weight``    text adapter after text block i + 1, i < t_until    [Et, Et]
text ``{t_until}.fc.0...``  learned projection P, replaces ``text_projection``  [E, Et]
``layer_adapters.{i}...``   vision adapter after vision block i + 1             [Wv, Wv]
``seg_proj.{l}.fc.weight``  S_l, level l of the feature layers                  [E, Wv]
``det_proj.fc.weight``      D, on the last level                                [E, Wv]
==========================  ==================================================  ==========

The official code builds P as [768, 768] (= [E, Et] for ViT-L/14, where E = Et).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ...errors import HeadFormatError


class LeakyLinear(nn.Module):
    """``LeakyReLU_0.01(x W^T)``, W: [c_out, c_in], no bias. State-dict key ``fc.0.weight``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.fc = nn.Sequential(nn.Linear(c_in, c_out, bias=False), nn.LeakyReLU(0.01))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class Projection(nn.Module):
    """``x W^T``, W: [c_out, c_in], no bias. State-dict key ``fc.weight``."""

    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.fc = nn.Linear(c_in, c_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def residual_mix(adapter: LeakyLinear, x: torch.Tensor, weight: float) -> torch.Tensor:
    """x: [..., C] block output -> lambda·a + (1 - lambda)·x, a = adapter(x) rescaled per token to ‖x‖.

    No epsilon in the rescale, and the operation order of the official code ((a·‖x‖)/‖a‖).
    """
    a = adapter(x)
    a = a * x.norm(dim=-1, keepdim=True) / a.norm(dim=-1, keepdim=True)
    return weight * a + (1 - weight) * x


def build_text_adapter(text_width: int, embed_dim: int, until: int) -> nn.ModuleDict:
    """``{"0".."until-1"}``: adapters [Et, Et]; ``{"until"}``: the learned projection P [E, Et]."""
    modules = {str(i): LeakyLinear(text_width, text_width) for i in range(until)}
    modules[str(until)] = LeakyLinear(text_width, embed_dim)
    return nn.ModuleDict(modules)


def build_image_adapter(vision_width: int, embed_dim: int, until: int, levels: int) -> nn.ModuleDict:
    return nn.ModuleDict({
        "layer_adapters": nn.ModuleList([LeakyLinear(vision_width, vision_width) for _ in range(until)]),
        "seg_proj": nn.ModuleList([Projection(vision_width, embed_dim) for _ in range(levels)]),
        "det_proj": Projection(vision_width, embed_dim),
    })


def init_adapters(module: nn.Module) -> None:
    """Xavier-uniform on every matrix, as the official ``AdaptedCLIP._init_weights_``."""
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -------------------------------------------------------------------------------------------------
# files


def read_torch_file(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise HeadFormatError(f"{what} not found: {path}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise HeadFormatError(f"{path}: not a readable torch file ({type(exc).__name__}: {exc})") from None


def load_strict(module: nn.Module, state: Any, source: str) -> None:
    """``module.load_state_dict(state, strict=True)`` with a message that lists what does not fit."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise HeadFormatError(f"{source}: expected a state dict of tensors")
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    problems = []
    if any(k.endswith(".fc.0.weight") and k.startswith(("seg_proj.", "det_proj.")) for k in state):
        problems.append("it was trained with the official --relu option (LeakyReLU level projections), which "
                        "this detector does not implement")
    if missing:
        problems.append(f"missing keys {missing}")
    if unexpected:
        problems.append(f"unexpected keys {unexpected}")
    shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(v.shape)}" for k, v in own.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if shapes:
        problems.append("shape mismatch (" + "; ".join(shapes) + ")")
    if problems:
        raise HeadFormatError(f"{source} does not fit this model: " + "; ".join(problems))
    module.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)


def official_entry(path: str | Path, key: str) -> Mapping[str, torch.Tensor]:
    """The ``key`` entry ("text_adapter" / "image_adapter") of an official AA-CLIP checkpoint."""
    payload = read_torch_file(path, f"official AA-CLIP {key} file")
    if not isinstance(payload, Mapping) or key not in payload:
        found = sorted(payload)[:8] if isinstance(payload, Mapping) else type(payload).__name__
        other = {"text_adapter": "image_adapter", "image_adapter": "text_adapter"}[key]
        hint = f" (this is a {other} file)" if isinstance(payload, Mapping) and other in payload else ""
        raise HeadFormatError(f"{path}: not an official AA-CLIP {key} checkpoint: no '{key}' entry{hint}; "
                              f"found {found}")
    return payload[key]
