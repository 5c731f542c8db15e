"""What reviewers read and write: the review queue, verdicts, versioned thresholds, overview numbers.

Everything here is a query on the store; the dashboard holds no state of its own. Every read is about one
model version per class: by default the class's *active* version (``queue.active_versions``: promoted, else
the version of its latest live result), or the one asked for. A threshold belongs to a (class, model
version): a newly promoted version never inherits another version's threshold ("not calibrated for this
version" until one is saved for it). Decisions are made at read time (image score >= the threshold of the
result's own version), so a new threshold version applies to every result of its version without
rescoring. Reviews and thresholds are append-only: a verdict or a threshold is never updated in place,
and a rollback is a new version carrying an old value. A review records the result the reviewer was shown.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from sqlalchemy import Engine, and_, case, false, func, or_, select

from ..errors import InspectorError
from ..hashing import sha256_of
from .db import utcnow
from .queue import active_model, active_versions
from .schema import (
    CLAIMED,
    DONE,
    FAILED,
    PENDING,
    dicom_images,
    images,
    jobs,
    model_versions,
    results,
    reviews,
    sources,
    thresholds,
)

VERDICTS = ("normal", "defect", "skip")
#: The verdict of a review row that undoes an image's only review (``undo_reviews``): the image counts as not
#: reviewed again, and its history keeps both rows.
UNDONE = "unreviewed"
#: The reason stored with the verdicts of ``accept_low_scores``.
BULK_ACCEPT_REASON = "accepted with its page: score below the threshold"


class ReviewError(InspectorError, ValueError):
    """A review or threshold that cannot be saved as given (no reviewer name, unknown verdict...)."""


def _latest_thresholds():
    """Subquery: (class_name, model_version_id, version, value, review_band) of the newest threshold of each
    (class, model version)."""
    newest = select(thresholds.c.class_name, thresholds.c.model_version_id,
                    func.max(thresholds.c.version).label("version")) \
        .group_by(thresholds.c.class_name, thresholds.c.model_version_id).subquery()
    return select(thresholds.c.class_name, thresholds.c.model_version_id, thresholds.c.version,
                  thresholds.c.value, thresholds.c.review_band).join(
        newest, and_(newest.c.class_name == thresholds.c.class_name,
                     newest.c.model_version_id == thresholds.c.model_version_id,
                     newest.c.version == thresholds.c.version)
    ).subquery("current_threshold")


def _threshold_join(th):
    return and_(th.c.class_name == images.c.class_name, th.c.model_version_id == results.c.model_version_id)


def _latest_reviews():
    """Subquery: the newest review of each image (verdict, reviewer, time)."""
    newest = select(reviews.c.image_id, func.max(reviews.c.id).label("id")).group_by(reviews.c.image_id).subquery()
    return select(reviews.c.image_id, reviews.c.verdict, reviews.c.reviewer, reviews.c.created_at).join(
        newest, newest.c.id == reviews.c.id).subquery("last_review")


def version_filter(conn: Any, model_version_id: int | None = None):
    """Results of ``model_version_id``, or (None) of each class's active version."""
    if model_version_id is not None:
        return results.c.model_version_id == model_version_id
    active = active_versions(conn)
    if not active:
        return false()
    return or_(*[and_(images.c.class_name == name, results.c.model_version_id == version)
                 for name, version in active.items()])


def active_version_id(engine: Engine, class_name: str) -> int | None:
    with engine.connect() as conn:
        return active_versions(conn).get(class_name)


def class_versions(engine: Engine, class_name: str) -> list[dict[str, Any]]:
    """The versions that have results for ``class_name`` (id, name, results), active one first."""
    with engine.connect() as conn:
        active = active_versions(conn).get(class_name)
        rows = conn.execute(select(model_versions.c.id, model_versions.c.name, func.count().label("results"))
                            .join(results, results.c.model_version_id == model_versions.c.id)
                            .join(images, images.c.id == results.c.image_id)
                            .where(images.c.class_name == class_name)
                            .group_by(model_versions.c.id, model_versions.c.name)).all()
    out = [{"id": r.id, "name": r.name, "results": r.results, "active": r.id == active} for r in rows]
    return sorted(out, key=lambda r: (not r["active"], r["name"]))


def review_queue(engine: Engine, class_name: str | None = None, source_id: int | None = None,
                 since: dt.datetime | None = None, until: dt.datetime | None = None,
                 score_min: float | None = None, score_max: float | None = None, decision: str | None = None,
                 reviewed: bool | None = None, order: str = "score", limit: int = 50,
                 offset: int = 0, model_version_id: int | None = None,
                 audit: bool | None = None, image_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """Scored images with their decision and last review, filtered, sorted and paginated in SQL.

    One result per image: of ``model_version_id``, or of its class's active version.
    order: "score" (highest first) or "closeness" (nearest to the threshold first: the unsure ones).
    decision: "defect" (score >= threshold), "normal" (below), or None: the what-if decision at the current
    threshold (``stored_decision`` is the pass/fail/review made when the result was stored). reviewed:
    True/False/None (an image whose last review was undone counts as not reviewed, its ``verdict`` None).
    audit: True = only the audit sample of passes. image_ids: only these images (a link to one image).
    ``dicom`` is True for a frame of a DICOM file (``frame`` its 0-based frame; see ``store.dicom``).
    """
    th = _latest_thresholds()
    flagged = case((th.c.value.is_(None), None), (results.c.image_score >= th.c.value, "defect"), else_="normal")

    def last_review(column):  # correlated on the indexed reviews.image_id: cheap per row, no materialisation
        return (select(column).where(reviews.c.image_id == images.c.id).order_by(reviews.c.id.desc()).limit(1)
                .correlate(images).scalar_subquery())

    verdict = last_review(reviews.c.verdict)
    query = (select(images.c.id, images.c.path, images.c.class_name, images.c.source_id, images.c.width,
                    images.c.height, results.c.id.label("result_id"), results.c.image_score, results.c.text_score,
                    results.c.topk_score, results.c.created_at, results.c.model_version_id,
                    results.c.decision.label("stored_decision"), results.c.audit,
                    model_versions.c.name.label("model_version"), th.c.value.label("threshold"),
                    th.c.version.label("threshold_version"), th.c.review_band, flagged.label("decision"),
                    verdict.label("verdict"), last_review(reviews.c.reviewer).label("reviewer"),
                    last_review(reviews.c.created_at).label("reviewed_at"), images.c.frame,
                    dicom_images.c.image_id.is_not(None).label("dicom"))
             .join(results, results.c.image_id == images.c.id)
             .join(model_versions, model_versions.c.id == results.c.model_version_id)
             .join(th, _threshold_join(th), isouter=True)
             .join(dicom_images, dicom_images.c.image_id == images.c.id, isouter=True))
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
    if audit is not None:
        query = query.where(results.c.audit.is_(True) if audit else results.c.audit.is_(False))
    if image_ids is not None:
        query = query.where(images.c.id.in_([int(i) for i in image_ids]))
    if reviewed is True:
        query = query.where(verdict.is_not(None), verdict != UNDONE)
    elif reviewed is False:
        query = query.where(or_(verdict.is_(None), verdict == UNDONE))
    if order == "closeness":
        query = query.order_by(func.abs(results.c.image_score - func.coalesce(th.c.value, 0.5)), images.c.id)
    elif order == "score":
        query = query.order_by(results.c.image_score.desc(), images.c.id)
    else:
        raise ReviewError(f"order must be 'score' or 'closeness', not '{order}'")
    with engine.connect() as conn:
        query = query.where(version_filter(conn, model_version_id))
        rows = [dict(r) for r in conn.execute(query.limit(limit).offset(offset)).mappings()]
    for row in rows:
        if row["verdict"] == UNDONE:
            row.update(verdict=None, reviewer=None, reviewed_at=None)
    return rows


def anomaly_map(engine: Engine, image_id: int, result_id: int | None = None) -> bytes | None:
    """The map of the result being reviewed (``result_id``), else of the image's active-version result."""
    with engine.connect() as conn:
        if result_id is not None:
            return conn.execute(select(results.c.anomaly_map).where(results.c.id == result_id,
                                                                    results.c.image_id == image_id)).scalar()
        return conn.execute(select(results.c.anomaly_map).join(images, images.c.id == results.c.image_id)
                            .where(results.c.image_id == image_id, version_filter(conn))).scalar()


def record_review(engine: Engine, image_id: int, verdict: str, reviewer: str, reason: str | None = None,
                  result_id: int | None = None) -> int:
    """Append a review (of the result ``result_id`` the reviewer was shown); returns its id. A reviewer
    name is required."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}, not '{verdict}'")
    if not reviewer or not reviewer.strip():
        raise ReviewError("a reviewer name is required to review")
    reviewer = reviewer.strip()
    with engine.begin() as conn:
        if conn.execute(select(images.c.id).where(images.c.id == image_id)).first() is None:
            raise ReviewError(f"no image with id {image_id}")
        if result_id is not None and conn.execute(select(results.c.id).where(
                results.c.id == result_id, results.c.image_id == image_id)).first() is None:
            raise ReviewError(f"result {result_id} is not a result of image {image_id}")
        return conn.execute(reviews.insert().values(image_id=image_id, verdict=verdict, reviewer=reviewer,
                                                    reason=(reason or None), result_id=result_id,
                                                    created_at=utcnow())).inserted_primary_key[0]


def undo_reviews(engine: Engine, review_ids: Sequence[int], who: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Undo reviews by appending, for each, a review that restores the image's verdict from before it (or
    ``UNDONE`` when it was the image's first): nothing is deleted, the history keeps all rows.

    A review is undone only while it is still its image's latest (nobody reviewed the image since), newest
    first, in one transaction. Returns (``{"image_id", "undone", "review_id", "verdict"}`` per undone review,
    the ids left alone because the image was reviewed again since).
    """
    if not who or not who.strip():
        raise ReviewError("a reviewer name is required to undo a review")
    done: list[dict[str, Any]] = []
    kept: list[int] = []
    with engine.begin() as conn:
        for review_id in sorted({int(i) for i in review_ids}, reverse=True):
            row = conn.execute(select(reviews.c.image_id, reviews.c.result_id).where(reviews.c.id == review_id)).first()
            if row is None:
                raise ReviewError(f"no review with id {review_id}")
            latest = conn.execute(select(func.max(reviews.c.id)).where(reviews.c.image_id == row.image_id)).scalar()
            if latest != review_id:
                kept.append(review_id)
                continue
            before = conn.execute(select(reviews.c.verdict, reviews.c.result_id)
                                  .where(reviews.c.image_id == row.image_id, reviews.c.id < review_id)
                                  .order_by(reviews.c.id.desc()).limit(1)).first()
            verdict = before.verdict if before is not None else UNDONE
            new_id = conn.execute(reviews.insert().values(
                image_id=row.image_id, verdict=verdict, reviewer=who.strip(), reason=f"undo of review #{review_id}",
                result_id=before.result_id if before is not None and before.result_id else row.result_id,
                created_at=utcnow())).inserted_primary_key[0]
            done.append({"image_id": row.image_id, "undone": review_id, "review_id": new_id, "verdict": verdict})
    return done, kept


def accept_low_scores(engine: Engine, shown: Sequence[tuple[int, int]], who: str) -> list[int]:
    """Accept as normal, in one transaction, the images of ``shown`` ((image id, result id) pairs: the page a
    reviewer sees) that are not reviewed and score below their threshold minus its review band; returns the
    new review ids.

    Left untouched: the audit sample of passes (drawn to measure the escape rate, each must be looked at),
    images at or above the band, images of a version without a threshold, images already reviewed.
    """
    if not who or not who.strip():
        raise ReviewError("a reviewer name is required to review")
    pairs = {(int(i), int(r)) for i, r in shown}
    if not pairs:
        return []
    th = _latest_thresholds()
    verdict = (select(reviews.c.verdict).where(reviews.c.image_id == images.c.id).order_by(reviews.c.id.desc())
               .limit(1).correlate(images).scalar_subquery())
    query = (select(images.c.id, results.c.id.label("result_id"))
             .join(results, results.c.image_id == images.c.id)
             .join(th, _threshold_join(th))
             .where(results.c.id.in_([r for _, r in pairs]), results.c.audit.is_(False),
                    results.c.image_score < th.c.value - th.c.review_band,
                    or_(verdict.is_(None), verdict == UNDONE))
             .order_by(results.c.image_score.desc(), images.c.id))
    now, ids = utcnow(), []
    with engine.begin() as conn:
        for row in conn.execute(query).all():
            if (row.id, row.result_id) in pairs:
                ids.append(conn.execute(reviews.insert().values(
                    image_id=row.id, verdict="normal", reviewer=who.strip(), reason=BULK_ACCEPT_REASON,
                    result_id=row.result_id, created_at=now)).inserted_primary_key[0])
    return ids


def review_history(engine: Engine, image_id: int) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(reviews).where(reviews.c.image_id == image_id)
                                              .order_by(reviews.c.id)).mappings()]


def _version_where(model_version_id: int | None):
    return thresholds.c.model_version_id.is_(None) if model_version_id is None else \
        thresholds.c.model_version_id == model_version_id


def _or_active(engine: Engine, class_name: str, model_version_id: int | None) -> int | None:
    """``model_version_id``, or (None) the class's active version (None before any result or promotion)."""
    return model_version_id if model_version_id is not None else active_version_id(engine, class_name)


def current_threshold(engine: Engine, class_name: str, model_version_id: int | None = None
                      ) -> dict[str, Any] | None:
    """The threshold in force for (class, model version; default its active version); None: not calibrated
    for this version."""
    model_version_id = _or_active(engine, class_name, model_version_id)
    with engine.connect() as conn:
        row = conn.execute(select(thresholds).where(thresholds.c.class_name == class_name,
                                                    _version_where(model_version_id))
                           .order_by(thresholds.c.version.desc()).limit(1)).mappings().first()
        return dict(row) if row else None


def latest_other_threshold(engine: Engine, class_name: str, model_version_id: int | None) -> dict[str, Any] | None:
    """The newest threshold of ``class_name`` saved for *another* version (what the dashboard shows as "the
    old threshold would flag..." for an uncalibrated version), with that version's name."""
    with engine.connect() as conn:
        row = conn.execute(select(thresholds, model_versions.c.name.label("model_version"))
                           .join(model_versions, model_versions.c.id == thresholds.c.model_version_id, isouter=True)
                           .where(thresholds.c.class_name == class_name, ~_version_where(model_version_id)
                                  if model_version_id is not None else false())
                           .order_by(thresholds.c.created_at.desc(), thresholds.c.id.desc()).limit(1)).mappings().first()
        return dict(row) if row else None


def save_threshold(engine: Engine, class_name: str, value: float, who: str, note: str | None = None,
                   model_version_id: int | None = None, review_band: float = 0.0) -> int:
    """Append a new threshold version for (``class_name``, ``model_version_id``; default the class's active
    version); returns its number."""
    model_version_id = _or_active(engine, class_name, model_version_id)
    if not who or not who.strip():
        raise ReviewError("a name is required to change a threshold")
    if not 0.0 <= value <= 1.0:
        raise ReviewError(f"threshold must lie in [0, 1], not {value}")
    if not 0.0 <= review_band < 0.5:
        raise ReviewError(f"the review band must lie in [0, 0.5), not {review_band}")
    with engine.begin() as conn:
        last = conn.execute(select(func.max(thresholds.c.version)).where(
            thresholds.c.class_name == class_name, _version_where(model_version_id))).scalar() or 0
        conn.execute(thresholds.insert().values(class_name=class_name, model_version_id=model_version_id,
                                                version=last + 1, value=float(value), created_by=who.strip(),
                                                created_at=utcnow(), note=note or None, kind="reviewed",
                                                review_band=float(review_band)))
        return last + 1


def rollback_threshold(engine: Engine, class_name: str, version: int, who: str,
                       model_version_id: int | None = None) -> int:
    """A new version with the value of an earlier one (history is never rewritten)."""
    model_version_id = _or_active(engine, class_name, model_version_id)
    with engine.connect() as conn:
        value = conn.execute(select(thresholds.c.value).where(thresholds.c.class_name == class_name,
                                                              _version_where(model_version_id),
                                                              thresholds.c.version == version)).scalar()
    if value is None:
        raise ReviewError(f"class '{class_name}' has no threshold version {version} for this model version")
    return save_threshold(engine, class_name, value, who, note=f"rollback to v{version}",
                          model_version_id=model_version_id)


def threshold_history(engine: Engine, class_name: str, model_version_id: int | None = None) -> list[dict[str, Any]]:
    model_version_id = _or_active(engine, class_name, model_version_id)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(thresholds).where(
            thresholds.c.class_name == class_name, _version_where(model_version_id))
            .order_by(thresholds.c.version.desc())).mappings()]


def reviewed_scores(engine: Engine, class_name: str, model_version_id: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(scores, labels 1 = defect) of the version's results of the images of a class whose last verdict is
    normal or defect (``model_version_id`` None: the class's active version)."""
    rv = _latest_reviews()
    with engine.connect() as conn:
        rows = conn.execute(select(results.c.image_score, rv.c.verdict)
                            .join(images, images.c.id == results.c.image_id)
                            .join(rv, rv.c.image_id == images.c.id)
                            .where(images.c.class_name == class_name, rv.c.verdict.in_(("normal", "defect")),
                                   version_filter(conn, model_version_id))).all()
    return (np.array([r.image_score for r in rows], dtype=np.float64),
            np.array([r.verdict == "defect" for r in rows], dtype=np.int64))


def class_scores(engine: Engine, class_name: str, limit: int = 200_000,
                 model_version_id: int | None = None) -> np.ndarray:
    """Image scores of a class by one version (for the share of images a threshold would flag)."""
    with engine.connect() as conn:
        return np.array(conn.execute(select(results.c.image_score).join(images, images.c.id == results.c.image_id)
                                     .where(images.c.class_name == class_name,
                                            version_filter(conn, model_version_id)).limit(limit)).scalars().all(),
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


def compare_versions(engine: Engine, class_name: str, active: int, candidate: int) -> dict[str, Any]:
    """The two versions on the images of ``class_name`` both scored and a reviewer judged (normal/defect):
    image AUROC and AP of each, precision and recall at each version's own threshold, and the images
    whose decisions disagree (both versions calibrated) — what to look at before promoting a shadow."""
    from ..metrics import auroc, average_precision

    rv = _latest_reviews()
    a, b = results.alias("a"), results.alias("b")
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.id, images.c.path, a.c.image_score.label("sa"),
                                   b.c.image_score.label("sb"), rv.c.verdict)
                            .join(a, and_(a.c.image_id == images.c.id, a.c.model_version_id == active))
                            .join(b, and_(b.c.image_id == images.c.id, b.c.model_version_id == candidate))
                            .join(rv, rv.c.image_id == images.c.id)
                            .where(images.c.class_name == class_name, rv.c.verdict.in_(("normal", "defect")))
                            .order_by(images.c.id)).all()
    labels = np.array([r.verdict == "defect" for r in rows], dtype=np.int64)
    out: dict[str, Any] = {"reviewed_images": len(rows), "defects": int(labels.sum()), "versions": {}}
    decisions = {}
    for key, version in (("sa", active), ("sb", candidate)):
        scores = np.array([getattr(r, key) for r in rows], dtype=np.float64)
        both = 0 < labels.sum() < len(labels)
        th = current_threshold(engine, class_name, version)
        entry: dict[str, Any] = {"image_auroc": float(auroc(labels, scores)) if both else None,
                                 "image_ap": float(average_precision(labels, scores)) if both else None,
                                 "threshold": th["value"] if th else None}
        if th is not None:
            entry.update(threshold_effect(scores, labels, scores, th["value"]))
            decisions[version] = scores >= th["value"]
        out["versions"][version] = entry
    if len(decisions) == 2:
        differ = decisions[active] != decisions[candidate]
        out["disagreements"] = [{"image_id": r.id, "path": r.path, "active": r.sa, "candidate": r.sb,
                                 "verdict": r.verdict} for r, d in zip(rows, differ) if d]
    else:
        out["disagreements"] = None  # a version without a threshold has no decisions to compare
    return out


def escape_counts(engine: Engine, since: dt.datetime | None = None,
                  class_name: str | None = None) -> list[dict[str, Any]]:
    """Per (class, line): passes stored since ``since``, audited passes a reviewer judged (normal or
    defect), and defects found among them (the inputs of ``stats.escape_rate``)."""
    rv = _latest_reviews()
    judged = and_(results.c.audit.is_(True), rv.c.verdict.in_(("normal", "defect")))
    query = (select(images.c.class_name, sources.c.line, func.count().label("passes"),
                    func.sum(case((judged, 1), else_=0)).label("audited"),
                    func.sum(case((and_(judged, rv.c.verdict == "defect"), 1), else_=0)).label("found"))
             .select_from(results).join(images, images.c.id == results.c.image_id)
             .join(sources, sources.c.id == images.c.source_id, isouter=True)
             .join(rv, rv.c.image_id == images.c.id, isouter=True)
             .where(results.c.decision == "pass").group_by(images.c.class_name, sources.c.line)
             .order_by(images.c.class_name, sources.c.line))
    if since is not None:
        query = query.where(results.c.created_at >= since)
    if class_name is not None:
        query = query.where(images.c.class_name == class_name)
    with engine.connect() as conn:
        return [{"class_name": r.class_name, "line": r.line, "passes": r.passes, "audited": int(r.audited or 0),
                 "found": int(r.found or 0)} for r in conn.execute(query)]


def classes(engine: Engine) -> list[str]:
    with engine.connect() as conn:
        return list(conn.execute(select(images.c.class_name).distinct().order_by(images.c.class_name)).scalars())


def source_list(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(sources).order_by(sources.c.id)).mappings()]


def overview(engine: Engine, hours: int = 24) -> dict[str, Any]:
    """Images per hour, flagged share per class (active versions), queue depth, errors, active model."""
    since = utcnow() - dt.timedelta(hours=hours)
    th = _latest_thresholds()
    hour = func.strftime("%Y-%m-%d %H:00", results.c.created_at) if engine.dialect.name == "sqlite" else \
        func.to_char(func.date_trunc("hour", results.c.created_at), "YYYY-MM-DD HH24:00")
    with engine.connect() as conn:
        per_hour = [dict(r) for r in conn.execute(
            select(hour.label("hour"), images.c.class_name, func.count().label("images"),
                   func.sum(case((results.c.image_score >= th.c.value, 1), else_=0)).label("flagged"),
                   func.count(th.c.value).label("with_threshold"))
            .join(images, images.c.id == results.c.image_id)
            .join(th, _threshold_join(th), isouter=True)
            .where(results.c.created_at >= since, version_filter(conn))
            .group_by(hour, images.c.class_name).order_by(hour)).mappings()]
        depth = conn.execute(select(func.count()).select_from(jobs)
                             .where(jobs.c.status.in_((PENDING, CLAIMED)))).scalar_one()
        errors = [dict(r) for r in conn.execute(
            select(images.c.error, func.count().label("count")).where(images.c.status == FAILED)
            .group_by(images.c.error).order_by(func.count().desc()).limit(20)).mappings()]
        active = active_model(conn)
        done = conn.execute(select(func.count()).select_from(images).where(images.c.status == DONE)).scalar_one()
    return {"per_hour": per_hour, "queue_depth": depth, "errors": errors, "scored": done,
            "active_model": active["name"] if active else None,
            "active_by_class": active["by_class"] if active else {},
            "active_detector": active["detector"] if active else None,
            "fallback": active["fallback"] if active else None,
            "random_weights": active["random_weights"] if active else None}


def export_csv(engine: Engine, class_name: str | None = None, model_version_id: int | None = None) -> str:
    """Every scored image (by its class's active version, or ``model_version_id``) with the model version,
    its decision at that version's current threshold and its full review history; a DICOM image also its
    frame and UIDs (``store.dicom.EVENT_FIELDS``, empty for other images)."""
    from .dicom import EVENT_FIELDS
    from .schema import dicom_images

    th, out = _latest_thresholds(), io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["image_id", "path", "class_name", "model_version", "image_score", "threshold_version",
                     "threshold", "decision", "scored_at", "review_verdict", "reviewer", "review_reason",
                     "reviewed_at", *EVENT_FIELDS])
    query = (select(images.c.id, images.c.path, images.c.class_name, model_versions.c.name.label("model_version"),
                    results.c.image_score, th.c.version, th.c.value, results.c.created_at, reviews.c.verdict,
                    reviews.c.reviewer, reviews.c.reason, reviews.c.created_at.label("reviewed_at"),
                    images.c.frame, dicom_images.c.image_id.label("dicom"), dicom_images.c.frames,
                    dicom_images.c.study_uid, dicom_images.c.series_uid, dicom_images.c.sop_uid)
             .join(results, results.c.image_id == images.c.id)
             .join(model_versions, model_versions.c.id == results.c.model_version_id)
             .join(th, _threshold_join(th), isouter=True)
             .join(reviews, reviews.c.image_id == images.c.id, isouter=True)
             .join(dicom_images, dicom_images.c.image_id == images.c.id, isouter=True)
             .order_by(images.c.id, reviews.c.id))
    if class_name:
        query = query.where(images.c.class_name == class_name)
    with engine.connect() as conn:
        for r in conn.execute(query.where(version_filter(conn, model_version_id))):
            decision = "" if r.value is None else ("defect" if r.image_score >= r.value else "normal")
            writer.writerow([r.id, r.path, r.class_name, r.model_version, f"{r.image_score:.6f}", r.version or "",
                             r.value if r.value is not None else "", decision, r.created_at, r.verdict or "",
                             r.reviewer or "", r.reason or "", r.reviewed_at or "",
                             *([r.frame, r.frames, r.study_uid or "", r.series_uid or "", r.sop_uid or ""]
                               if r.dicom is not None else [""] * 5)])
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
    if grant == "registered" and sha256_of(data) != sha:
        raise ImageNotAllowed(f"{path}: the file changed since it was scored")
    return data


__all__: Sequence[str] = [
    "UNDONE",
    "VERDICTS",
    "ReviewError",
    "accept_low_scores",
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
    "undo_reviews",
]
