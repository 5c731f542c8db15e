"""The outbox: decision events on their way to the line, written in the transaction that stores the result.

A crash between storing a result and sending its event loses nothing: the event row is there, ``pending``,
and the next dispatcher sends it. Delivery is at least once (a row is marked ``sent`` only after its sink
accepted it; a crash in between sends it again, with the same ``id``), and in order per (sink, source): a
dispatcher takes a sink's rows oldest first and stops at the first that fails, holding the rest until it
goes through (``delivery.py``).
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterable
from typing import Any

from sqlalchemy import Engine, func, select, update

from .db import utcnow
from .schema import outbox

PENDING, SENT = "pending", "sent"


def enqueue(conn: Any, result_id: int, source_id: int | None, event: dict[str, Any], sinks: Iterable[str]) -> None:
    now = utcnow()
    payload = json.dumps(event, sort_keys=True, default=str)
    for sink in sinks:
        conn.execute(outbox.insert().values(result_id=result_id, sink=sink, source_id=source_id, payload=payload,
                                            status=PENDING, attempts=0, next_attempt_at=now, created_at=now))


def due(engine: Engine, sink: str, source_ids: list[int | None] | None, limit: int = 100) -> list[dict[str, Any]]:
    """The oldest pending rows of ``sink`` (of these sources; None in the list = rows without a source)."""
    query = select(outbox).where(outbox.c.sink == sink, outbox.c.status == PENDING)
    if source_ids is not None:
        known = [s for s in source_ids if s is not None]
        where = outbox.c.source_id.in_(known)
        if None in source_ids:
            where = where | outbox.c.source_id.is_(None)
        query = query.where(where)
    with engine.connect() as conn:
        rows = conn.execute(query.order_by(outbox.c.id).limit(limit)).mappings().all()
    return [dict(r) for r in rows]


def mark_sent(engine: Engine, row_id: int) -> None:
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id == row_id).values(status=SENT, sent_at=utcnow()))


def mark_failed(engine: Engine, row_id: int, error: str, retry_in: float) -> None:
    with engine.begin() as conn:
        conn.execute(update(outbox).where(outbox.c.id == row_id).values(
            attempts=outbox.c.attempts + 1, last_error=error[:2000],
            next_attempt_at=utcnow() + dt.timedelta(seconds=retry_in)))


def backlog(engine: Engine) -> dict[str, dict[str, Any]]:
    """sink -> pending count, oldest pending age (s) and its last error, for `status` and Prometheus."""
    now = utcnow()
    with engine.connect() as conn:
        rows = conn.execute(select(outbox.c.sink, func.count().label("n"), func.min(outbox.c.created_at).label("oldest"))
                            .where(outbox.c.status == PENDING).group_by(outbox.c.sink)).all()
        out = {}
        for r in rows:
            error = conn.execute(select(outbox.c.last_error).where(outbox.c.sink == r.sink, outbox.c.status == PENDING,
                                                                   outbox.c.last_error.is_not(None))
                                 .order_by(outbox.c.id).limit(1)).scalar()
            out[r.sink] = {"pending": r.n, "oldest_seconds": (now - r.oldest).total_seconds(), "last_error": error}
    return out
