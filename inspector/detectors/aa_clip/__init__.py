"""AA-CLIP (CVPR 2025): anomaly-aware CLIP with residual adapters, zero-shot anomaly detection."""

from .adapters import HeadFormatError
from .model import AACLIP, CLASS_DESCRIPTIONS, prompt_sentences

__all__ = ["AACLIP", "CLASS_DESCRIPTIONS", "HeadFormatError", "prompt_sentences"]
