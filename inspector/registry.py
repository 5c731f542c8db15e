"""The model registry: one folder per model version under ``[registry] path`` (default ``models/``).

    models/<name>/manifest.json   what the version is: detector, backbone source, head file and hash, origin
    models/<name>/head.pt         the learnable part, our format (tens of MB; ignored by git); absent for
                                  a training-free detector (WinCLIP)

The frozen CLIP backbone is *named* by the manifest (an open_clip tag or a local file with its size),
never copied. A version folder is written once, through a temporary folder renamed into place, and is
never overwritten.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import getpass
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .backbone import BackboneSpec, load_backbone
from .config import Settings, load_settings
from .detectors import detector_class
from .errors import InspectorError
from .hashing import file_sha256

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
HEAD_FILE = "head.pt"


class RegistryError(InspectorError, ValueError):
    """A model version that cannot be found, read or written; the message says which and why."""


def _check_name(name: str) -> None:
    if not name or name.startswith(".") or any(ch in name for ch in "/\\\0") or name != name.strip():
        raise RegistryError(f"invalid model name {name!r}: use letters, digits, '-', '_' or '.'")


def register_model(registry: str | os.PathLike, name: str, model: Any, origin: dict[str, Any]) -> Path:
    """Register a loaded detector (any kind) as a new version."""
    trainable = getattr(model, "trainable", True)
    return register(registry, name, detector=model.name, backbone=model.backbone.spec, origin=origin,
                    save_head=model.save_head if trainable else None,
                    head_info=model.describe_head() if trainable else None)


def register(registry: str | os.PathLike, name: str, *, detector: str, backbone: BackboneSpec,
             origin: dict[str, Any], save_head: Callable[[Path], None] | None = None,
             head_info: dict[str, Any] | None = None) -> Path:
    """Write a new version folder; refuses to replace an existing one. ``save_head(path)`` writes the
    learnable part (None for a training-free detector)."""
    _check_name(name)
    root = Path(registry)
    target = root / name
    if target.exists():
        raise RegistryError(f"model '{name}' already exists in {root}; versions are never overwritten, "
                            "choose another --name")
    root.mkdir(parents=True, exist_ok=True)
    staging = root / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    head_entry = None
    if save_head is not None:
        save_head(staging / HEAD_FILE)
        head_entry = {"file": HEAD_FILE, "sha256": file_sha256(staging / HEAD_FILE), **(head_info or {})}
    backbone_entry = dataclasses.asdict(backbone)
    source = Path(backbone.pretrained).expanduser()
    if source.is_file():
        backbone_entry["pretrained"] = str(source.resolve())
        backbone_entry["size_bytes"] = source.stat().st_size
    manifest = {
        "name": name,
        "detector": detector,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "created_by": getpass.getuser(),
        "backbone": backbone_entry,
        "head": head_entry,
        "origin": origin,
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    staging.rename(target)
    log.info("registered %s model %s in %s", detector, name, target)
    return target


def list_versions(registry: str | os.PathLike) -> list[dict[str, Any]]:
    root = Path(registry)
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(root.iterdir()):
        if folder.is_dir() and not folder.name.startswith(".") and (folder / MANIFEST).is_file():
            out.append(read_manifest(folder))
    return out


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RegistryError(f"{folder} is not a model version (no {MANIFEST})") from None
    except json.JSONDecodeError as exc:
        raise RegistryError(f"{path}: broken manifest ({exc})") from None


def resolve(name_or_path: str | os.PathLike, registry: str | os.PathLike = "models") -> Path:
    """A version folder from a registered name or a path to a version folder."""
    candidate = Path(name_or_path).expanduser()
    if (candidate / MANIFEST).is_file():
        return candidate
    by_name = Path(registry) / str(name_or_path)
    if (by_name / MANIFEST).is_file():
        return by_name
    known = ", ".join(v["name"] for v in list_versions(registry)) or "none"
    raise RegistryError(f"no model '{name_or_path}' (looked for {candidate} and {by_name}); registered: {known}")


def manifest_backbone(manifest: dict[str, Any]) -> BackboneSpec:
    """The backbone a version's manifest names (keys a newer or older BackboneSpec lacks are ignored)."""
    fields = {f.name for f in dataclasses.fields(BackboneSpec)}
    entry = {k: v for k, v in manifest["backbone"].items() if k in fields}
    entry["feature_layers"] = tuple(entry.get("feature_layers", (6, 12, 18, 24)))
    return BackboneSpec(**entry)


def backbone_spec(settings: Settings, detector: str | None = None) -> BackboneSpec:
    """The backbone ``settings`` describe; empty keys take the detector's own defaults (its paper's)."""
    m = settings.model
    default = detector_class(detector or m.detector).default_backbone
    # another architecture than the paper's: its input size need not suit it; 224 suits patches of 14, 16, 32
    own_size = default.image_size if m.backbone in ("", default.arch) else 224
    return BackboneSpec(arch=m.backbone or default.arch, pretrained=m.pretrained or default.pretrained,
                        clip_format=m.clip_format, activation=m.activation,
                        image_size=m.image_size or own_size,
                        feature_layers=tuple(m.feature_layers) or default.feature_layers,
                        model_config=m.model_config)


def load_model(name_or_path: str | os.PathLike | None = None, settings: Settings | None = None,
               device: str | None = None, detector: str | None = None) -> Any:
    """A ready detector in torch: a registered version (name or folder), or, with no name, the one
    ``settings`` describe (``detector`` or ``[model] detector``, ``name``, or backbone + head keys). Options
    from ``settings`` (the precision an exported runtime implies, fp32; ``versions.load_model`` then attaches
    the export ``[model] runtime`` names). (Which version is *active* is the database's business:
    ``pipeline.resolve_recipe``.)

    A trainable detector without a head is built untrained (with a loud warning); the production verbs go
    through ``pipeline``, which scores with the training-free fallback instead."""
    from .runtime import resolve_device

    settings = settings or load_settings()
    name_or_path = name_or_path or (settings.model.name if detector is None else "") or None
    if name_or_path:
        folder = resolve(name_or_path, settings.registry.path)
        manifest = read_manifest(folder)
        kind = manifest.get("detector", "bayes-pfl")
        spec = manifest_backbone(manifest)
        head_path = folder / manifest["head"]["file"] if manifest.get("head") else None
        provenance = {"model": manifest["name"], "backbone": spec.pretrained,
                      "head_sha256": (manifest.get("head") or {}).get("sha256"), "random_weights": spec.is_random}
    else:
        kind = detector or settings.model.detector
        spec = backbone_spec(settings, kind)
        head_path = Path(settings.model.head) if settings.model.head else None
        provenance = {"model": None, "backbone": f"{spec.arch}/{spec.pretrained}",
                      "head": str(head_path) if head_path else None, "random_weights": spec.is_random}
    cls = detector_class(kind)
    if head_path is None and cls.trainable:
        provenance["random_weights"] = True
        log.warning("UNTRAINED HEAD: no trained %s head configured; its learnable parts are at their initial "
                    "values and scores mean nothing", kind)
    from .exported import scoring_precision

    precision = scoring_precision(settings.model)  # fp32 under an exported runtime
    backbone = load_backbone(spec)
    model = cls.from_settings(backbone, head_path, cls.options_from(settings), precision=precision,
                              provenance=provenance)
    return model.to(resolve_device(device or settings.model.device))
