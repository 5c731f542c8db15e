"""Archive bombs and rejected datasets (issue 12, item 5): real zip and tar.gz bombs built here (hundreds of MB
of zeros in a few hundred KB), with lowered caps so the tests stay small; nothing is left in the cache."""

from __future__ import annotations

import io
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

from inspector.data import DatasetError, load_dataset
from inspector.data.archives import ArchiveLimits, extract_archive

MB = 1 << 20
ZEROS = bytes(MB)


def _zip_bomb(path: Path, megabytes: int) -> Path:
    """One member of ``megabytes`` MB of zeros next to a plausible MVTec layout."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("data/part/train/good/000.png", b"\x89PNG not really")
        with handle.open("data/part/train/good/bomb.png", "w", force_zip64=True) as member:
            for _ in range(megabytes):
                member.write(ZEROS)
    return path


class _Zeros(io.RawIOBase):
    def __init__(self, size: int):
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self.left)
        buffer[:n] = bytes(n)
        self.left -= n
        return n


def _tar_bomb(path: Path, megabytes: int) -> Path:
    with tarfile.open(path, "w:gz", compresslevel=1) as handle:
        info = tarfile.TarInfo("data/part/train/good/bomb.png")
        info.size = megabytes * MB
        handle.addfile(info, io.BufferedReader(_Zeros(info.size)))
    return path


def _left_in(cache: Path) -> list[Path]:
    return list(cache.rglob("*")) if cache.exists() else []


@pytest.mark.parametrize("make", [_zip_bomb, _tar_bomb], ids=["zip", "tar.gz"])
def test_bomb_is_stopped_by_the_ratio_counting_bytes_written_and_leaves_nothing(tmp_path, make):
    archive = make(tmp_path / ("bomb.zip" if make is _zip_bomb else "bomb.tar.gz"), 200)
    assert archive.stat().st_size < 2 * MB
    cache = tmp_path / "cache"
    started = time.perf_counter()
    with pytest.raises(DatasetError, match="compression ratio"):
        extract_archive(archive, cache, ArchiveLimits(max_bytes=1 << 40, max_ratio=20, min_allowance=4 * MB))
    assert time.perf_counter() - started < 20
    assert _left_in(cache) == []


def test_total_size_cap_refuses_before_writing_and_leaves_nothing(tmp_path):
    archive = _zip_bomb(tmp_path / "big.zip", 40)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="more than the 8 MiB"):
        load_dataset(archive, cache_dir=cache, limits=ArchiveLimits(max_bytes=8 * MB, max_ratio=1e9))
    assert _left_in(cache) == []


def test_lying_size_headers_get_nothing_past_the_cap(tmp_path):
    """A zip whose headers claim 1 MB for a 30 MB member passes the header pre-check; what is written is
    counted, so it still cannot exceed the cap (here zipfile stops at the claimed size and the CRC fails)."""
    import struct

    archive = tmp_path / "liar.zip"
    name = "data/part/train/good/bomb.png"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr(name, bytes(30 * MB))
        offset = handle.getinfo(name).header_offset
    raw = bytearray(archive.read_bytes())
    struct.pack_into("<I", raw, offset + 22, MB)  # local header: uncompressed size
    central = raw.rindex(b"PK\x01\x02")
    struct.pack_into("<I", raw, central + 24, MB)  # central directory: uncompressed size
    archive.write_bytes(bytes(raw))
    with zipfile.ZipFile(archive) as handle:
        assert handle.getinfo(name).file_size == MB
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError):
        extract_archive(archive, cache, ArchiveLimits(max_bytes=2 * MB, max_ratio=1e9))
    assert _left_in(cache) == []


def test_a_rejected_dataset_is_not_kept_in_the_cache(tmp_path):
    archive = tmp_path / "notes.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("notes/readme.txt", "no dataset here " * 1000)
        handle.writestr("notes/more/other.txt", "x")
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError, match="unknown layout"):
        load_dataset(archive, cache_dir=cache)
    assert _left_in(cache) == []


def test_limits_come_from_the_data_settings(monkeypatch):
    from inspector.config import load_settings

    defaults = ArchiveLimits.from_settings(load_settings(environ={}).data)
    assert defaults == ArchiveLimits()
    assert defaults.max_bytes >= 32 << 30 and 10 <= defaults.max_ratio <= 1000
    s = load_settings(environ={"INSPECTOR_DATA__ARCHIVE_MAX_BYTES": "1000", "INSPECTOR_DATA__ARCHIVE_MAX_RATIO": "7"})
    assert ArchiveLimits.from_settings(s.data) == ArchiveLimits(max_bytes=1000, max_ratio=7.0)


def test_bytes_are_counted_as_written_whatever_a_header_declared(tmp_path):
    """A member stream that yields more than its header said (the readers' own bound is not relied on)."""
    from inspector.data.archives import _Budget, write_file

    archive = tmp_path / "a.zip"
    archive.write_bytes(bytes(1000))
    budget = _Budget(archive, ArchiveLimits(max_bytes=MB, max_ratio=1e9))
    budget.check_declared(10)  # what the header says passes
    with pytest.raises(DatasetError, match="expands past 1 MiB"):
        write_file(io.BytesIO(bytes(3 * MB)), tmp_path / "out" / "member.png", budget)
    assert (tmp_path / "out" / "member.png").stat().st_size <= MB + 1
