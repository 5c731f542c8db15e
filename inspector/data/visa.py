"""Reader for VisA's index, ``<root>/split_csv/1cls.csv``.

The file has one row per image with the columns ``object, split, label, image, mask``: ``label`` is
``normal`` or ``anomaly``, ``image`` and ``mask`` are paths relative to the root, and ``mask`` is empty for
normal images. VisA records no defect type, so anomalous records get the defect ``"anomaly"``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .records import DatasetError, Record, check_split, finish, indexed_record, require_dir

INDEX = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}


def is_visa_root(root: Path) -> bool:
    """Whether ``root`` holds VisA's ``split_csv/1cls.csv``."""
    return (root / INDEX).is_file()


def read_visa(root: Path, require_masks: bool = True) -> list[Record]:
    """All records listed in ``<root>/split_csv/1cls.csv``; every file it names must exist."""
    root = require_dir(Path(root), "dataset folder")
    index = root / INDEX
    if not index.is_file():
        raise DatasetError(f"VisA index not found: {index}")
    rows = read_rows(index)
    records = [row_record(root, index, line, row, require_masks) for line, row in rows]
    return finish(records, index, {row["object"].strip() for _, row in rows})


def read_rows(index: Path) -> list[tuple[int, dict[str, str]]]:
    """The rows of the csv with their line numbers, after checking the header."""
    with open(index, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{index}: missing column(s) {', '.join(missing)} "
                               f"(expected {', '.join(COLUMNS)})")
        return [(reader.line_num, {k: (v or "") for k, v in row.items() if k}) for row in reader]


def row_record(root: Path, index: Path, line: int, row: dict[str, str], require_masks: bool) -> Record:
    """The record of one csv row, its files checked."""
    where = f"{index}, line {line}"
    label_text = row["label"].strip().lower()
    if label_text not in LABELS:
        raise DatasetError(f"{where}: label must be 'normal' or 'anomaly', not {row['label']!r}")
    label = LABELS[label_text]
    class_name = row["object"].strip()
    if not class_name:
        raise DatasetError(f"{where}: empty object (class) name")
    split = check_split(row["split"].strip(), where)
    image = root / row["image"].strip() if row["image"].strip() else None
    mask = root / row["mask"].strip() if row["mask"].strip() else None
    return indexed_record(image, mask, class_name, label, "anomaly", split, where, require_masks,
                          f"a mask path in {index}")
