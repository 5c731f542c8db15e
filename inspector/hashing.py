"""SHA-256 in one place: of files (image contents at intake, heads and weights for the registry and model
versions, dataset archives and contents) and of identities (``digest_of``)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any, BinaryIO

CHUNK = 1 << 20

_CACHE: dict[tuple[str, int, int], str] = {}


def update_from(digest: Any, handle: BinaryIO, chunk: int = CHUNK) -> int:
    """Feed an open binary file to ``digest`` in chunks; returns the bytes read."""
    size = 0
    while block := handle.read(chunk):
        digest.update(block)
        size += len(block)
    return size


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of bytes already read (a file's content, as a worker reads it to score it)."""
    return hashlib.sha256(data).hexdigest()


def stream_sha256(handle: BinaryIO, chunk: int = CHUNK) -> tuple[str, int]:
    """(hex SHA-256, size) of what is left to read in ``handle``."""
    digest = hashlib.sha256()
    size = update_from(digest, handle, chunk)
    return digest.hexdigest(), size


def file_sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes."""
    with open(path, "rb") as handle:
        return stream_sha256(handle)[0]


def cached_file_sha256(path: str | os.PathLike) -> str:
    """``file_sha256`` of a large file that does not change (weights, heads), remembered per (real path, size,
    mtime) for the life of the process."""
    real = os.path.realpath(path)
    stat = os.stat(real)
    key = (real, stat.st_size, stat.st_mtime_ns)
    if key not in _CACHE:
        _CACHE[key] = file_sha256(real)
    return _CACHE[key]


def digest_of(identity: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a JSON-able mapping, keys sorted (a model version's identity, a pool's options):
    equal mappings give equal digests on every box."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode("utf-8")).hexdigest()
