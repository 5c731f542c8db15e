"""Dashboard logic with Streamlit's AppTest, on a database filled by the real pipeline (test-tiny)."""

from __future__ import annotations

from pathlib import Path

import pytest

from inspector.store import reviews, thresholds

from .pipeline_helpers import scored_database, table_rows

APP = str(Path(__file__).parents[1] / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def scored_db(tmp_path_factory):
    return scored_database(tmp_path_factory.mktemp("dash"), count=6, seed=500)


def open_app(db: str, monkeypatch):
    """The dashboard on ``db``, no password, after its first run."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INSPECTOR_DATABASE__URL", db)
    monkeypatch.delenv("INSPECTOR_DASHBOARD__PASSWORD", raising=False)
    monkeypatch.delenv("INSPECTOR_CONFIG", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    return at


@pytest.fixture
def app(scored_db, monkeypatch):
    return open_app(scored_db, monkeypatch)


def test_review_needs_a_name_then_records_verdicts(app, scored_db):
    assert len(app.get("image")) == 1, "the current image with its heatmap overlay is shown"
    assert app.button(key="reject").disabled and any("Enter your name" in w.value for w in app.warning)
    first = app.caption[0].value
    app.sidebar.text_input(key="reviewer").input("ana").run()
    app.text_input(key=next(w.key for w in app.text_input if w.key.startswith("reason_"))).input("burr")
    app.button(key="reject").click().run()
    assert not app.exception
    saved = table_rows(scored_db, reviews)
    assert [(r["verdict"], r["reviewer"], r["reason"]) for r in saved] == [("defect", "ana", "burr")]
    assert app.caption[0].value != first, "the next unreviewed image follows at once"
    app.button(key="accept").click().run()
    assert [r["verdict"] for r in table_rows(scored_db, reviews)] == ["defect", "normal"]


def test_thresholds_save_and_rollback(app, scored_db):
    app.sidebar.text_input(key="reviewer").input("ben").run()
    app.sidebar.radio(key="page").set_value("Thresholds").run()
    assert not app.exception
    app.slider(key="t_value").set_value(0.42).run()
    assert len(app.metric) == 4
    app.text_input(key="t_note").input("first cut").run()
    app.button(key="t_save").click().run()
    app.slider(key="t_value").set_value(0.6).run()
    app.button(key="t_save").click().run()
    saved = sorted(table_rows(scored_db, thresholds), key=lambda r: r["version"])
    assert [(r["version"], r["value"], r["created_by"]) for r in saved][-2:] == [
        (saved[-2]["version"], 0.42, "ben"), (saved[-1]["version"], 0.6, "ben")]
    app.selectbox(key="t_rollback_version").set_value(saved[-2]["version"]).run()
    app.button(key="t_rollback").click().run()
    latest = max(table_rows(scored_db, thresholds), key=lambda r: r["version"])
    assert latest["value"] == 0.42 and latest["note"] == f"rollback to v{saved[-2]['version']}"


def test_overview_and_export(app):
    app.sidebar.radio(key="page").set_value("Overview").run()
    assert not app.exception
    labels = {m.label: m.value for m in app.metric}
    assert labels["Queue depth"] == "0" and labels["Scored"] == "6"
    assert any("RANDOM" in e.value for e in app.error)
    assert not app.get("download_button")  # the export is built on demand, not on every render
    app.button(key="export_prepare").click().run()
    assert not app.exception and app.session_state["export_csv"].count("\n") == 7  # header + 6 results


def test_password_gate(scored_db, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INSPECTOR_DATABASE__URL", scored_db)
    monkeypatch.setenv("INSPECTOR_DASHBOARD__PASSWORD", "s3cret")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert len(at.sidebar.radio) == 0 and len(at.text_input) == 1
    at.text_input(key="password").input("wrong").run()
    assert at.error and len(at.sidebar.radio) == 0
    at.text_input(key="password").input("s3cret").run()
    assert len(at.sidebar.radio) == 1


def test_review_page_survives_a_stored_image_replaced_by_a_non_image(tmp_path, monkeypatch):
    """Issue 12 item 12: the page used to crash with no buttons, and the queue was stuck on that image."""
    db = scored_database(tmp_path, count=2, seed=900)
    for path in (tmp_path / "line1").iterdir():
        path.write_bytes(b"not an image any more")
    at = open_app(db, monkeypatch)
    assert any("cannot be shown" in w.value for w in at.warning)
    at.sidebar.text_input(key="reviewer").input("ana").run()
    at.button(key="reject").click().run()
    assert not at.exception and [r["verdict"] for r in table_rows(db, reviews)] == ["defect"]
