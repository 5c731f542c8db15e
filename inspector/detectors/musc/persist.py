"""Rolling pools on disk, so that a restarted worker (even after SIGKILL) has the pools it had, rescoring nothing.

One folder per model version (``[musc] pool_dir`` / the digest of the detector's scoring options and its
backbone, chosen by ``MuSc.from_settings``), one sub-folder per class::

    <pool_dir>/<class slug>/index.pt        hashes and join ages in slot order, image embeddings, the
                                            reviewer-accepted hashes, the verdicts taken into account,
                                            drift state
    <pool_dir>/<class slug>/<hash>.pt       one pooled image's LNAMD features [R*T, L', C] in pool_dtype

An image's feature file is written once, when it joins (so a batch writes only its own images, not the whole
pool: 67 MB per image fp32 at full size); the index is rewritten after every batch that changed the pool.
Every file is written to a temporary name in the same folder and renamed with ``os.replace`` (atomic on
POSIX): a kill leaves either the old or the new index, and the index only names feature files that exist.
Files no index names (an evicted image, a leftover temporary file) are deleted at the next save. Files are
read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists and dicts only, never code.
Hash names are checked against ``[0-9a-f]{24}`` before they become paths.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT = 1
_HASH = re.compile(r"^[0-9a-f]{24}$")


def class_slug(class_name: str) -> str:
    """A file-system-safe, collision-free folder name for a class ("metal nut" -> "metal_nut-<8 hex>")."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", class_name).strip("._")[:60] or "class"
    return f"{readable}-{hashlib.blake2b(class_name.encode('utf-8'), digest_size=4).hexdigest()}"


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file next to ``path``, flushed, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".pt", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class PoolFiles:
    """The files of one model version's pools: ``save`` after a batch, ``load`` on a class's first use."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder).expanduser()
        self._written: dict[str, set[str]] = {}  # class -> hashes whose feature file exists

    def class_dir(self, class_name: str) -> Path:
        return self.folder / class_slug(class_name)

    def save(self, class_name: str, features: dict[str, torch.Tensor], hashes: list[str], ages: list[int],
             embeddings: torch.Tensor, drift: dict[str, Any], accepted: list[str] = (),
             reviewed: dict[str, str] | None = None) -> None:
        """Write the pool of a class: ``features`` maps the hashes not yet on disk to their [R*T, L', C];
        ``ages`` the join order per slot, ``accepted`` the reviewer-accepted hashes, ``reviewed`` review key
        -> verdict taken into account."""
        folder = self.class_dir(class_name)
        written = self._written.setdefault(class_name, set())
        for digest in hashes:
            if digest not in written:
                atomic_save(features[digest].detach().cpu().clone(), folder / f"{digest}.pt")
                written.add(digest)
        atomic_save({"format": FORMAT, "class_name": class_name, "hashes": list(hashes),
                     "ages": [int(a) for a in ages], "accepted": list(accepted),
                     "reviewed": [[str(k), str(v)] for k, v in (reviewed or {}).items()],
                     "embeddings": embeddings.detach().float().cpu().clone(), "drift": drift}, folder / "index.pt")
        keep = set(hashes)
        for path in folder.iterdir():  # evicted images and leftovers of a killed write
            if path.name != "index.pt" and path.stem not in keep:
                path.unlink(missing_ok=True)
        self._written[class_name] = keep

    def load(self, class_name: str, device: torch.device, shape: tuple[int, ...], dtype: torch.dtype
             ) -> dict[str, Any] | None:
        """The stored pool of a class: {"hashes", "ages", "features" [count, *shape], "embeddings", "accepted",
        "reviewed", "drift"}, or None. Entries whose feature file is missing or of another shape / dtype are
        dropped (logged). An index of the first layout (a ring ``start`` instead of ages) is read too."""
        index_path = self.class_dir(class_name) / "index.pt"
        if not index_path.is_file():
            return None
        try:
            index = torch.load(index_path, map_location="cpu", weights_only=True)
        except Exception as error:  # noqa: BLE001 - a damaged index means an empty pool, said loudly
            log.warning("MuSc pool of class '%s': cannot read %s (%s); starting an empty pool", class_name,
                        index_path, error)
            return None
        if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("class_name") != class_name:
            log.warning("MuSc pool of class '%s': %s is not a pool index of this format; ignored", class_name,
                        index_path)
            return None
        hashes, kept, rows = list(index["hashes"]), [], []
        for slot, digest in enumerate(hashes):
            path = index_path.parent / f"{digest}.pt"
            if not (isinstance(digest, str) and _HASH.match(digest)) or not path.is_file():
                log.warning("MuSc pool of class '%s': pooled image %r has no feature file; left out", class_name,
                            digest)
                continue
            tensor = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape or tensor.dtype != dtype:
                log.warning("MuSc pool of class '%s': %s does not match this model; left out", class_name, path)
                continue
            kept.append(tensor)
            rows.append(slot)
        if "ages" in index:
            ages = [int(a) for a in index["ages"]]
        else:  # the first layout: a ring buffer whose oldest slot was ``start``
            start = int(index.get("start", 0)) % max(len(hashes), 1)
            ages = [(slot - start) % len(hashes) for slot in range(len(hashes))]
        self._written[class_name] = {hashes[s] for s in rows}
        features = torch.stack(kept).to(device) if kept else torch.empty(0, *shape, dtype=dtype, device=device)
        embeddings = index["embeddings"][rows].to(device)
        return {"hashes": [hashes[s] for s in rows], "ages": [ages[s] for s in rows], "features": features,
                "embeddings": embeddings, "accepted": [str(h) for h in index.get("accepted", [])],
                "reviewed": {str(k): str(v) for k, v in index.get("reviewed", [])},
                "drift": dict(index.get("drift") or {})}
