"""The one record type every dataset layout is read into, and the checks all readers share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import InspectorError
from ..imaging import IMAGE_SUFFIXES

#: The splits a record can belong to.
SPLITS = ("train", "test")

#: What to do with a mask file that belongs to no image: raise, or leave it out.
ORPHAN_POLICIES = ("error", "ignore")


class DatasetError(InspectorError, ValueError):
    """A dataset that cannot be used as given. The message names the path or class and says what is wrong."""


@dataclass(frozen=True)
class Record:
    """One labelled image of a dataset.

    ``mask`` is a grayscale image whose non-zero pixels mark the defect; it is ``None`` for normal images
    and for anomalous images of sets without pixel labels (read with ``require_masks=False``).
    """

    image: Path
    mask: Path | None
    class_name: str
    label: int  # 0 normal, 1 anomalous
    defect: str  # defect type; "good" for normal images
    split: str  # "train" or "test"


def is_hidden(path: Path) -> bool:
    """Dot-files, and the ``__MACOSX`` resource folders that macOS adds to zip files."""
    return path.name.startswith((".", "__MACOSX"))


def visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders of ``folder`` that are not hidden, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_dir() and not is_hidden(p))


def image_files(folder: Path) -> list[Path]:
    """Image files directly inside ``folder`` (not hidden), sorted by name; none if it is not a folder."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not is_hidden(p) and p.suffix.lower() in IMAGE_SUFFIXES)


def require_dir(path: Path, what: str) -> Path:
    """``path`` if it is an existing folder, else a DatasetError naming it."""
    if not path.exists():
        raise DatasetError(f"{what} not found: {path}")
    if not path.is_dir():
        raise DatasetError(f"{what} is not a folder: {path}")
    return path


def check_orphan_policy(orphan_masks: str) -> None:
    """Reject an unknown ``orphan_masks`` value early, before any file is read."""
    if orphan_masks not in ORPHAN_POLICIES:
        raise DatasetError(f"orphan_masks must be one of {', '.join(ORPHAN_POLICIES)}, not {orphan_masks!r}")


def check_split(split: str, where: object) -> str:
    """``split`` if it is a known split name, else a DatasetError saying where it was found."""
    if split not in SPLITS:
        raise DatasetError(f"{where}: unknown split {split!r} (expected one of {', '.join(SPLITS)})")
    return split


def missing_mask_error(image: Path, expected: str) -> DatasetError:
    """The error for an anomalous image without pixel labels, with the way out for image-only sets."""
    return DatasetError(f"{image}: anomalous image without a mask (expected {expected}); "
                        "pass require_masks=False for a classification-only dataset")


def indexed_record(image: Path | None, mask: Path | None, class_name: str, label: int, defect: str, split: str,
                   where: str, require_masks: bool, mask_column: str) -> Record:
    """The record of one line of an index file (VisA csv, meta.json), its files checked.

    A listed mask whose image is missing is "a mask without an image"; a listed mask that is missing is an
    error even when masks are optional; an anomalous image without a mask is an error if ``require_masks``.
    """
    if image is None or not image.is_file():
        if mask is not None:
            raise DatasetError(f"{where}: {mask}: a mask without an image ({image or 'no image path'} not found)")
        raise DatasetError(f"{where}: image not found: {image or '(no image path)'}")
    if label == 0:
        return Record(image, None, class_name, 0, "good", split)
    if mask is not None and not mask.is_file():
        raise DatasetError(f"{where}: mask not found: {mask} (for image {image})")
    if mask is None and require_masks:
        raise missing_mask_error(image, mask_column)
    return Record(image, mask, class_name, 1, defect, split)


def sort_records(records: Iterable[Record]) -> list[Record]:
    """Records in a stable order: class, split, defect, image path."""
    return sorted(records, key=lambda r: (r.class_name, SPLITS.index(r.split), r.defect, str(r.image)))


def finish(records: Sequence[Record], where: object, classes: Iterable[str] = ()) -> list[Record]:
    """Common final checks of every reader, then the records sorted.

    Every class in ``classes`` (the classes the layout declares) must have at least one image, and no
    image may be listed twice in the same split.
    """
    found = {r.class_name for r in records}
    for name in sorted(set(classes) - found):
        raise DatasetError(f"{where}: class '{name}' has no images")
    if not records:
        raise DatasetError(f"{where}: no images found")
    seen: set[tuple[str, Path]] = set()
    for r in records:
        key = (r.split, r.image)
        if key in seen:
            raise DatasetError(f"{where}: image listed twice in split '{r.split}': {r.image}")
        seen.add(key)
    return sort_records(records)
