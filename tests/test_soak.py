"""Soak (issue 12): a watcher and two workers on a real Postgres under a stream of good files, renames, copies,
FIFOs, truncated files and deletions, with SIGKILLs of every process. Bounded to a few minutes. Every good
content ends scored exactly once, every bad file is recorded with a reason, and nothing is left stuck."""

from __future__ import annotations

import hashlib
import os
import random
import threading
import time

from sqlalchemy import create_engine, func, select

from inspector.store.schema import images, jobs, results

from .pipeline_helpers import drop_atomically, kill9, schema_ready, small_png, start_cli, wait_for


def _produce(folder, plan: dict, done: threading.Event, count: int = 96) -> None:
    rng = random.Random(12)
    kept: list = []
    for i in range(count):
        kind = ("good", "good", "rename", "copy", "fifo", "truncated", "good", "delete")[i % 8]
        path = folder / f"f{i:03d}.png"
        if kind in ("good", "rename", "delete"):
            drop_atomically(path, 10_000 + i)
            data = path.read_bytes()
            if kind == "rename":
                time.sleep(rng.uniform(0, 0.6))  # before or after registration: both must end scored once
                path.rename(folder / f"r{i:03d}.png")
                plan["good"].add(hashlib.sha256(data).hexdigest())
            elif kind == "delete":
                time.sleep(rng.uniform(0, 0.6))
                path.unlink()
                plan["deleted"].add(hashlib.sha256(data).hexdigest())
            else:
                plan["good"].add(hashlib.sha256(data).hexdigest())
                kept.append(path)
        elif kind == "copy" and kept:
            source = rng.choice(kept)
            tmp = folder / f".c{i:03d}.tmp"
            tmp.write_bytes(source.read_bytes())
            tmp.rename(path)  # same content: a duplicate, never scored twice
        elif kind == "fifo":
            os.mkfifo(path)
            plan["fifo"].add(str(path))
        elif kind == "truncated":
            small_png(path.with_suffix(".tmp"), 20_000 + i)
            data = path.with_suffix(".tmp").read_bytes()
            path.with_suffix(".tmp").unlink()
            tmp = folder / f".t{i:03d}.tmp"
            tmp.write_bytes(data[: len(data) // 2])
            tmp.rename(path)
            plan["truncated"].add(str(path))
        time.sleep(0.15)
    done.set()


def test_soak_watcher_and_two_workers_on_postgres_with_sigkills(tmp_path, pg_url):
    folder = tmp_path / "line"
    folder.mkdir()
    extra = {"INSPECTOR_WATCH__LEASE_SECONDS": "3", "INSPECTOR_MODEL__BATCH_SIZE": "4"}
    watch_args = ["watch", str(folder), "--class-name", "screw"]
    watcher = start_cli(watch_args, pg_url, tmp_path, **extra)
    wait_for(lambda: schema_ready(pg_url), 120, what="schema")
    workers = [start_cli(["worker"], pg_url, tmp_path, **extra) for _ in range(2)]
    plan: dict[str, set] = {"good": set(), "deleted": set(), "fifo": set(), "truncated": set()}
    done = threading.Event()
    producer = threading.Thread(target=_produce, args=(folder, plan, done))
    producer.start()
    kills = 0
    try:
        for step in range(3):  # kill a worker, the other worker, then the watcher, while files keep coming
            time.sleep(4)
            if step < 2:
                kill9(workers[step])
                workers[step] = start_cli(["worker"], pg_url, tmp_path, **extra)
            else:
                kill9(watcher)
                watcher = start_cli(watch_args, pg_url, tmp_path, **extra)
            kills += 1
        producer.join(timeout=120)
        assert done.is_set()
        engine = create_engine(pg_url)

        def settled():
            with engine.connect() as conn:
                open_jobs = conn.execute(select(func.count()).select_from(jobs)
                                         .where(jobs.c.status.in_(("pending", "claimed")))).scalar_one()
                scored = set(conn.execute(select(images.c.sha256).join(results, results.c.image_id == images.c.id))
                             .scalars())
                recorded = set(conn.execute(select(images.c.path)).scalars())
            return open_jobs == 0 and plan["good"] <= scored and plan["fifo"] | plan["truncated"] <= recorded

        wait_for(settled, 300, interval=1.0, what="every good file scored and every bad one recorded")
    finally:
        for process in [watcher, *workers]:
            if process.poll() is None:
                kill9(process)
    with engine.connect() as conn:
        per_content = dict(conn.execute(select(images.c.sha256, func.count(results.c.id))
                                        .join(results, results.c.image_id == images.c.id)
                                        .group_by(images.c.sha256)).all())
        rows = {r.path: r for r in conn.execute(select(images.c.path, images.c.status, images.c.error))}
        stuck = conn.execute(select(func.count()).select_from(jobs)
                             .where(jobs.c.status.in_(("pending", "claimed")))).scalar_one()
    engine.dispose()
    lost = [h for h in plan["good"] if per_content.get(h, 0) == 0]
    doubled = {h: n for h, n in per_content.items() if n > 1}
    assert kills == 3 and not lost and not doubled and stuck == 0, (lost, doubled, stuck)
    for path in plan["fifo"]:
        assert rows[path].status == "failed" and "not a regular file" in rows[path].error
    for path in plan["truncated"]:
        assert rows[path].status == "failed" and rows[path].error
    assert all(per_content.get(h, 0) <= 1 for h in plan["deleted"])  # scored before it vanished, or failed
    print(f"soak: {len(plan['good'])} good contents, {len(plan['deleted'])} deleted, {len(plan['fifo'])} FIFOs, "
          f"{len(plan['truncated'])} truncated, {kills} SIGKILLs: lost {len(lost)}, duplicated {len(doubled)}, "
          f"stuck {stuck}")
