"""Routing: which model versions get a job for an image. Decided in the database, so every box agrees.

For an image of a watched source:

* the **live** version (its result drives the decision): the source's pinned version if its watcher was
  told one (``--model``, ``--detector``, a ``[[sources]]`` model); else the version promoted for the
  image's class, else the site's promoted version; else the version the source's watcher loads by default
  (the configured detector, or the day-one fallback);
* every **shadow** version of the class (or the site), other than the live one: scored and stored, never
  deciding anything.

``inspector score`` asks for one version explicitly (a **manual** job). ``inspector models promote
--rescore`` queues **backfill** jobs for history, at a lower priority than live images.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import Engine, and_, exists, func, insert, literal, or_, select, update
from sqlalchemy.exc import IntegrityError

from .db import db_now
from .schema import (
    BACKFILL,
    CLAIMED,
    DUPLICATE,
    FAILED,
    LIVE,
    MANUAL,
    PENDING,
    PRIORITY,
    SHADOWED,
    images,
    jobs,
    sources,
)
from .versions import promoted_version, shadow_versions


def live_version(conn: Any, source_id: int | None, class_name: str) -> int | None:
    pinned = default = None
    if source_id is not None:
        row = conn.execute(select(sources.c.pinned_version_id, sources.c.default_version_id)
                           .where(sources.c.id == source_id)).first()
        if row is not None:
            pinned, default = row.pinned_version_id, row.default_version_id
    return pinned or promoted_version(conn, class_name) or default


def targets(conn: Any, source_id: int | None, class_name: str) -> list[tuple[int, str]]:
    """(version id, purpose) of the jobs a new image of ``source_id`` gets."""
    live = live_version(conn, source_id, class_name)
    out = [(live, LIVE)] if live is not None else []
    out += [(v, SHADOWED) for v in shadow_versions(conn, class_name) if v != live]
    return out


def add_jobs(conn: Any, image_id: int, wanted: list[tuple[int, str]], now: dt.datetime | None = None) -> int:
    """Queue ``wanted`` (version, purpose) jobs for an image, skipping versions it already has one for."""
    now = now or db_now(conn)
    added = 0
    for version, purpose in wanted:
        if conn.execute(select(jobs.c.id).where(jobs.c.image_id == image_id,
                                                jobs.c.model_version_id == version)).first() is not None:
            continue
        conn.execute(jobs.insert().values(image_id=image_id, model_version_id=version, purpose=purpose,
                                          priority=PRIORITY[purpose], status=PENDING, attempts=0,
                                          next_attempt_at=now, created_at=now, updated_at=now))
        added += 1
    return added


def route_unrouted(engine: Engine, source_ids: list[int] | None = None, fallback: int | None = None) -> int:
    """Give every pending image without a live job one (images carried over by migration 0003, or
    registered while no version was known): its routing targets, else ``fallback`` (the version of the
    `inspector worker` that asks). Returns how many images were routed."""
    has_live = exists().where(jobs.c.image_id == images.c.id, jobs.c.purpose.in_((LIVE, MANUAL)))
    query = select(images.c.id, images.c.source_id, images.c.class_name).where(
        images.c.status == PENDING, ~has_live)
    if source_ids is not None:
        query = query.where(images.c.source_id.in_(source_ids))
    routed = 0
    try:
        with engine.begin() as conn:
            for row in conn.execute(query.order_by(images.c.id)).all():
                wanted = targets(conn, row.source_id, row.class_name) or (
                    [(fallback, LIVE)] if fallback is not None else [])
                if wanted and add_jobs(conn, row.id, wanted):
                    routed += 1
    except IntegrityError:  # another box routed the same images at the same moment: theirs stand
        return 0
    return routed


def enqueue_backfill(engine: Engine, model_version_id: int, class_name: str | None,
                     since: dt.datetime | None) -> int:
    """Queue scored-or-failed-free history (images of ``class_name``, or all, discovered since ``since``)
    for ``model_version_id`` at backfill priority; images it already has a job for are skipped. One
    INSERT ... SELECT: exactly once however often it is asked."""
    already = exists().where(jobs.c.image_id == images.c.id, jobs.c.model_version_id == model_version_id)
    count = select(func.count()).select_from(jobs).where(jobs.c.model_version_id == model_version_id)
    with engine.begin() as conn:  # (rowcount of INSERT ... SELECT is not reported by every driver: count)
        now = db_now(conn)
        chosen = select(images.c.id, literal(model_version_id), literal(BACKFILL), literal(PRIORITY[BACKFILL]),
                        literal(PENDING), literal(0), literal(now), literal(now), literal(now)).where(
            images.c.status.notin_((DUPLICATE, FAILED)), ~already)
        if class_name is not None:
            chosen = chosen.where(images.c.class_name == class_name)
        if since is not None:
            chosen = chosen.where(images.c.discovered_at >= since)
        before = conn.execute(count).scalar_one()
        conn.execute(insert(jobs).from_select(
            ["image_id", "model_version_id", "purpose", "priority", "status", "attempts", "next_attempt_at",
             "created_at", "updated_at"], chosen))
        return conn.execute(count).scalar_one() - before


def set_source_versions(engine: Engine, source_id: int, pinned: int | None, default: int | None) -> None:
    with engine.begin() as conn:
        conn.execute(update(sources).where(sources.c.id == source_id).values(
            pinned_version_id=pinned, default_version_id=default))


def served_versions(conn: Any, source_ids: list[int]) -> set[int]:
    """Every version the images of these sources are routed to now (live and shadow), for a watcher."""
    out: set[int] = set()
    for row in conn.execute(select(sources.c.id, sources.c.class_name).where(sources.c.id.in_(source_ids))):
        out.update(v for v, _ in targets(conn, row.id, row.class_name))
    return out


def versions_with_work(conn: Any) -> list[int]:
    """Versions that have jobs waiting (pending, or claimed with an expired lease), most urgent first."""
    now = db_now(conn)
    ready = or_(jobs.c.status == PENDING, and_(jobs.c.status == CLAIMED, jobs.c.lease_until < now))
    rows = conn.execute(select(jobs.c.model_version_id, func.max(jobs.c.priority).label("p"))
                        .where(ready).group_by(jobs.c.model_version_id).order_by(func.max(jobs.c.priority).desc()))
    return [r.model_version_id for r in rows]

