"""inspector: batch visual inspection with zero-shot anomaly detection on CLIP.

    from inspector import BayesPFL, AACLIP, WinCLIP, MuSc, load_model
    model = load_model("visa-official")          # a registered version (any detector), or a folder
    result = model.predict(["part.png"], "metal nut")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["AACLIP", "BayesPFL", "BayesPFLHead", "MuSc", "WinCLIP", "__version__", "load_model",
           "official_image_scores"]

# Imported on first use, so that `inspector --help`, `status` and `config show` (which never touch a model)
# start without torch and the detectors.
_LAZY = {"AACLIP": ".detectors.aa_clip", "BayesPFL": ".detectors.bayes_pfl", "BayesPFLHead": ".detectors.bayes_pfl",
         "official_image_scores": ".detectors.bayes_pfl", "WinCLIP": ".detectors.winclip", "MuSc": ".detectors.musc",
         "load_model": ".versions"}

if TYPE_CHECKING:  # for type checkers and IDEs: the names as they are
    from .detectors.aa_clip import AACLIP
    from .detectors.bayes_pfl import BayesPFL, BayesPFLHead, official_image_scores
    from .detectors.musc import MuSc
    from .detectors.winclip import WinCLIP
    from .versions import load_model


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'inspector' has no attribute '{name}'")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
