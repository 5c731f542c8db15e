"""Safe, cached extraction of dataset archives: ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz``, ``.tar.bz2``.

An archive is extracted once into ``<cache_dir>/<first 16 hex digits of its sha256>/`` and that folder is
reused on later calls. Every member is checked before anything is written; refused are absolute paths
(``/x``, ``C:\\x``), ``..`` components, paths that resolve outside the target, symbolic and hard links,
and device files or FIFOs. Extraction goes into a temporary sibling folder that is renamed into place at
the end, so an interrupted or refused extraction never leaves a half-filled cache entry.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from pathlib import Path

from .records import DatasetError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")
DIGEST_CHARS = 16
READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError, RuntimeError)


def default_cache_dir() -> Path:
    """``~/.cache/inspector/datasets``."""
    return Path.home() / ".cache" / "inspector" / "datasets"


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file with one of the archive suffixes."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def file_digest(path: Path) -> str:
    """The sha256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def extract_archive(archive: Path, cache_dir: Path | None = None) -> Path:
    """The folder holding the archive's contents, extracting it first unless the cache already has it."""
    archive = Path(archive)
    if not is_archive(archive):
        raise DatasetError(f"not an archive ({', '.join(ARCHIVE_SUFFIXES)}): {archive}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache_dir / file_digest(archive)[:DIGEST_CHARS]
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=cache_dir))
    try:
        unpack(archive, staging)
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def publish(staging: Path, target: Path) -> None:
    """Rename the finished ``staging`` folder to ``target``; if another process got there first, keep theirs."""
    try:
        os.rename(staging, target)
    except OSError:
        if not target.is_dir():
            raise


def unpack(archive: Path, folder: Path) -> None:
    """Check every member of the archive, then write them all under ``folder``."""
    try:
        if archive.name.lower().endswith(".zip"):
            unpack_zip(archive, folder)
        else:
            unpack_tar(archive, folder)
    except DatasetError:
        raise
    except READ_ERRORS as exc:
        raise DatasetError(f"cannot extract {archive}: {exc}") from None


def safe_parts(name: str, archive: Path) -> tuple[str, ...]:
    """The components of a member name, refusing absolute paths and ``..``; ``()`` for the archive root."""
    posix = name.replace("\\", "/")
    if posix.startswith("/") or re.match(r"^[A-Za-z]:", posix):
        raise DatasetError(f"{archive}: refusing member with an absolute path: {name!r}")
    parts = tuple(p for p in posix.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DatasetError(f"{archive}: refusing member with a '..' component: {name!r}")
    if any("\0" in p for p in parts):
        raise DatasetError(f"{archive}: refusing member with a NUL byte in its name: {name!r}")
    return parts


def destination(folder: Path, name: str, archive: Path) -> Path | None:
    """Where a member goes under ``folder`` (``None`` for the root itself), checked to stay inside it."""
    parts = safe_parts(name, archive)
    if not parts:
        return None
    path = folder.joinpath(*parts)
    base = os.path.realpath(folder)
    if os.path.commonpath([base, os.path.realpath(path)]) != base:
        raise DatasetError(f"{archive}: refusing member that escapes the target folder: {name!r}")
    return path


def write_file(source, path: Path) -> None:
    """Copy an open member stream to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        shutil.copyfileobj(source, out, 1 << 20)


def zip_kind(info: zipfile.ZipInfo) -> str:
    """'dir', 'file', 'symlink' or 'special', from the entry's name and Unix mode bits (when recorded)."""
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        return "symlink"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special"
    return "dir" if info.is_dir() or kind == stat.S_IFDIR else "file"


def unpack_zip(archive: Path, folder: Path) -> None:
    """Extract a zip file after checking all its entries."""
    with zipfile.ZipFile(archive) as handle:
        plan = []
        for info in handle.infolist():
            kind = zip_kind(info)
            if kind in ("symlink", "special"):
                raise DatasetError(f"{archive}: refusing {kind} entry {info.filename!r}")
            plan.append((info, kind, destination(folder, info.filename, archive)))
        for info, kind, path in plan:
            if path is None:
                continue
            if kind == "dir":
                path.mkdir(parents=True, exist_ok=True)
            else:
                with handle.open(info) as source:
                    write_file(source, path)


def tar_kind(member: tarfile.TarInfo) -> str:
    """'dir', 'file', 'symlink', 'hardlink' or 'special'."""
    if member.issym():
        return "symlink"
    if member.islnk():
        return "hardlink"
    if member.isdir():
        return "dir"
    if member.isfile():
        return "file"
    return "special"


def unpack_tar(archive: Path, folder: Path) -> None:
    """Extract a (compressed) tar file after checking all its members."""
    with tarfile.open(archive, mode="r:*") as handle:
        plan = []
        for member in handle.getmembers():
            kind = tar_kind(member)
            if kind in ("symlink", "hardlink", "special"):
                raise DatasetError(f"{archive}: refusing {kind} member {member.name!r}")
            plan.append((member, kind, destination(folder, member.name, archive)))
        for member, kind, path in plan:  # in archive order, so compressed streams are read forwards
            if path is None:
                continue
            if kind == "dir":
                path.mkdir(parents=True, exist_ok=True)
            else:
                write_file(handle.extractfile(member), path)
