"""Model versions and promotions, in the database every box shares.

A version row is keyed by ``digest`` (see ``inspector/versions.py`` for what it hashes) and carries a human
``name``. Promotions are append-only rows: ``promote`` makes a version the active one for a class (or the
site, ``class_name`` None), ``shadow`` / ``unshadow`` start and stop scoring new images of a class with a
candidate beside the active version. The active version of a class is its latest ``promote`` row, or the
site's; nothing is ever updated in place, so the history answers "who switched line 3, when, and why".
"""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import Engine, or_, select
from sqlalchemy.exc import IntegrityError

from ..errors import InspectorError
from .db import utcnow
from .schema import PROMOTE, SHADOW, UNSHADOW, model_versions, promotions


class VersionError(InspectorError, ValueError):
    """A model version that cannot be recorded or promoted as asked; the message says why."""


def ensure_model_version(engine: Engine, name: str, detector: str, manifest: dict[str, Any],
                         random_weights: bool, digest: str | None = None, registry_name: str | None = None) -> int:
    """The id of the version with ``digest`` (recorded first if new). Without a digest (tests, legacy
    callers) the name is the identity. A name already held by another digest gets ``@<digest[:8]>``."""
    import hashlib

    digest = digest or hashlib.sha256(f"name\0{name}".encode()).hexdigest()
    for _ in range(3):  # two boxes starting together race to insert the same version: then read it
        try:
            with engine.begin() as conn:
                row = conn.execute(select(model_versions.c.id).where(model_versions.c.digest == digest)).first()
                if row is not None:
                    return row.id
                taken = conn.execute(select(model_versions.c.id).where(model_versions.c.name == name)).first()
                stored_name = f"{name}@{digest[:8]}" if taken is not None else name
                return conn.execute(model_versions.insert().values(
                    name=stored_name, detector=detector, digest=digest, registry_name=registry_name,
                    manifest=json.dumps(manifest, sort_keys=True, default=str),
                    random_weights=random_weights, created_at=utcnow())).inserted_primary_key[0]
        except IntegrityError:
            continue
    raise VersionError(f"could not record model version {name}")


def version_row(conn: Any, version: int | str) -> dict[str, Any] | None:
    """A version by id, by name, or by digest (or a unique digest prefix of 8+ characters)."""
    c = model_versions.c
    if isinstance(version, int):
        where = c.id == version
    else:
        where = or_(c.name == version, c.digest == version)
        if len(version) >= 8 and all(ch in "0123456789abcdef" for ch in version):
            where = or_(where, c.digest.like(f"{version}%"))
    rows = conn.execute(select(model_versions).where(where).order_by(c.id)).mappings().all()
    exact = [r for r in rows if r["name"] == version or r["digest"] == version or r["id"] == version]
    if exact:
        return dict(exact[0])
    if len(rows) > 1:
        raise VersionError(f"'{version}' names {len(rows)} model versions; give more of the digest")
    return dict(rows[0]) if rows else None


def list_model_versions(engine: Engine) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(model_versions).order_by(model_versions.c.id)).mappings()]


def record_promotion(engine: Engine, model_version_id: int, class_name: str | None, action: str, who: str,
                     note: str | None = None, at: Any = None) -> dict[str, Any]:
    """Append one promotion row (``promote``, ``shadow`` or ``unshadow``)."""
    if action not in (PROMOTE, SHADOW, UNSHADOW):
        raise VersionError(f"unknown promotion action '{action}'")
    if not who or not who.strip():
        raise VersionError("a name is required to promote a model version")
    values = {"model_version_id": model_version_id, "class_name": class_name or None, "action": action,
              "created_by": who.strip(), "created_at": at or utcnow(), "note": note or None}
    with engine.begin() as conn:
        values["id"] = conn.execute(promotions.insert().values(**values)).inserted_primary_key[0]
    return values


def promotion_history(engine: Engine, class_name: str | None = None) -> list[dict[str, Any]]:
    query = (select(promotions, model_versions.c.name.label("model"))
             .join(model_versions, model_versions.c.id == promotions.c.model_version_id).order_by(promotions.c.id))
    if class_name is not None:
        query = query.where(promotions.c.class_name == class_name)
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(query).mappings()]


def promoted_version(conn: Any, class_name: str | None) -> int | None:
    """The version promoted for ``class_name`` (its latest promote row), else the site's, else None."""
    for scope in ([class_name] if class_name is not None else []) + [None]:
        where = promotions.c.class_name.is_(None) if scope is None else promotions.c.class_name == scope
        row = conn.execute(select(promotions.c.model_version_id).where(where, promotions.c.action == PROMOTE)
                           .order_by(promotions.c.id.desc()).limit(1)).first()
        if row is not None:
            return row.model_version_id
    return None


def promoted_map(conn: Any) -> dict[str | None, int]:
    """scope (class name, None for the site) -> promoted version id."""
    out: dict[str | None, int] = {}
    for row in conn.execute(select(promotions.c.class_name, promotions.c.model_version_id)
                            .where(promotions.c.action == PROMOTE).order_by(promotions.c.id)):
        out[row.class_name] = row.model_version_id
    return out


def shadow_versions(conn: Any, class_name: str | None) -> list[int]:
    """Versions in shadow for ``class_name`` (or site-wide), in the order they were started."""
    where = promotions.c.class_name.is_(None)
    if class_name is not None:
        where = or_(where, promotions.c.class_name == class_name)
    state: dict[tuple[str | None, int], bool] = {}
    for row in conn.execute(select(promotions.c.class_name, promotions.c.model_version_id, promotions.c.action)
                            .where(where, promotions.c.action.in_((SHADOW, UNSHADOW))).order_by(promotions.c.id)):
        state[(row.class_name, row.model_version_id)] = row.action == SHADOW
    seen: list[int] = []
    for (_, version), on in state.items():
        if on and version not in seen:
            seen.append(version)
    return seen
