"""Model versions: written once, promoted site-wide or per class, the promotion history kept."""

from __future__ import annotations

import json
import warnings

import pytest

from inspector.registry import RegistryError, list_versions, read_manifest, register_model
from inspector.store.db import open_store
from inspector.store.versions import promoted_version, version_row


def test_register_promote_and_active_versions(tiny_model, tmp_path):
    from inspector.promotion import history, promote

    from .conftest import tiny_settings

    for name in ("v1", "v2", "v3"):
        register_model(tmp_path / "models", name, tiny_model, {"kind": "test"})
    with pytest.raises(RegistryError, match="already exists"):
        register_model(tmp_path / "models", "v1", tiny_model, {"kind": "test"})
    with pytest.raises(RegistryError, match="invalid model name"):
        register_model(tmp_path / "models", "../evil", tiny_model, {"kind": "test"})
    assert [v["name"] for v in list_versions(tmp_path / "models")] == ["v1", "v2", "v3"]
    assert read_manifest(tmp_path / "models" / "v2")["head"]["sha256"]
    settings = tiny_settings(allow_random_weights=True)
    settings.registry.path = str(tmp_path / "models")
    settings.database.url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    engine = open_store(settings.database.url, auto_upgrade=True)
    with engine.connect() as conn:
        assert promoted_version(conn, None) is None
    promote(settings, "v1", who="ana", note="first")
    promote(settings, "v2", class_name="screw", who="ben")

    def active(class_name):
        with engine.connect() as conn:
            return version_row(conn, promoted_version(conn, class_name))["name"]

    assert active(None) == "v1" and active("screw") == "v2"
    assert active("nut") == "v1"  # falls back to the site-wide version
    promote(settings, "v3", who="ana")
    assert active(None) == "v3" and active("screw") == "v2"
    rows = history(settings)
    assert [(p["model"], p["class_name"], p["created_by"], p["action"]) for p in rows] == [
        ("v1", None, "ana", "promote"), ("v2", "screw", "ben", "promote"), ("v3", None, "ana", "promote")]
    assert rows[0]["note"] == "first" and all(p["created_at"] for p in rows)
    with pytest.raises(RegistryError, match="no model 'v9'"):
        promote(settings, "v9")
    engine.dispose()


def test_legacy_promotions_file_is_imported_once(tiny_model, tmp_path):
    from inspector.promotion import history

    from .conftest import tiny_settings

    register_model(tmp_path / "models", "old", tiny_model, {"kind": "test"})
    lines = [{"model": "old", "class_name": None, "by": "ana", "at": "2026-11-20T10:00:00+00:00", "note": "first"},
             {"model": "old", "class_name": "screw", "by": "ben", "at": "2026-11-21T10:00:00+00:00", "note": None}]
    legacy = tmp_path / "models" / "promotions.jsonl"
    legacy.write_text("".join(json.dumps(line) + "\n" for line in lines))
    settings = tiny_settings(allow_random_weights=True)
    settings.registry.path = str(tmp_path / "models")
    settings.database.url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    rows = history(settings)
    assert [(r["model"], r["class_name"], r["created_by"], r["note"]) for r in rows] == [
        ("old", None, "ana", "first"), ("old", "screw", "ben", None)]
    assert str(rows[0]["created_at"]).startswith("2026-11-20 10:00")
    assert not legacy.exists() and (tmp_path / "models" / "promotions.jsonl.imported").is_file()
    assert len(history(settings)) == 2  # not imported twice


def test_watch_uses_the_version_promoted_for_its_class(tiny_model, tmp_path):
    from inspector.pipeline import load_detector
    from inspector.promotion import promote

    from .conftest import tiny_settings

    register_model(tmp_path / "models", "site", tiny_model, {"kind": "test"})
    register_model(tmp_path / "models", "screw-v2", tiny_model, {"kind": "test"})
    settings = tiny_settings(allow_random_weights=True)
    settings.registry.path = str(tmp_path / "models")
    settings.database.url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    promote(settings, "site")
    promote(settings, "screw-v2", class_name="screw")
    engine = open_store(settings.database.url)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_detector(settings, "screw", engine).provenance["model"] == "screw-v2"
        assert load_detector(settings, "nut", engine).provenance["model"] == "site"
    engine.dispose()
