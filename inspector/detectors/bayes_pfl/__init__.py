"""Bayes-PFL (CVPR 2025): Bayesian prompt flow learning for zero-shot anomaly detection on CLIP."""

from .head import BayesPFLConfig, BayesPFLHead
from .model import BayesPFL, official_image_scores

__all__ = ["BayesPFL", "BayesPFLConfig", "BayesPFLHead", "official_image_scores"]
