"""Reviewer verdicts for detectors that learn from the line (MuSc's rolling pools): what changed since a
review id, one verdict per image.

``pipeline.Models.sync_reviews`` calls ``pool_reviews_since`` before each batch with the newest review id it
has seen, and passes the result to each detector's ``on_reviews(defects, normals=...)``.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import Engine, func, select

from .schema import images, reviews

__all__ = ["PoolReview", "pool_reviews_since"]


class PoolReview(NamedTuple):
    """One reviewed image: its class, its path now, and a key that names the file's content (its SHA-256,
    or the path when the row has none)."""

    class_name: str
    path: str
    key: str


def pool_reviews_since(engine: Engine, after_id: int = 0) -> tuple[list[PoolReview], list[PoolReview], int]:
    """(defects, normals, newest id): every image with a review after ``after_id``, once, by its *latest*
    review (a reviewer who changed their mind counts once, with the last word), in the order of those
    reviews; images whose latest verdict is neither (``skip``, an undone review) are in neither list. The
    newest id is the next call's ``after_id``."""
    with engine.connect() as conn:
        newest = conn.execute(select(func.max(reviews.c.id)).where(reviews.c.id > after_id)).scalar()
        if newest is None:
            return [], [], after_id
        latest = (select(func.max(reviews.c.id).label("id")).where(reviews.c.image_id.in_(
            select(reviews.c.image_id).where(reviews.c.id > after_id, reviews.c.id <= newest)))
            .where(reviews.c.id <= newest).group_by(reviews.c.image_id).subquery())
        rows = conn.execute(select(reviews.c.verdict, images.c.class_name, images.c.path, images.c.sha256)
                            .join(latest, latest.c.id == reviews.c.id)
                            .join(images, images.c.id == reviews.c.image_id).order_by(reviews.c.id)).all()
    defects, normals = [], []
    for r in rows:
        entry = PoolReview(r.class_name, r.path, r.sha256 or r.path)
        if r.verdict == "defect":
            defects.append(entry)
        elif r.verdict == "normal":
            normals.append(entry)
    return defects, normals, int(newest)
