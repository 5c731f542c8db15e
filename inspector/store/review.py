"""What reviewers read and write: the review queue, verdicts, versioned thresholds, overview numbers.

Everything here is a query on the store; the dashboard holds no state of its own. Decisions are made at
read time (image score >= the class's current threshold), so a new threshold version applies to every
result, old and new, without rescoring. Reviews and thresholds are append-only: a verdict or a threshold
is never updated in place, and a rollback is a new version carrying an old value.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Engine, and_, case, func, select

from .db import utcnow
from .queue import active_model
from .schema import (
    CLAIMED,
    DONE,
    FAILED,
    PENDING,
    images,
    results,
    reviews,
    sources,
    thresholds,
)

VERDICTS = ("normal", "defect", "skip")


class ReviewError(ValueError):
    """A review or threshold that cannot be saved as given (no reviewer name, unknown verdict...)."""


def _latest_thresholds():
    """Subquery: (class_name, version, value) of the newest threshold version of each class."""
    newest = select(thresholds.c.class_name, func.max(thresholds.c.version).label("version")) \
        .group_by(thresholds.c.class_name).subquery()
    return select(thresholds.c.class_name, thresholds.c.version, thresholds.c.value).join(
        newest, and_(newest.c.class_name == thresholds.c.class_name, newest.c.version == thresholds.c.version)
    ).subquery("current_threshold")


def _latest_reviews():
    """Subquery: the newest review of each image (verdict, reviewer, time)."""
    newest = select(reviews.c.image_id, func.max(reviews.c.id).label("id")).group_by(reviews.c.image_id).subquery()
    return select(reviews.c.image_id, reviews.c.verdict, reviews.c.reviewer, reviews.c.created_at).join(
        newest, newest.c.id == reviews.c.id).subquery("last_review")


def review_queue(engine: Engine, class_name: str | None = None, source_id: int | None = None,
                 since: dt.datetime | None = None, until: dt.datetime | None = None,
                 score_min: float | None = None, score_max: float | None = None, decision: str | None = None,
                 reviewed: bool | None = None, order: str = "score", limit: int = 50,
                 offset: int = 0) -> list[dict[str, Any]]:
    """Scored images with their decision and last review, filtered, sorted and paginated in SQL.

    order: "score" (highest first) or "closeness" (nearest to the class threshold first: the unsure ones).
    decision: "defect" (score >= threshold), "normal" (below), or None. reviewed: True/False/None.
    """
    th = _latest_thresholds()
    flagged = case((th.c.value.is_(None), None), (results.c.image_score >= th.c.value, "defect"), else_="normal")

    def last_review(column):  # correlated on the indexed reviews.image_id: cheap per row, no materialisation
        return (select(column).where(reviews.c.image_id == images.c.id).order_by(reviews.c.id.desc()).limit(1)
                .correlate(images).scalar_subquery())

    verdict = last_review(reviews.c.verdict)
    query = (select(images.c.id, images.c.path, images.c.class_name, images.c.source_id, images.c.width,
                    images.c.height, results.c.id.label("result_id"), results.c.image_score, results.c.text_score,
                    results.c.topk_score, results.c.created_at, th.c.value.label("threshold"),
                    th.c.version.label("threshold_version"), flagged.label("decision"),
                    verdict.label("verdict"), last_review(reviews.c.reviewer).label("reviewer"),
                    last_review(reviews.c.created_at).label("reviewed_at"))
             .join(results, results.c.image_id == images.c.id)
             .join(th, th.c.class_name == images.c.class_name, isouter=True))
    if class_name:
        query = query.where(images.c.class_name == class_name)
    if source_id is not None:
        query = query.where(images.c.source_id == source_id)
    if since is not None:
        query = query.where(results.c.created_at >= since)
    if until is not None:
        query = query.where(results.c.created_at < until)
    if score_min is not None:
        query = query.where(results.c.image_score >= score_min)
    if score_max is not None:
        query = query.where(results.c.image_score <= score_max)
    if decision is not None:
        query = query.where(flagged == decision)
    reviewed_any = select(reviews.c.id).where(reviews.c.image_id == images.c.id).exists()
    if reviewed is True:
        query = query.where(reviewed_any)
    elif reviewed is False:
        query = query.where(~reviewed_any)
    if order == "closeness":
        query = query.order_by(func.abs(results.c.image_score - func.coalesce(th.c.value, 0.5)), images.c.id)
    elif order == "score":
        query = query.order_by(results.c.image_score.desc(), images.c.id)
    else:
        raise ReviewError(f"order must be 'score' or 'closeness', not '{order}'")
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query.limit(limit).offset(offset)).mappings()]


def anomaly_map(engine: Engine, image_id: int) -> bytes | None:
    with engine.connect() as conn:
        return conn.execute(select(results.c.anomaly_map).where(results.c.image_id == image_id)
                            .order_by(results.c.id.desc()).limit(1)).scalar()


def record_review(engine: Engine, image_id: int, verdict: str, reviewer: str, reason: str | None = None) -> int:
    """Append a review; returns its id. A reviewer name is required."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}, not '{verdict}'")
    if not reviewer or not reviewer.strip():
        raise ReviewError("a reviewer name is required to review")
    with engine.begin() as conn:
        if conn.execute(select(images.c.id).where(images.c.id == image_id)).first() is None:
            raise ReviewError(f"no image with id {image_id}")
        return conn.execute(reviews.insert().values(image_id=image_id, verdict=verdict, reviewer=reviewer.strip(),
                                                    reason=(reason or None), created_at=utcnow())
                            ).inserted_primary_key[0]


def review_history(engine: Engine, image_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(reviews).where(reviews.c.image_id == image_id)
                                              .order_by(reviews.c.id)).mappings()]


def current_threshold(engine: Engine, class_name: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        row = conn.execute(select(thresholds).where(thresholds.c.class_name == class_name)
                           .order_by(thresholds.c.version.desc()).limit(1)).mappings().first()
        return dict(row) if row else None


def save_threshold(engine: Engine, class_name: str, value: float, who: str, note: str | None = None) -> int:
    """Append a new threshold version for ``class_name``; returns the version number."""
    if not who or not who.strip():
        raise ReviewError("a name is required to change a threshold")
    if not 0.0 <= value <= 1.0:
        raise ReviewError(f"threshold must lie in [0, 1], not {value}")
    with engine.begin() as conn:
        last = conn.execute(select(func.max(thresholds.c.version)).where(thresholds.c.class_name == class_name)
                            ).scalar() or 0
        conn.execute(thresholds.insert().values(class_name=class_name, version=last + 1, value=float(value),
                                                created_by=who.strip(), created_at=utcnow(), note=note or None))
        return last + 1


def rollback_threshold(engine: Engine, class_name: str, version: int, who: str) -> int:
    """A new version with the value of an earlier one (history is never rewritten)."""
    with engine.connect() as conn:
        value = conn.execute(select(thresholds.c.value).where(thresholds.c.class_name == class_name,
                                                              thresholds.c.version == version)).scalar()
    if value is None:
        raise ReviewError(f"class '{class_name}' has no threshold version {version}")
    return save_threshold(engine, class_name, value, who, note=f"rollback to v{version}")


def threshold_history(engine: Engine, class_name: str) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(thresholds).where(thresholds.c.class_name == class_name)
                                              .order_by(thresholds.c.version.desc())).mappings()]


def reviewed_scores(engine: Engine, class_name: str) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels 1 = defect) of the images of a class whose last verdict is normal or defect."""
    rv = _latest_reviews()
    with engine.connect() as conn:
        rows = conn.execute(select(results.c.image_score, rv.c.verdict)
                            .join(images, images.c.id == results.c.image_id)
                            .join(rv, rv.c.image_id == images.c.id)
                            .where(images.c.class_name == class_name, rv.c.verdict.in_(("normal", "defect")))).all()
    return (np.array([r.image_score for r in rows], dtype=np.float64),
            np.array([r.verdict == "defect" for r in rows], dtype=np.int64))


def class_scores(engine: Engine, class_name: str, limit: int = 200_000) -> np.ndarray:
    """All image scores of a class (for the share of images a threshold would flag)."""
    with engine.connect() as conn:
        return np.array(conn.execute(select(results.c.image_score).join(images, images.c.id == results.c.image_id)
                                     .where(images.c.class_name == class_name).limit(limit)).scalars().all(),
                        dtype=np.float64)


def threshold_effect(scores: np.ndarray, labels: np.ndarray, all_scores: np.ndarray, threshold: float) -> dict:
    """What a threshold would do: precision, recall, false-positive rate on reviewed images, flagged share."""
    flagged = scores >= threshold
    tp = int((flagged & (labels == 1)).sum())
    fp = int((flagged & (labels == 0)).sum())
    fn = int((~flagged & (labels == 1)).sum())
    tn = int((~flagged & (labels == 0)).sum())
    return {"precision": tp / (tp + fp) if tp + fp else None, "recall": tp / (tp + fn) if tp + fn else None,
            "fpr": fp / (fp + tn) if fp + tn else None,
            "flagged_share": float((all_scores >= threshold).mean()) if all_scores.size else None,
            "tp": tp, "fp": fp, "fn": fn, "tn": tn}


def threshold_for_recall(scores: np.ndarray, labels: np.ndarray, recall: float) -> float | None:
    """The highest threshold whose recall on reviewed defects reaches ``recall``."""
    defects = np.sort(scores[labels == 1])[::-1]
    if defects.size == 0:
        return None
    needed = int(np.ceil(recall * defects.size))
    return float(defects[max(needed, 1) - 1])


def classes(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(images.c.class_name).distinct().order_by(images.c.class_name)).scalars())


def source_list(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(sources).order_by(sources.c.id)).mappings()]


def overview(engine: Engine, hours: int = 24) -> dict[str, Any]:
    """Images per hour, flagged share per class, queue depth, errors, active model."""
    since = utcnow() - dt.timedelta(hours=hours)
    th = _latest_thresholds()
    hour = func.strftime("%Y-%m-%d %H:00", results.c.created_at) if engine.dialect.name == "sqlite" else \
        func.to_char(func.date_trunc("hour", results.c.created_at), "YYYY-MM-DD HH24:00")
    with engine.connect() as conn:
        per_hour = [dict(r) for r in conn.execute(
            select(hour.label("hour"), images.c.class_name, func.count().label("images"),
                   func.sum(case((results.c.image_score >= th.c.value, 1), else_=0)).label("flagged"))
            .join(images, images.c.id == results.c.image_id)
            .join(th, th.c.class_name == images.c.class_name, isouter=True)
            .where(results.c.created_at >= since).group_by(hour, images.c.class_name).order_by(hour)).mappings()]
        depth = conn.execute(select(func.count()).select_from(images)
                             .where(images.c.status.in_((PENDING, CLAIMED)))).scalar_one()
        errors = [dict(r) for r in conn.execute(
            select(images.c.error, func.count().label("count")).where(images.c.status == FAILED)
            .group_by(images.c.error).order_by(func.count().desc()).limit(20)).mappings()]
        active = active_model(conn)
        done = conn.execute(select(func.count()).select_from(images).where(images.c.status == DONE)).scalar_one()
    return {"per_hour": per_hour, "queue_depth": depth, "errors": errors, "scored": done,
            "active_model": active["name"] if active else None,
            "active_detector": active["detector"] if active else None,
            "fallback": active["fallback"] if active else None,
            "random_weights": active["random_weights"] if active else None}


def export_csv(engine: Engine, class_name: str | None = None) -> str:
    """Every scored image with its decision at the current threshold and its full review history."""
    th, out = _latest_thresholds(), io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["image_id", "path", "class_name", "image_score", "threshold_version", "threshold", "decision",
                     "scored_at", "review_verdict", "reviewer", "review_reason", "reviewed_at"])
    query = (select(images.c.id, images.c.path, images.c.class_name, results.c.image_score, th.c.version,
                    th.c.value, results.c.created_at, reviews.c.verdict, reviews.c.reviewer, reviews.c.reason,
                    reviews.c.created_at.label("reviewed_at"))
             .join(results, results.c.image_id == images.c.id)
             .join(th, th.c.class_name == images.c.class_name, isouter=True)
             .join(reviews, reviews.c.image_id == images.c.id, isouter=True)
             .order_by(images.c.id, reviews.c.id))
    if class_name:
        query = query.where(images.c.class_name == class_name)
    with engine.connect() as conn:
        for r in conn.execute(query):
            decision = "" if r.value is None else ("defect" if r.image_score >= r.value else "normal")
            writer.writerow([r.id, r.path, r.class_name, f"{r.image_score:.6f}", r.version or "", r.value or "",
                             decision, r.created_at, r.verdict or "", r.reviewer or "", r.reason or "",
                             r.reviewed_at or ""])
    return out.getvalue()


class ImageNotAllowed(PermissionError):
    """The dashboard may not show this file: outside every watched folder, or not the file that was scored."""


def _path_grants(engine: Engine, path: str) -> tuple[list[str], str | None]:
    """What may make ``path`` showable: the watched folders that are still their own resolved form (a folder
    later replaced by a symlink, or registered through one, grants nothing), and the sha256 of a successfully
    read row of exactly this resolved path registered without a source (`inspector score`), if any."""
    import os

    with engine.connect() as conn:
        roots = [p for p in conn.execute(select(sources.c.path)).scalars()
                 if os.path.isabs(p) and os.path.realpath(p) == os.path.normpath(p)]
        sha = None
        if os.path.isabs(path) and os.path.normpath(path) == path:
            sha = conn.execute(select(images.c.sha256).where(
                images.c.path == path, images.c.source_id.is_(None), images.c.sha256.is_not(None))
                .order_by(images.c.id.desc()).limit(1)).scalar()
    return [os.path.normpath(r) for r in roots], sha


def _granted(real: str, path: str, roots: list[str], sha: str | None) -> str | None:
    """How the resolved file ``real`` (opened as ``path``) is granted: "root", "registered" or None."""
    import os

    if any(os.path.commonpath([real, root]) == root for root in roots):
        return "root"
    return "registered" if sha is not None and real == path else None


def image_path_allowed(engine: Engine, path: str) -> bool:
    """Whether a file may be shown: its resolved path lies under a watched folder, or it is, with no symlink
    on the way, a file registered by `inspector score`. :func:`read_allowed_image` also checks what it opens."""
    import os

    roots, sha = _path_grants(engine, path)
    return _granted(os.path.realpath(path), path, roots, sha) is not None


def read_allowed_image(engine: Engine, path: str) -> bytes:
    """The bytes of an image the dashboard may show, checked on the file actually opened (not only its name).

    The file is opened without blocking (a FIFO never hangs the page) and must be a regular file; the path of
    the opened descriptor must lie under a watched folder, or be the registered file itself, whose content
    must still be what was scored (sha256). Raises :class:`ImageNotAllowed`, or ``FileNotFoundError``.
    """
    import hashlib
    import os
    import stat

    roots, sha = _path_grants(engine, path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        opened = os.fstat(fd)
        if not stat.S_ISREG(opened.st_mode):
            raise ImageNotAllowed(f"{path}: not a regular file")
        proc = f"/proc/self/fd/{fd}"
        real = os.readlink(proc) if os.path.islink(proc) else os.path.realpath(path)
        current = os.stat(real) if os.path.exists(real) else None
        if current is None or (current.st_dev, current.st_ino) != (opened.st_dev, opened.st_ino):
            raise ImageNotAllowed(f"{path}: the file changed while it was opened")
        grant = _granted(real, path, roots, sha)
        if grant is None:
            raise ImageNotAllowed(f"{path}: resolves to {real}, outside the watched folders")
        chunks = []
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if grant == "registered" and hashlib.sha256(data).hexdigest() != sha:
        raise ImageNotAllowed(f"{path}: the file changed since it was scored")
    return data


__all__: Sequence[str] = [
    "VERDICTS",
    "ReviewError",
    "anomaly_map",
    "class_scores",
    "classes",
    "current_threshold",
    "export_csv",
    "image_path_allowed",
    "overview",
    "record_review",
    "review_history",
    "review_queue",
    "reviewed_scores",
    "rollback_threshold",
    "save_threshold",
    "source_list",
    "threshold_effect",
    "threshold_for_recall",
    "threshold_history",
]
