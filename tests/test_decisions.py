"""Decisions the line can act on: exact intervals, provisional thresholds, the audit sample, and delivery to
a real MQTT broker, a local HTTP receiver and OK/NG folders (sinks down, 500s, a SIGKILL before sending)."""

from __future__ import annotations

import hashlib
import hmac
import http.server
import json
import math
import os
import threading
import time
from typing import ClassVar

import numpy as np
import pytest
import torch
from sqlalchemy import select

from inspector import stats
from inspector.config import OutputSettings
from inspector.delivery import Dispatcher
from inspector.store import upgrade
from inspector.store.db import make_engine, open_store
from inspector.store.decisions import DecisionPolicy, provisional_value
from inspector.store.maps import encode_map
from inspector.store.queue import Outcome, claim, complete, ensure_source, register_file
from inspector.store.review import escape_counts, record_review, save_threshold
from inspector.store.routing import set_source_versions
from inspector.store.schema import outbox, results, thresholds
from inspector.store.versions import ensure_model_version

from .pipeline_helpers import Broker, kill9, mqtt_subscriber, small_png, start_cli, wait_for

# -------------------------------------------------------------------------------------------------
# exact intervals, checked by hand and against scipy


def test_clopper_pearson_matches_hand_computed_bounds_and_scipy():
    from scipy.stats import beta

    lo, hi = stats.clopper_pearson(0, 10)
    assert lo == 0 and math.isclose(hi, 1 - 0.025 ** (1 / 10), abs_tol=1e-9)  # 0.3085
    lo, hi = stats.clopper_pearson(10, 10)
    assert hi == 1 and math.isclose(lo, 0.025 ** (1 / 10), abs_tol=1e-9)  # 0.6915
    for k, n in ((1, 7), (5, 10), (3, 200), (47, 50), (120, 400)):
        lo, hi = stats.clopper_pearson(k, n)
        assert math.isclose(lo, beta.ppf(0.025, k, n - k + 1), abs_tol=1e-8), (k, n)
        assert math.isclose(hi, beta.ppf(0.975, k + 1, n - k), abs_tol=1e-8), (k, n)
    assert stats.clopper_pearson(0, 0) == (0.0, 1.0)


def test_interval_covers_a_simulated_lines_true_escape_rate():
    """A line with a known 3 % escape rate among passes, audited 150 passes at a time, 400 times: the 95 %
    interval must cover the truth at least 95 % of the time (Clopper-Pearson is conservative)."""
    rng = np.random.default_rng(7)
    truth, covered = 0.03, 0
    for _ in range(400):
        found = int((rng.random(150) < truth).sum())
        e = stats.escape_rate(10_000, 150, found)
        covered += e.interval[0] <= truth <= e.interval[1]
        assert e.estimated_escapes_interval[0] <= e.estimated_escapes <= e.estimated_escapes_interval[1]
    assert covered / 400 >= 0.95


def test_calibration_proposals_and_defects_needed():
    # 0.975 ** n < 0.025 first at n = 146: 146 caught defects show recall >= 0.975 with 95 % confidence
    assert stats.defects_needed(0.975) == math.ceil(math.log(0.025) / math.log(0.975))
    assert stats.defects_needed(0.9) == 36
    labels = np.array([1] * 40 + [0] * 60)
    scores = np.r_[np.linspace(0.6, 0.99, 40), np.linspace(0.0, 0.7, 60)]
    p = stats.propose_for_recall(scores, labels, 0.8)
    assert p.threshold is not None and p.recall_interval[0] >= 0.8 and p.more_defects_needed == 0
    tight = stats.propose_for_recall(scores, labels, 0.95)  # 40 defects cannot show 95 %
    assert tight.more_defects_needed == stats.defects_needed(0.95) - 40 and tight.threshold == scores[:40].min()
    fa = stats.propose_for_false_alarms(scores, labels, 0.1)
    assert fa.threshold is not None and fa.false_alarm_interval[1] <= 0.1
    lower = [t for t in np.unique(scores) if t < fa.threshold]
    assert stats.clopper_pearson(int((scores[labels == 0] >= lower[-1]).sum()), 60)[1] > 0.1  # the lowest one


# -------------------------------------------------------------------------------------------------
# decisions at write time


def _result(score: float) -> dict:
    data, w, h = encode_map(torch.full((16, 16), score))
    return {"image_score": score, "text_score": score, "topk_score": score, "anomaly_map": data,
            "map_width": w, "map_height": h}


def _score(engine, tmp_path, source, scores, policy, start=0):
    for i, score in enumerate(scores, start):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"%d" % i)
        assert register_file(engine, source, "screw", str(path), f"{i}".rjust(64, "0"), 1, 1) == "new"
        (job,) = claim(engine, "w", 1, 60)
        assert complete(engine, "w", [Outcome(job.id, result=_result(score))], policy=policy) == 1
    with engine.connect() as conn:
        return conn.execute(select(results.c.image_score, results.c.decision, results.c.threshold_id,
                                   results.c.audit).order_by(results.c.id)).all()


@pytest.fixture
def store(tmp_path):
    url = f"sqlite:///{tmp_path / 'd.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    source = ensure_source(engine, str(tmp_path), "screw", line="line 1")
    version = ensure_model_version(engine, "m", "winclip", {}, False)
    set_source_versions(engine, source, None, version)
    yield engine, source, version
    engine.dispose()


def test_provisional_threshold_then_a_reviewed_one_never_rewrites_the_past(store, tmp_path):
    engine, source, version = store
    policy = DecisionPolicy(provisional_after=5, provisional_k=3.5, audit_share=0.0)
    first = [0.50, 0.52, 0.49, 0.51, 0.55]
    rows = _score(engine, tmp_path, source, first + [0.53, 0.90], policy)
    assert [r.decision for r in rows[:5]] == ["review"] * 5  # before N images: review
    expected = provisional_value(np.array(first), policy)
    median = np.median(first)
    assert math.isclose(expected, median + 3.5 * 1.4826 * np.median(np.abs(np.array(first) - median)))
    with engine.connect() as conn:
        th = conn.execute(select(thresholds)).one()
    assert th.kind == "provisional" and math.isclose(th.value, expected) and "first 5" in th.note
    assert [r.decision for r in rows[5:]] == ["fail" if s >= expected else "pass" for s in (0.53, 0.90)]
    assert rows[6].decision == "fail" and rows[5].threshold_id == th.id
    save_threshold(engine, "screw", 0.95, "qa", model_version_id=version, review_band=0.02)
    later = _score(engine, tmp_path, source, [0.94, 0.96, 0.90], policy, start=7)[7:]
    assert [r.decision for r in later] == ["review", "review", "pass"]  # within the band: review
    with engine.connect() as conn:
        again = conn.execute(select(results.c.decision, results.c.threshold_id).order_by(results.c.id)).all()
    assert again[6] == ("fail", th.id)  # decided by the provisional row, and stays so


def test_audit_sample_is_seeded_random_and_feeds_the_escape_rate(store, tmp_path):
    engine, source, version = store
    save_threshold(engine, "screw", 0.8, "qa", model_version_id=version)
    policy = DecisionPolicy(audit_share=0.5, audit_seed=3)
    rows = _score(engine, tmp_path, source, [0.1] * 40, policy)
    audited = [i for i, r in enumerate(rows) if r.audit]
    assert all(r.decision == "pass" for r in rows) and 10 < len(audited) < 30
    again = DecisionPolicy(audit_share=0.5, audit_seed=3)
    from inspector.store.decisions import audited as draw

    assert [draw(i + 1, f"{i}".rjust(64, "0"), again) for i in range(40)] == [r.audit for r in rows]
    from inspector.store.review import review_queue

    sample = review_queue(engine, class_name="screw", audit=True, limit=100)
    assert len(sample) == len(audited)
    record_review(engine, sample[0]["id"], "defect", "qa")
    for row in sample[1:]:
        record_review(engine, row["id"], "normal", "qa")
    (counts,) = escape_counts(engine)
    assert counts == {"class_name": "screw", "line": "line 1", "passes": 40, "audited": len(audited), "found": 1}
    e = stats.escape_rate(counts["passes"], counts["audited"], counts["found"])
    assert math.isclose(e.estimated_escapes, 40 / len(audited))


# -------------------------------------------------------------------------------------------------
# delivery to real sinks


class Receiver(http.server.BaseHTTPRequestHandler):
    failures = 0
    got: ClassVar[list] = []
    secret = b"s3cret"

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if Receiver.failures > 0:
            Receiver.failures -= 1
            self.send_response(500)
            self.end_headers()
            return
        expected = "sha256=" + hmac.new(self.secret, body, hashlib.sha256).hexdigest()
        assert self.headers["X-Inspector-Signature"] == expected
        Receiver.got.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver():
    Receiver.failures, Receiver.got = 0, []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def test_sinks_down_then_back_deliver_everything_in_order(store, tmp_path, receiver):
    engine, source, version = store
    save_threshold(engine, "screw", 0.5, "qa", model_version_id=version)
    broker = Broker(tmp_path)
    outputs = OutputSettings(mqtt_url=f"mqtt://127.0.0.1:{broker.port}", webhook_url=(
        f"http://127.0.0.1:{receiver.server_address[1]}/events"), webhook_secret="s3cret",
        folder_root=str(tmp_path / "out"), retry_max_seconds=0.2)
    policy = DecisionPolicy(audit_share=0.0, sinks=("mqtt", "webhook", "folder"))
    images = tmp_path / "images"
    images.mkdir()
    Receiver.failures = 3  # the receiver answers 500 three times
    scores = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]
    _score(engine, images, source, scores, policy)
    dispatcher = Dispatcher(engine, outputs, [source])
    now = 0.0
    dispatcher.drain(now)  # the broker is down: mqtt holds everything; the webhook fails
    assert not any(r.status == "sent" for r in _outbox(engine) if r.sink == "mqtt")
    broker.start()
    received: list = []
    client = mqtt_subscriber(broker.port, received)
    time.sleep(0.5)
    try:
        for _ in range(20):
            now += 1.0
            dispatcher.drain(now)
            if all(r.status == "sent" for r in _outbox(engine)):
                break
        wait_for(lambda: len(received) >= len(scores), 20, what="mqtt messages")
    finally:
        client.loop_stop()
        broker.stop()
    ids = [e["id"] for _, e in received]
    with engine.connect() as conn:
        result_ids = conn.execute(select(results.c.id).order_by(results.c.id)).scalars().all()
    assert ids == result_ids  # all, once each here, in order
    assert [e["id"] for e in Receiver.got] == result_ids  # after the 500s, in order
    event = Receiver.got[1]
    assert event["decision"] == "fail" and event["line"] == "line 1" and event["model_version"] == "m"
    assert event["threshold"] == 0.5 and event["threshold_version"] == 1 and len(event["sha256"]) == 64
    assert received[1][0] == "inspector/line_1/screw"
    ok, ng = sorted(os.listdir(tmp_path / "out" / "OK" / "line_1")), sorted(os.listdir(tmp_path / "out" / "NG" / "line_1"))
    assert len(ok) == 3 and len(ng) == 3 and not any(n.startswith(".") for n in ok + ng)


def _outbox(engine):
    with engine.connect() as conn:
        return conn.execute(select(outbox).order_by(outbox.c.id)).all()


def test_daemon_killed_before_sending_loses_no_event(tmp_path, receiver):
    folder = tmp_path / "line1"
    folder.mkdir()
    for i in range(6):
        small_png(folder / f"p{i}.png", i)
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    url = f"http://127.0.0.1:{receiver.server_address[1]}/events"
    env = {"INSPECTOR_OUTPUTS__WEBHOOK_URL": url, "INSPECTOR_OUTPUTS__WEBHOOK_SECRET": "s3cret",
           "INSPECTOR_OUTPUTS__RETRY_MAX_SECONDS": "0.5", "INSPECTOR_DECISIONS__PROVISIONAL_AFTER": "2"}
    Receiver.failures = 10**6  # the receiver is down: events are stored, not sent
    daemon = start_cli(["watch", str(folder), "-n", "screw", "-d", "winclip"], db, tmp_path, **env)
    engine = None
    try:
        wait_for(lambda: os.path.exists(tmp_path / "inspector.sqlite") and _count_results(db) == 6, 300,
                 what="6 results")
        kill9(daemon)  # between commit and publish
        engine = open_store(db)
        pending = [r for r in _outbox(engine) if r.status == "pending"]
        assert len(pending) == 6
        Receiver.failures = 1
        again = start_cli(["watch", str(folder), "-n", "screw", "-d", "winclip", "--once"], db, tmp_path, **env)
        assert again.wait(timeout=300) == 0
    finally:
        if daemon.poll() is None:
            kill9(daemon)
    with engine.connect() as conn:
        result_ids = sorted(conn.execute(select(results.c.id)).scalars().all())
    engine.dispose()
    assert sorted({e["id"] for e in Receiver.got}) == result_ids
    assert [e["decision"] for e in sorted(Receiver.got, key=lambda e: e["id"])][:2] == ["review", "review"]


def _count_results(db: str) -> int:
    try:
        engine = make_engine(db)
        with engine.connect() as conn:
            n = len(conn.execute(select(results.c.id)).all())
        engine.dispose()
        return n
    except Exception:  # noqa: BLE001 - not created yet
        return 0
