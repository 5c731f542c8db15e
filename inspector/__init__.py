"""inspector: batch visual inspection with zero-shot anomaly detection on CLIP.

    from inspector import BayesPFL, load_model
    model = load_model("visa-official")          # a registered version, or a folder
    result = model.predict(["part.png"], "metal nut")
"""

from .detectors.bayes_pfl import BayesPFL, BayesPFLHead, official_image_scores
from .registry import load_model

__version__ = "0.1.0"
__all__ = ["BayesPFL", "BayesPFLHead", "__version__", "load_model", "official_image_scores"]
