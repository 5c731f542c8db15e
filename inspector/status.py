"""The service behind `inspector status`: read-only, and light (no model code, no torch), so it answers fast."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

from .config import Settings
from .stats import escape_rate
from .store.db import open_store
from .store.outbox import backlog
from .store.queue import status
from .store.review import escape_counts


def status_json(settings: Settings, escape_days: float = 7.0) -> str:
    """`inspector status --json`: the queue per version, the outbox backlog per sink, and the escape-rate
    estimate per class and line over the last ``escape_days`` (defects among audited passes, 95 % exact
    interval, scaled to all passes)."""
    engine = open_store(settings.database.url)
    try:
        data = status(engine)
        data["outbox"] = backlog(engine)
        since = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(days=escape_days)
        data["escape_window_days"] = escape_days
        data["escape"] = [{**row, **dataclasses.asdict(escape_rate(row["passes"], row["audited"], row["found"]))}
                          for row in escape_counts(engine, since)]
        return json.dumps(data, default=str)
    finally:
        engine.dispose()
