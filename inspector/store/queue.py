"""The queue: register files, claim batches with a lease, complete them in one transaction.

Exactly-once comes from three rules:
* a claim sets ``status = claimed, claimed_by = worker, lease_until = now + lease``; an expired lease
  makes the image claimable again (its worker died);
* completing writes every result of a batch and the images' ``done`` status in one transaction, and
  only for images still claimed by this worker (a worker whose lease was taken over writes nothing);
* ``results`` is unique on (image, model version), so even a bug cannot store two.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError

from .db import is_sqlite, utcnow
from .schema import CLAIMED, DONE, DUPLICATE, FAILED, PENDING, images, model_versions, results, sources


@dataclass
class Claimed:
    id: int
    path: str
    class_name: str
    sha256: str | None
    attempts: int


@dataclass
class Outcome:
    """What a worker learned about one claimed image."""

    image_id: int
    result: dict[str, Any] | None = None  # columns of ``results`` (without ids)
    error: str | None = None
    permanent: bool = True  # False: retry with backoff (until max attempts)
    width: int | None = None
    height: int | None = None
    sha256: str | None = None  # when the content changed since discovery


def ensure_source(engine: Engine, path: str, class_name: str, line: str | None = None,
                  recursive: bool = False) -> int:
    for _ in range(2):  # a second process may insert the same row at the same moment: then read it
        try:
            with engine.begin() as conn:
                row = conn.execute(select(sources.c.id, sources.c.class_name).where(sources.c.path == path)).first()
                if row is not None:
                    if row.class_name != class_name:
                        conn.execute(update(sources).where(sources.c.id == row.id).values(class_name=class_name))
                    return row.id
                return conn.execute(sources.insert().values(
                    path=path, class_name=class_name, line=line, recursive=recursive,
                    created_at=utcnow())).inserted_primary_key[0]
        except IntegrityError:
            continue
    raise RuntimeError(f"could not record source {path}")


def ensure_model_version(engine: Engine, name: str, detector: str, manifest: dict[str, Any],
                         random_weights: bool) -> int:
    for _ in range(2):  # two workers starting together race to insert the same version: then read it
        try:
            with engine.begin() as conn:
                row = conn.execute(select(model_versions.c.id).where(model_versions.c.name == name)).first()
                if row is not None:
                    return row.id
                return conn.execute(model_versions.insert().values(
                    name=name, detector=detector, manifest=json.dumps(manifest, sort_keys=True, default=str),
                    random_weights=random_weights, created_at=utcnow())).inserted_primary_key[0]
        except IntegrityError:
            continue
    raise RuntimeError(f"could not record model version {name}")


def known_files(engine: Engine, source_id: int) -> dict[str, tuple[int | None, int | None]]:
    """path -> (size, mtime_ns) of every image row of a source (the intake's memory after a restart)."""
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.path, images.c.size, images.c.mtime_ns)
                            .where(images.c.source_id == source_id))
        return {r.path: (r.size, r.mtime_ns) for r in rows}


def register_file(engine: Engine, source_id: int | None, class_name: str, path: str, sha256: str | None,
                  size: int | None, mtime_ns: int | None, error: str | None = None) -> str:
    """Record a discovered file. Returns "known", "new", "renamed", "duplicate" or "failed".

    * (path, content) already known: nothing to do;
    * same content known at a path that no longer exists: a rename, the row follows the file;
    * same content known at a path that still exists: a copy, recorded as a duplicate of the first;
    * ``error`` (unreadable, symlink out of the folder...): recorded as failed, never scored.
    """
    now = utcnow()
    base = {"source_id": source_id, "class_name": class_name, "path": path, "sha256": sha256, "size": size,
                "mtime_ns": mtime_ns, "attempts": 0, "next_attempt_at": now, "discovered_at": now, "updated_at": now}
    try:
        with engine.begin() as conn:
            if error is not None:
                same = conn.execute(select(images.c.id).where(images.c.path == path, images.c.sha256.is_(None),
                                                              images.c.status == FAILED)).first()
                if same is not None:
                    return "known"
                conn.execute(images.insert().values(**base, status=FAILED, error=error))
                return "failed"
            if conn.execute(select(images.c.id).where(images.c.path == path, images.c.sha256 == sha256)).first():
                return "known"
            twin = conn.execute(select(images.c.id, images.c.path).where(
                images.c.sha256 == sha256, images.c.status != DUPLICATE).order_by(images.c.id)).first()
            if twin is not None:
                if not os.path.lexists(twin.path):
                    conn.execute(update(images).where(images.c.id == twin.id).values(
                        path=path, size=size, mtime_ns=mtime_ns, updated_at=now))
                    return "renamed"
                conn.execute(images.insert().values(**base, status=DUPLICATE, duplicate_of=twin.id))
                return "duplicate"
            conn.execute(images.insert().values(**base, status=PENDING))
            return "new"
    except IntegrityError:  # another intake registered it at the same moment
        return "known"


def claim(engine: Engine, worker: str, limit: int, lease_seconds: float) -> list[Claimed]:
    """Take up to ``limit`` pending images (or images whose lease expired) for ``worker``."""
    now = utcnow()
    ready = or_(and_(images.c.status == PENDING, images.c.next_attempt_at <= now),
                and_(images.c.status == CLAIMED, images.c.lease_until < now))
    query = select(images.c.id, images.c.path, images.c.class_name, images.c.sha256, images.c.attempts) \
        .where(ready).order_by(images.c.id).limit(limit)
    if not is_sqlite(engine):
        query = query.with_for_update(skip_locked=True)
    with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE, the one writer
        rows = conn.execute(query).all()
        if not rows:
            return []
        ids = [r.id for r in rows]
        conn.execute(update(images).where(images.c.id.in_(ids)).values(
            status=CLAIMED, claimed_by=worker, lease_until=now + dt.timedelta(seconds=lease_seconds),
            attempts=images.c.attempts + 1, updated_at=now))
    return [Claimed(r.id, r.path, r.class_name, r.sha256, r.attempts + 1) for r in rows]


def backoff_seconds(attempts: int, base: float = 2.0, cap: float = 300.0) -> float:
    return min(cap, base * 2 ** max(0, attempts - 1))


def complete(engine: Engine, worker: str, model_version_id: int, outcomes: Sequence[Outcome],
             max_attempts: int = 5) -> int:
    """Write a batch in one transaction; returns how many results were stored."""
    now = utcnow()
    stored = 0
    with engine.begin() as conn:
        for o in outcomes:
            mine = and_(images.c.id == o.image_id, images.c.claimed_by == worker, images.c.status == CLAIMED)
            if o.result is not None:
                values: dict[str, Any] = {"status": DONE, "claimed_by": None, "lease_until": None, "error": None,
                                              "width": o.width, "height": o.height, "updated_at": now}
                if o.sha256:
                    values["sha256"] = o.sha256
                if conn.execute(update(images).where(mine).values(**values)).rowcount != 1:
                    continue  # lease lost: another worker owns this image now
                conn.execute(results.insert().values(image_id=o.image_id, model_version_id=model_version_id,
                                                     worker=worker, created_at=now, **o.result))
                stored += 1
            else:
                attempts = conn.execute(select(images.c.attempts).where(images.c.id == o.image_id)).scalar_one()
                if o.permanent or attempts >= max_attempts:
                    values = {"status": FAILED, "error": o.error, "claimed_by": None, "lease_until": None, "updated_at": now}
                else:
                    values = {"status": PENDING, "error": o.error, "claimed_by": None, "lease_until": None, "updated_at": now,
                                  "next_attempt_at": now + dt.timedelta(seconds=backoff_seconds(attempts))}
                conn.execute(update(images).where(mine).values(**values))
    return stored


def release(engine: Engine, worker: str, image_ids: Iterable[int] | None = None) -> None:
    """Give claimed images back to the queue at once (clean shutdown), without counting an attempt."""
    where = and_(images.c.claimed_by == worker, images.c.status == CLAIMED)
    if image_ids is not None:
        where = and_(where, images.c.id.in_(list(image_ids)))
    with engine.begin() as conn:
        conn.execute(update(images).where(where).values(
            status=PENDING, claimed_by=None, lease_until=None, attempts=func.max(images.c.attempts - 1, 0)
            if is_sqlite(engine) else func.greatest(images.c.attempts - 1, 0), updated_at=utcnow()))


def pending_count(engine: Engine) -> int:
    """Images still to score, claimed ones included."""
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(images)
                            .where(images.c.status.in_([PENDING, CLAIMED]))).scalar_one()


def status(engine: Engine, window_minutes: int = 60) -> dict[str, Any]:
    """Queue depth, throughput, errors and the active model, for `inspector status`."""
    now = utcnow()
    since = now - dt.timedelta(minutes=window_minutes)
    with engine.connect() as conn:
        counts = {r.status: r.n for r in conn.execute(
            select(images.c.status, func.count().label("n")).group_by(images.c.status))}
        recent = conn.execute(select(func.count(), func.min(results.c.created_at), func.max(results.c.created_at))
                              .where(results.c.created_at >= since)).one()
        errors = [{"error": r.error, "count": r.n} for r in conn.execute(
            select(images.c.error, func.count().label("n")).where(images.c.status == FAILED)
            .group_by(images.c.error).order_by(func.count().desc()).limit(10))]
        oldest = conn.execute(select(func.min(images.c.discovered_at))
                              .where(images.c.status.in_([PENDING, CLAIMED]))).scalar()
        active = active_model(conn)
    scored, first, last = recent
    rate = None
    if scored and first and last and last > first:
        rate = scored / (last - first).total_seconds()
    return {
        "queue_depth": counts.get(PENDING, 0) + counts.get(CLAIMED, 0),
        "by_status": counts,
        "scored_last_window": scored,
        "window_minutes": window_minutes,
        "images_per_second": rate,
        "oldest_unscored_age_seconds": (now - oldest).total_seconds() if oldest else None,
        "errors": errors,
        "active_model": active["name"] if active else None,
        "active_model_random_weights": active["random_weights"] if active else None,
        "active_model_fallback": active["fallback"] if active else None,
    }


def active_model(conn: Any) -> dict[str, Any] | None:
    """The model version of the latest result: name, detector, random_weights, and ``fallback`` (why a
    training-free fallback scores instead of the configured detector, or None); None before any result."""
    row = conn.execute(select(model_versions.c.name, model_versions.c.detector, model_versions.c.random_weights,
                              model_versions.c.manifest)
                       .join(results, results.c.model_version_id == model_versions.c.id)
                       .order_by(results.c.id.desc()).limit(1)).first()
    if row is None:
        return None
    try:
        manifest = json.loads(row.manifest or "{}")
    except ValueError:
        manifest = {}
    fallback = manifest.get("fallback") if isinstance(manifest, dict) else None
    return {"name": row.name, "detector": row.detector, "random_weights": bool(row.random_weights),
            "fallback": fallback}
