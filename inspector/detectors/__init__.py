"""Detectors behind one interface (``base.Detector``), chosen by name with ``[model] detector``.

Every detector class also provides, for the registry and the CLI:

* ``name``: its key in ``KINDS``;
* ``default_backbone``: the ``BackboneSpec`` its paper uses (used where ``[model] backbone`` etc. are empty);
* ``trainable``: whether ``inspector retrain`` can fit it (WinCLIP is training-free);
* ``from_settings(backbone, head, settings, provenance)``: a ready detector on a loaded ``ClipBackbone``
  with its learnable part read from ``head`` (a file in our format, or None: untrained / training-free);
* ``save_head(path)`` and ``describe_head() -> dict`` (what the registry writes in a manifest).
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import InspectorError

#: detector name -> "module:Class"
KINDS = {
    "bayes-pfl": "inspector.detectors.bayes_pfl:BayesPFL",
    "aa-clip": "inspector.detectors.aa_clip:AACLIP",
    "winclip": "inspector.detectors.winclip:WinCLIP",
    "musc": "inspector.detectors.musc:MuSc",
}


class UnknownDetector(InspectorError, ValueError):
    pass


def detector_class(name: str) -> Any:
    """The class of detector ``name`` (imported on first use)."""
    if name not in KINDS:
        raise UnknownDetector(f"unknown detector '{name}'; known: {', '.join(KINDS)}")
    module, _, cls = KINDS[name].partition(":")
    return getattr(importlib.import_module(module), cls)
