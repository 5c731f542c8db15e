"""The queue: register files, claim jobs in batches with a lease, complete them in one transaction.

``images`` is the ledger of content seen; ``jobs`` is the queue, one row per (image, model version)
(``routing.py`` decides which versions an image gets). Exactly-once per (image, version) comes from
three rules:

* a claim sets ``status = claimed, claimed_by = worker, lease_until = now + lease`` on jobs of one
  version the worker has loaded; an expired lease makes a job claimable again (its worker died), and a
  job whose attempts are used up is failed instead of claimed again;
* completing writes every result of a batch and the jobs' ``done`` status in one transaction, and only
  for jobs still claimed by this worker (a worker whose lease was taken over writes nothing);
* ``results`` and ``jobs`` are unique on (image, model version), so even a bug cannot store two.

``images.status`` follows the image's live job (pending until it is done or failed), so the ledger still
answers "was this image scored" without a join.

Robustness rules (issue 12):

* lease times come from the database's clock (``db_now``), never a box's: clocks drift between boxes;
* a job that has been claimed before (its batch failed, or its worker died or timed out on it) is claimed
  alone, so one poison image cannot hold the images queued behind it; ``renew`` extends the leases of a
  batch still being scored, so a slow batch is not taken over by a second worker;
* a file that vanished before it was scored is not lost when its content lives on elsewhere: a rename
  registered later re-queues the job (``register_file``), and a copy registered earlier (a duplicate) is
  promoted to be the scored image (``complete``, ``Outcome.vanished``).
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

from ..backoff import nth_delay
from .db import db_now, is_sqlite, utcnow
from .decisions import DecisionPolicy, decide
from .dicom import event_fields, insert_dicom
from .outbox import enqueue
from .routing import add_jobs, targets
from .schema import (
    BACKFILL,
    CLAIMED,
    DONE,
    DUPLICATE,
    FAILED,
    LIVE,
    MANUAL,
    PENDING,
    dicom_images,
    images,
    jobs,
    model_versions,
    results,
    sources,
    thresholds,
)
from .versions import ensure_model_version, promoted_map

DECIDING = (LIVE, MANUAL)  # purposes whose result is the image's own (drives its decision)
#: the error of a job whose file was gone when its worker read it (a rename found later re-queues it)
VANISHED = "file disappeared before it could be scored"


@dataclass
class Claimed:
    id: int  # the job
    path: str
    class_name: str
    sha256: str | None
    attempts: int
    image_id: int = 0
    model_version_id: int = 0
    frame: int = 0  # the frame of a multi-frame file
    window: str | None = None  # a DICOM image's window preset (None: the file's own)


@dataclass
class Outcome:
    """What a worker learned about one claimed job."""

    job_id: int
    result: dict[str, Any] | None = None  # columns of ``results`` (without ids)
    error: str | None = None
    permanent: bool = True  # False: retry with backoff (until max attempts)
    width: int | None = None
    height: int | None = None
    #: the file was gone when it was read: a rename registered since re-queues the job, a copy takes over
    vanished: bool = False


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


def known_files(engine: Engine, source_id: int) -> dict[str, tuple[int | None, int | None]]:
    """path -> (size, mtime_ns) of every image row of a source (the intake's memory after a restart)."""
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.path, images.c.size, images.c.mtime_ns)
                            .where(images.c.source_id == source_id))
        return {r.path: (r.size, r.mtime_ns) for r in rows}


def register_file(engine: Engine, source_id: int | None, class_name: str, path: str, sha256: str | None,
                  size: int | None, mtime_ns: int | None, error: str | None = None,
                  wanted: list[tuple[int, str]] | None = None, dicom: dict[str, Any] | None = None) -> str:
    """Record a discovered file and queue its jobs. Returns "known", "new", "renamed", "duplicate" or "failed".

    * (path, content) already known: nothing to do;
    * same content known at a path that no longer exists: a rename, the row follows the file;
    * same content known at a path that still exists: a copy, recorded as a duplicate of the first;
    * ``error`` (unreadable, symlink out of the folder...): recorded as failed, never scored.

    A new image gets the jobs ``routing.targets`` chooses for its source, in the same transaction.
    ``wanted`` (``inspector score --model``): these (version, purpose) jobs instead, added to the known
    image (or the original of a copy) when the content was seen before.

    ``dicom`` (a DICOM file's record, ``inspector.dicom.DicomHeader.record``): one image row per frame (frame
    0, 1, ...), each with its ``dicom_images`` row; a rename moves every frame, a copy links frame to frame.
    """
    frames = int(dicom["frames"]) if dicom else 1
    try:
        with engine.begin() as conn:
            now = db_now(conn)
            base = {"source_id": source_id, "class_name": class_name, "path": path, "sha256": sha256, "size": size,
                    "mtime_ns": mtime_ns, "attempts": 0, "next_attempt_at": now, "discovered_at": now,
                    "updated_at": now}
            if error is not None:
                same = conn.execute(select(images.c.id).where(images.c.path == path, images.c.sha256.is_(None),
                                                              images.c.status == FAILED)).first()
                if same is not None:
                    return "known"
                conn.execute(images.insert().values(**base, status=FAILED, error=error))
                return "failed"
            known = conn.execute(select(images.c.id).where(images.c.path == path, images.c.sha256 == sha256)).first()
            if known is not None:
                for image_id in (_frame_rows(conn, path, sha256).values() if wanted else ()):
                    add_jobs(conn, image_id, wanted, now)
                return "known"
            # (an image whose file vanished and whose copy was promoted points at its successor: skip it)
            twin = conn.execute(select(images.c.id, images.c.path).where(
                images.c.sha256 == sha256, images.c.status != DUPLICATE, images.c.duplicate_of.is_(None))
                .order_by(images.c.id)).first()
            if twin is not None:
                originals = _frame_rows(conn, twin.path, sha256)  # frame -> image id (one row unless multi-frame)
                for image_id in (originals.values() if wanted else ()):
                    add_jobs(conn, image_id, wanted, now)
                if not os.path.lexists(twin.path):
                    conn.execute(update(images).where(images.c.id.in_(list(originals.values()))).values(
                        path=path, size=size, mtime_ns=mtime_ns, updated_at=now))
                    for image_id in originals.values():
                        _requeue_vanished(conn, image_id, now)
                    return "renamed"
                for frame, original in originals.items():
                    conn.execute(images.insert().values(**base, frame=frame, status=DUPLICATE, duplicate_of=original))
                return "duplicate"
            jobs_wanted = wanted if wanted is not None else targets(conn, source_id, class_name)
            for frame in range(frames):
                image_id = conn.execute(images.insert().values(**base, frame=frame, status=PENDING)
                                        ).inserted_primary_key[0]
                if dicom:
                    insert_dicom(conn, image_id, dicom)
                add_jobs(conn, image_id, jobs_wanted, now)
            return "new"
    except IntegrityError:  # another intake registered it at the same moment
        return "known"


def _frame_rows(conn: Any, path: str, sha256: str | None) -> dict[int, int]:
    """frame -> image id of the (non-duplicate) rows of one file's content at ``path``."""
    rows = conn.execute(select(images.c.id, images.c.frame).where(
        images.c.path == path, images.c.sha256 == sha256, images.c.status != DUPLICATE).order_by(images.c.frame))
    return {r.frame: r.id for r in rows}


def _requeue_vanished(conn: Any, image_id: int, now: dt.datetime) -> None:
    """The file of ``image_id`` was found again at another path: its jobs that failed because the file had
    vanished are queued again (from scratch), and the image is pending again if its live job is."""
    conn.execute(update(jobs).where(jobs.c.image_id == image_id, jobs.c.status == FAILED, jobs.c.error == VANISHED)
                 .values(status=PENDING, error=None, attempts=0, claimed_by=None, lease_until=None,
                         next_attempt_at=now, updated_at=now))
    live = conn.execute(select(jobs.c.status).where(jobs.c.image_id == image_id, jobs.c.purpose.in_(DECIDING))
                        .order_by(jobs.c.id)).first()
    if live is not None and live.status == PENDING:
        conn.execute(update(images).where(images.c.id == image_id, images.c.status == FAILED)
                     .values(status=PENDING, error=None, updated_at=now))


def _ready(now: dt.datetime):
    return or_(and_(jobs.c.status == PENDING, jobs.c.next_attempt_at <= now),
               and_(jobs.c.status == CLAIMED, jobs.c.lease_until < now))


def claim(engine: Engine, worker: str, limit: int, lease_seconds: float, versions: Iterable[int] | None = None,
          max_attempts: int | None = None) -> list[Claimed]:
    """Take up to ``limit`` ready jobs of one model version (of ``versions``: the ones ``worker`` has
    loaded; None = any) for ``worker``, the most urgent first (priority, then age). A job whose lease
    expired after ``max_attempts`` claims is failed, not claimed again."""
    if limit < 1:
        raise ValueError(f"a batch takes at least one image, not {limit}")
    if versions is not None:
        versions = list(versions)
        if not versions:
            return []
    with engine.begin() as conn:  # SQLite: BEGIN IMMEDIATE, the one writer
        now = db_now(conn)
        ready = _ready(now)
        if versions is not None:
            ready = and_(ready, jobs.c.model_version_id.in_(versions))
        if max_attempts is not None:
            _give_up(conn, and_(ready, jobs.c.attempts >= max_attempts), now)
        head = select(jobs.c.model_version_id).where(ready).order_by(jobs.c.priority.desc(), jobs.c.id).limit(1)
        version = conn.execute(head).scalar()
        if version is None:
            return []
        query = (select(jobs.c.id, jobs.c.image_id, jobs.c.attempts, images.c.path, images.c.class_name,
                        images.c.sha256, images.c.frame, dicom_images.c.window)
                 .join(images, images.c.id == jobs.c.image_id)
                 .outerjoin(dicom_images, dicom_images.c.image_id == jobs.c.image_id)
                 .where(ready, jobs.c.model_version_id == version)
                 .order_by(jobs.c.priority.desc(), jobs.c.id).limit(limit))
        if not is_sqlite(engine):
            query = query.with_for_update(skip_locked=True, of=jobs)
        rows = conn.execute(query).all()
        if not rows:
            return []
        # a job claimed before (its batch failed, or its worker died or ran out of lease on it) goes alone:
        # a poison image is isolated within one retry instead of taking its batch down with it every time
        if rows[0].attempts > 0:
            rows = rows[:1]
        else:
            rows = rows[:next((i for i, r in enumerate(rows) if r.attempts > 0), len(rows))]
        conn.execute(update(jobs).where(jobs.c.id.in_([r.id for r in rows])).values(
            status=CLAIMED, claimed_by=worker, lease_until=now + dt.timedelta(seconds=lease_seconds),
            attempts=jobs.c.attempts + 1, updated_at=now))
    return [Claimed(r.id, r.path, r.class_name, r.sha256, r.attempts + 1, r.image_id, version, r.frame, r.window)
            for r in rows]


def renew(engine: Engine, worker: str, job_ids: Iterable[int], lease_seconds: float) -> int:
    """Extend the leases of ``job_ids`` that ``worker`` still holds to the database's now + ``lease_seconds``
    (a batch slower than its lease stays its worker's). Returns how many leases were extended."""
    ids = list(job_ids)
    if not ids:
        return 0
    with engine.begin() as conn:
        now = db_now(conn)
        return conn.execute(update(jobs).where(
            jobs.c.id.in_(ids), jobs.c.claimed_by == worker, jobs.c.status == CLAIMED).values(
            lease_until=now + dt.timedelta(seconds=lease_seconds))).rowcount


def current_paths(engine: Engine, image_ids: Iterable[int]) -> dict[int, str]:
    """image id -> its path now (intake moves a row when it finds its file renamed)."""
    ids = list(image_ids)
    if not ids:
        return {}
    with engine.connect() as conn:
        return {r.id: r.path for r in conn.execute(select(images.c.id, images.c.path).where(images.c.id.in_(ids)))}


def _give_up(conn: Any, where: Any, now: dt.datetime) -> None:
    stuck = conn.execute(select(jobs.c.id, jobs.c.image_id, jobs.c.purpose, jobs.c.attempts).where(where)).all()
    for row in stuck:
        error = (f"gave up after {row.attempts} attempts: the worker holding it died or timed out each time")
        conn.execute(update(jobs).where(jobs.c.id == row.id).values(
            status=FAILED, error=error, claimed_by=None, lease_until=None, updated_at=now))
        if row.purpose in DECIDING:
            conn.execute(update(images).where(images.c.id == row.image_id).values(
                status=FAILED, error=error, updated_at=now))


def backoff_seconds(attempts: int, base: float = 2.0, cap: float = 300.0) -> float:
    """Seconds before a transiently failed image is tried again: 2, 4, 8, ... at most 5 minutes."""
    return nth_delay(attempts, base, cap)


def complete(engine: Engine, worker: str, outcomes: Sequence[Outcome], max_attempts: int = 5,
             policy: DecisionPolicy | None = None) -> int:
    """Write a batch in one transaction; returns how many results were stored. With a ``policy``, each live
    result is decided as it is stored, and its event is queued in the outbox for every sink, in the same
    transaction (``decisions.py``, ``outbox.py``)."""
    stored = 0
    with engine.begin() as conn:
        now = db_now(conn)
        for o in outcomes:
            mine = and_(jobs.c.id == o.job_id, jobs.c.claimed_by == worker, jobs.c.status == CLAIMED)
            job = conn.execute(select(jobs.c.image_id, jobs.c.model_version_id, jobs.c.purpose, jobs.c.attempts)
                               .where(mine)).first()
            if job is None:
                continue  # lease lost: another worker owns this job now
            image_values: dict[str, Any] = {"updated_at": now}
            if o.result is not None:
                conn.execute(update(jobs).where(mine).values(status=DONE, claimed_by=None, lease_until=None,
                                                             error=None, updated_at=now))
                decided = {}
                if policy is not None and job.purpose in DECIDING:
                    image = conn.execute(select(images.c.class_name, images.c.sha256, images.c.path,
                                                images.c.source_id).where(images.c.id == job.image_id)).one()
                    decided = decide(conn, job.image_id, image.sha256, image.class_name,
                                     job.model_version_id, o.result["image_score"], policy)
                result_id = conn.execute(results.insert().values(
                    image_id=job.image_id, model_version_id=job.model_version_id, worker=worker, created_at=now,
                    **o.result, **decided)).inserted_primary_key[0]
                if decided and policy.sinks:
                    enqueue(conn, result_id, image.source_id, decision_event(
                        conn, result_id, job.image_id, image, job.model_version_id, o.result["image_score"],
                        decided, now), policy.sinks)
                image_values.update(width=o.width, height=o.height)
                if job.purpose in DECIDING:
                    image_values.update(status=DONE, error=None)
                stored += 1
            else:
                error = o.error
                if o.vanished:
                    error = _vanished(conn, job, mine, now)
                    if error is None:
                        continue  # the file is back under the image's (updated) path: queued again
                final = o.permanent or job.attempts >= max_attempts
                values = {"status": FAILED if final else PENDING, "error": error, "claimed_by": None,
                          "lease_until": None, "updated_at": now}
                if not final:
                    values["next_attempt_at"] = now + dt.timedelta(seconds=backoff_seconds(job.attempts))
                conn.execute(update(jobs).where(mine).values(**values))
                if job.purpose in DECIDING:
                    image_values.update(status=values["status"], error=error)
            conn.execute(update(images).where(images.c.id == job.image_id).values(**image_values))
    return stored


def _vanished(conn: Any, job: Any, mine: Any, now: dt.datetime) -> str | None:
    """A claimed job's file was gone. If intake has since moved the image to a path that exists (a rename),
    the job goes back to the queue (None). Else, if a copy of the content exists (a duplicate of this image),
    the copy becomes the scored image and gets the job; the error says which."""
    query = select(images.c.path, images.c.duplicate_of).where(images.c.id == job.image_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()  # serialises with a rename's update of the row
    image = conn.execute(query).first()
    if image is not None and os.path.isfile(image.path):
        conn.execute(update(jobs).where(mine).values(status=PENDING, claimed_by=None, lease_until=None,
                                                     next_attempt_at=now, updated_at=now))
        return None
    successor = image.duplicate_of if image is not None else None
    if successor is None and job.purpose in DECIDING:
        for copy in conn.execute(select(images.c.id, images.c.path).where(
                images.c.duplicate_of == job.image_id, images.c.status == DUPLICATE).order_by(images.c.id)):
            if os.path.isfile(copy.path):
                successor = copy.id
                break
        if successor is not None:  # promote the copy: the content's image from now on
            conn.execute(update(images).where(images.c.id == successor).values(
                status=PENDING, duplicate_of=None, error=None, updated_at=now))
            conn.execute(update(images).where(images.c.duplicate_of == job.image_id, images.c.id != successor)
                         .values(duplicate_of=successor, updated_at=now))
            conn.execute(update(images).where(images.c.id == job.image_id).values(duplicate_of=successor))
    if successor is None:
        return VANISHED
    add_jobs(conn, successor, [(job.model_version_id, job.purpose)], now)
    path = conn.execute(select(images.c.path).where(images.c.id == successor)).scalar_one()
    return f"{VANISHED}; its copy {path} is scored instead"


def decision_event(conn: Any, result_id: int, image_id: int, image: Any, version_id: int, score: float,
                   decided: dict[str, Any], at: dt.datetime) -> dict[str, Any]:
    """What the line receives for one decision; ``id`` (the result's) is the idempotency key. A DICOM image's
    event also carries its frame and Study / Series / SOP Instance UIDs (``store/dicom.py``), never patient
    data."""
    version = conn.execute(select(model_versions.c.name, model_versions.c.digest)
                           .where(model_versions.c.id == version_id)).one()
    line = conn.execute(select(sources.c.line).where(sources.c.id == image.source_id)).scalar() \
        if image.source_id is not None else None
    th = conn.execute(select(thresholds.c.value, thresholds.c.version, thresholds.c.kind)
                      .where(thresholds.c.id == decided["threshold_id"])).first() \
        if decided["threshold_id"] is not None else None
    return {"id": result_id, "image_id": image_id, "path": image.path, "sha256": image.sha256,
            "class_name": image.class_name, "line": line, "source_id": image.source_id,
            "model_version": version.name, "model_digest": version.digest, "score": score,
            "decision": decided["decision"], "audit": decided["audit"],
            "threshold": th.value if th else None, "threshold_version": th.version if th else None,
            "threshold_kind": th.kind if th else None, "time": at.isoformat() + "Z",
            **event_fields(conn, image_id)}


def release(engine: Engine, worker: str, job_ids: Iterable[int] | None = None) -> None:
    """Give claimed jobs back to the queue at once (clean shutdown), without counting an attempt."""
    where = and_(jobs.c.claimed_by == worker, jobs.c.status == CLAIMED)
    if job_ids is not None:
        where = and_(where, jobs.c.id.in_(list(job_ids)))
    with engine.begin() as conn:
        conn.execute(update(jobs).where(where).values(
            status=PENDING, claimed_by=None, lease_until=None, attempts=func.max(jobs.c.attempts - 1, 0)
            if is_sqlite(engine) else func.greatest(jobs.c.attempts - 1, 0), updated_at=utcnow()))


def pending_count(engine: Engine, versions: Iterable[int] | None = None) -> int:
    """Jobs still to do (claimed ones included), of ``versions`` or of all."""
    query = select(func.count()).select_from(jobs).where(jobs.c.status.in_([PENDING, CLAIMED]))
    if versions is not None:
        query = query.where(jobs.c.model_version_id.in_(list(versions)))
    with engine.connect() as conn:
        return conn.execute(query).scalar_one()


def status(engine: Engine, window_minutes: int = 60) -> dict[str, Any]:
    """Queue depth per model version (and backfill progress), throughput over a stated window, errors, the
    active versions, for `inspector status`."""
    now = utcnow()
    since = now - dt.timedelta(minutes=window_minutes)
    with engine.connect() as conn:
        counts = {r.status: r.n for r in conn.execute(
            select(images.c.status, func.count().label("n")).group_by(images.c.status))}
        per_version: dict[int, dict[str, Any]] = {}
        names = {r.id: r for r in conn.execute(select(model_versions.c.id, model_versions.c.name,
                                                      model_versions.c.random_weights))}
        for r in conn.execute(select(jobs.c.model_version_id, jobs.c.purpose, jobs.c.status, func.count().label("n"))
                              .group_by(jobs.c.model_version_id, jobs.c.purpose, jobs.c.status)):
            entry = per_version.setdefault(r.model_version_id, {
                "model_version": names[r.model_version_id].name, "queued": 0, "claimed": 0, "done": 0,
                "failed": 0, "backfill": {"total": 0, "done": 0, "failed": 0}})
            entry[{PENDING: "queued", CLAIMED: "claimed", DONE: "done", FAILED: "failed"}[r.status]] += r.n
            if r.purpose == BACKFILL:
                entry["backfill"]["total"] += r.n
                if r.status in (DONE, FAILED):
                    entry["backfill"][r.status] += r.n
        scored = conn.execute(select(func.count()).select_from(results)
                              .where(results.c.created_at >= since)).scalar_one()
        errors = [{"error": r.error, "count": r.n} for r in conn.execute(
            select(images.c.error, func.count().label("n")).where(images.c.status == FAILED)
            .group_by(images.c.error).order_by(func.count().desc()).limit(10))]
        oldest = conn.execute(select(func.min(jobs.c.created_at))
                              .where(jobs.c.status.in_([PENDING, CLAIMED]))).scalar()
        active = active_model(conn)
    depth = sum(v["queued"] + v["claimed"] for v in per_version.values())
    return {
        "queue_depth": depth,
        "by_status": counts,
        "versions": sorted(per_version.values(), key=lambda v: v["model_version"]),
        "scored_last_window": scored,
        "window_minutes": window_minutes,
        "images_per_second": scored / (window_minutes * 60.0),
        "oldest_unscored_age_seconds": (now - oldest).total_seconds() if oldest else None,
        "errors": errors,
        "active_model": active["name"] if active else None,
        "active_by_class": active["by_class"] if active else {},
        "active_model_random_weights": active["random_weights"] if active else None,
        "active_model_fallback": active["fallback"] if active else None,
    }


def active_versions(conn: Any, promoted: dict[str | None, int] | None = None) -> dict[str, int]:
    """class name -> the version whose results are the class's own: promoted for the class or the site,
    else the version of the class's latest live result. ``promoted``: ``promoted_map(conn)``, if read."""
    promoted = promoted_map(conn) if promoted is None else promoted
    latest = (select(images.c.class_name, func.max(results.c.id).label("rid"))
              .join(results, results.c.image_id == images.c.id)
              .join(jobs, and_(jobs.c.image_id == results.c.image_id,
                               jobs.c.model_version_id == results.c.model_version_id))
              .where(jobs.c.purpose.in_(DECIDING)).group_by(images.c.class_name).subquery())
    out = {r.class_name: r.model_version_id for r in conn.execute(
        select(latest.c.class_name, results.c.model_version_id).join(results, results.c.id == latest.c.rid))}
    for name in list(out) + [c for c in promoted if c is not None]:
        chosen = promoted.get(name, promoted.get(None))
        if chosen is not None:
            out[name] = chosen
    return out


def active_model(conn: Any) -> dict[str, Any] | None:
    """The headline version (site-wide promotion, else the version of the latest live result): name,
    detector, random_weights, ``fallback`` (why a training-free fallback scores instead of the configured
    detector, or None), and ``by_class`` (class -> version name); None before any result or promotion."""
    promoted = promoted_map(conn)
    by_class_ids = active_versions(conn, promoted)
    site = promoted.get(None)
    if site is None:
        row = conn.execute(select(jobs.c.model_version_id).where(jobs.c.purpose.in_(DECIDING), jobs.c.status == DONE)
                           .order_by(jobs.c.updated_at.desc(), jobs.c.id.desc()).limit(1)).first()
        site = row.model_version_id if row is not None else None
    if site is None:
        return None
    rows = {r.id: r for r in conn.execute(select(model_versions.c.id, model_versions.c.name,
                                                 model_versions.c.detector, model_versions.c.random_weights,
                                                 model_versions.c.manifest))}
    row = rows[site]
    try:
        manifest = json.loads(row.manifest or "{}")
    except ValueError:
        manifest = {}
    fallback = manifest.get("fallback") if isinstance(manifest, dict) else None
    return {"name": row.name, "detector": row.detector, "random_weights": bool(row.random_weights),
            "fallback": fallback, "id": row.id,
            "by_class": {name: rows[v].name for name, v in sorted(by_class_ids.items())}}


__all__ = ["Claimed", "Outcome", "active_model", "active_versions", "claim", "complete", "current_paths", "db_now",
           "ensure_model_version", "ensure_source", "known_files", "pending_count", "register_file", "release",
           "renew", "status"]
