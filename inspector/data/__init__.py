"""Datasets: every supported layout read into one ``Record`` type, archives extracted safely, and summaries.

``load_dataset`` takes a folder, a ``meta.json`` file or an archive and detects the layout:

* ``meta.json`` (or a single Bayes-PFL ``meta_<name>.json``) in the root: the APRIL-GAN/AnomalyCLIP/
  AdaCLIP/Bayes-PFL index (:mod:`.meta`);
* ``split_csv/1cls.csv``: VisA (:mod:`.visa`);
* class folders with ``train/`` or ``test/``: MVTec AD (:mod:`.mvtec`).

A folder that holds nothing but one sub-folder (archives often wrap their content that way) is descended
into until a layout is recognised.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..hashing import update_from
from .archives import ARCHIVE_SUFFIXES, ArchiveLimits, default_cache_dir, extract_archive, is_archive
from .meta import find_meta_index, read_meta
from .mvtec import is_mvtec_root, read_mvtec
from .records import SPLITS, DatasetError, Record, check_orphan_policy, is_hidden, require_dir, sort_records
from .visa import is_visa_root, read_visa

__all__ = [
    "ARCHIVE_SUFFIXES", "ArchiveLimits", "DatasetError", "Record", "content_hash", "dataset_summary",
    "default_cache_dir", "detect_layout", "extract_archive", "find_root", "load_dataset", "read_meta", "read_mvtec",
    "read_visa",
]

SUPPORTED_LAYOUTS = ("meta.json index of APRIL-GAN/AnomalyCLIP/AdaCLIP/Bayes-PFL; "
                     "VisA (split_csv/1cls.csv); "
                     "MVTec AD (<class>/train/good, <class>/test/<defect>, <class>/ground_truth/<defect>)")


def load_dataset(path: str | Path, splits: Sequence[str] = SPLITS, require_masks: bool = True,
                 orphan_masks: str = "error", cache_dir: str | Path | None = None,
                 limits: ArchiveLimits | None = None) -> list[Record]:
    """The records of the ``splits`` of a dataset folder, ``meta.json`` file or archive, sorted.

    ``require_masks=False`` accepts anomalous images without pixel labels (``mask=None``).
    ``orphan_masks`` ("error" or "ignore") decides what a mask file without an image does (MVTec layout;
    the index-based layouts only read the masks they list). Archives are extracted into ``cache_dir``
    (default ``~/.cache/inspector/datasets``) once, within ``limits`` (size and ratio caps), and reused; an
    extraction is kept only once its dataset reads.
    """
    check_orphan_policy(orphan_masks)
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise DatasetError(f"unknown split(s) {', '.join(map(repr, unknown))}; expected {', '.join(SPLITS)}")
    path = Path(path).expanduser()
    records = read_any(path, require_masks, orphan_masks, cache_dir, limits)
    selected = [r for r in records if r.split in splits]
    if not selected:
        raise DatasetError(f"{path}: no images in split(s) {', '.join(splits)}")
    return selected


def read_any(path: Path, require_masks: bool, orphan_masks: str, cache_dir: str | Path | None,
             limits: ArchiveLimits | None = None) -> list[Record]:
    """All records of a folder, index file or archive (published to the cache only once it reads)."""
    if not path.exists():
        raise DatasetError(f"dataset not found: {path}")
    if path.is_file() and path.suffix.lower() == ".json":
        return read_meta(path, require_masks)
    if path.is_file():
        if not is_archive(path):
            raise DatasetError(f"{path}: expected a folder, a meta.json or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
        path = extract_archive(path, Path(cache_dir) if cache_dir else None, limits,
                               validate=lambda folder: read_folder(folder, require_masks, orphan_masks))
    return read_folder(path, require_masks, orphan_masks)


def read_folder(path: Path, require_masks: bool, orphan_masks: str) -> list[Record]:
    """All records of a dataset folder, in whichever layout it has."""
    root = find_root(path)
    layout = detect_layout(root)
    if layout == "meta":
        return read_meta(root, require_masks)
    if layout == "visa":
        return read_visa(root, require_masks)
    return read_mvtec(root, require_masks, orphan_masks)


def detect_layout(root: Path) -> str:
    """'meta', 'visa' or 'mvtec' for a dataset root, or a DatasetError listing the supported layouts."""
    root = require_dir(Path(root), "dataset folder")
    if find_meta_index(root) is not None:
        return "meta"
    if is_visa_root(root):
        return "visa"
    if is_mvtec_root(root):
        return "mvtec"
    raise DatasetError(f"{root}: unknown layout. Supported: {SUPPORTED_LAYOUTS}")


def find_root(folder: Path) -> Path:
    """``folder``, or the folder it wraps: descend while there is no layout, exactly one sub-folder and no files."""
    folder = require_dir(Path(folder), "dataset folder")
    while not has_layout(folder):
        entries = [p for p in folder.iterdir() if not is_hidden(p)]
        if len(entries) != 1 or not entries[0].is_dir():
            break
        folder = entries[0]
    return folder


def has_layout(folder: Path) -> bool:
    """Whether ``folder`` is the root of a recognised layout."""
    try:
        detect_layout(folder)
    except DatasetError:
        return False
    return True


def dataset_summary(records: Sequence[Record]) -> dict[str, dict[str, int]]:
    """Counts per class for a manifest or a report: ``{class: {"<split>/<normal|anomalous>": n, "masks": m}}``.

    Only the split/label pairs that occur are listed; classes and keys come in a stable order.
    """
    summary: dict[str, dict[str, int]] = {}
    masks: dict[str, int] = {}
    for r in sort_records(records):
        counts = summary.setdefault(r.class_name, {})
        key = f"{r.split}/{'anomalous' if r.label else 'normal'}"
        counts[key] = counts.get(key, 0) + 1
        masks[r.class_name] = masks.get(r.class_name, 0) + (r.mask is not None)
    for name, counts in summary.items():
        counts["masks"] = masks[name]
    return summary


def content_hash(records: Sequence[Record]) -> str:
    """A sha256 (hex) of the records' labels, relative file paths and file bytes, in a stable order.

    Paths are taken relative to the deepest folder all files share, so the same data extracted to a
    different place gives the same hash, while renaming, relabelling or editing any file changes it.
    """
    files = [f for r in records for f in (r.image, r.mask) if f is not None]
    if not files:
        return hashlib.sha256().hexdigest()
    base = os.path.commonpath([os.path.abspath(f.parent) for f in files])
    rows = sorted(((rel(r.image, base), rel(r.mask, base), r) for r in records), key=lambda t: (t[0], t[2].split, t[1]))
    digest = hashlib.sha256()
    for image, mask, r in rows:
        add_field(digest, "\t".join((image, mask, r.class_name, r.split, str(r.label), r.defect)).encode())
        for file in (r.image, r.mask):
            if file is not None:
                add_file(digest, file)
    return digest.hexdigest()


def rel(path: Path | None, base: str) -> str:
    """``path`` relative to ``base`` in POSIX form; ``""`` for ``None``."""
    return Path(os.path.relpath(os.path.abspath(path), base)).as_posix() if path is not None else ""


def add_field(digest: Any, data: bytes) -> None:
    """Feed ``data`` with its length first, so that consecutive fields cannot run into each other."""
    digest.update(len(data).to_bytes(8, "big"))
    digest.update(data)


def add_file(digest: Any, path: Path) -> None:
    """Feed a file's size and bytes."""
    digest.update(path.stat().st_size.to_bytes(8, "big"))
    with open(path, "rb") as handle:
        update_from(digest, handle)
