"""Normal reference images per product class, for few-shot detectors (WinCLIP+).

Layout: ``<folder>/<slug>/<sha256[:16]>.png`` plus ``<folder>/<slug>/class.txt`` holding the class name as
given. Each image is decoded (EXIF orientation applied, converted to RGB) and stored as a lossless PNG
named by the SHA-256 of its decoded pixels, so the same picture added twice, or as a JPEG and a PNG with
identical pixels, is stored once. Every file of an ``add`` is decoded before anything is written, so a bad
file stops the call and nothing of it is stored.

The slug is the class name itself when it is already a safe folder name (letters, digits, ``.``, ``_``,
``-``), otherwise a sanitised form plus a short hash of the name, so two different names never share a
folder.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from PIL import Image

from .errors import UsageError
from .imaging import ImageDecodeError, ImageInput, as_list, open_image

_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")
_NAME_FILE = "class.txt"
T = TypeVar("T")


def class_slug(class_name: str) -> str:
    """A folder name for ``class_name`` (itself when safe; otherwise sanitised + 8 hex digits of its hash)."""
    if not class_name.strip():
        raise UsageError("class name is empty")
    if _SAFE.match(class_name) and len(class_name) <= 80:
        return class_name
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", class_name).strip("._-")[:60] or "class"
    digest = hashlib.sha256(class_name.encode("utf-8")).hexdigest()[:8]
    return f"{cleaned}-{digest}"


def pixel_digest(image: Image.Image) -> str:
    """SHA-256 of a decoded RGB image's size and pixel bytes (the content a reference is deduplicated by)."""
    digest = hashlib.sha256(f"{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ReferenceStore:
    """Folder of normal reference images, one sub-folder per class."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder).expanduser()

    def class_folder(self, class_name: str) -> Path:
        return self.folder / class_slug(class_name)

    def add(self, class_name: str, paths: ImageInput | Iterable[ImageInput]) -> list[Path]:
        """Store copies of ``paths`` (files or PIL images) as references of ``class_name``.

        Returns the stored file of each input, in order (an image already stored returns its existing
        file). Raises ``ValueError`` naming the first unreadable file; then nothing is stored.
        """
        sources = as_list(paths)
        if not sources:
            raise UsageError("no reference images given")
        decoded: list[tuple[str, Image.Image]] = []
        for source in sources:
            try:
                image = open_image(source)
            except ImageDecodeError as exc:
                raise UsageError(f"reference image rejected, nothing added for '{class_name}': {exc}") from None
            decoded.append((pixel_digest(image)[:16], image))

        target = self.class_folder(class_name)
        target.mkdir(parents=True, exist_ok=True)
        name_file = target / _NAME_FILE
        if not name_file.exists():
            name_file.write_text(class_name, encoding="utf-8")
        elif name_file.read_text(encoding="utf-8") != class_name:  # a hash collision of two names: refuse
            raise UsageError(f"{target} already holds references of another class "
                             f"('{name_file.read_text(encoding='utf-8')}')")
        out: list[Path] = []
        written: list[Path] = []
        try:
            for digest, image in decoded:
                path = target / f"{digest}.png"
                if not path.exists() and path not in written:
                    with tempfile.NamedTemporaryFile(dir=target, prefix=".incoming-", suffix=".png",
                                                     delete=False) as handle:
                        image.save(handle, format="PNG")
                    os.replace(handle.name, path)
                    written.append(path)
                out.append(path)
        except BaseException:
            for path in written:  # nothing half-added: undo this call's files
                path.unlink(missing_ok=True)
            for stray in target.glob(".incoming-*"):
                stray.unlink(missing_ok=True)
            raise
        return out

    def list(self, class_name: str) -> list[Path]:
        """Stored reference files of ``class_name``, sorted by name (empty when none)."""
        folder = self.class_folder(class_name)
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".png" and not p.name.startswith("."))

    def classes(self) -> list[str]:
        """Names of the classes that have at least one reference image, sorted."""
        if not self.folder.is_dir():
            return []
        names = []
        for folder in self.folder.iterdir():
            name_file = folder / _NAME_FILE
            if folder.is_dir() and name_file.is_file():
                name = name_file.read_text(encoding="utf-8")
                if self.list(name):
                    names.append(name)
        return sorted(names)

    def remove(self, class_name: str) -> int:
        """Forget every reference of ``class_name``; returns how many images were removed."""
        count = len(self.list(class_name))
        folder = self.class_folder(class_name)
        if folder.is_dir():
            shutil.rmtree(folder)
        return count

    def fingerprint(self, class_name: str) -> tuple[str, ...]:
        """Cheap change marker: the sorted file names (content hashes) of the class's references."""
        folder = self.class_folder(class_name)
        try:
            names = os.listdir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return ()
        return tuple(sorted(n for n in names if n.endswith(".png") and not n.startswith(".")))

    def __repr__(self) -> str:
        return f"ReferenceStore({str(self.folder)!r})"


def cached_encoding(store: ReferenceStore | None, class_name: str, cache: dict[str, T],
                    encode: Callable[[list[Path], tuple[str, ...]], T], limit: int = 0) -> T | None:
    """What a detector made of a class's reference images (few-shot memory, MuSc's seeded pool), cached in
    ``cache`` and made again only when the store's images of that class changed.

    A cached value carries a ``fingerprint``: the file names it was made from, or None when the detector pinned
    it itself (kept as is, whatever the store holds). ``encode(paths, fingerprint)`` makes the value from the
    first ``limit`` references (0: all). A reference removed between listing and reading (``references
    remove`` on another box) gets one more listing; a second failure is a ValueError naming the folder. Returns
    None (and forgets the class) when the store holds no reference of it.
    """
    cached = cache.get(class_name)
    if cached is not None and cached.fingerprint is None:
        return cached
    current = store.fingerprint(class_name) if store is not None else ()
    if not current:
        cache.pop(class_name, None)
        return None
    if cached is not None and cached.fingerprint == current:
        return cached
    for attempt in (1, 2):
        paths = store.list(class_name)
        if not paths:
            cache.pop(class_name, None)
            return None
        try:
            value = encode(paths[:limit] if limit else paths, tuple(p.name for p in paths))
            break
        except ValueError as exc:
            if attempt == 2:
                raise ValueError(f"reference images of class '{class_name}' in {store.folder} are unreadable: "
                                 f"{exc}") from None
    cache[class_name] = value
    return value
