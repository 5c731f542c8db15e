"""inspector: batch visual inspection with zero-shot anomaly detection on CLIP.

    from inspector import BayesPFL, AACLIP, WinCLIP, load_model
    model = load_model("visa-official")          # a registered version (any detector), or a folder
    result = model.predict(["part.png"], "metal nut")
"""

from .detectors.aa_clip import AACLIP
from .detectors.bayes_pfl import BayesPFL, BayesPFLHead, official_image_scores
from .detectors.winclip import WinCLIP
from .registry import load_model

__version__ = "0.1.0"
__all__ = ["AACLIP", "BayesPFL", "BayesPFLHead", "WinCLIP", "__version__", "load_model", "official_image_scores"]
