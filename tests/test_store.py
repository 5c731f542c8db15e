"""Store and queue semantics on SQLite and a real Postgres."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from sqlalchemy import func, select

from inspector.store import images, make_engine, results, upgrade, utcnow
from inspector.store.db import StoreError, check_schema, open_store
from inspector.store.maps import decode_map, encode_map, mask_at
from inspector.store.queue import (
    Outcome,
    claim,
    complete,
    ensure_model_version,
    ensure_source,
    pending_count,
    register_file,
    release,
    status,
)
from inspector.store.routing import set_source_versions
from inspector.store.schema import jobs


@pytest.fixture
def engine(db_url):
    upgrade(db_url)
    engine = make_engine(db_url)
    yield engine
    engine.dispose()


def result_row(score: float = 0.5) -> dict:
    data, w, h = encode_map(torch.full((64, 64), score))
    return {"image_score": score, "text_score": score, "topk_score": score, "anomaly_map": data,
            "map_width": w, "map_height": h}


def fill(engine, tmp_path, n: int) -> tuple[int, int]:
    source = ensure_source(engine, str(tmp_path), "bottle")
    mv = ensure_model_version(engine, "m1", "bayes-pfl", {"a": 1}, True)
    set_source_versions(engine, source, None, mv)
    for i in range(n):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"x%d" % i)
        assert register_file(engine, source, "bottle", str(path), f"{i:064d}", 2, 1) == "new"
    return source, mv


def test_schema_matches_models_and_is_checked(db_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from inspector.store import metadata

    engine = make_engine(db_url)
    with pytest.raises(StoreError, match="inspector db upgrade"):
        check_schema(engine)
    assert upgrade(db_url) == "0005"
    check_schema(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
    engine.dispose()


def test_open_store_creates_an_empty_database(db_url):
    open_store(db_url, auto_upgrade=True).dispose()
    check_schema(make_engine(db_url))


def test_claim_complete_exactly_once(engine, tmp_path):
    fill(engine, tmp_path, 5)
    first = claim(engine, "w1", 3, lease_seconds=60)
    second = claim(engine, "w2", 3, lease_seconds=60)
    assert len(first) == 3 and len(second) == 2
    assert not {c.id for c in first} & {c.id for c in second}
    assert claim(engine, "w3", 3, 60) == []
    assert complete(engine, "w1", [Outcome(c.id, result=result_row()) for c in first]) == 3
    # w3 cannot complete what w2 holds
    assert complete(engine, "w3", [Outcome(c.id, result=result_row()) for c in second]) == 0
    assert complete(engine, "w2", [Outcome(c.id, result=result_row()) for c in second]) == 2
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(results)).scalar_one() == 5
    assert pending_count(engine) == 0


def test_expired_lease_returns_images_and_old_worker_cannot_write(engine, tmp_path):
    fill(engine, tmp_path, 2)
    dead = claim(engine, "dead", 2, lease_seconds=0.2)
    assert claim(engine, "alive", 2, lease_seconds=60) == []
    time.sleep(0.4)
    taken = claim(engine, "alive", 2, lease_seconds=60)
    assert len(taken) == 1  # claimed before (its worker died on it): one at a time, isolating a poison pill
    taken += claim(engine, "alive", 2, lease_seconds=60)
    assert {c.id for c in taken} == {c.id for c in dead}
    assert taken[0].attempts == 2
    assert complete(engine, "dead", [Outcome(c.id, result=result_row()) for c in dead]) == 0
    assert complete(engine, "alive", [Outcome(c.id, result=result_row()) for c in taken]) == 2


def test_transient_errors_back_off_then_fail(engine, tmp_path):
    fill(engine, tmp_path, 1)
    for attempt in range(1, 4):
        (c,) = claim(engine, "w", 1, 60)
        assert c.attempts == attempt
        complete(engine, "w", [Outcome(c.id, error="read error", permanent=False)], max_attempts=3)
        with engine.begin() as conn:  # skip the backoff wait
            conn.execute(jobs.update().values(next_attempt_at=jobs.c.created_at))
    with engine.connect() as conn:
        row = conn.execute(select(images.c.status, images.c.error)).one()
    assert row.status == "failed" and row.error == "read error"


def test_release_gives_claims_back_without_counting(engine, tmp_path):
    fill(engine, tmp_path, 2)
    claim(engine, "w", 2, 60)
    release(engine, "w")
    again = claim(engine, "w2", 2, 60)
    assert len(again) == 2 and all(c.attempts == 1 for c in again)


def test_register_rename_duplicate_and_error(engine, tmp_path):
    source = ensure_source(engine, str(tmp_path), "bottle")
    set_source_versions(engine, source, None, ensure_model_version(engine, "m1", "bayes-pfl", {}, False))
    a = tmp_path / "a.png"
    a.write_bytes(b"same")
    assert register_file(engine, source, "bottle", str(a), "h" * 64, 4, 1) == "new"
    assert register_file(engine, source, "bottle", str(a), "h" * 64, 4, 1) == "known"
    b = tmp_path / "b.png"
    b.write_bytes(b"same")
    assert register_file(engine, source, "bottle", str(b), "h" * 64, 4, 1) == "duplicate"
    a.rename(tmp_path / "c.png")
    assert register_file(engine, source, "bottle", str(tmp_path / "c.png"), "h" * 64, 4, 1) == "renamed"
    assert register_file(engine, source, "bottle", str(tmp_path / "x.png"), None, None, None, "unreadable") == "failed"
    assert register_file(engine, source, "bottle", str(tmp_path / "x.png"), None, None, None, "unreadable") == "known"
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.path, images.c.status).order_by(images.c.id)).all()
    assert [(r.path.rsplit("/", 1)[1], r.status) for r in rows] == [
        ("c.png", "pending"), ("b.png", "duplicate"), ("x.png", "failed")]
    assert pending_count(engine) == 1


def test_concurrent_claims_never_overlap(engine, tmp_path):
    fill(engine, tmp_path, 60)
    seen: list[int] = []
    lock = threading.Lock()

    def work(name):
        eng = make_engine(str(engine.url.render_as_string(hide_password=False)))
        while batch := claim(eng, name, 4, 60):
            complete(eng, name, [Outcome(c.id, result=result_row()) for c in batch])
            with lock:
                seen.extend(c.id for c in batch)
        eng.dispose()

    threads = [threading.Thread(target=work, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(set(seen)) and len(seen) == 60
    assert status(engine)["by_status"] == {"done": 60}


def test_map_encoding_and_masks():
    m = torch.zeros(518, 518)
    m[100:200, 300:400] = 0.9
    data, w, h = encode_map(m, 256)
    assert (w, h) == (256, 256) and data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = decode_map(data)
    assert abs(float(decoded.max()) - 0.9) < 2 / 255
    assert mask_at(data, 0.5).sum() > 0 and mask_at(data, 0.95).sum() == 0


def test_migrating_an_existing_database_keeps_its_rows(db_url, tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import MetaData

    from inspector.store import metadata

    assert upgrade(db_url, "0001") == "0001"
    engine = make_engine(db_url)
    old = MetaData()
    old.reflect(engine)  # the 0001 tables as they were: rows written the way the 0001 code wrote them
    now = utcnow()
    with engine.begin() as conn:
        source = conn.execute(old.tables["sources"].insert().values(
            path=str(tmp_path), class_name="bottle", recursive=False, created_at=now)).inserted_primary_key[0]
        conn.execute(old.tables["images"].insert().values(
            source_id=source, path=str(tmp_path / "a.png"), class_name="bottle", sha256="a" * 64, size=1,
            mtime_ns=1, status="pending", attempts=0, next_attempt_at=now, discovered_at=now, updated_at=now))
    with pytest.raises(StoreError, match="revision 0001"):
        check_schema(engine)
    assert upgrade(db_url) == "0005"
    check_schema(engine)
    with engine.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), metadata) == []
        assert conn.execute(select(images.c.status)).scalar_one() == "pending"
    engine.dispose()


def test_a_reader_never_blocks_a_writer_on_sqlite(tmp_path):
    """A long read (a CSV export, a dashboard page) holds no write lock: a claim goes through while the
    read transaction is still open (every transaction used to start with BEGIN IMMEDIATE)."""
    from inspector.store.review import export_csv

    url = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    fill(engine, tmp_path, 3)
    reader = make_engine(url)
    claimed_while_reading = threading.Event()
    with reader.connect() as conn:
        conn.execute(select(func.count()).select_from(images)).scalar_one()  # the read transaction is open
        assert conn.in_transaction()

        def writer():
            if claim(engine, "w", 3, 60):
                claimed_while_reading.set()

        thread = threading.Thread(target=writer)
        thread.start()
        thread.join(timeout=30)
        assert conn.in_transaction()
        assert claimed_while_reading.is_set(), "the claim waited for the reader"
    assert export_csv(reader) is not None
    reader.dispose()
    engine.dispose()
