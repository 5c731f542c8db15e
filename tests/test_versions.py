"""Model versions end to end: jobs per (image, version), lines routed to their own version, promotions seen
by every box, score --model, backfill, shadow, SIGKILL mid-backfill, and the 0002 -> 0003 migration."""

from __future__ import annotations

import os
import threading
import warnings

import pytest
import torch
from sqlalchemy import MetaData, create_engine, func, select

from inspector.config import Settings
from inspector.intake import Intake, WatchedFolder
from inspector.store import upgrade, utcnow
from inspector.store.db import open_store
from inspector.store.queue import claim
from inspector.store.routing import set_source_versions
from inspector.store.schema import jobs, model_versions, results, thresholds

from .pipeline_helpers import FAST_ENV, kill9, run_cli, small_png, start_cli, wait_for

pytestmark = pytest.mark.usefixtures("one_thread")


def fast_settings(tmp_path, db_url: str, **model) -> Settings:
    """In-process settings equal to the subprocesses' FAST_ENV (so both compute the same version digests)."""
    s = Settings()
    for key, value in FAST_ENV.items():
        section, _, name = key[len("INSPECTOR_"):].partition("__")
        s.set(section.lower(), name.lower(), value)
    s.override("model", **model)
    s.database.url = db_url
    s.registry.path = str(tmp_path / "models")
    return s


def make_folder(root, name: str, n: int, seed: int):
    folder = root / name
    folder.mkdir()
    for i in range(n):
        small_png(folder / f"{name}_{i:03d}.png", seed + i)
    return folder.resolve()


def register_tiny(settings: Settings, *names: str) -> None:
    """Registered Bayes-PFL versions on the tiny random backbone (as `inspector retrain` would leave)."""
    from inspector.registry import load_model, register_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(settings=settings, detector="bayes-pfl")
    for i, name in enumerate(names):
        with torch.no_grad():
            for p in model.head.parameters():
                p.add_(0.01 * (i + 1))
        register_model(settings.registry.path, name, model, {"kind": "test"})


def version_of_results(db_url: str) -> dict[str, list[str]]:
    """image path (file name) -> names of the versions that stored a result for it."""
    from inspector.store.schema import images

    engine = create_engine(db_url)
    with engine.connect() as conn:
        rows = conn.execute(select(images.c.path, model_versions.c.name, model_versions.c.detector)
                            .join(results, results.c.image_id == images.c.id)
                            .join(model_versions, model_versions.c.id == results.c.model_version_id)).all()
    engine.dispose()
    out: dict[str, list[str]] = {}
    for r in rows:
        out.setdefault(os.path.basename(r.path), []).append(r.name)
    return out


def test_two_watchers_on_one_database_score_only_with_their_own_version(tmp_path, db_url):
    l1 = make_folder(tmp_path, "l1", 16, 0)
    l2 = make_folder(tmp_path, "l2", 16, 100)
    upgrade(db_url)  # both start together: the schema exists first, as after `inspector db upgrade`
    a = start_cli(["watch", str(l1), "-n", "metal nut", "-d", "winclip", "--once"], db_url, tmp_path)
    b = start_cli(["watch", str(l2), "-n", "screw", "-d", "aa-clip", "--once"], db_url, tmp_path)
    assert a.wait(timeout=600) == 0 and b.wait(timeout=600) == 0
    by_image = version_of_results(db_url)
    assert len(by_image) == 32
    for name, versions in by_image.items():
        assert len(versions) == 1, (name, versions)
        expected = "winclip@" if name.startswith("l1_") else "aa-clip@"
        assert versions[0].startswith(expected), (name, versions)


def test_one_daemon_serves_many_lines_from_sources_config(tmp_path):
    l1 = make_folder(tmp_path, "l1", 6, 0)
    l2 = make_folder(tmp_path, "l2", 6, 100)
    (tmp_path / "config.toml").write_text(
        f'[[sources]]\npath = "{l1}"\nclass_name = "metal nut"\nline = "line 1"\ndetector = "winclip"\n\n'
        f'[[sources]]\npath = "{l2}"\nclass_name = "screw"\nline = "line 2"\ndetector = "aa-clip"\n')
    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    done = run_cli(["watch", "--once"], db, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    by_image = version_of_results(db)
    assert len(by_image) == 12
    assert all(len(v) == 1 and v[0].startswith("winclip@" if n.startswith("l1_") else "aa-clip@")
               for n, v in by_image.items()), by_image
    status = run_cli(["status", "--json"], db, tmp_path)
    import json

    data = json.loads(status.stdout)
    assert {v["model_version"].split("@")[0] for v in data["versions"]} == {"winclip", "aa-clip"}
    assert set(data["active_by_class"]) == {"metal nut", "screw"}


def test_workers_follow_promotions_made_on_another_box(tmp_path, db_url):
    settings = fast_settings(tmp_path, db_url)
    register_tiny(settings, "site-v1", "screw-v2")
    env = {"INSPECTOR_REGISTRY__PATH": str(tmp_path / "models")}
    for args in (["models", "promote", "site-v1", "--by", "ana"],
                 ["models", "promote", "screw-v2", "-n", "screw", "--by", "ben"]):
        done = run_cli(args, db_url, tmp_path, env=env)  # "another box": its own process, the shared database
        assert done.returncode == 0, done.stderr[-2000:]
    engine = open_store(db_url)
    screw, nut = make_folder(tmp_path, "screw", 8, 0), make_folder(tmp_path, "nut", 8, 50)
    intake = Intake(engine, [WatchedFolder(screw, "screw"), WatchedFolder(nut, "nut")], stable_seconds=0,
                    rescan_seconds=0)
    intake.scan()
    assert intake.tick() == 16
    engine.dispose()
    workers = [start_cli(["worker", "--once"], db_url, tmp_path, INSPECTOR_REGISTRY__PATH=str(tmp_path / "models"),
                         INSPECTOR_MODEL__BATCH_SIZE="2") for _ in range(2)]
    assert [w.wait(timeout=600) for w in workers] == [0, 0]
    by_image = version_of_results(db_url)
    assert len(by_image) == 16
    assert all(v == ["screw-v2" if n.startswith("screw_") else "site-v1"] for n, v in by_image.items()), by_image


def test_score_with_another_model_scores_with_it(tmp_path):
    from inspector.pipeline import score_files

    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    settings = fast_settings(tmp_path, db)
    register_tiny(settings, "A", "B")
    image = tmp_path / "part.png"
    small_png(image, 3)
    runs = {}
    for name in ("A", "B", "A"):
        settings.model.name = name
        rows, _ = score_files(settings, [image], "screw")
        runs.setdefault(name, []).append(rows[0])
    assert runs["A"][0]["model_version"] == "A" and runs["B"][0]["model_version"] == "B"
    assert runs["A"][0]["image_score"] != runs["B"][0]["image_score"]  # another head: another function
    assert runs["A"][1]["image_score"] == runs["A"][0]["image_score"]  # A's stored result, not re-scored
    assert version_of_results(db) == {"part.png": ["A", "B"]}


def _scored_by(engine, settings, version_ids, folder_name, tmp_path, n, seed, detectors):
    """Register ``n`` images of a class "screw" folder and score them with the loaded ``detectors``."""
    from inspector.pipeline import make_worker

    folder = make_folder(tmp_path, folder_name, n, seed)
    intake = Intake(engine, [WatchedFolder(folder, "screw")], stable_seconds=0, rescan_seconds=0)
    set_source_versions(engine, intake.folders[0].source_id, None, version_ids[0])
    intake.scan()
    assert intake.tick() == n
    worker = make_worker(engine, detectors, settings)
    worker.run(threading.Event(), until_empty=lambda: True)
    return intake


def _load(settings, name):
    from inspector.versions import build, recipe_from_registry

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recipe = recipe_from_registry(settings, name)
        return recipe, build(recipe, settings)


def test_promote_with_rescore_backfills_history_once_after_live_images(tmp_path, db_url):
    from inspector.pipeline import make_worker, record_version
    from inspector.promotion import promote

    settings = fast_settings(tmp_path, db_url)
    register_tiny(settings, "A", "B")
    engine = open_store(db_url, auto_upgrade=True)
    (ra, a), (rb, b) = _load(settings, "A"), _load(settings, "B")
    va, vb = record_version(engine, ra), record_version(engine, rb)
    intake = _scored_by(engine, settings, [va], "old", tmp_path, 6, 0, {va: a})
    assert promote(settings, "B", "screw", "qa", rescore="all")["backfill"] == 6
    assert promote(settings, "B", "screw", "qa", rescore="all")["backfill"] == 0  # exactly once
    small_png(intake.folders[0].path / "live.png", 99)  # a new image after the promotion: routed to B at once
    intake.scan()
    assert intake.tick() == 1
    first = claim(engine, "probe", 1, 60, versions=[vb])
    assert first[0].path.endswith("live.png"), "live images are claimed before the backfill"
    from inspector.store.queue import release

    release(engine, "probe")
    make_worker(engine, {vb: b}, settings).run(threading.Event(), until_empty=lambda: True)
    by_image = version_of_results(db_url)
    assert by_image.pop("live.png") == ["B"]
    assert len(by_image) == 6 and all(sorted(v) == ["A", "B"] for v in by_image.values())
    from inspector.store.queue import status

    progress = {v["model_version"]: v["backfill"] for v in status(engine)["versions"]}
    assert progress["B"] == {"total": 6, "done": 6, "failed": 0}
    engine.dispose()


def test_shadow_version_is_stored_and_never_decides(tmp_path):
    from inspector.pipeline import record_version
    from inspector.promotion import shadow
    from inspector.store import review as rv

    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    settings = fast_settings(tmp_path, db)
    register_tiny(settings, "A", "B")
    engine = open_store(db, auto_upgrade=True)
    (ra, a), (rb, b) = _load(settings, "A"), _load(settings, "B")
    va, vb = record_version(engine, ra), record_version(engine, rb)
    shadow(settings, "B", "screw", "qa")
    intake = _scored_by(engine, settings, [va], "line", tmp_path, 5, 0, {va: a, vb: b})
    assert all(sorted(v) == ["A", "B"] for v in version_of_results(db).values())
    queue = rv.review_queue(engine, class_name="screw", order="score")
    assert len(queue) == 5 and {r["model_version"] for r in queue} == {"A"}
    rv.save_threshold(engine, "screw", 0.0, "qa")  # for the active version A: everything is a defect
    assert rv.current_threshold(engine, "screw", vb) is None  # B is not calibrated
    assert {r["decision"] for r in rv.review_queue(engine, class_name="screw")} == {"defect"}
    assert {r["decision"] for r in rv.review_queue(engine, class_name="screw", model_version_id=vb)} == {None}
    rows = rv.review_queue(engine, class_name="screw")
    rv.record_review(engine, rows[0]["id"], "defect", "qa", result_id=rows[0]["result_id"])
    rv.record_review(engine, rows[1]["id"], "normal", "qa", result_id=rows[1]["result_id"])
    report = rv.compare_versions(engine, "screw", va, vb)
    assert report["reviewed_images"] == 2 and report["disagreements"] is None
    csv_text = rv.export_csv(engine, "screw")
    assert ",A," in csv_text and ",B," not in csv_text
    shadow(settings, "B", "screw", "qa", stop=True)
    small_png(intake.folders[0].path / "after.png", 77)
    intake.scan()
    intake.tick()
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(jobs).where(jobs.c.model_version_id == vb)
                            ).scalar_one() == 5
    engine.dispose()


def test_sigkill_of_a_worker_mid_backfill_loses_and_duplicates_nothing(tmp_path):
    from inspector.pipeline import record_version
    from inspector.promotion import promote

    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    settings = fast_settings(tmp_path, db)
    register_tiny(settings, "A", "B")
    engine = open_store(db, auto_upgrade=True)
    va = record_version(engine, _load(settings, "A")[0])
    folder = make_folder(tmp_path, "old", 40, 0)
    intake = Intake(engine, [WatchedFolder(folder, "screw")], stable_seconds=0, rescan_seconds=0)
    set_source_versions(engine, intake.folders[0].source_id, va, va)  # history nobody re-scores but B
    intake.scan()
    assert intake.tick() == 40
    assert promote(settings, "B", "screw", "qa", rescore="all")["backfill"] == 40
    engine.dispose()
    env = {"INSPECTOR_REGISTRY__PATH": str(tmp_path / "models"), "INSPECTOR_MODEL__BATCH_SIZE": "4"}
    worker = start_cli(["worker", "--model", "B"], db, tmp_path, **env)
    wait_for(lambda: len(version_of_results(db)) >= 4, 300, what="first backfill results")
    kill9(worker)
    done = start_cli(["worker", "--model", "B", "--once"], db, tmp_path, **env)
    assert done.wait(timeout=600) == 0
    by_image = version_of_results(db)
    assert len(by_image) == 40 and all(v == ["B"] for v in by_image.values()), by_image


def test_migration_0002_to_0003_keeps_every_row(tmp_path, db_url):
    from inspector.store.review import review_queue
    from inspector.store.routing import route_unrouted

    upgrade(db_url, "0002")
    engine = create_engine(db_url)
    old = MetaData()
    old.reflect(engine)
    t = old.tables
    now = utcnow()
    image = {"size": 1, "mtime_ns": 1, "attempts": 1, "next_attempt_at": now, "discovered_at": now, "updated_at": now}
    with engine.begin() as conn:
        src = conn.execute(t["sources"].insert().values(path=str(tmp_path), class_name="screw", recursive=False,
                                                        created_at=now)).inserted_primary_key[0]
        mv1, mv2 = (conn.execute(t["model_versions"].insert().values(
            name=n, detector="bayes-pfl", manifest="{}", random_weights=True, created_at=now)).inserted_primary_key[0]
            for n in ("old-a", "old-b"))
        ids = {}
        for name, status in (("done1", "done"), ("done2", "done"), ("pend", "pending"), ("held", "claimed"),
                             ("bad", "failed"), ("copy", "duplicate")):
            ids[name] = conn.execute(t["images"].insert().values(
                source_id=src, path=str(tmp_path / f"{name}.png"), class_name="screw", sha256=name.ljust(64, "0"),
                status=status, claimed_by="w" if status == "claimed" else None, **image)).inserted_primary_key[0]
        for name, mv, score in (("done1", mv1, 0.2), ("done2", mv1, 0.8), ("done2", mv2, 0.7)):
            conn.execute(t["results"].insert().values(image_id=ids[name], model_version_id=mv, image_score=score,
                                                      anomaly_map=b"png", map_width=1, map_height=1, created_at=now))
        conn.execute(t["thresholds"].insert().values(class_name="screw", version=1, value=0.5, created_by="ana",
                                                     created_at=now))
        conn.execute(t["thresholds"].insert().values(class_name="bolt", version=1, value=0.4, created_by="ana",
                                                     created_at=now))
        conn.execute(t["reviews"].insert().values(image_id=ids["done2"], verdict="defect", reviewer="ana",
                                                  created_at=utcnow()))
    counts_before = {name: _count(engine, table) for name, table in t.items() if name != "alembic_version"}
    engine.dispose()
    assert upgrade(db_url) == "0005"
    engine = open_store(db_url)
    new = MetaData()
    new.reflect(engine)
    for name, count in counts_before.items():
        assert _count(engine, new.tables[name]) == count, name
    with engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(jobs).where(jobs.c.status == "done")).scalar_one() == 3
        digests = conn.execute(select(model_versions.c.digest)).scalars().all()
        assert len(set(digests)) == 2 and all(len(d) == 64 for d in digests)
        th = {r.class_name: r.model_version_id for r in conn.execute(select(thresholds))}
        assert th == {"screw": mv2, "bolt": None}  # the version of the class's latest result
        review = conn.execute(select(new.tables["reviews"].c.result_id)).scalar_one()
        assert review is not None
        statuses = dict(conn.execute(select(new.tables["images"].c.path, new.tables["images"].c.status)).all())
    assert statuses[str(tmp_path / "held.png")] == "pending"
    queue = review_queue(engine, class_name="screw")
    assert {(os.path.basename(r["path"]), r["model_version"]) for r in queue} == {("done2.png", "old-b")}
    assert queue[0]["threshold"] == 0.5 and queue[0]["decision"] == "defect"
    set_source_versions(engine, src, None, mv1)
    assert route_unrouted(engine) == 2  # the pending and the once-claimed image get their live job
    engine.dispose()


def _count(engine, table) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def test_sources_config_is_validated(tmp_path):
    from inspector.config import ConfigError, load_settings

    path = tmp_path / "config.toml"
    path.write_text('[[sources]]\npath = "/x"\nclass_name = "screw"\nmodel = "a"\ndetector = "winclip"\n')
    with pytest.raises(ConfigError, match="model or detector, not both"):
        load_settings(path, environ={})
    path.write_text('[[sources]]\npath = "/x"\nclas_name = "screw"\n')
    with pytest.raises(ConfigError, match="unknown key 'clas_name'"):
        load_settings(path, environ={})
    path.write_text('[[sources]]\npath = "/x"\nclass_name = "screw"\npolling = true\n')
    assert load_settings(path, environ={}).sources[0].polling is True


def test_reviewer_rejections_leave_musc_s_rolling_pool(tmp_path):
    """Issue 16: an image a reviewer judged a defect is taken out of its class's pool by the serving worker."""
    from inspector.pipeline import Models, make_worker, record_version
    from inspector.store.review import record_review, review_queue
    from inspector.versions import build, recipe_from_settings

    db = f"sqlite:///{tmp_path / 'inspector.sqlite'}"
    settings = fast_settings(tmp_path, db, detector="musc")
    settings.override("musc", pool_dir="")
    engine = open_store(db, auto_upgrade=True)
    recipe = recipe_from_settings(settings)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        musc = build(recipe, settings)
    version = record_version(engine, recipe)
    folder = make_folder(tmp_path, "line", 6, 0)
    intake = Intake(engine, [WatchedFolder(folder, "screw")], stable_seconds=0, rescan_seconds=0)
    set_source_versions(engine, intake.folders[0].source_id, version, version)
    intake.scan()
    assert intake.tick() == 6
    make_worker(engine, {version: musc}, settings).run(threading.Event(), until_empty=lambda: True)
    assert musc.pool_count("screw") == 6
    rejected = review_queue(engine, class_name="screw", limit=10)[0]
    record_review(engine, rejected["id"], "defect", "qa")
    record_review(engine, review_queue(engine, class_name="screw", limit=10)[1]["id"], "normal", "qa")
    models = Models(engine, settings)
    assert models.sync_reviews([musc]) == 1
    assert musc.pool_count("screw") == 5
    from inspector.detectors.musc import content_hash
    from inspector.imaging import preprocess

    gone = content_hash(preprocess([rejected["path"]], musc.image_size)[0])
    assert gone not in musc._pools["screw"].hashes
    assert models.sync_reviews([musc]) == 0  # each review is passed once
    engine.dispose()
