"""Review and threshold queries on SQLite and a real Postgres."""

from __future__ import annotations

import csv
import io

import pytest
import torch
from sqlalchemy import func, select

from inspector.store import make_engine, results, upgrade
from inspector.store.decisions import DecisionPolicy
from inspector.store.maps import encode_map
from inspector.store.queue import Outcome, claim, complete, ensure_model_version, ensure_source, register_file
from inspector.store.review import (
    BULK_ACCEPT_REASON,
    UNDONE,
    ReviewError,
    accept_low_scores,
    escape_counts,
    export_csv,
    image_path_allowed,
    overview,
    record_review,
    review_history,
    review_queue,
    reviewed_scores,
    rollback_threshold,
    save_threshold,
    threshold_effect,
    threshold_for_recall,
    threshold_history,
    undo_reviews,
)
from inspector.store.routing import set_source_versions

SCORES = {"screw": [0.1, 0.35, 0.48, 0.52, 0.9], "nut": [0.2, 0.7]}


@pytest.fixture
def filled(db_url, tmp_path):
    upgrade(db_url)
    engine = make_engine(db_url)
    mv = ensure_model_version(engine, "m", "bayes-pfl", {}, False)
    for cls, scores in SCORES.items():
        folder = tmp_path / cls
        folder.mkdir()
        source = ensure_source(engine, str(folder), cls)
        set_source_versions(engine, source, None, mv)
        for i, score in enumerate(scores):
            path = folder / f"{i}.png"
            path.write_bytes(b"%d" % i)
            register_file(engine, source, cls, str(path), f"{cls}{i}".ljust(64, "0"), 1, 1)
    batch = claim(engine, "w", 100, 60)
    by_id = {c.id: c for c in batch}
    outcomes = []
    for image_id, c in by_id.items():
        cls, index = c.path.split("/")[-2], int(c.path.split("/")[-1][0])
        score = SCORES[cls][index]
        data, w, h = encode_map(torch.full((32, 32), score))
        outcomes.append(Outcome(image_id, result={"image_score": score, "text_score": score, "topk_score": score,
                                                  "anomaly_map": data, "map_width": w, "map_height": h}))
    complete(engine, "w", outcomes)
    yield engine, tmp_path
    engine.dispose()


def test_queue_order_filters_and_decisions(filled):
    engine, _ = filled
    rows = review_queue(engine, class_name="screw")
    assert [r["image_score"] for r in rows] == [0.9, 0.52, 0.48, 0.35, 0.1]
    assert all(r["decision"] is None for r in rows)  # no threshold yet
    save_threshold(engine, "screw", 0.5, "ana", "first cut")
    rows = review_queue(engine, class_name="screw", order="closeness")
    assert [r["image_score"] for r in rows][:2] in ([0.48, 0.52], [0.52, 0.48])
    flagged = review_queue(engine, class_name="screw", decision="defect")
    assert sorted(r["image_score"] for r in flagged) == [0.52, 0.9]
    assert len(review_queue(engine, score_min=0.3, score_max=0.6)) == 3
    page = review_queue(engine, limit=2, offset=2)
    assert [r["image_score"] for r in page] == [0.52, 0.48]
    # a new threshold version changes decisions at read time, results untouched
    with engine.connect() as conn:
        before = conn.execute(select(func.count()).select_from(results)).scalar_one()
    save_threshold(engine, "screw", 0.4, "ana")
    assert sorted(r["image_score"] for r in review_queue(engine, class_name="screw", decision="defect")) == [
        0.48, 0.52, 0.9]
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(results)).scalar_one() == before


def test_reviews_are_appended_and_need_a_name(filled):
    engine, _ = filled
    top = review_queue(engine, class_name="screw")[0]
    with pytest.raises(ReviewError, match="reviewer name is required"):
        record_review(engine, top["id"], "defect", "  ")
    with pytest.raises(ReviewError, match="verdict"):
        record_review(engine, top["id"], "maybe", "ana")
    record_review(engine, top["id"], "normal", "ana", "glare")
    record_review(engine, top["id"], "defect", "ben", "scratch visible when zoomed")
    history = review_history(engine, top["id"])
    assert [(h["verdict"], h["reviewer"]) for h in history] == [("normal", "ana"), ("defect", "ben")]
    assert review_queue(engine, class_name="screw", reviewed=True)[0]["verdict"] == "defect"
    assert len(review_queue(engine, class_name="screw", reviewed=False)) == 4


def test_threshold_versions_rollback_and_effects(filled):
    engine, _ = filled
    assert save_threshold(engine, "screw", 0.5, "ana") == 1
    assert save_threshold(engine, "screw", 0.3, "ben", "more recall") == 2
    assert rollback_threshold(engine, "screw", 1, "ana") == 3
    history = threshold_history(engine, "screw")
    assert [(h["version"], h["value"], h["created_by"]) for h in history] == [
        (3, 0.5, "ana"), (2, 0.3, "ben"), (1, 0.5, "ana")]
    assert history[0]["note"] == "rollback to v1"
    with pytest.raises(ReviewError):
        save_threshold(engine, "screw", 1.5, "ana")
    rows = review_queue(engine, class_name="screw")
    for r, verdict in zip(rows, ["defect", "defect", "normal", "normal", "normal"]):
        record_review(engine, r["id"], verdict, "ana")
    scores, labels = reviewed_scores(engine, "screw")
    effect = threshold_effect(scores, labels, scores, 0.5)
    assert effect["precision"] == 1.0 and effect["recall"] == 1.0 and effect["flagged_share"] == 0.4
    assert threshold_effect(scores, labels, scores, 0.3)["fpr"] == pytest.approx(2 / 3)
    assert threshold_for_recall(scores, labels, 0.5) == 0.9
    assert threshold_for_recall(scores, labels, 1.0) == 0.52


def test_overview_export_and_allowed_paths(filled):
    engine, tmp_path = filled
    save_threshold(engine, "screw", 0.5, "ana")
    record_review(engine, review_queue(engine)[0]["id"], "defect", "ana", 'said "ok", then no')
    info = overview(engine)
    assert info["scored"] == 7 and info["queue_depth"] == 0 and info["active_model"] == "m"
    assert sum(r["images"] for r in info["per_hour"]) == 7
    assert sum(r["flagged"] or 0 for r in info["per_hour"] if r["class_name"] == "screw") == 2
    rows = list(csv.DictReader(io.StringIO(export_csv(engine))))
    assert len(rows) == 7 and {r["decision"] for r in rows if r["class_name"] == "screw"} == {"defect", "normal"}
    assert any(r["review_reason"] == 'said "ok", then no' for r in rows)
    assert image_path_allowed(engine, str(tmp_path / "screw" / "0.png"))
    assert not image_path_allowed(engine, "/etc/passwd")
    assert not image_path_allowed(engine, str(tmp_path / "screw" / ".." / ".." / "elsewhere.png"))


def test_undo_appends_a_review_that_restores_the_verdict_before(filled):
    engine, _ = filled
    first, second = review_queue(engine, class_name="screw")[:2]
    one = record_review(engine, first["id"], "defect", "ana", "scratch", result_id=first["result_id"])
    done, kept = undo_reviews(engine, [one], "ana")
    assert kept == [] and [(d["image_id"], d["undone"], d["verdict"]) for d in done] == [(first["id"], one, UNDONE)]
    # the image is unreviewed again (in the queue, out of the reviewed scores) and its history kept both rows
    assert first["id"] in [r["id"] for r in review_queue(engine, class_name="screw", reviewed=False)]
    assert first["id"] not in [r["id"] for r in review_queue(engine, class_name="screw", reviewed=True)]
    assert reviewed_scores(engine, "screw")[0].size == 0
    history = review_history(engine, first["id"])
    assert [(h["verdict"], h["reason"]) for h in history] == [("defect", "scratch"), (UNDONE, f"undo of review #{one}")]
    assert history[1]["result_id"] == first["result_id"]
    # undoing a second verdict brings back the first one, not "unreviewed"
    record_review(engine, second["id"], "normal", "ana")
    two = record_review(engine, second["id"], "defect", "ben")
    done, _ = undo_reviews(engine, [two], "ben")
    assert done[0]["verdict"] == "normal"
    (row,) = review_queue(engine, image_ids=[second["id"]])
    assert row["verdict"] == "normal" and row["reviewer"] == "ben"  # ben's undo row carries ana's verdict
    # a review someone else made since is not undone behind their back
    three = record_review(engine, first["id"], "skip", "ana")
    record_review(engine, first["id"], "defect", "ben")
    assert undo_reviews(engine, [three], "ana") == ([], [three])
    assert review_history(engine, first["id"])[-1]["verdict"] == "defect"
    with pytest.raises(ReviewError, match="reviewer name"):
        undo_reviews(engine, [three], " ")


@pytest.fixture
def decided(db_url, tmp_path):
    """14 screw images scored 0.05 .. 0.70 by one version whose threshold 0.5 (review band 0.05) was in force
    when they were stored, half of the passes drawn into the audit sample."""
    upgrade(db_url)
    engine = make_engine(db_url)
    mv = ensure_model_version(engine, "m", "bayes-pfl", {}, False)
    source = ensure_source(engine, str(tmp_path), "screw")
    set_source_versions(engine, source, None, mv)
    save_threshold(engine, "screw", 0.5, "ana", model_version_id=mv, review_band=0.05)
    scores = {}
    for i in range(14):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"%d" % i)
        register_file(engine, source, "screw", str(path), f"s{i}".ljust(64, "0"), 1, 1)
        scores[str(path)] = round(0.05 * (i + 1), 2)
    outcomes = []
    for job in claim(engine, "w", 100, 60):
        data, w, h = encode_map(torch.full((8, 8), scores[job.path]))
        outcomes.append(Outcome(job.id, result={"image_score": scores[job.path], "anomaly_map": data,
                                                "map_width": w, "map_height": h}))
    complete(engine, "w", outcomes, policy=DecisionPolicy(audit_share=0.5, audit_seed=1))
    yield engine
    engine.dispose()


def test_accept_low_scores_of_a_page_leaves_the_audit_sample_alone(decided):
    engine = decided
    page = review_queue(engine, class_name="screw", limit=10)  # the 10 highest: 0.70 .. 0.25
    audit = {r["id"] for r in page if r["audit"]}
    low = {r["id"] for r in page if r["image_score"] < 0.45 and not r["audit"]}
    assert audit and low, "the seeded draw gives this page both audited and plain passes"
    assert all(r["review_band"] == 0.05 and r["stored_decision"] in ("pass", "fail", "review") for r in page)
    reviewed_before = next(iter(low))
    record_review(engine, reviewed_before, "defect", "ben")
    ids = accept_low_scores(engine, [(r["id"], r["result_id"]) for r in page], "carol")
    assert len(ids) == len(low) - 1
    by_image = {r["id"]: review_history(engine, r["id"]) for r in page}
    accepted = {i for i, h in by_image.items() if any(x["reviewer"] == "carol" for x in h)}
    assert accepted == low - {reviewed_before}
    assert all(h[-1]["verdict"] == "normal" and h[-1]["reason"] == BULK_ACCEPT_REASON
               and h[-1]["result_id"] is not None for i, h in by_image.items() if i in accepted)
    assert not any(by_image[i] for i in audit), "audited passes are reviewed one by one"
    band_and_above = {r["id"] for r in page if r["image_score"] >= 0.45}
    assert not any(by_image[i] for i in band_and_above)
    assert [h["verdict"] for h in by_image[reviewed_before]] == ["defect"]
    # images off the page are untouched, and a second click changes nothing
    assert len(review_queue(engine, class_name="screw", reviewed=True, limit=100)) == len(low)
    assert accept_low_scores(engine, [(r["id"], r["result_id"]) for r in page], "carol") == []
    # the bulk verdicts undo like any other; the escape rate still counts only audited passes
    done, kept = undo_reviews(engine, ids, "carol")
    assert kept == [] and {d["verdict"] for d in done} == {UNDONE}
    (counts,) = escape_counts(engine)
    assert counts["audited"] == 0


def test_accept_low_scores_needs_a_threshold(filled):
    engine, _ = filled
    page = review_queue(engine, class_name="screw")
    assert accept_low_scores(engine, [(r["id"], r["result_id"]) for r in page], "ana") == []
    with pytest.raises(ReviewError, match="reviewer name"):
        accept_low_scores(engine, [(page[0]["id"], page[0]["result_id"])], "")
