"""The daemon as it runs next to a camera: real processes, real filesystem events, SIGKILL, Postgres outages."""

from __future__ import annotations

import io
import os
import signal
import threading
import time

import numpy as np
from PIL import Image

from inspector.intake import Intake, WatchedFolder
from inspector.store import open_store

from .pipeline_helpers import (
    db_ping,
    drop_atomically,
    image_list,
    image_rows,
    kill9,
    result_counts,
    schema_ready,
    small_png,
    start_cli,
    wait_for,
)


def _all_scored(db_url: str, expected: int):
    def check():
        counts = result_counts(db_url)
        done = sum(1 for n in counts.values() if n >= 1)
        return counts if done >= expected else None

    return check


def test_500_images_with_three_sigkills_each_scored_exactly_once(tmp_path):
    folder = tmp_path / "line1"
    folder.mkdir()
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    total = 500
    writer_done = threading.Event()

    def camera():
        for i in range(total):
            if i % 3 == 0:
                small_png(folder / f"img_{i:04d}.png", i)  # written in place, not renamed
            else:
                drop_atomically(folder / f"img_{i:04d}.png", i)
            time.sleep(0.01)
        writer_done.set()

    args = ["watch", str(folder), "--class-name", "screw"]
    daemon = start_cli(args, db, tmp_path)
    camera_thread = threading.Thread(target=camera)
    camera_thread.start()
    for _ in range(3):
        # let it get some work done (and hold claims), then kill it without warning
        wait_for(lambda: schema_ready(db) and sum(result_counts(db).values()) > 0, 120, what="first results")
        time.sleep(2.0)
        kill9(daemon)
        daemon = start_cli(args, db, tmp_path)
    camera_thread.join()
    assert writer_done.is_set()
    try:
        counts = wait_for(_all_scored(db, total), 300, what=f"{total} results")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0, "SIGTERM must end the daemon cleanly"
    assert len(counts) == total
    assert set(counts.values()) == {1}, {p: n for p, n in counts.items() if n != 1}
    assert all(r["status"] == "done" for r in image_rows(db).values())


def test_slowly_written_files_are_scored_once_after_they_are_complete(tmp_path):
    folder = tmp_path / "line1"
    folder.mkdir()
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    daemon = start_cli(["watch", str(folder), "--class-name", "screw"], db, tmp_path,
                       INSPECTOR_WATCH__STABLE_SECONDS="1.5")
    try:
        wait_for(lambda: schema_ready(db), 60, what="daemon start")
        time.sleep(3)  # model loaded, observer running
        payloads = []
        for k in range(2):
            buf = io.BytesIO()
            Image.fromarray(np.random.default_rng(k).integers(0, 255, (300, 300, 3), dtype=np.uint8)).save(buf, "PNG")
            payloads.append(buf.getvalue())
        paths = [folder / "slow_a.png", folder / "slow_b.png"]
        handles = [open(p, "wb") for p in paths]  # noqa: SIM115 - both stay open while written in chunks
        for step in range(8):  # eight chunks, 0.5 s apart: never stable for 1.5 s until the end
            for handle, data in zip(handles, payloads):
                chunk = len(data) // 8 + 1
                handle.write(data[step * chunk:(step + 1) * chunk])
                handle.flush()
            time.sleep(0.5)
        for handle in handles:
            handle.close()
        counts = wait_for(_all_scored(db, 2), 120, what="two results")
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=60)
    rows = image_list(db)
    assert sorted(os.path.basename(r["path"]) for r in rows) == ["slow_a.png", "slow_b.png"], \
        "a file must not be registered before it is complete"
    assert all(r["status"] == "done" for r in rows)
    assert sorted(r["size"] for r in rows) == sorted(len(p) for p in payloads)
    assert set(counts.values()) == {1}


def _backlog(tmp_path, db_url: str, n: int):
    folder = tmp_path / "line1"
    folder.mkdir()
    for i in range(n):
        small_png(folder / f"b_{i:04d}.png", 1000 + i)
    engine = open_store(db_url, auto_upgrade=True)
    intake = Intake(engine, [WatchedFolder(folder.resolve(), "screw")], stable_seconds=0, rescan_seconds=0)
    intake.scan()
    assert intake.tick() == n
    engine.dispose()
    return folder


def test_two_workers_on_one_postgres_score_each_image_once(tmp_path, pg_url):
    n = 160
    _backlog(tmp_path, pg_url, n)
    workers = [start_cli(["worker"], pg_url, tmp_path, INSPECTOR_MODEL__BATCH_SIZE="4") for _ in range(2)]
    try:
        counts = wait_for(_all_scored(pg_url, n), 300, what=f"{n} results")
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        codes = [w.wait(timeout=60) for w in workers]
    assert codes == [0, 0]
    assert len(counts) == n and set(counts.values()) == {1}
    from sqlalchemy import create_engine, text

    engine = create_engine(pg_url)
    with engine.connect() as conn:
        per_worker = conn.execute(text("select count(distinct worker) from results")).scalar_one()
    engine.dispose()
    assert per_worker == 2, "both workers must have taken part"


def test_postgres_outage_mid_run_loses_nothing(tmp_path, pg_cluster, pg_url):
    folder = tmp_path / "line1"
    folder.mkdir()
    n = 120
    daemon = start_cli(["watch", str(folder), "--class-name", "screw"], pg_url, tmp_path)
    try:
        wait_for(lambda: db_ping(pg_url), 30, what="postgres")
        for i in range(n // 2):
            drop_atomically(folder / f"p_{i:04d}.png", 2000 + i)
        wait_for(lambda: schema_ready(pg_url) and sum(result_counts(pg_url).values()) >= 5, 120,
                 what="first results")
        pg_cluster.stop()
        for i in range(n // 2, n):  # the camera keeps writing while the database is down
            drop_atomically(folder / f"p_{i:04d}.png", 2000 + i)
        time.sleep(10)
        assert daemon.poll() is None, "the daemon must survive a database outage"
        pg_cluster.start()
        counts = wait_for(_all_scored(pg_url, n), 300, what=f"{n} results after the outage")
    finally:
        if not pg_cluster.is_running():
            pg_cluster.start()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(timeout=60)
    assert code == 0
    assert len(counts) == n and set(counts.values()) == {1}


def test_polling_recursive_and_renames(tmp_path):
    """A camera filing by date on a share (polling observer, sub-folders); a renamed file is not rescored."""
    folder = tmp_path / "cam"
    folder.mkdir()
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    daemon = start_cli(["watch", str(folder), "--class-name", "screw", "--polling", "--recursive"], db, tmp_path,
                       INSPECTOR_WATCH__RESCAN_SECONDS="0")  # only the polling observer can find these
    try:
        wait_for(lambda: schema_ready(db), 60, what="daemon start")
        day = folder / "2026-11-22"
        day.mkdir()
        for i in range(3):
            drop_atomically(day / f"r_{i}.png", 3000 + i)
        wait_for(_all_scored(db, 3), 120, what="three results from a sub-folder")
        (day / "r_0.png").rename(day / "r_0_renamed.png")
        wait_for(lambda: any(p.endswith("r_0_renamed.png") for p in image_rows(db)), 60, what="rename noticed")
        time.sleep(2)
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    rows = image_list(db)
    assert sorted(os.path.basename(r["path"]) for r in rows) == ["r_0_renamed.png", "r_1.png", "r_2.png"]
    assert sum(result_counts(db).values()) == 3
