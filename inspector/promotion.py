"""Promotion, shadow and backfill: the services behind `inspector models promote | shadow | history`.

A promotion switches the *new* images of a class (or of the site) to a version at once: routing reads the
promotions table for every image it registers, and every watcher and worker re-reads it within a few
seconds. ``rescore`` also queues history for the new version (backfill jobs, claimed after live images),
so the dashboard can show the new version's results for images scored before the switch. A shadow version
scores new images beside the active one; its results are stored and compared, and never decide anything.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
from typing import Any

from .config import Settings
from .pipeline import import_legacy_registry, record_version
from .store.db import open_store
from .store.routing import enqueue_backfill
from .store.schema import PROMOTE, SHADOW, UNSHADOW
from .store.versions import (
    VersionError,
    list_model_versions,
    promoted_map,
    promotion_history,
    record_promotion,
    shadow_versions,
)
from .versions import recipe_from_registry

log = logging.getLogger(__name__)


def parse_since(value: str | None) -> tuple[bool, dt.datetime | None]:
    """``--rescore`` value -> (rescore?, since). "all" = all history; a date or ISO time (UTC); "7d", "12h"."""
    if value is None:
        return False, None
    text = value.strip().lower()
    if text == "all":
        return True, None
    units = {"d": "days", "h": "hours", "m": "minutes"}
    if text[:-1].isdigit() and text[-1:] in units:
        return True, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None) - dt.timedelta(**{units[text[-1]]: int(text[:-1])})
    try:
        when = dt.datetime.fromisoformat(value.strip())
    except ValueError:
        raise VersionError(f"--rescore takes 'all', a date (2026-11-30), an ISO time or an age (7d, 12h), "
                           f"not '{value}'") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return True, when


def promote(settings: Settings, name: str, class_name: str | None = None, who: str | None = None,
            note: str | None = None, rescore: str | None = None) -> dict[str, Any]:
    """Make registered version ``name`` the active one for ``class_name`` (None: the site). Returns the
    promotion row plus ``version``, ``random_weights`` and ``backfill`` (jobs queued by ``rescore``)."""
    do_rescore, since = parse_since(rescore)
    recipe = recipe_from_registry(settings, name)
    engine = open_store(settings.database.url, auto_upgrade=True)
    try:
        import_legacy_registry(engine, settings)
        version = record_version(engine, recipe)
        row = record_promotion(engine, version, class_name, PROMOTE, who or getpass.getuser(), note)
        queued = enqueue_backfill(engine, version, class_name, since) if do_rescore else 0
    finally:
        engine.dispose()
    return {**row, "version": recipe.name, "digest": recipe.digest, "random_weights": recipe.random_weights,
            "backfill": queued}


def shadow(settings: Settings, name: str, class_name: str | None, who: str | None = None,
           note: str | None = None, stop: bool = False) -> dict[str, Any]:
    """Start (or ``stop``) scoring the new images of ``class_name`` with ``name`` beside the active version."""
    recipe = recipe_from_registry(settings, name)
    engine = open_store(settings.database.url, auto_upgrade=True)
    try:
        version = record_version(engine, recipe)
        with engine.connect() as conn:
            running = version in shadow_versions(conn, class_name)
        if stop and not running:
            raise VersionError(f"{recipe.name} is not in shadow for {class_name or 'the site'}")
        if not stop and running:
            raise VersionError(f"{recipe.name} is already in shadow for {class_name or 'the site'}")
        row = record_promotion(engine, version, class_name, UNSHADOW if stop else SHADOW,
                               who or getpass.getuser(), note)
    finally:
        engine.dispose()
    return {**row, "version": recipe.name, "digest": recipe.digest}


def history(settings: Settings, class_name: str | None = None) -> list[dict[str, Any]]:
    engine = open_store(settings.database.url, auto_upgrade=True)
    try:
        import_legacy_registry(engine, settings)
        return promotion_history(engine, class_name)
    finally:
        engine.dispose()



def placements(settings: Settings) -> dict[str, dict[str, list[str]]]:
    """registry name -> {"active_for": scopes, "shadow_for": scopes} ("site" or class names)."""
    engine = open_store(settings.database.url, auto_upgrade=True)
    try:
        import_legacy_registry(engine, settings)
        names = {v["id"]: v["registry_name"] or v["name"] for v in list_model_versions(engine)}
        out: dict[str, dict[str, list[str]]] = {}

        def add(version: int, key: str, scope: str | None) -> None:
            entry = out.setdefault(names[version], {"active_for": [], "shadow_for": []})
            if (scope or "site") not in entry[key]:
                entry[key].append(scope or "site")

        scopes = {r["class_name"] for r in promotion_history(engine)}
        with engine.connect() as conn:
            for scope, version in promoted_map(conn).items():
                add(version, "active_for", scope)
            for scope in scopes:
                for version in shadow_versions(conn, scope):
                    add(version, "shadow_for", scope)
    finally:
        engine.dispose()
    return out
