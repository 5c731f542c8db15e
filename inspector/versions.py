"""Model-version identity: which version a line uses, what makes two versions the same, how to build one.

A *version* is everything that changes the numbers a detector writes: the detector, the backbone (its
open_clip tag, or the SHA-256 of its weights file), the head file's SHA-256, the input size, the feature
layers, the detector's scoring options (Bayes-PFL's R, text cache and seed; WinCLIP's scales and reference
set...), the site's class descriptions its text prompts use (``with_class_descriptions``), the runtime when
it is not torch (``[model] runtime``: exported graphs) and its role (a day-one
fallback is not the same version as the detector configured on purpose).
``digest`` is the SHA-256 of that identity, and the store keys versions by it: two boxes with the same
model and settings write into the same version, a box whose settings differ gets a version of its own.

A version also has a human ``name``: the registry folder for a registered model (``inspector models
import-official`` / ``retrain``), ``<detector>@<digest[:12]>`` otherwise. When a registered model runs with
other scoring options than the version first stored under its name, it becomes ``<name>@<digest[:8]>``.

Which version scores an image is decided in the database (``store/routing.py``); this module only turns
settings (and a registry name) into a ``Recipe`` and a recipe into a loaded detector.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings
from .hashing import cached_file_sha256, digest_of

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """What builds one model version, and its identity.

    name:          human name (registry folder, or ``<detector>@<digest[:12]>``)
    detector:      detector kind ("bayes-pfl", "aa-clip", "winclip", ...)
    identity:      the JSON-able provenance that ``digest`` hashes
    digest:        SHA-256 of ``identity`` (the version's key in the store)
    registry_name: the registry folder it is loaded from, None for a version built from settings
    fallback:      why a training-free fallback scores instead of the configured detector (None: it does not)
    random_weights: random backbone or untrained head: scores mean nothing
    """

    name: str
    detector: str
    identity: dict[str, Any]
    digest: str
    registry_name: str | None = None
    fallback: str | None = None
    random_weights: bool = False

    def manifest(self) -> dict[str, Any]:
        """What the store keeps about the version (``model_versions.manifest``)."""
        return {"name": self.name, "identity": self.identity, "registry_name": self.registry_name,
                "fallback": self.fallback, "random_weights": self.random_weights}


def _options(cls: Any, settings: Settings) -> dict[str, Any]:
    """The detector's scoring options (``scoring_options(options, precision)``, part of its interface), with
    ``precision = "auto"`` replaced by the arithmetic it means on this box's device (bf16 on CUDA and on
    CPUs with native bf16, fp32 elsewhere): a box that computes in another precision scores another
    version, and says so instead of writing its numbers under the other's name."""
    from .exported import scoring_precision

    options = dict(cls.scoring_options(cls.options_from(settings), scoring_precision(settings.model)))
    if options.get("precision") == "auto":
        from .runtime import resolve, resolve_device

        try:
            device = resolve_device(settings.model.device)
        except (ValueError, RuntimeError):
            device = "cpu"  # the device error is the loader's to report, with its own message
        options["precision"] = resolve("auto", device)
    return options


def _weights_identity(pretrained: str) -> str:
    source = Path(pretrained).expanduser()
    return f"sha256:{cached_file_sha256(source)}" if source.is_file() else pretrained


def _identity(detector: str, spec: Any, head_sha256: str | None, options: dict[str, Any],
              fallback: bool, runtime: str = "torch") -> dict[str, Any]:
    config = spec.model_config
    if config and Path(config).is_file():
        config = f"sha256:{cached_file_sha256(config)}"
    # an exported runtime computes other numbers (to ~1e-6): another version; torch is left unsaid, so the
    # versions of boxes that score in torch keep their digests
    extra = {"runtime": runtime} if runtime != "torch" and not fallback else {}
    return {**extra, "detector": detector, "arch": spec.arch, "weights": _weights_identity(spec.pretrained),
            "clip_format": spec.clip_format, "activation": spec.activation, "model_config": config,
            "image_size": spec.image_size, "feature_layers": list(spec.feature_layers),
            "pos_embed_antialias": getattr(spec, "pos_embed_antialias", True),
            "head_sha256": head_sha256, "options": options, "role": "fallback" if fallback else "configured"}


def recipe_from_settings(settings: Settings, detector: str | None = None, fallback: str | None = None) -> Recipe:
    """The version that ``settings`` describe (``detector`` or ``[model] detector``, backbone and head keys)."""
    from .detectors import detector_class
    from .registry import backbone_spec

    kind = detector or settings.model.detector
    cls = detector_class(kind)
    spec = backbone_spec(settings, kind)
    head = settings.model.head if cls.trainable and settings.model.head else None
    if head and not Path(head).is_file():
        raise FileNotFoundError(f"[model] head: no such file: {head}")
    head_sha = cached_file_sha256(head) if head else None
    identity = _identity(kind, spec, head_sha, _options(cls, settings), fallback is not None, settings.model.runtime)
    digest = digest_of(identity)
    return Recipe(name=f"{kind}@{digest[:12]}", detector=kind, identity=identity, digest=digest,
                  fallback=fallback, random_weights=spec.is_random or (cls.trainable and head is None))


def recipe_from_registry(settings: Settings, name_or_path: str) -> Recipe:
    """A registered version (name or folder) with the scoring options of ``settings``."""
    from .detectors import detector_class
    from .registry import manifest_backbone, read_manifest, resolve

    folder = resolve(name_or_path, settings.registry.path)
    manifest = read_manifest(folder)
    kind = manifest.get("detector", "bayes-pfl")
    spec = manifest_backbone(manifest)
    head_sha = (manifest.get("head") or {}).get("sha256")
    cls = detector_class(kind)
    identity = _identity(kind, spec, head_sha, _options(cls, settings), False, settings.model.runtime)
    identity["registry_name"] = manifest["name"]
    in_registry = (Path(settings.registry.path) / manifest["name"]).resolve() == Path(folder).resolve()
    return Recipe(name=manifest["name"], detector=kind, identity=identity, digest=digest_of(identity),
                  registry_name=manifest["name"] if in_registry else str(Path(folder).resolve()),
                  random_weights=spec.is_random or (cls.trainable and head_sha is None))


def with_class_descriptions(recipe: Recipe, descriptions: Mapping[str, str | None] | None) -> Recipe:
    """``recipe`` with classes described in the site's words in its detector's text prompts ({class name:
    description}, a ``[[sources]]`` ``class_description``). The descriptions are part of the identity: other
    words are another function of the image, so another version, with thresholds of its own. Unchanged when
    there is nothing to describe or the detector has no text prompts (``Detector.describes_classes``)."""
    from .detectors import detector_class

    wanted = {str(k): str(v).strip() for k, v in (descriptions or {}).items() if v and str(v).strip() != k}
    if not wanted or not detector_class(recipe.detector).describes_classes:
        return recipe
    merged = {**recipe.identity.get("class_descriptions", {}), **wanted}
    identity = {**recipe.identity, "class_descriptions": dict(sorted(merged.items()))}
    digest = digest_of(identity)
    name = recipe.name if recipe.registry_name else f"{recipe.detector}@{digest[:12]}"
    return dataclasses.replace(recipe, name=name, identity=identity, digest=digest)


def load_model(name_or_path: str | os.PathLike | None = None, settings: Settings | None = None,
               device: str | None = None, detector: str | None = None) -> Any:
    """A ready detector (``registry.load_model``: a registered version, or the one ``settings`` describe);
    with ``[model] runtime`` other than torch its encoder calls run through the export ``[model] export``
    names, which must have been written for this very version (``inspector.exported.attach``)."""
    from .config import load_settings
    from .registry import load_model as load_in_torch

    settings = settings or load_settings()
    model = load_in_torch(name_or_path, settings=settings, device=device, detector=detector)
    if settings.model.runtime != "torch":
        from .exported import attach

        recipe = (recipe_from_registry(settings, name_or_path) if name_or_path
                  else recipe_from_settings(settings, detector=model.name))
        attach(model, settings.model.export, settings.model.runtime, recipe.identity)
    return model


def build(recipe: Recipe, settings: Settings, device: str | None = None) -> Any:
    """Load the detector a recipe describes (its ``provenance`` names the version)."""
    if recipe.fallback and settings.model.runtime != "torch":  # the day-one fallback scores in torch
        import copy

        settings = copy.deepcopy(settings)
        settings.override("model", runtime="torch")
    if recipe.registry_name:
        detector = load_model(recipe.registry_name, settings=settings, device=device)
    else:
        detector = load_model(None, settings=settings, device=device, detector=recipe.detector)
    detector.provenance["version"] = recipe.name
    detector.provenance["digest"] = recipe.digest
    if recipe.identity.get("class_descriptions"):
        detector.set_class_descriptions(recipe.identity["class_descriptions"])
        detector.provenance["class_descriptions"] = dict(recipe.identity["class_descriptions"])
    if recipe.fallback:
        detector.provenance["fallback"] = recipe.fallback
        detector.provenance["configured_detector"] = settings.model.detector
    return detector
