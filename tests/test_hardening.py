"""Issue 12, "never lose or stall an image" and "bad values": FIFOs, renames and copies racing the worker,
poison batches, decode memory, slow batches and leases, folder events, and values a user can get wrong.
Real files, FIFOs, inotify, SQLite and subprocesses of the real CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
import warnings

import pytest
from sqlalchemy import func, select, text

from inspector.intake import Intake, WatchedFolder
from inspector.store import images, open_store, results
from inspector.store.queue import claim, complete, db_now, register_file
from inspector.store.routing import route_unrouted
from inspector.store.schema import jobs
from inspector.worker import PixelBudget, Worker, load

from .pipeline_helpers import image_rows, run_cli, small_png, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    from inspector import load_model

    from .conftest import tiny_settings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_model(settings=tiny_settings(image_size=224, samples=1))


def _setup(tmp_path, detector, folder_name="line1", **intake):
    folder = tmp_path / folder_name
    folder.mkdir(exist_ok=True)
    engine = open_store(f"sqlite:///{tmp_path / 'inspector.sqlite'}", auto_upgrade=True)
    kw = {"stable_seconds": 0, "rescan_seconds": 0, **intake}
    watched = Intake(engine, [WatchedFolder(folder.resolve(), "bottle")], **kw)
    from inspector.pipeline import register_model_version

    version = register_model_version(engine, detector, [watched.folders[0].source_id]) if detector else None
    return folder, engine, watched, version


def _drain(worker: Worker, rounds: int = 50) -> None:
    for _ in range(rounds):
        if not worker.step():
            return


def _results_by_sha(engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.sha256, func.count(results.c.id)).join(
            results, results.c.image_id == images.c.id).group_by(images.c.sha256)).all()
    return {r[0]: r[1] for r in rows}


# -------------------------------------------------------------------------------------------------
# 6. a FIFO named *.png


def test_fifo_named_png_never_blocks_watch_once(tmp_path):
    folder = tmp_path / "line1"
    folder.mkdir()
    os.mkfifo(folder / "pipe.png")
    small_png(folder / "good.png", 1)
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["watch", str(folder), "--class-name", "screw", "--once"], db, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = {os.path.basename(p): r for p, r in image_rows(db).items()}
    assert rows["good.png"]["status"] == "done"
    assert rows["pipe.png"]["status"] == "failed" and "named pipe" in rows["pipe.png"]["error"]


def test_worker_reader_never_opens_a_fifo(tmp_path, tiny):
    folder, engine, intake, _ = _setup(tmp_path, tiny)
    small_png(folder / "a.png", 1)
    intake.scan()
    assert intake.tick() == 1
    (folder / "a.png").unlink()
    os.mkfifo(folder / "a.png")  # swapped for a FIFO after registration: the reader would block forever
    (item,) = claim(engine, "w", 8, 60)
    box: list = []
    reader = threading.Thread(target=lambda: box.append(load(item, 224)), daemon=True)
    reader.start()
    reader.join(timeout=10)
    assert box, "load() blocked on a FIFO"
    assert box[0].pixels is None and "named pipe" in box[0].error
    engine.dispose()


# -------------------------------------------------------------------------------------------------
# 7. renames and copies racing the worker


def test_rename_found_after_the_worker_failed_requeues_and_scores_once(tmp_path, tiny):
    folder, engine, intake, version = _setup(tmp_path, tiny)
    small_png(folder / "a.png", 1)
    intake.scan()
    intake.tick()
    (folder / "a.png").rename(folder / "b.png")  # renamed before the worker reads it, intake not yet aware
    worker = Worker(engine, {version: tiny})
    _drain(worker)
    assert image_rows(str(engine.url))[str(folder.resolve() / "a.png")]["status"] == "failed"
    intake.scan()  # the rename is found: the row follows the file and its job is queued again
    intake.tick()
    _drain(worker)
    worker.close()
    rows = image_rows(str(engine.url))
    assert list(rows) == [str(folder.resolve() / "b.png")]
    assert rows[str(folder.resolve() / "b.png")]["status"] == "done"
    assert list(_results_by_sha(engine).values()) == [1]
    engine.dispose()


def test_rename_registered_while_claimed_is_read_at_its_new_path(tmp_path, tiny):
    folder, engine, intake, version = _setup(tmp_path, tiny)
    small_png(folder / "a.png", 1)
    intake.scan()
    intake.tick()
    worker = Worker(engine, {version: tiny})
    batch = claim(engine, worker.name, 8, 60)
    (folder / "a.png").rename(folder / "b.png")
    intake.scan()
    intake.tick()  # registers the rename while the job is claimed with the old path
    worker._hold([c.id for c in batch])
    futures = [worker.pool.submit(load, c, tiny.image_size, worker.budget) for c in batch]
    worker._finish((batch, futures, tiny), None, time.perf_counter())
    worker.close()
    (row,) = image_rows(str(engine.url)).values()
    assert row["status"] == "done" and row["path"].endswith("b.png")
    assert list(_results_by_sha(engine).values()) == [1]
    engine.dispose()


def test_copy_of_a_vanished_original_is_promoted_and_scored_once(tmp_path, tiny):
    folder, engine, intake, version = _setup(tmp_path, tiny)
    small_png(folder / "a.png", 1)
    intake.scan()
    intake.tick()
    shutil.copyfile(folder / "a.png", folder / "copy.png")
    intake.scan()
    intake.tick()
    assert intake.counts["duplicate"] == 1
    (folder / "a.png").unlink()  # the original vanishes before it is scored
    worker = Worker(engine, {version: tiny})
    _drain(worker)
    worker.close()
    rows = {os.path.basename(p): r for p, r in image_rows(str(engine.url)).items()}
    assert rows["copy.png"]["status"] == "done" and rows["copy.png"]["duplicate_of"] is None
    assert rows["a.png"]["status"] == "failed" and "copy" in rows["a.png"]["error"]
    assert list(_results_by_sha(engine).values()) == [1]
    # a later rescan changes nothing: the copy is known, the vanished original is not resurrected
    intake.scan()
    intake.tick()
    assert list(_results_by_sha(engine).values()) == [1]
    engine.dispose()


# -------------------------------------------------------------------------------------------------
# 8. poison pills, decode memory, leases, the database clock


def _fill(engine, tmp_path, n, version, source):
    for i in range(n):
        path = tmp_path / f"{i}.png"
        path.write_bytes(b"x%d" % i)
        assert register_file(engine, source, "bottle", str(path), f"{i:064d}", 2, 1) == "new"


def test_attempts_are_capped_at_claim_and_retried_jobs_go_alone(tmp_path, tiny):
    _, engine, intake, version = _setup(tmp_path, tiny)
    _fill(engine, tmp_path, 6, version, intake.folders[0].source_id)
    dead = claim(engine, "dead", 3, lease_seconds=0.2)
    assert len(dead) == 3
    time.sleep(0.4)
    # the three its worker died on come back one at a time, then the untouched ones as a batch
    sizes = []
    while batch := claim(engine, "w", 3, 60):
        sizes.append(len(batch))
        complete(engine, "w", [])
    assert sizes == [1, 1, 1, 3]
    with engine.begin() as conn:
        conn.execute(jobs.update().values(status="pending", attempts=0, claimed_by=None))
    for _ in range(2):  # a job whose worker dies on it each time: given up at the cap, never claimed again
        assert claim(engine, "dies", 1, lease_seconds=0.05, max_attempts=2)
        time.sleep(0.1)
    claim(engine, "w", 1, 60, max_attempts=2)
    with engine.connect() as conn:
        first = conn.execute(select(jobs.c.status, jobs.c.error).order_by(jobs.c.id)).first()
    assert first.status == "failed" and "gave up after 2 attempts" in first.error
    engine.dispose()


class Poisoned:
    """The tiny model, except that it raises on a batch holding one particular image (a model bug that
    one input triggers; the rest of its batch is fine)."""

    def __init__(self, model, poison_seed):
        self.model, self.poison_seed, self.calls = model, poison_seed, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def predict_tensors(self, pixels, names, seeds=None):
        self.calls.append(len(pixels))
        if self.poison_seed in (seeds or []):
            raise RuntimeError("kernel failed on this input")
        return self.model.predict_tensors(pixels, names, seeds=seeds)


def test_a_poison_image_is_isolated_and_the_rest_of_its_batch_is_scored(tmp_path, tiny):
    folder, engine, intake, version = _setup(tmp_path, tiny)
    for i in range(5):
        small_png(folder / f"{i}.png", 100 + i)
    intake.scan()
    intake.tick()
    poison_path = str(folder.resolve() / "2.png")
    from inspector.store.queue import Claimed

    poison = load(Claimed(0, poison_path, "bottle", None, 1), 224).seed
    assert poison is not None
    detector = Poisoned(tiny, poison)
    worker = Worker(engine, {version: detector}, batch_size=8, max_attempts=3)
    with engine.begin() as conn:  # no backoff waits in a test: retries are due at once
        conn.execute(text("CREATE TRIGGER no_wait AFTER UPDATE OF next_attempt_at ON jobs "
                          "BEGIN UPDATE jobs SET next_attempt_at = created_at WHERE id = new.id; END"))
    _drain(worker)
    worker.close()
    rows = image_rows(str(engine.url))
    assert rows.pop(poison_path)["status"] == "failed"
    assert all(r["status"] == "done" for r in rows.values()), rows
    assert sorted(_results_by_sha(engine).values()) == [1, 1, 1, 1]
    assert detector.calls[0] == 5 and all(n == 1 for n in detector.calls[1:])
    engine.dispose()


_RSS_SCRIPT = r"""
import os, sys, threading, time
from PIL import Image
sys.path.insert(0, sys.argv[1])
from concurrent.futures import ThreadPoolExecutor
from inspector.store.queue import Claimed
from inspector.worker import PixelBudget, load
path, count, budget = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
Image.MAX_IMAGE_PIXELS = None
page = os.sysconf("SC_PAGE_SIZE")
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * page
top, done = [rss()], threading.Event()
def sample():
    while not done.is_set():
        top[0] = max(top[0], rss())
        time.sleep(0.002)
base = rss()
threading.Thread(target=sample, daemon=True).start()
b = PixelBudget(budget)
with ThreadPoolExecutor(4) as pool:
    out = list(pool.map(lambda i: load(Claimed(i, path, "x", None, 1), 224, b), range(count)))
done.set()
assert all(o.pixels is not None for o in out), [o.error for o in out]
print((top[0] - base) >> 20, b.peak)
"""


def _decode_rss(tmp_path, path, count, budget) -> tuple[int, int]:
    from .pipeline_helpers import ROOT

    done = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(ROOT), str(path), str(count), str(budget)],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"},
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    mb, peak = done.stdout.split()
    return int(mb), int(peak)


def test_pixel_budget_bounds_decode_memory(tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (4000, 4000), (120, 30, 200)).save(big)  # 16 Mpx, a few KB on disk
    one_mb, _ = _decode_rss(tmp_path, big, 1, 0)
    free_mb, _ = _decode_rss(tmp_path, big, 8, 0)
    bounded_mb, peak = _decode_rss(tmp_path, big, 8, 20_000_000)
    assert peak == 16_000_000  # one at a time under a 20 Mpx budget
    # eight images under the budget cost what one does; without it, what the threads decode together
    assert bounded_mb < 1.3 * one_mb + 30 and bounded_mb < 0.85 * free_mb, (one_mb, bounded_mb, free_mb)


def test_budget_lets_one_image_over_it_through():
    budget = PixelBudget(10)
    with budget.hold(50):  # alone: proceeds
        assert budget.in_use == 50


def test_two_workers_with_batches_slower_than_the_lease_claim_each_image_once(tmp_path, tiny):
    folder, engine, intake, version = _setup(tmp_path, tiny)
    for i in range(12):
        small_png(folder / f"{i}.png", 200 + i)
    intake.scan()
    intake.tick()
    lease = 0.4

    class Slow:  # the real tiny model; a batch of 3 takes longer than the lease
        def __init__(self, model):
            self.model = model

        def __getattr__(self, name):
            return getattr(self.model, name)

        def predict_tensors(self, pixels, names, seeds=None):
            time.sleep(lease * 2.5)
            return self.model.predict_tensors(pixels, names, seeds=seeds)

    stop = threading.Event()
    workers = [Worker(engine, {version: Slow(tiny)}, batch_size=3, lease_seconds=lease, name=f"w{i}")
               for i in range(2)]
    threads = [threading.Thread(target=w.run, args=(stop,), kwargs={"until_empty": lambda: False,
                                                                    "idle_seconds": 0.1}) for w in workers]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(r["status"] == "done" for r in image_rows(str(engine.url)).values()), 60,
                 interval=0.2, what="12 images scored")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    with engine.connect() as conn:
        attempts = [r.attempts for r in conn.execute(select(jobs.c.attempts))]
    assert attempts == [1] * 12, attempts  # each job claimed once: no lease ran out under a working worker
    assert sorted(_results_by_sha(engine).values()) == [1] * 12
    engine.dispose()


def test_leases_use_the_database_clock_not_the_boxes(tmp_path, tiny, monkeypatch):
    _, engine, intake, version = _setup(tmp_path, tiny)
    _fill(engine, tmp_path, 1, version, intake.folders[0].source_id)
    assert claim(engine, "a", 1, lease_seconds=60)
    import datetime as dt

    from inspector.store import db, queue

    real = db.utcnow

    def ahead():
        return real() + dt.timedelta(hours=1)

    monkeypatch.setattr(queue, "utcnow", ahead)  # this box's clock runs an hour ahead
    monkeypatch.setattr(db, "utcnow", ahead)
    assert claim(engine, "b", 1, lease_seconds=60) == [], "a box with a fast clock stole a live lease"
    with engine.connect() as conn:
        assert abs((db_now(conn) - dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)).total_seconds()) < 5
    engine.dispose()


# -------------------------------------------------------------------------------------------------
# 9. folder events


def test_non_recursive_watch_ignores_folders_moved_in_and_recursive_ignores_dot_folders(tmp_path):
    engine = open_store(f"sqlite:///{tmp_path / 'inspector.sqlite'}", auto_upgrade=True)
    flat, deep, outside = tmp_path / "flat", tmp_path / "deep", tmp_path / "outside"
    for d in (flat, deep, outside):
        d.mkdir()
    intake = Intake(engine, [WatchedFolder(flat.resolve(), "a"), WatchedFolder(deep.resolve(), "b", recursive=True)],
                    stable_seconds=0, rescan_seconds=0)
    intake.start_observer()
    try:
        time.sleep(0.5)
        for name in ("batch1", "batch2"):
            (outside / name).mkdir()
            small_png(outside / name / "x.png", len(name))
        (outside / "batch1").rename(flat / "batch1")  # a folder moved into a non-recursive watch
        (deep / ".cache").mkdir()
        small_png(deep / ".cache" / "y.png", 5)  # a dot-folder of a recursive watch
        (outside / "batch2").rename(deep / ".incoming")  # a dot-folder moved in
        small_png(flat / "own.png", 7)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            intake.tick()
            time.sleep(0.2)
    finally:
        intake.stop()
    registered = sorted(os.path.relpath(p, tmp_path) for p in image_rows(str(engine.url)))
    assert registered == ["flat/own.png"], registered
    engine.dispose()


def test_watched_folder_deleted_and_recreated_is_watched_again(tmp_path):
    engine = open_store(f"sqlite:///{tmp_path / 'inspector.sqlite'}", auto_upgrade=True)
    folder = tmp_path / "drop"
    folder.mkdir()
    intake = Intake(engine, [WatchedFolder(folder.resolve(), "a")], stable_seconds=0, rescan_seconds=3600)
    stop = threading.Event()
    thread = threading.Thread(target=intake.run, args=(stop,), kwargs={"interval": 0.1}, daemon=True)
    thread.start()
    try:
        time.sleep(1.0)
        shutil.rmtree(folder)
        time.sleep(0.5)
        folder.mkdir()
        time.sleep(1.0)  # (the re-arming notices the new folder)
        small_png(folder / "after.png", 3)
        wait_for(lambda: any(p.endswith("after.png") for p in image_rows(str(engine.url))), 10,
                 interval=0.2, what="a file in the re-created folder")
    finally:
        stop.set()
        thread.join(timeout=10)
    engine.dispose()


# -------------------------------------------------------------------------------------------------
# 11. bad values


@pytest.mark.parametrize("env, message", [
    ({"INSPECTOR_MODEL__BATCH_SIZE": "0"}, "batch_size"),
    ({"INSPECTOR_MODEL__DEVICE": "banana"}, "not a device"),
])
def test_bad_settings_are_one_clear_line(tmp_path, env, message):
    (tmp_path / "line1").mkdir()
    done = run_cli(["watch", str(tmp_path / "line1"), "-n", "screw", "--once"], f"sqlite:///{tmp_path / 'db'}",
                   tmp_path, timeout=60, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and message in done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr


@pytest.mark.parametrize("key, value, message", [
    ("batch_size", "-1", "at least 1"), ("device", "cuda:x", "not a device"), ("precision", "fp64", "fp32"),
    ("lease_seconds", "0", "greater than 0"), ("max_attempts", "0", "at least 1"), ("domain", "space", "medical"),
    ("lease_seconds", "nan", "greater than 0"),
])
def test_settings_are_validated_at_load(key, value, message):
    from inspector.config import ConfigError, load_settings

    section = {"lease_seconds": "WATCH", "max_attempts": "WATCH", "domain": "AA_CLIP"}.get(key, "MODEL")
    with pytest.raises(ConfigError, match=message):
        load_settings(None, environ={f"INSPECTOR_{section}__{key.upper()}": value})


def test_bad_class_names_are_refused(tmp_path):
    from inspector.config import ConfigError, check_name

    assert check_name("  metal nut ", "x") == "metal nut"
    for bad, message in ((" ", "must not be empty"), ("x" * 201, "at most 200"), ("a\u200bb\n", "control")):
        with pytest.raises(ConfigError, match=message):
            check_name(bad, "class")
    (tmp_path / "line1").mkdir()
    small_png(tmp_path / "line1" / "a.png", 1)
    for args in (["watch", str(tmp_path / "line1"), "-n", "x" * 500, "--once"], ["score", str(tmp_path / "line1"), "-n", ""]):
        done = run_cli(args, f"sqlite:///{tmp_path / 'db'}", tmp_path, timeout=120)
        assert done.returncode == 2, done.stderr[-2000:]
        assert "Traceback" not in done.stderr and ("at most 200" in done.stderr or "empty" in done.stderr), done.stderr


def test_score_maps_long_names_and_unwritable_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    long_name = "L" * 251 + ".png"  # 255 bytes: its map name would be longer than the file system allows
    small_png(folder / long_name, 1)
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    done = run_cli(["score", str(folder / long_name), "-n", "screw", "--maps", str(tmp_path / "maps"), "--json"],
                   db, tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (written,) = os.listdir(tmp_path / "maps")
    assert len(written.encode()) <= 255 and written.endswith("_map.png")
    (tmp_path / "a-file").write_text("not a folder")
    done = run_cli(["score", str(folder / long_name), "-n", "screw", "--maps", str(tmp_path / "a-file" / "maps")],
                   db, tmp_path, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "cannot write the anomaly map" in done.stderr


def test_score_maps_on_a_full_disk(tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12k", "tmpfs", str(full)],
                                           capture_output=True, check=False).returncode != 0:
        pytest.skip("needs to mount a tiny tmpfs")
    try:
        (full / "filler").write_bytes(b"\0" * 8192)
        folder = tmp_path / "imgs"
        folder.mkdir()
        for i in range(3):
            small_png(folder / f"{i}.png", i, size=200)
        done = run_cli(["score", str(folder), "-n", "screw", "--maps", str(full)], f"sqlite:///{tmp_path / 'db'}",
                       tmp_path, timeout=120)
    finally:
        subprocess.run(["umount", str(full)], check=False)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "No space left on device" in done.stderr


def test_corrupt_sqlite_file_is_one_clear_line(tmp_path):
    from .pipeline_helpers import scored_database

    db = scored_database(tmp_path, 3, seed=1)
    path = tmp_path / "inspector.sqlite"
    data = bytearray(path.read_bytes())
    page = 4096
    for start in range(page, len(data), page):  # every page but the header page: garbage
        data[start:start + 100] = b"\xa5" * 100
    path.write_bytes(bytes(data))
    for name in ("inspector.sqlite-wal", "inspector.sqlite-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    done = run_cli(["watch", str(tmp_path / "line1"), "-n", "screw", "--once"], db, tmp_path, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "error:" in done.stderr


def test_daemon_survives_a_database_error(tmp_path, tiny):
    folder, engine, intake, version = _setup(tmp_path, tiny)
    small_png(folder / "a.png", 1)
    intake.scan()
    intake.tick()
    with engine.begin() as conn:  # a database that refuses the batch's write (as a corrupt page would)
        conn.execute(text("CREATE TRIGGER refuse BEFORE INSERT ON results BEGIN SELECT RAISE(ABORT, 'refused'); END"))
    worker = Worker(engine, {version: tiny}, lease_seconds=0.5)
    stop = threading.Event()
    thread = threading.Thread(target=worker.run, args=(stop,), kwargs={"idle_seconds": 0.1}, daemon=True)
    thread.start()
    try:
        time.sleep(2.0)
        assert thread.is_alive(), "a database error ended the worker"
        with engine.begin() as conn:
            conn.execute(text("DROP TRIGGER refuse"))
        wait_for(lambda: all(r["status"] == "done" for r in image_rows(str(engine.url)).values()), 30,
                 interval=0.2, what="the image scored once the database accepts writes")
    finally:
        stop.set()
        thread.join(timeout=30)
    assert list(_results_by_sha(engine).values()) == [1]
    route_unrouted(engine)
    engine.dispose()
