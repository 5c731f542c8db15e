"""Dataset readers. Every layout yields the same ``Record``s.

* MVTec AD folders: ``<class>/train/good``, ``<class>/test/<defect>``, masks in
  ``<class>/ground_truth/<defect>/<stem>_mask.png`` (or ``<stem>.png``, as some MVTec-layout sets name them);
* VisA: ``split_csv/1cls.csv`` (object, split, label, image, mask);
* ``meta.json`` / ``meta_<name>.json`` of APRIL-GAN, AnomalyCLIP, AdaCLIP and Bayes-PFL
  (split -> class -> [{img_path, mask_path, cls_name, specie_name, anomaly}]).

Checks: a wrong path, a class without images, a mask without an image (``orphan_masks="error"``, or
"ignore"), an anomalous image whose mask is missing (``require_masks=True``) are clear errors.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


class DatasetError(ValueError):
    """A dataset that cannot be used as given; the message names the file or class and the problem."""


@dataclass(frozen=True)
class Record:
    image: Path
    mask: Path | None
    class_name: str
    label: int  # 0 normal, 1 anomalous
    defect: str  # "good" for normal images
    split: str  # "train" or "test"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []


def read_mvtec(root: Path, require_masks: bool = True, orphan_masks: str = "error") -> list[Record]:
    classes = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                     and ((d / "train").is_dir() or (d / "test").is_dir()))
    if not classes:
        raise DatasetError(f"{root}: no class folders with train/ or test/ (MVTec AD layout)")
    records: list[Record] = []
    for cls in classes:
        found: list[Record] = []
        for split in ("train", "test"):
            split_dir = cls / split
            if not split_dir.is_dir():
                continue
            for defect_dir in sorted(d for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith(".")):
                defect = defect_dir.name
                for image in _images(defect_dir):
                    if defect == "good":
                        found.append(Record(image, None, cls.name, 0, "good", split))
                        continue
                    mask = None
                    for candidate in (cls / "ground_truth" / defect / f"{image.stem}_mask.png",
                                      cls / "ground_truth" / defect / f"{image.stem}.png"):
                        if candidate.is_file():
                            mask = candidate
                            break
                    if mask is None and require_masks:
                        raise DatasetError(f"{image}: anomalous image without a mask in "
                                           f"{cls / 'ground_truth' / defect}")
                    found.append(Record(image, mask, cls.name, 1, defect, split))
        if not found:
            raise DatasetError(f"class '{cls.name}' in {root} has no images")
        used = {r.mask for r in found if r.mask is not None}
        truth = cls / "ground_truth"
        if truth.is_dir() and orphan_masks == "error":
            for defect_dir in sorted(d for d in truth.iterdir() if d.is_dir()):
                for mask in _images(defect_dir):
                    if mask not in used:
                        raise DatasetError(f"{mask}: a mask without an image (use orphan_masks='ignore' to "
                                           "skip such masks)")
        records.extend(found)
    return records


def read_visa(root: Path, require_masks: bool = True) -> list[Record]:
    index = root / "split_csv" / "1cls.csv"
    records = []
    with open(index, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            try:
                label = {"normal": 0, "anomaly": 1}[row["label"].strip()]
                image = root / row["image"]
                mask = root / row["mask"] if row.get("mask") else None
                cls, split = row["object"], row["split"]
            except KeyError as exc:
                raise DatasetError(f"{index}: bad row {row} ({exc})") from None
            if not image.is_file():
                raise DatasetError(f"{index}: image not found: {image}")
            if label == 1 and (mask is None or not mask.is_file()):
                if require_masks:
                    raise DatasetError(f"{image}: anomalous image without a mask ({mask})")
                mask = None
            records.append(Record(image, mask if label == 1 else None, cls, label,
                                  "anomaly" if label else "good", split))
    _check_classes(records, index)
    return sorted(records, key=lambda r: (r.class_name, r.split, str(r.image)))


def read_meta(index: Path, require_masks: bool = True) -> list[Record]:
    root = index.parent
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{index}: not valid JSON ({exc})") from None
    records = []
    for split, classes in data.items():
        if not isinstance(classes, dict):
            raise DatasetError(f"{index}: '{split}' must map class names to lists of records")
        for cls, entries in classes.items():
            for entry in entries:
                try:
                    image = root / entry["img_path"]  # an absolute path overrides the root
                    label = int(entry["anomaly"])
                    mask = root / entry["mask_path"] if entry.get("mask_path") else None
                    name = entry.get("cls_name") or cls
                except (KeyError, TypeError, ValueError) as exc:
                    raise DatasetError(f"{index}: bad record {entry} ({exc})") from None
                if not image.is_file():
                    raise DatasetError(f"{index}: image not found: {image}")
                if label == 1 and (mask is None or not mask.is_file()):
                    if require_masks:
                        raise DatasetError(f"{image}: anomalous image without a mask ({mask})")
                    mask = None
                records.append(Record(image, mask if label else None, name, label,
                                      entry.get("specie_name") or ("anomaly" if label else "good"), split))
    _check_classes(records, index)
    return sorted(records, key=lambda r: (r.class_name, r.split, str(r.image)))


def _check_classes(records: list[Record], where: Path) -> None:
    if not records:
        raise DatasetError(f"{where}: no images listed")
