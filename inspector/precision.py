"""Moved to ``inspector.runtime`` (device and precision in one module); this name stays for this release."""

from .runtime import *
from .runtime import autocast, check, cpu_bf16, describe, fp32, resolve  # noqa: F401
