"""Services behind `inspector watch`, `worker` and `status`: wire settings, store, model, intake, worker."""

from __future__ import annotations

import dataclasses
import json
import logging
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy import Engine

from .config import Settings
from .errors import InspectorError
from .intake import Intake, WatchedFolder
from .store.db import open_store
from .store.decisions import DecisionPolicy
from .store.queue import pending_count
from .store.versions import ensure_model_version, promoted_version, record_promotion, version_row
from .versions import Recipe, build, recipe_from_registry, recipe_from_settings, with_class_descriptions
from .worker import Worker

log = logging.getLogger(__name__)


class RandomWeightsRefused(InspectorError, ValueError):
    pass


def fallback_reason(settings: Settings) -> str | None:
    """Why the training-free fallback scores instead of the configured detector (None: it does not)."""
    from .detectors import detector_class

    m = settings.model
    if m.name or m.head or not detector_class(m.detector).trainable or m.fallback in ("", "none") \
            or m.fallback == m.detector:
        return None
    return (f"{m.detector} has no trained head yet ([model] head / name, or a promoted version); scoring with "
            f"{m.fallback}, which needs no training, until one is configured")


def default_recipe(settings: Settings) -> Recipe:
    """The version ``settings`` describe, promotions aside: ``[model] name`` (a registered version), else the
    configured detector with its head, else (a trainable detector without a head) the day-one fallback."""
    m = settings.model
    if m.name:
        return recipe_from_registry(settings, m.name)
    reason = fallback_reason(settings)
    if reason:
        return recipe_from_settings(settings, detector=m.fallback, fallback=reason)
    return recipe_from_settings(settings)


def check_weights_allowed(settings: Settings, recipe: Recipe) -> None:
    """Production verbs refuse random backbones and untrained heads unless explicitly allowed."""
    m = settings.model
    if m.allow_random_weights or not recipe.random_weights:
        return
    if recipe.identity.get("weights") == "random":
        raise RandomWeightsRefused(
            f"model version {recipe.name} has a random backbone ([model] pretrained = \"random\"); configure real "
            "weights, or pass --allow-random-weights for a test run")
    if recipe.registry_name:
        raise RandomWeightsRefused(f"model '{recipe.name}' has random or untrained weights; pass "
                                   "--allow-random-weights for a test run")
    raise RandomWeightsRefused(
        f"no trained {recipe.detector} model configured and [model] fallback = \"{m.fallback}\"; configure "
        "[model] name or head, set fallback = \"winclip\", or pass --allow-random-weights for a test run")


def record_version(engine: Engine, recipe: Recipe) -> int:
    """The store's id of ``recipe``'s version (recorded on first sight; every box finds the same row)."""
    return ensure_model_version(engine, recipe.name, recipe.detector, recipe.manifest(), recipe.random_weights,
                                digest=recipe.digest, registry_name=recipe.registry_name)


class Models:
    """The model versions one process has loaded (version id -> detector), each loaded once.

    A version is built from a recipe this process knows (its own settings' versions) or, for a version
    another box recorded, from the registry folder it names, provided that this box's settings give the
    same digest (otherwise it would score a different function under the version's name: it refuses, and
    says so once)."""

    def __init__(self, engine: Engine, settings: Settings):
        self.engine = engine
        self.settings = settings
        self.loaded: dict[int, Any] = {}
        self.recipes: dict[int, Recipe] = {}
        self._settings: dict[int, Settings] = {}
        self._cannot: set[int] = set()
        self._last_review = 0  # reviews passed to the detectors so far (``sync_reviews``)

    def add(self, recipe: Recipe, settings: Settings | None = None) -> int:
        """Record a version this process can build (with ``settings``, default the process's own)."""
        version = record_version(self.engine, recipe)
        self.recipes.setdefault(version, recipe)
        self._settings.setdefault(version, settings or self.settings)
        return version

    def get(self, version: int) -> Any | None:
        """The loaded detector of ``version``, loading it first; None if this box cannot build it."""
        if version in self.loaded:
            return self.loaded[version]
        if version in self._cannot:
            return None
        recipe = self.recipes.get(version) or self._recipe_from_store(version)
        if recipe is None:
            self._cannot.add(version)
            return None
        settings = self._settings.get(version, self.settings)
        try:
            check_weights_allowed(settings, recipe)
        except RandomWeightsRefused as exc:
            if version not in self.recipes:  # another box's version: skip it, keep serving the rest
                log.error("not serving model version %s: %s", recipe.name, exc)
                self._cannot.add(version)
                return None
            raise
        log.info("loading model version %s (%s, digest %s)", recipe.name, recipe.detector, recipe.digest[:12])
        if recipe.fallback:
            log.warning("DAY ONE: %s", recipe.fallback)
        try:
            self.loaded[version] = build(recipe, settings)
        except Exception:
            if version in self.recipes:  # this process's own version: the user's configuration, say it
                raise
            log.exception("cannot load model version %s; leaving its jobs to other boxes", recipe.name)
            self._cannot.add(version)
            return None
        self.recipes[version] = recipe
        return self.loaded[version]

    def _recipe_from_store(self, version: int) -> Recipe | None:
        from .registry import RegistryError

        with self.engine.connect() as conn:
            row = version_row(conn, version)
        if row is None:
            return None
        if not row["registry_name"]:
            log.warning("model version %s was recorded by another box from its own settings; this box can "
                        "serve it only with the same settings", row["name"])
            return None
        try:
            recipe = recipe_from_registry(self.settings, row["registry_name"])
        except RegistryError as exc:
            log.warning("cannot serve model version %s: %s", row["name"], exc)
            return None
        try:  # the class descriptions it was recorded with (a [[sources]] class_description on another box)
            described = json.loads(row["manifest"] or "{}").get("identity", {}).get("class_descriptions")
        except (ValueError, AttributeError):
            described = None
        recipe = with_class_descriptions(recipe, described)
        if recipe.digest != row["digest"]:
            log.warning("cannot serve model version %s: this box's settings give it another identity (digest "
                        "%s, recorded %s): align [model] / detector options with the box that recorded it",
                        row["name"], recipe.digest[:12], row["digest"][:12])
            return None
        return recipe

    def serving(self, versions: list[int] | set[int]) -> dict[int, Any]:
        """The detectors of those of ``versions`` this box can build (loading any not loaded yet), after
        passing them the reviews written since the last call (``sync_reviews``)."""
        out = {}
        for version in versions:
            detector = self.get(version)
            if detector is not None:
                out[version] = detector
        self.sync_reviews(out.values())
        return out

    def sync_reviews(self, detectors: Any) -> int:
        """Tell detectors that learn from the line (``on_reviews``, e.g. MuSc's rolling pool, which drops images
        a reviewer rejected and prefers those accepted) about the verdicts written since the last call: each
        image once, by its latest review (``store.pool_reviews``). Returns how many defect verdicts were passed
        (the accepted normals go along)."""
        from .store.pool_reviews import pool_reviews_since

        learners = [d for d in detectors if hasattr(d, "on_reviews")]
        if not learners:
            return 0
        defects, normals, self._last_review = pool_reviews_since(self.engine, self._last_review)
        if not defects and not normals:
            return 0
        for detector in learners:
            try:
                detector.on_reviews(defects, normals=normals)
            except Exception:  # a detector's bookkeeping must never stop scoring
                log.exception("%s could not take %d reviews into account", detector.name,
                              len(defects) + len(normals))
        return len(defects)


def load_detector(settings: Settings, class_name: str | None = None, engine: Engine | None = None) -> Any:
    """A ready detector for one-off work (``eval``): the configured version, or, when nothing is configured
    and a database is given, the version promoted for ``class_name`` (or the site)."""
    recipe = resolve_recipe(settings, engine, class_name)
    check_weights_allowed(settings, recipe)
    if recipe.fallback:
        log.warning("DAY ONE: %s", recipe.fallback)
    return build(recipe, settings)


def resolve_recipe(settings: Settings, engine: Engine | None = None, class_name: str | None = None) -> Recipe:
    """The configured version (``[model] name`` or head); else the one promoted for ``class_name`` (or the
    site) in the database; else the default (``default_recipe``)."""
    m = settings.model
    if engine is not None and not (m.name or m.head):
        with engine.connect() as conn:
            promoted = promoted_version(conn, class_name)
            row = version_row(conn, promoted) if promoted is not None else None
        if row is not None and row["registry_name"]:
            return recipe_from_registry(settings, row["registry_name"])
    return default_recipe(settings)


def register_model_version(engine: Engine, detector: Any, source_ids: list[int] | None = None) -> int:
    """Record an already loaded detector as a version (identity: its provenance) and, for ``source_ids``,
    route their new images to it: for one-off tools (bench) and tests that build a detector themselves."""
    from .hashing import digest_of
    from .store.routing import set_source_versions

    digest = digest_of({"detector": detector.name, "provenance": detector.provenance})
    version = ensure_model_version(engine, f"{detector.name}@{digest[:12]}", detector.name,
                                   {"provenance": detector.provenance}, bool(detector.provenance.get("random_weights")),
                                   digest=digest)
    for source in source_ids or []:
        set_source_versions(engine, source, version, version)
    return version


def decision_policy(settings: Settings) -> DecisionPolicy:
    """``[decisions]`` and the enabled ``[outputs]`` sinks, as the store applies them."""
    from .delivery import enabled_sinks

    return DecisionPolicy(**dataclasses.asdict(settings.decisions), sinks=enabled_sinks(settings.outputs))


def make_worker(engine: Engine, models: dict[int, Any], settings: Settings, on_batch=None, refresh=None) -> Worker:
    w = settings.watch
    return Worker(engine, models, batch_size=settings.model.batch_size, lease_seconds=w.lease_seconds,
                  max_attempts=w.max_attempts, map_size=w.map_size, decode_threads=w.decode_threads,
                  on_batch=on_batch, refresh=refresh, policy=decision_policy(settings),
                  pixel_budget=w.batch_pixel_budget)


def start_delivery(engine: Engine, settings: Settings, source_ids: list[int | None],
                   stop: threading.Event, hide_paths: set[int] | None = None) -> tuple[Any, threading.Thread] | None:
    """A ``Dispatcher`` thread for these sources' events, if any ``[outputs]`` sink is configured (the
    events of ``hide_paths`` sources without their path)."""
    from .delivery import Dispatcher, enabled_sinks

    if not enabled_sinks(settings.outputs):
        return None
    dispatcher = Dispatcher(engine, settings.outputs, source_ids, hide_paths=hide_paths)
    thread = threading.Thread(target=dispatcher.run, args=(stop,), name="delivery", daemon=True)
    thread.start()
    return dispatcher, thread


def finish_delivery(engine: Engine, delivery: tuple[Any, threading.Thread] | None, stop: threading.Event,
                    source_ids: list[int | None], wait_seconds: float = 10.0) -> None:
    """Give the dispatcher up to ``wait_seconds`` to send what is pending (a batch run), then stop it; what
    is left stays in the outbox for the next run."""
    from .store.outbox import due

    if delivery is None:
        return
    dispatcher, thread = delivery
    deadline = time.monotonic() + wait_seconds
    while time.monotonic() < deadline and any(due(engine, name, source_ids, 1) for name in dispatcher.sinks):
        time.sleep(0.1)
    stop.set()
    thread.join(timeout=wait_seconds + 10)


def import_legacy_registry(engine: Engine, settings: Settings) -> int:
    """Bring a pre-0003 ``models/promotions.jsonl`` into the promotions table once (then renamed to
    ``promotions.jsonl.imported``, nothing deleted). Returns how many promotions were imported."""
    import datetime as dt

    from .registry import RegistryError

    path = Path(settings.registry.path) / "promotions.jsonl"
    if not path.is_file():
        return 0
    imported = 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        entry = json.loads(line)
        try:
            version = record_version(engine, recipe_from_registry(settings, entry["model"]))
        except RegistryError as exc:
            log.warning("promotions.jsonl: skipping %s: %s", entry.get("model"), exc)
            continue
        at = dt.datetime.fromisoformat(entry["at"]).astimezone(dt.timezone.utc).replace(tzinfo=None) \
            if entry.get("at") else None
        record_promotion(engine, version, entry.get("class_name"), "promote", entry.get("by") or "unknown",
                         entry.get("note"), at=at)
        imported += 1
    path.rename(path.with_name(path.name + ".imported"))
    log.info("imported %d promotions from %s into the database", imported, path)
    return imported


def install_signal_handlers(stop: threading.Event) -> None:
    """First SIGTERM/SIGINT: finish the current batch and exit. Second: exit now (leases make it safe)."""

    def handler(signum, _frame):
        if stop.is_set():
            log.warning("second %s: exiting now", signal.Signals(signum).name)
            raise SystemExit(130)
        log.info("%s: finishing the current batch, then exiting", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


class Metrics:
    """Prometheus metrics on ``--metrics-port`` (created only when asked for), on ``address`` only
    (``[watch] metrics_address``, loopback by default)."""

    def __init__(self, port: int, engine: Engine, address: str = "127.0.0.1"):
        from prometheus_client import Counter, Gauge, Histogram, start_http_server

        self.scored = Counter("inspector_images_scored_total", "Images scored and stored")
        self.claimed = Counter("inspector_images_claimed_total", "Images claimed by this worker")
        self.batch = Histogram("inspector_batch_seconds", "Seconds per batch, read to stored")
        queue_depth = Gauge("inspector_queue_depth", "Images waiting to be scored")
        queue_depth.set_function(lambda: _safe(lambda: pending_count(engine)))
        outbox_pending = Gauge("inspector_outbox_pending", "Decision events not yet accepted by their sink",
                               ["sink"])
        from .delivery import SINKS
        from .store.outbox import backlog

        for sink in SINKS:
            outbox_pending.labels(sink).set_function(
                lambda sink=sink: _safe(lambda: backlog(engine).get(sink, {}).get("pending", 0)))
        start_http_server(port, addr=address)

    def on_batch(self, claimed: int, stored: int, seconds: float) -> None:
        self.claimed.inc(claimed)
        self.scored.inc(stored)
        self.batch.observe(seconds)


def _safe(fn: Callable[[], float]) -> float:
    try:
        return float(fn())
    except Exception:  # noqa: BLE001 - the database may be down; the gauge says NaN
        return float("nan")


def folder_settings(settings: Settings, folder: WatchedFolder) -> Settings:
    """The settings a folder's default version is built from: the daemon's, with its own model/detector and
    AA-CLIP domain (part of the version's identity: a medical folder scores under a version of its own)."""
    import copy

    if not (folder.model or folder.detector or folder.domain):
        return settings
    own = copy.deepcopy(settings)
    if folder.model:
        own.model.name = folder.model
    if folder.detector:
        own.model.name = ""
        own.model.detector = folder.detector
    if folder.domain:
        own.aa_clip.domain = folder.domain
    return own


def watch(settings: Settings, folders: list[WatchedFolder], once: bool = False, stop: threading.Event | None = None,
          metrics_port: int | None = None, intake_only: bool = False) -> dict[str, Any]:
    """Intake for every folder plus one worker serving every version they route to. ``once``: score the
    backlog, then return. Returns counts for the caller.

    Each folder's images go to the version active for its class (``store/routing.py``); a folder with its
    own model or detector is pinned to it. Distinct versions are loaded once; a promotion or a new shadow
    made anywhere is picked up within ``refresh_seconds`` (the worker loads the version then)."""
    from .store.routing import route_unrouted, served_versions, set_source_versions

    stop = stop or threading.Event()
    engine = open_store(settings.database.url, auto_upgrade=True)
    import_legacy_registry(engine, settings)
    models = Models(engine, settings)
    w = settings.watch
    intake = Intake(engine, folders, stable_seconds=w.stable_seconds, rescan_seconds=0 if once else w.rescan_seconds,
                    polling=w.polling)
    for folder in folders:
        own = folder_settings(settings, folder)
        plain = default_recipe(own)
        recipe = with_class_descriptions(plain, {folder.class_name: folder.class_description})
        check_weights_allowed(own, recipe)
        version = models.add(recipe, own)
        pinned = bool(folder.model or folder.detector or folder.domain or settings.model.name or settings.model.head
                      or recipe.digest != plain.digest)  # described in the site's words: that version
        set_source_versions(engine, folder.source_id, version if pinned else None, version)
    source_ids = [f.source_id for f in folders]
    routed = route_unrouted(engine, source_ids)
    if routed:
        log.info("routed %d images carried over without a job", routed)

    def refresh(worker: Worker) -> None:
        with engine.connect() as conn:
            wanted = served_versions(conn, source_ids)
        worker.models = models.serving(wanted)

    metrics = Metrics(metrics_port, engine, settings.watch.metrics_address) if metrics_port else None
    worker = make_worker(engine, {}, settings, on_batch=metrics.on_batch if metrics else None, refresh=refresh)
    refresh(worker)
    sending = threading.Event()
    delivery = start_delivery(engine, settings, list(source_ids), sending,
                              hide_paths={f.source_id for f in folders if f.hide_paths})
    started = time.perf_counter()
    if once:
        intake.scan()
        while not stop.is_set():  # wait for files still being written, then register them
            intake.tick()
            if intake.pending_candidates() == 0:
                break
            stop.wait(0.2)
        worker.run(stop, until_empty=lambda: pending_count(engine, worker.models) == 0, idle_seconds=w.idle_seconds)
    else:
        thread = threading.Thread(target=intake.run, args=(stop,), name="intake", daemon=True)
        thread.start()
        try:
            worker.run(stop, idle_seconds=w.idle_seconds)
        finally:
            stop.set()
            thread.join(timeout=10)
    elapsed = time.perf_counter() - started
    finish_delivery(engine, delivery, sending, list(source_ids), wait_seconds=10.0 if once else 5.0)
    engine.dispose()
    names = sorted({models.recipes[v].name for v in models.loaded})
    return {"stored": worker.stored, "failed": worker.failed, "seconds": elapsed, "intake": dict(intake.counts),
            "model_version": ", ".join(names),
            "random_weights": any(models.recipes[v].random_weights for v in models.loaded),
            "fallback": next((models.recipes[v].fallback for v in models.loaded if models.recipes[v].fallback),
                             None)}


def run_worker(settings: Settings, stop: threading.Event | None = None, metrics_port: int | None = None,
               pinned: bool = False, until_empty: bool = False) -> int:
    """`inspector worker`: no intake. ``pinned`` (``--model`` / ``--detector``): only the version the
    settings describe; otherwise every version with work waiting that this box can build, the routing
    read from the database alone (promotions made on any box included)."""
    from .store.routing import route_unrouted, versions_with_work

    stop = stop or threading.Event()
    engine = open_store(settings.database.url)
    import_legacy_registry(engine, settings)
    models = Models(engine, settings)
    own = models.add(default_recipe(settings))

    def refresh(worker: Worker) -> None:
        route_unrouted(engine, fallback=own)  # images no watcher routed (intake without a version, 0002 rows)
        if pinned:
            worker.models = models.serving([own])
            return
        with engine.connect() as conn:
            waiting = versions_with_work(conn)
        worker.models = models.serving(waiting)

    metrics = Metrics(metrics_port, engine, settings.watch.metrics_address) if metrics_port else None
    worker = make_worker(engine, {}, settings, on_batch=metrics.on_batch if metrics else None, refresh=refresh)
    worker.run(stop, idle_seconds=settings.watch.idle_seconds,
               until_empty=(lambda: pending_count(engine, worker.models or None) == 0) if until_empty else None)
    engine.dispose()
    return worker.stored


def score_files(settings: Settings, files: list[Path], class_name: str,
                progress: Callable[[int, int], None] | None = None, window: str | None = None,
                class_description: str | None = None) -> tuple[list[dict[str, Any]], Any]:
    """`inspector score`: the same queue, worker and store as `watch`, for a given list of files.

    The version is the configured one (``--model``, ``[model] name`` / head), else the one promoted for
    ``class_name``, else the default. Each file gets a job for that version; a file already scored *by that
    version* (same content) is not scored again and its stored result is returned; a file scored only by
    another version is scored now. Files are read for registration as intake reads them (``intake.examine``):
    a DICOM file (``.dcm``, or the DICM preamble) becomes one image per frame, in ``window`` (a preset or
    "center/width"; None: the file's), and one that cannot become images is recorded as failed with its
    reason. Returns one row per image, i.e. per file and per frame of a multi-frame DICOM file (path,
    status, error, scores, model version, the map PNG; a DICOM row also its frame and UIDs), and the
    detector. ``class_description``: the words the text prompts use for the class (a version of its own,
    ``versions.with_class_descriptions``). ``progress(done, total)`` is called after each batch.
    """
    import os

    from sqlalchemy import select

    from .dicom import DicomError
    from .intake import examine
    from .store.dicom import event_fields
    from .store.queue import register_file
    from .store.schema import CLAIMED, DUPLICATE, MANUAL, PENDING, images, jobs, results

    engine = open_store(settings.database.url, auto_upgrade=True)
    import_legacy_registry(engine, settings)
    models = Models(engine, settings)
    recipe = with_class_descriptions(resolve_recipe(settings, engine, class_name), {class_name: class_description})
    version = models.add(recipe)
    detector = models.get(version)
    wanted = [(version, MANUAL)]
    paths = [str(f.resolve()) for f in files]
    content: dict[str, str] = {}  # path -> the content read now (a path seen before with other content)
    for path in paths:
        try:
            found = examine(path, window, images_too=True)
            register_file(engine, None, class_name, path, found.sha256, found.size, os.stat(path).st_mtime_ns,
                          wanted=wanted, dicom=found.dicom)
            content[path] = found.sha256
        except DicomError as exc:
            register_file(engine, None, class_name, path, None, None, None, error=str(exc))
        except OSError as exc:
            register_file(engine, None, class_name, path, None, None, None,
                          error=f"cannot read the file: {exc.strerror or exc}")

    def rows_for() -> list[dict[str, Any]]:
        """The image rows of the content each path holds now (one per frame; a file that could not be read:
        its newest failed row), each with its job for this version."""
        with engine.connect() as conn:
            found = conn.execute(select(images).where(images.c.path.in_(paths)).order_by(images.c.id)).mappings().all()
            failed = {r["path"]: r["id"] for r in found if r["sha256"] is None}
            chosen = [dict(r) for r in found if (r["sha256"] == content[r["path"]] if r["path"] in content
                                                 else r["id"] == failed.get(r["path"]))]
            ids = [r["duplicate_of"] if r["status"] == DUPLICATE else r["id"] for r in chosen]
            job_of = {j.image_id: j for j in conn.execute(select(jobs).where(
                jobs.c.image_id.in_(ids), jobs.c.model_version_id == version))}
        for row in chosen:
            owner = row["duplicate_of"] if row["status"] == DUPLICATE else row["id"]
            row["job"] = job_of.get(owner)
            row["owner"] = owner
        return chosen

    def remaining(rows: list[dict[str, Any]]) -> int:
        return sum(1 for r in rows if r["job"] is not None and r["job"].status in (PENDING, CLAIMED))

    def report(claimed: int, stored: int, seconds: float) -> None:
        rows = rows_for()
        progress(len(rows) - remaining(rows), len(rows))

    worker = make_worker(engine, {version: detector}, settings, on_batch=report if progress else None)
    sending = threading.Event()
    delivery = start_delivery(engine, settings, [None], sending)
    worker.run(threading.Event(), until_empty=lambda: remaining(rows_for()) == 0,
               idle_seconds=settings.watch.idle_seconds)
    finish_delivery(engine, delivery, sending, [None])
    by_path: dict[str, list[dict[str, Any]]] = {}
    for row in rows_for():
        by_path.setdefault(row["path"], []).append(row)
    out = []
    with engine.connect() as conn:
        for path in paths:
            for row in sorted(by_path.get(path) or [None], key=lambda r: r["frame"] if r else 0):
                job = row["job"] if row is not None else None
                result = None
                if job is not None:
                    result = conn.execute(select(results).where(results.c.image_id == job.image_id,
                                                                results.c.model_version_id == version)
                                          ).mappings().first()
                if row is None:
                    state, error = "missing", "not registered"
                elif job is None:
                    state, error = row["status"], row["error"]
                else:
                    state = DUPLICATE if row["status"] == DUPLICATE and job.status == "done" else job.status
                    error = job.error
                dicom = event_fields(conn, row["owner"]) if row is not None and row["sha256"] else {}
                out.append({"path": path, **dicom, "class_name": class_name, "model_version": recipe.name,
                            "model_digest": recipe.digest, "status": state, "error": error,
                            "image_score": result["image_score"] if result else None,
                            "text_score": result["text_score"] if result else None,
                            "topk_score": result["topk_score"] if result else None,
                            "latency_ms": result["latency_ms"] if result else None,
                            "decision": result["decision"] if result else None,
                            "threshold_id": result["threshold_id"] if result else None,
                            "audit": bool(result["audit"]) if result else None,
                            "anomaly_map_png": result["anomaly_map"] if result else None})
    engine.dispose()
    return out, detector
