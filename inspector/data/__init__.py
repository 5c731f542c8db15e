"""Datasets: one record type for every layout, safe archives, and synthetic data for tests and demos."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Sequence

from .archives import extract, is_archive
from .readers import DatasetError, Record, read_meta, read_mvtec, read_visa

__all__ = ["DatasetError", "Record", "content_hash", "dataset_summary", "detect_root", "load_dataset"]


def detect_root(path: Path) -> Path:
    """Descend through folders that hold exactly one folder and nothing else (archives often wrap one)."""
    while True:
        entries = [p for p in path.iterdir() if not p.name.startswith((".", "__MACOSX"))]
        if len(entries) == 1 and entries[0].is_dir() and not _layout(path):
            path = entries[0]
        else:
            return path


def _layout(root: Path) -> str | None:
    if (root / "meta.json").is_file() or list(root.glob("meta_*.json")):
        return "meta"
    if (root / "split_csv" / "1cls.csv").is_file():
        return "visa"
    if any(d.is_dir() and ((d / "train").is_dir() or (d / "test").is_dir()) for d in root.iterdir()):
        return "mvtec"
    return None


def load_dataset(path: str | Path, splits: Sequence[str] = ("train", "test"), require_masks: bool = True,
                 orphan_masks: str = "error", cache_dir: str | Path | None = None) -> list[Record]:
    """Records of a dataset folder or archive, its layout detected: meta.json, VisA or MVTec AD."""
    if orphan_masks not in ("error", "ignore"):
        raise DatasetError(f"orphan_masks must be 'error' or 'ignore', not '{orphan_masks}'")
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    if path.is_file() and path.suffix == ".json":
        records = read_meta(path, require_masks)
    else:
        if is_archive(path):
            path = extract(path, Path(cache_dir) if cache_dir else None)
        elif not path.is_dir():
            raise DatasetError(f"{path}: not a folder, a meta.json or a .zip/.tar(.gz|.xz) archive")
        root = detect_root(path)
        layout = _layout(root)
        if layout == "meta":
            index = root / "meta.json" if (root / "meta.json").is_file() else sorted(root.glob("meta_*.json"))[0]
            records = read_meta(index, require_masks)
        elif layout == "visa":
            records = read_visa(root, require_masks)
        elif layout == "mvtec":
            records = read_mvtec(root, require_masks, orphan_masks)
        else:
            raise DatasetError(f"{root}: unknown layout; supported: MVTec AD folders (<class>/train, <class>/test, "
                               "<class>/ground_truth), VisA (split_csv/1cls.csv), meta.json")
    records = [r for r in records if r.split in splits]
    if not records:
        raise DatasetError(f"{path}: no images in split(s) {', '.join(splits)}")
    return records


def dataset_summary(records: Sequence[Record]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for r in records:
        c = out.setdefault(r.class_name, {})
        key = f"{r.split}/{'anomalous' if r.label else 'normal'}"
        c[key] = c.get(key, 0) + 1
        if r.mask is not None:
            c["masks"] = c.get("masks", 0) + 1
    return out


def content_hash(records: Sequence[Record]) -> str:
    """sha256 over (class, split, label, file names and bytes of images and masks), in a stable order."""
    digest = hashlib.sha256()
    for r in sorted(records, key=lambda r: (r.class_name, r.split, str(r.image))):
        digest.update(f"{r.class_name}|{r.split}|{r.label}|{r.image.name}|{r.mask.name if r.mask else ''}".encode())
        for file in (r.image, r.mask):
            if file is not None:
                digest.update(file.read_bytes())
    return digest.hexdigest()
