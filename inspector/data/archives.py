"""Safe, cached extraction of dataset archives: ``.zip``, ``.tar``, ``.tar.gz``/``.tgz``, ``.tar.xz``, ``.tar.bz2``.

An archive is extracted once into ``<cache_dir>/<first 16 hex digits of its sha256>/`` and that folder is
reused on later calls. Every member is checked before anything is written; refused are absolute paths
(``/x``, ``C:\\x``), ``..`` components, paths that resolve outside the target, symbolic and hard links,
and device files or FIFOs. Extraction goes into a temporary sibling folder that is renamed into place only
after the dataset in it validated, so an interrupted, refused or rejected extraction leaves nothing behind.

Bombs: the bytes actually written are counted (headers are not trusted) against :class:`ArchiveLimits`, a
total size and a ratio to the archive's own size (``[data] archive_max_bytes`` and ``archive_max_ratio``);
the header sizes are also summed first, so an honest oversized archive is refused before anything is written.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hashing import file_sha256
from .records import DatasetError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.xz", ".tar.bz2")
DIGEST_CHARS = 16
READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, tarfile.TarError, RuntimeError)


@dataclass(frozen=True)
class ArchiveLimits:
    """How much one archive may write: at most ``max_bytes`` in all, and at most ``max_ratio`` times the
    archive's size (but always ``min_allowance``, so small archives of text compress freely)."""

    max_bytes: int = 64 << 30
    max_ratio: float = 100.0
    min_allowance: int = 64 << 20

    @classmethod
    def from_settings(cls, data: Any) -> ArchiveLimits:
        """From the ``[data]`` settings section."""
        return cls(max_bytes=data.archive_max_bytes, max_ratio=data.archive_max_ratio)

    def allowance(self, archive_size: int) -> tuple[int, str]:
        """Bytes the archive may write, and which cap sets that number (for the message)."""
        by_ratio = max(self.min_allowance, int(self.max_ratio * archive_size))
        if by_ratio < self.max_bytes:
            return by_ratio, f"compression ratio cap ({self.max_ratio:g}x the archive's {archive_size} bytes)"
        return self.max_bytes, f"size cap of {_size(self.max_bytes)} ([data] archive_max_bytes)"


def _size(n: int) -> str:
    return f"{n / (1 << 30):g} GiB" if n >= 1 << 30 else f"{n / (1 << 20):g} MiB"


class _Budget:
    """Counts the bytes written while extracting and stops at the allowance."""

    def __init__(self, archive: Path, limits: ArchiveLimits):
        self.archive = archive
        self.left, self.reason = limits.allowance(archive.stat().st_size)
        self.allowed = self.left

    def check_declared(self, total: int) -> None:
        if total > self.allowed:
            raise DatasetError(f"{self.archive}: refusing an archive that declares {total} bytes, more than the "
                               f"{_size(self.allowed)} allowed by the {self.reason}")

    def spend(self, n: int) -> None:
        self.left -= n
        if self.left < 0:
            raise DatasetError(f"{self.archive}: refusing an archive that expands past {_size(self.allowed)}: over "
                               f"the {self.reason}; a bomb, or raise the [data] archive limits")


def default_cache_dir() -> Path:
    """``~/.cache/inspector/datasets``."""
    return Path.home() / ".cache" / "inspector" / "datasets"


def is_archive(path: Path) -> bool:
    """Whether ``path`` is a file with one of the archive suffixes."""
    return path.is_file() and path.name.lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, cache_dir: Path | None = None, limits: ArchiveLimits | None = None,
                    validate: Callable[[Path], object] | None = None) -> Path:
    """The folder holding the archive's contents, extracting it first unless the cache already has it.

    ``validate(folder)`` runs on the finished extraction before it is published to the cache; whatever it
    raises (a dataset the readers reject) removes the extraction, as any failure does."""
    archive = Path(archive)
    if not is_archive(archive):
        raise DatasetError(f"not an archive ({', '.join(ARCHIVE_SUFFIXES)}): {archive}")
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    target = cache_dir / file_sha256(archive)[:DIGEST_CHARS]
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=cache_dir))
    try:
        unpack(archive, staging, _Budget(archive, limits or ArchiveLimits()))
        if validate is not None:
            validate(staging)
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


def unpack(archive: Path, folder: Path, budget: _Budget | None = None) -> None:
    """Check every member of the archive, then write them all under ``folder`` within ``budget``."""
    budget = budget or _Budget(archive, ArchiveLimits())
    try:
        if archive.name.lower().endswith(".zip"):
            unpack_zip(archive, folder, budget)
        else:
            unpack_tar(archive, folder, budget)
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


def write_file(source, path: Path, budget: _Budget) -> None:
    """Copy an open member stream to ``path``, creating its folder, counting every byte against ``budget``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as out:
        while block := source.read(min(1 << 20, max(budget.left, 0) + 1)):
            budget.spend(len(block))
            out.write(block)


def zip_kind(info: zipfile.ZipInfo) -> str:
    """'dir', 'file', 'symlink' or 'special', from the entry's name and Unix mode bits (when recorded)."""
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if kind == stat.S_IFLNK:
        return "symlink"
    if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
        return "special"
    return "dir" if info.is_dir() or kind == stat.S_IFDIR else "file"


def unpack_zip(archive: Path, folder: Path, budget: _Budget) -> None:
    """Extract a zip file after checking all its entries."""
    with zipfile.ZipFile(archive) as handle:
        plan = []
        for info in handle.infolist():
            kind = zip_kind(info)
            if kind in ("symlink", "special"):
                raise DatasetError(f"{archive}: refusing {kind} entry {info.filename!r}")
            plan.append((info, kind, destination(folder, info.filename, archive)))
        budget.check_declared(sum(info.file_size for info, kind, _ in plan if kind == "file"))
        for info, kind, path in plan:
            if path is None:
                continue
            if kind == "dir":
                path.mkdir(parents=True, exist_ok=True)
            else:
                with handle.open(info) as source:
                    write_file(source, path, budget)


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


def unpack_tar(archive: Path, folder: Path, budget: _Budget) -> None:
    """Extract a (compressed) tar file after checking all its members."""
    with tarfile.open(archive, mode="r:*") as handle:
        plan = []
        for member in handle.getmembers():
            kind = tar_kind(member)
            if kind in ("symlink", "hardlink", "special"):
                raise DatasetError(f"{archive}: refusing {kind} member {member.name!r}")
            plan.append((member, kind, destination(folder, member.name, archive)))
        budget.check_declared(sum(member.size for member, kind, _ in plan if kind == "file"))
        for member, kind, path in plan:  # in archive order, so compressed streams are read forwards
            if path is None:
                continue
            if kind == "dir":
                path.mkdir(parents=True, exist_ok=True)
            else:
                write_file(handle.extractfile(member), path, budget)
