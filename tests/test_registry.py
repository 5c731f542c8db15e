"""Model versions: written once, promoted site-wide or per class, the promotion history kept."""

from __future__ import annotations

import json
import warnings

import pytest

from inspector.registry import (
    RegistryError,
    active_version,
    list_versions,
    promote,
    promotions,
    read_manifest,
    register_model,
)


def test_register_promote_and_active_versions(tiny_model, tmp_path):
    for name in ("v1", "v2", "v3"):
        register_model(tmp_path, name, tiny_model, {"kind": "test"})
    with pytest.raises(RegistryError, match="already exists"):
        register_model(tmp_path, "v1", tiny_model, {"kind": "test"})
    with pytest.raises(RegistryError, match="invalid model name"):
        register_model(tmp_path, "../evil", tiny_model, {"kind": "test"})
    assert [v["name"] for v in list_versions(tmp_path)] == ["v1", "v2", "v3"]
    assert read_manifest(tmp_path / "v2")["head"]["sha256"]
    assert active_version(tmp_path) is None
    promote(tmp_path, "v1", who="ana", note="first")
    promote(tmp_path, "v2", class_name="screw", who="ben")
    assert active_version(tmp_path) == "v1"
    assert active_version(tmp_path, "screw") == "v2"
    assert active_version(tmp_path, "nut") == "v1"  # falls back to the site-wide version
    promote(tmp_path, "v3", who="ana")
    assert active_version(tmp_path) == "v3" and active_version(tmp_path, "screw") == "v2"
    history = promotions(tmp_path)
    assert [(p["model"], p["class_name"], p["by"]) for p in history] == [
        ("v1", None, "ana"), ("v2", "screw", "ben"), ("v3", None, "ana")]
    assert all(p["at"] for p in history)
    with pytest.raises(RegistryError, match="no model 'v9'"):
        promote(tmp_path, "v9")
    lines = (tmp_path / "promotions.jsonl").read_text().splitlines()
    assert len(lines) == 3 and json.loads(lines[0])["note"] == "first"


def test_watch_uses_the_version_promoted_for_its_class(tiny_model, tmp_path):
    from inspector.pipeline import load_detector

    from .conftest import tiny_settings

    register_model(tmp_path / "models", "site", tiny_model, {"kind": "test"})
    register_model(tmp_path / "models", "screw-v2", tiny_model, {"kind": "test"})
    promote(tmp_path / "models", "site")
    promote(tmp_path / "models", "screw-v2", class_name="screw")
    settings = tiny_settings(allow_random_weights=True)
    settings.registry.path = str(tmp_path / "models")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert load_detector(settings, "screw").provenance["model"] == "screw-v2"
        assert load_detector(settings, "nut").provenance["model"] == "site"
