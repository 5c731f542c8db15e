"""Reader for the ``meta.json`` index of APRIL-GAN, AnomalyCLIP, AdaCLIP and Bayes-PFL.

::

    {"train": {"<class>": [<entry>, ...]}, "test": {"<class>": [<entry>, ...]}}

Each entry has ``img_path``, ``mask_path`` (``""`` for normal images), ``cls_name``, ``specie_name``
(defect type), ``anomaly`` (0 or 1) and, in Bayes-PFL's ``meta_<dataset>.json`` files, ``dataset_name``.
Paths are relative to the folder holding the index; an absolute path is used as it is. The class name
is the key the entry is listed under (``cls_name`` repeats it). A class listed
with no entries in any split is an error; ``"train": {}`` (sets without a training split) is fine.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .records import DatasetError, Record, check_split, finish, indexed_record, require_dir


def find_meta_index(root: Path) -> Path | None:
    """``<root>/meta.json``, else the single ``meta_<name>.json`` of a Bayes-PFL root, else ``None``."""
    if (root / "meta.json").is_file():
        return root / "meta.json"
    candidates = sorted(p for p in root.glob("meta_*.json") if p.is_file())
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DatasetError(f"{root}: several indexes ({names}); pass the path of the one to read")
    return candidates[0] if candidates else None


def read_meta(path: Path, require_masks: bool = True) -> list[Record]:
    """All records of a ``meta.json`` file, or of the folder that holds one."""
    path = Path(path)
    if path.is_dir():
        index = find_meta_index(path)
        if index is None:
            raise DatasetError(f"no meta.json in {path}")
    elif path.is_file():
        index = path
    else:
        raise DatasetError(f"dataset index not found: {path}")
    root = require_dir(index.parent, "dataset folder")
    data = load_index(index)
    records: list[Record] = []
    classes: set[str] = set()
    for split, by_class in data.items():
        check_split(split, index)
        if not isinstance(by_class, dict):
            raise DatasetError(f"{index}: split '{split}' must map class names to lists of entries")
        for class_name, entries in by_class.items():
            if not isinstance(entries, list):
                raise DatasetError(f"{index}: {split}/{class_name} must be a list of entries")
            classes.add(class_name)
            for number, entry in enumerate(entries):
                where = f"{index}: {split}/{class_name}[{number}]"
                records.append(entry_record(root, where, split, class_name, entry, require_masks))
    return finish(records, index, classes)


def load_index(index: Path) -> dict[str, Any]:
    """The parsed index, which must be a JSON object."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{index}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{index}: expected a JSON object of splits ({{\"train\": ..., \"test\": ...}})")
    return data


def entry_record(root: Path, where: str, split: str, class_name: str, entry: Any, require_masks: bool) -> Record:
    """The record of one index entry, its files checked."""
    if not isinstance(entry, dict):
        raise DatasetError(f"{where}: expected an object with img_path, mask_path, anomaly, ...")
    label = entry_label(entry, where)
    image = resolve(root, entry.get("img_path"))
    mask = resolve(root, entry.get("mask_path"))
    defect = str(entry.get("specie_name") or "anomaly")
    return indexed_record(image, mask, class_name, label, defect, split, where, require_masks,
                          "a mask_path in the index")


def entry_label(entry: dict[str, Any], where: str) -> int:
    """The entry's ``anomaly`` field as 0 or 1."""
    value = entry.get("anomaly")
    if isinstance(value, bool) or value not in (0, 1):
        raise DatasetError(f"{where}: 'anomaly' must be 0 or 1, not {value!r}")
    return int(value)


def resolve(root: Path, value: Any) -> Path | None:
    """A path of the index joined onto the root (``None`` for a missing or empty value)."""
    if not value:
        return None
    if not isinstance(value, str):
        raise DatasetError(f"expected a path string in the index, not {value!r}")
    return root / value.replace("\\", "/")
