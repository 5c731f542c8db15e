"""Dashboard logic with Streamlit's AppTest, on a database filled by the real pipeline (test-tiny), and the
review page's pictures (heat overlay, fitting, zoom) on real images."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from inspector.store import results, reviews, thresholds

from .pipeline_helpers import image_list, run_cli, scored_database, small_png, table_rows

APP = str(Path(__file__).parents[1] / "dashboard" / "app.py")


@pytest.fixture(scope="module")
def scored_db(tmp_path_factory):
    return scored_database(tmp_path_factory.mktemp("dash"), count=6, seed=500)


def open_app(db: str, monkeypatch, page: str | None = None, **query: str):
    """The dashboard on ``db``, no password, after its first run (on ``page``, a page script's file name)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INSPECTOR_DATABASE__URL", db)
    monkeypatch.delenv("INSPECTOR_DASHBOARD__PASSWORD", raising=False)
    monkeypatch.delenv("INSPECTOR_CONFIG", raising=False)
    at = AppTest.from_file(APP, default_timeout=60)
    at.query_params.update(query)
    at.run()
    assert not at.exception, at.exception
    if page is not None:
        at.switch_page(page).run()
        assert not at.exception, at.exception
    return at


@pytest.fixture
def app(scored_db, monkeypatch):
    return open_app(scored_db, monkeypatch)


def images_shown(at) -> list[str]:
    """The alt texts of the pictures on the page ("image #3", "overlay of image #3", "zoom of image #3")."""
    return [img.alt for element in at.get("image") for img in element.proto.imgs]


def markdown(at) -> str:
    return "\n".join(m.value for m in at.markdown)


def current_image(at) -> int:
    (alt,) = [a for a in images_shown(at) if a.startswith("overlay of image #")]
    return int(alt.rsplit("#", 1)[1])


def test_review_needs_a_name_then_records_verdicts(app, scored_db):
    first = current_image(app)
    # a 64 px part is shown whole at 4x: no zoom crop, which would show the same pixels again
    assert images_shown(app) == [f"image #{first}", f"overlay of image #{first}"]
    assert any("No zoom: the whole image is shown" in c.value for c in app.caption)
    assert app.button(key="reject").disabled and any("Enter your name" in w.value for w in app.warning)
    app.text_input(key="reviewer").input("ana").run()
    app.text_input(key=f"reason_{first}").input("burr")
    app.button(key="reject").click().run()
    assert not app.exception
    saved = table_rows(scored_db, reviews)
    assert [(r["verdict"], r["reviewer"], r["reason"], r["image_id"]) for r in saved] == [("defect", "ana", "burr", first)]
    second = current_image(app)
    assert second != first, "the next unreviewed image follows at once"
    app.button(key="accept").click().run()
    assert [r["verdict"] for r in table_rows(scored_db, reviews)] == ["defect", "normal"]
    # undo: a new review row restores the state before (unreviewed), and the page shows that image again
    app.button(key="undo").click().run()
    assert not app.exception and current_image(app) == second
    rows = table_rows(scored_db, reviews)
    assert [(r["image_id"], r["verdict"], r["reason"]) for r in rows][-1] == (second, "unreviewed",
                                                                               f"undo of review #{rows[1]['id']}")
    assert len(rows) == 3, "history is kept: nothing was deleted"


def test_review_page_shows_where_the_image_comes_from(scored_db, monkeypatch):
    from sqlalchemy import create_engine, update

    from inspector.store import sources

    engine = create_engine(scored_db)
    with engine.begin() as conn:  # the source's production line, as `[[sources]] line` sets it
        conn.execute(update(sources).values(line="press 3"))
    engine.dispose()
    app = open_app(scored_db, monkeypatch)
    text = markdown(app)
    assert "line **press 3**" in text
    image = current_image(app)
    (row,) = [r for r in image_list(scored_db) if r["id"] == image]
    assert row["path"] in text and str(Path(row["path"]).parent) in text  # the full path and its source folder
    assert "**Scored**" in text and "UTC" in text and "bayes-pfl@" in text  # when, and by which model version
    captions = [img.caption for element in app.get("image") for img in element.proto.imgs]
    assert any("original · 64 × 64 px" in c for c in captions)


def test_a_link_opens_one_image_and_the_verdict_returns_to_the_queue(scored_db, monkeypatch):
    from sqlalchemy import create_engine, select

    from inspector.store import results

    engine = create_engine(scored_db)
    with engine.connect() as conn:  # the lowest score: the last image of the queue
        target = conn.execute(select(results.c.image_id).order_by(results.c.image_score).limit(1)).scalar()
    engine.dispose()
    linked = open_app(scored_db, monkeypatch, image=str(target))
    assert current_image(linked) == target
    linked.text_input(key="reviewer").input("ana").run()
    linked.button(key="skip").click().run()
    assert not linked.exception and "image" not in linked.query_params
    assert [(r["image_id"], r["verdict"]) for r in table_rows(scored_db, reviews)][-1] == (target, "skip")
    assert current_image(linked) != target


def test_accept_low_scores_of_the_page(tmp_path, monkeypatch):
    db = scored_database(tmp_path, count=6, seed=700)
    at = open_app(db, monkeypatch, page="thresholds_page.py")
    at.text_input(key="reviewer").input("ana").run()
    every = sorted(float(v) for v in _class_scores(db))
    at.number_input(key="t_typed").set_value(every[3]).run()  # three images below it
    at.button(key="t_save").click().run()
    at.switch_page("review_page.py").run()
    assert "Accept low scores (3)" in [p.proto.popover.label for p in at.get("popover")]
    at.button(key="accept_low").click().run()
    assert not at.exception
    saved = table_rows(db, reviews)
    assert len(saved) == 3 and {(r["verdict"], r["reviewer"]) for r in saved} == {("normal", "ana")}
    at.switch_page("overview_page.py").run()
    labels = {m.label: m.value for m in at.metric}
    assert labels["Flagged (24 h)"] == "50.0 %"  # 3 of 6 at or above the threshold, as a percentage
    assert "50.0 %" in str(at.dataframe[0].value.to_dict())
    at.switch_page("review_page.py").run()
    at.button(key="undo").click().run()  # one undo takes back the whole action
    assert [r["verdict"] for r in table_rows(db, reviews)][3:] == ["unreviewed"] * 3


def test_accept_low_scores_leaves_the_audit_sample_to_the_reviewer(tmp_path, monkeypatch):
    """Issue #10's audit sample (a random share of passes, drawn when stored) is reviewed one by one: the
    page's bulk accept skips it, and the "audit sample" filter lists what is left of it."""
    from inspector.store import open_store
    from inspector.store.review import active_version_id, save_threshold

    db = scored_database(tmp_path, count=4, seed=300)
    engine = open_store(db)
    threshold = float(np.median(_class_scores(db)))
    save_threshold(engine, "screw", threshold, "ana", model_version_id=active_version_id(engine, "screw"))
    engine.dispose()
    for i in range(10):  # a second batch, stored with pass/fail decisions and half the passes audited
        small_png(tmp_path / "line1" / f"more_{i}.png", 640 + i, size=64)
    done = run_cli(["watch", str(tmp_path / "line1"), "--class-name", "screw", "--once"], db, tmp_path,
                   env={"INSPECTOR_DECISIONS__AUDIT_SHARE": "0.5"})
    assert done.returncode == 0, done.stderr[-2000:]
    rows = table_rows(db, results)
    audited = {r["image_id"] for r in rows if r["audit"]}
    low = {r["image_id"] for r in rows if r["image_score"] < threshold and not r["audit"]}
    assert audited and low, "the seeded draw audits some passes and leaves others"
    assert all(r["image_score"] < threshold for r in rows if r["audit"])  # only passes are audited
    at = open_app(db, monkeypatch)
    at.text_input(key="reviewer").input("ana").run()
    assert f"Accept low scores ({len(low)})" in [p.proto.popover.label for p in at.get("popover")]
    assert any(f"The {len(audited)} audited passes" in m.value for m in at.markdown)
    at.button(key="accept_low").click().run()
    assert not at.exception
    saved = table_rows(db, reviews)
    assert {r["image_id"] for r in saved} == low and {r["verdict"] for r in saved} == {"normal"}
    assert any(f"Accepted {len(low)} low-score images" in c.value for c in at.caption)
    at.selectbox(key="f_reviewed").set_value("audit sample").run()
    assert not at.exception
    assert current_image(at) in audited and "**audit sample**" in " ".join(c.value for c in at.caption)


def test_review_page_shows_a_dicom_frame_with_its_panel(tmp_path, monkeypatch):
    """A DICOM file is no picture Pillow opens: the page shows its frame in the window it was scored in, and
    the DICOM panel (UIDs, modality, window presets) beside it."""
    import shutil

    import pydicom  # the dicom extra, part of dev
    from pydicom.data import get_testdata_file

    folder = tmp_path / "pacs"
    folder.mkdir()
    source = get_testdata_file("CT_small.dcm", download=False)
    shutil.copy(source, folder / "IM000001")
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["watch", str(folder), "--class-name", "head CT", "--once"], db, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = image_list(db)
    at = open_app(db, monkeypatch)
    assert images_shown(at)[:2] == [f"image #{row['id']}", f"overlay of image #{row['id']}"]
    assert not at.warning or not any("cannot be shown" in w.value for w in at.warning)
    ds = pydicom.dcmread(source)
    panel = markdown(at)
    assert ds.StudyInstanceUID in panel and ds.SOPInstanceUID in panel and "CT" in panel
    assert "frame 1" in panel  # the header names the frame
    captions = [img.caption for element in at.get("image") for img in element.proto.imgs]
    assert any(f"original · {ds.Columns} × {ds.Rows} px" in c for c in captions)
    at.text_input(key="reviewer").input("ana").run()
    at.button(key="reject").click().run()
    assert not at.exception and [(r["image_id"], r["verdict"]) for r in table_rows(db, reviews)] == [
        (row["id"], "defect")]


def _class_scores(db: str) -> list[float]:
    from sqlalchemy import create_engine, select

    from inspector.store import results

    engine = create_engine(db)
    with engine.connect() as conn:
        values = list(conn.execute(select(results.c.image_score)).scalars())
    engine.dispose()
    return values


def rollback_targets(at) -> list[int]:
    """The versions the rollback box offers (its options read "v3 · 0.42 by ben")."""
    return [int(o.split(" ", 1)[0][1:]) for o in at.selectbox(key="t_rollback_version").options]


def test_thresholds_save_and_rollback(tmp_path, monkeypatch):
    scored_db = scored_database(tmp_path, count=6, seed=500)
    app = open_app(scored_db, monkeypatch, page="thresholds_page.py")
    app.text_input(key="reviewer").input("ben").run()
    slider = app.slider(key="t_value")
    scores = _class_scores(scored_db)
    # the slider spans the class's scores (not 0-1), with a step fine enough for them
    assert slider.min <= min(scores) and slider.max >= max(scores) and slider.max - slider.min < 0.9
    assert slider.step <= (max(scores) - min(scores)) / 100
    app.number_input(key="t_typed").set_value(0.42).run()  # typed outside the slider's span: the span follows
    assert app.slider(key="t_value").value == pytest.approx(0.42) and app.slider(key="t_value").min <= 0.42
    assert {m.label for m in app.metric} >= {"Threshold in force", "Precision", "Recall", "False-positive rate",
                                             "Flagged share", "Image AUROC", "Image AP"}
    assert {m.label: m.value for m in app.metric}["Threshold in force"] == "not set"
    app.text_input(key="t_note").input("first cut").run()
    app.button(key="t_save").click().run()
    # the header shows the saved threshold in the same rerun as the confirmation
    assert {m.label: m.value for m in app.metric}["Threshold in force"] == "0.42"
    assert any("as v" in s.value for s in app.success)
    app.slider(key="t_value").set_value(0.6).run()
    assert app.number_input(key="t_typed").value == pytest.approx(0.6)
    app.button(key="t_save").click().run()
    saved = sorted(table_rows(scored_db, thresholds), key=lambda r: r["version"])
    assert [(r["version"], r["value"], r["created_by"]) for r in saved][-2:] == [
        (saved[-2]["version"], 0.42, "ben"), (saved[-1]["version"], 0.6, "ben")]
    assert {m.label: m.value for m in app.metric}["Threshold in force"] == "0.6"
    # the version in force is no rollback target
    assert rollback_targets(app) == [v["version"] for v in saved[:-1]][::-1]  # not the version in force
    app.selectbox(key="t_rollback_version").set_value(saved[-2]["version"]).run()
    app.button(key="t_rollback").click().run()
    latest = max(table_rows(scored_db, thresholds), key=lambda r: r["version"])
    assert latest["value"] == 0.42 and latest["note"] == f"rollback to v{saved[-2]['version']}"
    assert {m.label: m.value for m in app.metric}["Threshold in force"] == "0.42"
    assert latest["version"] not in rollback_targets(app) and saved[-1]["version"] in rollback_targets(app)


def test_thresholds_page_shows_auroc_ap_and_curves_once_both_verdicts_exist(tmp_path, monkeypatch):
    db = scored_database(tmp_path, count=6, seed=800)
    at = open_app(db, monkeypatch)
    at.text_input(key="reviewer").input("ana").run()
    for key in ("reject", "accept", "reject", "accept"):
        at.button(key=key).click().run()
    at.switch_page("thresholds_page.py").run()
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Reviewed"] == "4 of 6"
    assert 0.0 <= float(metrics["Image AUROC"]) <= 1.0 and 0.0 <= float(metrics["Image AP"]) <= 1.0
    charts = at.get("vega_lite_chart")
    assert len(charts) == 3, "the histogram, ROC and precision-recall"
    specs = "".join(c.proto.spec for c in charts)
    assert "AUROC" in specs and "AP " in specs and "threshold" in specs
    # the histogram spans the class's scores (their quantiles), not 0-1 in fixed 0.05 bins
    import json

    histogram = json.loads(charts[0].proto.spec)
    bars = next(layer for layer in histogram["layer"] if layer["mark"]["type"] == "bar")
    lo, hi = bars["encoding"]["x"]["scale"]["domain"]
    scores = _class_scores(db)
    assert lo <= min(scores) and hi >= max(scores) and hi - lo < 0.5


def test_overview_and_export(app):
    app.switch_page("overview_page.py").run()
    assert not app.exception
    # nothing of the review page is left on the overview (its buttons, pictures, filters)
    assert not [b for b in app.button if b.key in ("accept", "reject", "skip", "undo")]
    assert not images_shown(app) and not app.get("popover")
    labels = {m.label: m.value for m in app.metric}
    assert labels["Queue depth"] == "0" and labels["Scored"] == "6" and labels["Flagged (24 h)"] == "no threshold"
    assert any("RANDOM" in e.value for e in app.error)
    assert "**Active model:** `bayes-pfl@" in markdown(app)  # the whole name, not a metric cut to its width
    assert "no threshold" in str(app.dataframe[0].value.to_dict()) and "flagged 0" not in markdown(app)
    assert not app.get("download_button")  # the export is built on demand, not on every render
    app.button(key="export_prepare").click().run()
    assert not app.exception
    exported = list(csv.DictReader(io.StringIO(app.session_state["export_csv"])))
    assert len({r["image_id"] for r in exported}) == 6  # every result, with its review history


def test_threshold_controls_scale_to_a_narrow_score_range():
    """Issue #13: scores within 0.514-0.535 made the 0-1 slider and the fixed 0.05 bins useless."""
    from inspector._dashboard import charts

    scores = np.random.default_rng(3).uniform(0.514, 0.535, 300)
    lo, hi, step, decimals = charts.slider_span(scores, include=[0.52])
    assert 0.50 < lo <= scores.min() and scores.max() <= hi < 0.55
    assert (hi - lo) / step >= 500 and step == pytest.approx(1e-5) and decimals == 5
    assert round(lo / step) * step == pytest.approx(lo, abs=1e-12)  # the ends sit on the step grid
    spec = charts.histogram(scores, scores[:0], np.zeros(0, dtype=int), lo, hi, 0.52).to_dict()
    bins = next(iter(spec["datasets"].values()))
    widths = {round(b["to"] - b["from"], 12) for b in bins}
    assert len(widths) == 1 and widths.pop() == pytest.approx((hi - lo) / 40)
    assert sum(b["images"] for b in bins) == 300


def test_many_classes_get_distinct_colours_and_a_whole_legend():
    import json

    from inspector._dashboard import charts

    for n in (3, 12, 31):
        colours = charts.palette(n)
        assert len(colours) == n == len(set(colours))
    classes = [f"class-with-a-long-name-{i:02d}" for i in range(14)]
    rows = [{"hour": "2026-01-01 10:00", "class_name": c, "images": 3, "flagged": 1, "with_threshold": 1}
            for c in classes]
    spec = json.dumps(charts.per_hour(rows, classes).to_dict())
    legend = charts.per_hour(rows, classes).to_dict()["encoding"]["color"]["legend"]
    assert legend["labelLimit"] == 0 and legend["orient"] == "right" and legend["columns"] == 2
    assert charts.per_hour(rows, classes).to_dict()["height"] >= 19 * 7  # tall enough for its 7 legend rows
    assert all(c in spec for c in charts.palette(len(classes)))


def test_the_folder_says_defect_free_or_defect_when_it_can():
    from inspector._dashboard.panels import folder_hint

    assert folder_hint("/data/mvtec/screw/test/good/000.png") == "defect-free folder 'good'"
    assert folder_hint("/data/mvtec/screw/test/thread_side/003.png") == "defect folder 'thread_side'"
    assert folder_hint("/line/NG/17.png") == "defect folder 'NG'"
    assert folder_hint("/line/camera2/2026-01-01/17.png") is None  # nothing known: nothing claimed


def test_password_gate(scored_db, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("INSPECTOR_DATABASE__URL", scored_db)
    monkeypatch.setenv("INSPECTOR_DASHBOARD__PASSWORD", "s3cret")
    at = AppTest.from_file(APP, default_timeout=60)
    at.run()
    assert len(at.text_input) == 1 and not at.button
    at.text_input(key="password").input("wrong").run()
    assert at.error and not at.button
    at.text_input(key="password").input("s3cret").run()
    assert at.text_input(key="reviewer") and at.button(key="accept")


def test_review_page_survives_a_stored_image_replaced_by_a_non_image(tmp_path, monkeypatch):
    """Issue 12 item 12: the page used to crash with no buttons, and the queue was stuck on that image."""
    db = scored_database(tmp_path, count=2, seed=900)
    for path in (tmp_path / "line1").iterdir():
        path.write_bytes(b"not an image any more")
    at = open_app(db, monkeypatch)
    assert any("cannot be shown" in w.value for w in at.warning)
    at.text_input(key="reviewer").input("ana").run()
    at.button(key="reject").click().run()
    assert not at.exception and [r["verdict"] for r in table_rows(db, reviews)] == ["defect"]


# -------------------------------------------------------------------------------------------------
# the pictures


def part(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def test_heat_is_transparent_up_to_the_floor_and_rises_above_it():
    from inspector._dashboard import heatmap

    values = np.array([[0.0, 0.3, 0.5, 0.6, 0.8, 1.0]])
    rgba = heatmap.heat_rgba(values, floor=0.5, opacity=0.8)
    assert list(rgba[0, :3, 3]) == [0, 0, 0]  # a score of 0 paints nothing (it was navy before)
    assert 0 < rgba[0, 3, 3] < rgba[0, 4, 3] < rgba[0, 5, 3] == round(0.8 * 255)


def test_pictures_fit_the_screen_and_a_small_image_is_not_blown_up():
    from inspector._dashboard import heatmap

    assert heatmap.fit((200, 150), (470, 610)) == (400, 300)  # at most twice its size
    assert heatmap.fit((64, 64), (470, 610)) == (256, 256)  # a thumbnail: by a whole factor, to be seen
    assert heatmap.fit((30, 120), (470, 610)) == (90, 360)
    assert heatmap.fit((4000, 1000), (960, 290)) == (960, 240)
    assert heatmap.fit((400, 1200), (470, 610)) == (203, 610)


def test_zoom_is_a_full_resolution_crop_around_the_peak():
    from inspector._dashboard import heatmap

    image = part((1600, 400), seed=1)
    anomaly = np.zeros((64, 64), dtype=np.float32)
    anomaly[40:44, 50:54] = 1.0  # the peak, at 52/64 of the width and 42/64 of the height
    views = heatmap.render(image, anomaly, (960, 290), threshold=0.5)
    x, y = views.peak
    assert abs(x - 52 / 64 * 1600) < 30 and abs(y - 42 / 64 * 400) < 10
    left, top, right, bottom = views.zoom_box
    assert (right - left, bottom - top) == (256, 256) and 0 <= left and 0 <= top and right <= 1600 and bottom <= 400
    zoom = Image.open(io.BytesIO(views.zoom))
    assert views.zoom_scale == 1 and np.array_equal(np.asarray(zoom), np.asarray(image.crop(views.zoom_box)))
    shown = Image.open(io.BytesIO(views.overlay))
    assert shown.size == views.shown == (960, 240)
    original = np.asarray(Image.open(io.BytesIO(views.original)), dtype=np.int16)
    overlay = np.asarray(shown, dtype=np.int16)
    # away from the peak the overlay is the image itself (JPEG noise aside); at the peak it is tinted
    assert np.abs(overlay[:60, :300] - original[:60, :300]).mean() < 6
    # inside the hot square (rows 150-165, columns 750-810 on screen)
    assert np.abs(overlay[153:162, 760:800] - original[153:162, 760:800]).mean() > 30
