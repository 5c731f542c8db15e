"""Reader for the MVTec AD folder layout.

::

    <root>/<class>/train/good/*.png
    <root>/<class>/test/good/*.png
    <root>/<class>/test/<defect>/*.png
    <root>/<class>/ground_truth/<defect>/<stem>_mask.png   (or <stem>.png)

Folder names decide the labels: ``good`` is normal, any other folder is a defect type. A mask is paired
with its image by file name, ``<stem>_mask`` first (MVTec AD), then ``<stem>`` (sets such as the battery
weld set that reuse the image's name). A sub-folder of the root is a class when it holds ``train/``,
``test/`` or ``ground_truth/``; an empty sub-folder is reported as a class without images, and other
folders (documentation, licences) are left alone.
"""

from __future__ import annotations

from pathlib import Path

from .records import (
    DatasetError,
    Record,
    check_orphan_policy,
    finish,
    image_files,
    missing_mask_error,
    require_dir,
    visible_dirs,
)

CLASS_MARKERS = ("train", "test", "ground_truth")
NORMAL = "good"


def is_mvtec_root(root: Path) -> bool:
    """Whether some sub-folder of ``root`` looks like an MVTec class (it has ``train/`` or ``test/``)."""
    return any((d / "train").is_dir() or (d / "test").is_dir() for d in visible_dirs(root))


def class_folders(root: Path) -> list[Path]:
    """The class folders of an MVTec root: those with train/, test/ or ground_truth/, and empty ones."""
    return [d for d in visible_dirs(root)
            if any((d / marker).is_dir() for marker in CLASS_MARKERS) or not any(d.iterdir())]


def read_mvtec(root: Path, require_masks: bool = True, orphan_masks: str = "error") -> list[Record]:
    """All records of an MVTec AD layout folder.

    ``require_masks=False`` accepts anomalous images without a mask (their ``mask`` is ``None``).
    ``orphan_masks="ignore"`` skips mask files that belong to no image instead of raising.
    """
    check_orphan_policy(orphan_masks)
    root = require_dir(Path(root), "dataset folder")
    classes = class_folders(root)
    if not classes:
        raise DatasetError(f"{root}: no class folders with train/ or test/ (MVTec AD layout)")
    records: list[Record] = []
    for folder in classes:
        records.extend(read_class(folder, require_masks, orphan_masks))
    return finish(records, root, [c.name for c in classes])


def read_class(folder: Path, require_masks: bool, orphan_masks: str) -> list[Record]:
    """Records of one class folder, its masks paired by name and checked for orphans."""
    masks = MaskIndex(folder / "ground_truth")
    records = []
    for split in ("train", "test"):
        for defect_dir in visible_dirs(folder / split) if (folder / split).is_dir() else []:
            for image in image_files(defect_dir):
                records.append(make_record(image, folder.name, split, defect_dir.name, masks, require_masks))
    if not records:
        raise DatasetError(f"class '{folder.name}' has no images (looked in {folder}/train/* and {folder}/test/*)")
    if orphan_masks == "error":
        masks.check_all_used()
    return records


def make_record(image: Path, class_name: str, split: str, defect: str, masks: MaskIndex,
                require_masks: bool) -> Record:
    """The record of one image; anomalous images get their mask looked up by name."""
    if defect == NORMAL:
        return Record(image, None, class_name, 0, NORMAL, split)
    mask = masks.take(defect, image.stem)
    if mask is None and require_masks:
        raise missing_mask_error(image, f"{masks.folder / defect}/{image.stem}_mask.png or {image.stem}.png")
    return Record(image, mask, class_name, 1, defect, split)


class MaskIndex:
    """The mask files of one class's ``ground_truth`` folder, by defect and file stem, tracking which were used."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[tuple[str, str], Path] = {}
        for defect_dir in visible_dirs(folder) if folder.is_dir() else []:
            for mask in image_files(defect_dir):
                self.files.setdefault((defect_dir.name, mask.stem), mask)
        self.used: set[Path] = set()

    def take(self, defect: str, stem: str) -> Path | None:
        """The mask of image ``stem`` of ``defect`` (``<stem>_mask`` before ``<stem>``), marked as used."""
        for name in (f"{stem}_mask", stem):
            mask = self.files.get((defect, name))
            if mask is not None:
                self.used.add(mask)
                return mask
        return None

    def orphans(self) -> list[Path]:
        """Mask files that no image took, sorted."""
        return sorted(set(self.files.values()) - self.used)

    def check_all_used(self) -> None:
        """Raise a DatasetError naming the first mask without an image, if there is one."""
        orphans = self.orphans()
        if orphans:
            more = f" (and {len(orphans) - 1} more)" if len(orphans) > 1 else ""
            raise DatasetError(f"{orphans[0]}: a mask without an image{more}; no image in "
                               f"{self.folder.parent}/test/{orphans[0].parent.name}/ has that name. "
                               "Pass orphan_masks='ignore' to skip such masks")
