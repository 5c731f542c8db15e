"""WinCLIP / WinCLIP+ (Jeong et al., CVPR 2023), training-free zero- and few-shot; see ``model``."""

from .model import WinCLIP, covering_windows, harmonic_aggregation, prompt_ensemble, window_indices

__all__ = ["WinCLIP", "covering_windows", "harmonic_aggregation", "prompt_ensemble", "window_indices"]
