"""Safe extraction of dataset archives (.zip, .tar, .tar.gz, .tgz, .tar.xz) into a reusable cache.

Refused: absolute member paths, ``..`` components, members that resolve outside the target, symbolic and
hard links, device files and FIFOs. Extraction goes to a temporary sibling that is renamed into place,
so an interrupted extraction never leaves a half-filled cache.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from .readers import DatasetError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".txz", ".tar.bz2")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _check_member(name: str, archive: Path) -> PurePosixPath:
    member = PurePosixPath(name.replace("\\", "/"))
    if member.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise DatasetError(f"{archive}: refusing absolute member path '{name}'")
    if ".." in member.parts:
        raise DatasetError(f"{archive}: refusing member with '..': '{name}'")
    return member


def _fingerprint(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()[:16]


def extract(archive: Path, cache_dir: Path | None = None) -> Path:
    """Extract ``archive`` once into ``cache_dir/<hash>/`` and return that folder."""
    cache_dir = Path(cache_dir) if cache_dir else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() \
        / "inspector" / "datasets"
    target = cache_dir / _fingerprint(archive)
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = cache_dir / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, staging)
        else:
            _extract_tar(archive, staging)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def _inside(path: Path, root: Path) -> bool:
    return os.path.commonpath([os.path.realpath(path), os.path.realpath(root)]) == os.path.realpath(root)


def _extract_zip(archive: Path, target: Path) -> None:
    try:
        handle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise DatasetError(f"{archive}: not a readable zip ({exc})") from None
    with handle:
        for info in handle.infolist():
            member = _check_member(info.filename, archive)
            mode = info.external_attr >> 16
            if mode and (mode & 0o170000) == 0o120000:
                raise DatasetError(f"{archive}: refusing symbolic link '{info.filename}'")
            dest = target / Path(*member.parts)
            if not _inside(dest, target):
                raise DatasetError(f"{archive}: member '{info.filename}' escapes the target folder")
        handle.extractall(target)


def _extract_tar(archive: Path, target: Path) -> None:
    try:
        handle = tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise DatasetError(f"{archive}: not a readable tar archive ({exc})") from None
    with handle:
        members = handle.getmembers()
        for m in members:
            member = _check_member(m.name, archive)
            if m.issym() or m.islnk():
                raise DatasetError(f"{archive}: refusing link member '{m.name}'")
            if not (m.isfile() or m.isdir()):
                raise DatasetError(f"{archive}: refusing special member '{m.name}'")
            if not _inside(target / Path(*member.parts), target):
                raise DatasetError(f"{archive}: member '{m.name}' escapes the target folder")
        for m in members:
            dest = target / Path(*_check_member(m.name, archive).parts)
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            source = handle.extractfile(m)
            with open(dest, "wb") as out:
                shutil.copyfileobj(source, out)
