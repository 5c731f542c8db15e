"""``inspector retrain`` as a service: an auxiliary dataset, the detector's own trainer
(``Detector.trainer()``), and the result registered as a new model version with what produced it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .config import Settings
from .data import ArchiveLimits, content_hash, dataset_summary, load_dataset
from .detectors import detector_class
from .errors import UsageError

#: progress(phase, step, steps, losses)
Progress = Callable[[str, int, int, dict[str, float]], None]


def dataset_path(settings: Settings, name_or_path: str) -> str:
    """A dataset named in ``[datasets.NAME]``, or a path that exists."""
    if name_or_path in settings.datasets:
        return settings.datasets[name_or_path]
    if Path(name_or_path).expanduser().exists():
        return str(Path(name_or_path).expanduser())
    known = ", ".join(sorted(settings.datasets)) or "none configured"
    raise UsageError(f"'{name_or_path}' is neither a path nor a dataset named in config.toml "
                     f"([datasets.NAME] path = ...; known: {known})")


def code_version() -> str | None:
    """``git describe`` of this checkout, when it is one (recorded with a trained version)."""
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


@dataclasses.dataclass
class RetrainPlan:
    """What ``retrain`` is about to do (for the CLI's first line)."""

    name: str
    detector: str
    images: int
    classes: int
    dataset: str
    run_dir: Path


def retrain(settings: Settings, aux: str, name: str | None = None, resume: bool = False,
            text_epochs: int | None = None, orphan_masks: str = "error", progress: Progress | None = None,
            started: Callable[[RetrainPlan], None] | None = None) -> tuple[Path, Any]:
    """Train ``[model] detector``'s learnable parts on ``aux``'s test split (as the papers do) and register
    the result; returns (the version folder, the trainer's final state)."""
    from .registry import load_model, register_model

    cls = detector_class(settings.model.detector)
    trainer = cls.trainer()
    if trainer is None:
        raise UsageError(f"{cls.name} is training-free: nothing to retrain (few-shot references: "
                         "`inspector references add`)")
    if settings.model.pretrained == "random" and not settings.model.allow_random_weights:
        raise UsageError("training on a random backbone gives a useless model; pass --allow-random-weights for "
                         "a smoke run")
    cfg = trainer.config(settings.train, text_epochs=text_epochs)  # refuses what it cannot honour, first
    path = dataset_path(settings, aux)
    records = [r for r in load_dataset(path, orphan_masks=orphan_masks, limits=ArchiveLimits.from_settings(settings.data))
               if r.split == "test"]
    if not records:
        raise UsageError(f"{path}: no test-split images to train on")
    name = name or f"retrain-{Path(aux).stem}-{dt.datetime.now():%Y%m%d-%H%M}"
    settings.model.name = ""
    model = load_model(settings=settings)  # a fresh head (or [model] head), never the promoted one
    run_dir = Path(settings.registry.path) / ".runs" / name
    if started:
        started(RetrainPlan(name, model.name, len(records), len({r.class_name for r in records}), path, run_dir))
    state = trainer.fit(model, records, cfg, run_dir, resume=resume, progress=progress)
    origin = {"kind": "retrain", "dataset": str(path), "dataset_sha256": content_hash(records),
              "dataset_summary": dataset_summary(records), "hyperparameters": dataclasses.asdict(cfg),
              "history": state.history, "final_stage": state.stage, "seed": cfg.seed, "code_version": code_version(),
              "random_backbone": model.backbone.spec.is_random}
    return register_model(settings.registry.path, name, model, origin), state
