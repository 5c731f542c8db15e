"""Services behind `inspector watch`, `worker` and `status`: wire settings, store, model, intake, worker."""

from __future__ import annotations

import hashlib
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
from .intake import Intake, WatchedFolder
from .store.db import open_store
from .store.queue import ensure_model_version, pending_count
from .worker import Worker

log = logging.getLogger(__name__)


class RandomWeightsRefused(ValueError):
    pass


def _has_trained_model(settings: Settings, class_name: str | None = None) -> bool:
    from .detectors import detector_class
    from .registry import active_version

    m = settings.model
    return bool(m.name or m.head or active_version(settings.registry.path, class_name)
                or not detector_class(m.detector).trainable)


def fallback_reason(settings: Settings, class_name: str | None = None) -> str | None:
    """Why the training-free fallback scores instead of the configured detector (None: it does not)."""
    m = settings.model
    if _has_trained_model(settings, class_name) or m.fallback in ("", "none") or m.fallback == m.detector:
        return None
    return (f"{m.detector} has no trained head yet ([model] head / name, or a promoted version); scoring with "
            f"{m.fallback}, which needs no training, until one is configured")


def check_weights_allowed(settings: Settings, class_name: str | None = None) -> None:
    """Production verbs refuse random backbones and untrained heads unless explicitly allowed."""
    m = settings.model
    if m.allow_random_weights or m.name:
        return
    if m.pretrained == "random":
        raise RandomWeightsRefused(
            "the backbone has random weights ([model] pretrained = \"random\"); configure real weights, or pass "
            "--allow-random-weights for a test run")
    if not _has_trained_model(settings, class_name) and m.fallback in ("", "none"):
        raise RandomWeightsRefused(
            f"no trained {m.detector} model configured and [model] fallback = \"none\"; configure [model] name "
            "or head, set fallback = \"winclip\", or pass --allow-random-weights for a test run")


def load_detector(settings: Settings, class_name: str | None = None) -> Any:
    """The configured model; with no [model] name or head, the version promoted for ``class_name`` (or for
    the site); with none of those, the training-free fallback (WinCLIP), saying so in the log and in the
    provenance every result and the dashboard carry."""
    from .registry import active_version, load_model

    check_weights_allowed(settings, class_name)
    name = None
    if not settings.model.name and not settings.model.head and class_name:
        name = active_version(settings.registry.path, class_name)
    reason = fallback_reason(settings, class_name)
    if reason:
        log.warning("DAY ONE: %s", reason)
        detector = load_model(None, settings=settings, use_active=False, detector=settings.model.fallback)
        detector.provenance["fallback"] = reason
        detector.provenance["configured_detector"] = settings.model.detector
    else:
        detector = load_model(name, settings=settings)
    if detector.provenance.get("random_weights") and not settings.model.allow_random_weights:
        raise RandomWeightsRefused(f"model '{settings.model.name}' has random or untrained weights; pass "
                                   "--allow-random-weights for a test run")
    return detector


def model_version_name(detector: Any) -> str:
    p = detector.provenance
    if p.get("model"):
        return str(p["model"])
    head = p.get("head")
    if head and Path(head).is_file():
        tag = hashlib.sha256(Path(head).read_bytes()).hexdigest()[:12]
    else:
        tag = "untrained" if getattr(detector, "trainable", True) else "training-free"
    return f"{detector.name}:{p.get('backbone')}:{tag}"


def register_model_version(engine: Engine, detector: Any) -> int:
    return ensure_model_version(engine, model_version_name(detector), detector.name, detector.provenance,
                                bool(detector.provenance.get("random_weights")))


def make_worker(engine: Engine, detector: Any, settings: Settings, on_batch=None) -> Worker:
    w = settings.watch
    return Worker(engine, detector, register_model_version(engine, detector), batch_size=settings.model.batch_size,
                  lease_seconds=w.lease_seconds, max_attempts=w.max_attempts, map_size=w.map_size,
                  decode_threads=w.decode_threads, on_batch=on_batch)


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


def watch(settings: Settings, folders: list[WatchedFolder], once: bool = False, stop: threading.Event | None = None,
          metrics_port: int | None = None, intake_only: bool = False) -> dict[str, Any]:
    """Intake plus a worker. ``once``: score the backlog, then return. Returns counts for the caller."""
    stop = stop or threading.Event()
    engine = open_store(settings.database.url, auto_upgrade=True)
    class_names = {f.class_name for f in folders}
    detector = load_detector(settings, class_names.pop() if len(class_names) == 1 else None)
    metrics = Metrics(metrics_port, engine, settings.watch.metrics_address) if metrics_port else None
    worker = make_worker(engine, detector, settings, on_batch=metrics.on_batch if metrics else None)
    w = settings.watch
    intake = Intake(engine, folders, stable_seconds=w.stable_seconds, rescan_seconds=0 if once else w.rescan_seconds,
                    polling=w.polling)
    started = time.perf_counter()
    if once:
        intake.scan()
        while not stop.is_set():  # wait for files still being written, then register them
            intake.tick()
            if intake.pending_candidates() == 0:
                break
            stop.wait(0.2)
        worker.run(stop, until_empty=lambda: pending_count(engine) == 0, idle_seconds=w.idle_seconds)
    else:
        thread = threading.Thread(target=intake.run, args=(stop,), name="intake", daemon=True)
        thread.start()
        try:
            worker.run(stop, idle_seconds=w.idle_seconds)
        finally:
            stop.set()
            thread.join(timeout=10)
    elapsed = time.perf_counter() - started
    engine.dispose()
    return {"stored": worker.stored, "failed": worker.failed, "seconds": elapsed, "intake": dict(intake.counts),
            "model_version": model_version_name(detector), "random_weights": bool(detector.provenance.get(
                "random_weights"))}


def run_worker(settings: Settings, stop: threading.Event | None = None, metrics_port: int | None = None) -> int:
    stop = stop or threading.Event()
    engine = open_store(settings.database.url)
    detector = load_detector(settings)
    metrics = Metrics(metrics_port, engine, settings.watch.metrics_address) if metrics_port else None
    worker = make_worker(engine, detector, settings, on_batch=metrics.on_batch if metrics else None)
    worker.run(stop, idle_seconds=settings.watch.idle_seconds)
    engine.dispose()
    return worker.stored


def status_json(settings: Settings) -> str:
    from .store.queue import status

    engine = open_store(settings.database.url)
    try:
        return json.dumps(status(engine), default=str)
    finally:
        engine.dispose()


def score_files(settings: Settings, files: list[Path], class_name: str,
                progress: Callable[[int], None] | None = None) -> tuple[list[dict[str, Any]], Any]:
    """`inspector score`: the same queue, worker and store as `watch`, for a given list of files.

    Files already scored (same path and content) are not scored again; their stored result is returned.
    Returns one row per file (path, status, error, scores, the map PNG) and the detector.
    """
    import os

    from sqlalchemy import select

    from .intake import sha256_file
    from .store.queue import register_file
    from .store.schema import CLAIMED, DUPLICATE, PENDING, images, results

    engine = open_store(settings.database.url, auto_upgrade=True)
    detector = load_detector(settings)
    paths = [str(f.resolve()) for f in files]
    for path in paths:
        try:
            sha, size = sha256_file(path)
            register_file(engine, None, class_name, path, sha, size, os.stat(path).st_mtime_ns)
        except OSError as exc:
            register_file(engine, None, class_name, path, None, None, None,
                          error=f"cannot read the file: {exc.strerror or exc}")

    def rows_for() -> dict[str, Any]:
        with engine.connect() as conn:
            found = conn.execute(select(images).where(images.c.path.in_(paths)).order_by(images.c.id)).mappings().all()
        return {r["path"]: r for r in found}  # the newest row per path

    def remaining() -> int:
        return sum(1 for r in rows_for().values() if r["status"] in (PENDING, CLAIMED))

    total = len(paths)
    worker = make_worker(engine, detector, settings,
                         on_batch=(lambda claimed, stored, s: progress(total - remaining())) if progress else None)
    worker.run(threading.Event(), until_empty=lambda: remaining() == 0, idle_seconds=settings.watch.idle_seconds)
    by_path = rows_for()
    out = []
    with engine.connect() as conn:
        for path in paths:
            row = by_path.get(path)
            image_id = row["duplicate_of"] if row is not None and row["status"] == DUPLICATE else (row or {}).get("id")
            result = None
            if image_id is not None:
                result = conn.execute(select(results).where(results.c.image_id == image_id)
                                      .order_by(results.c.id.desc()).limit(1)).mappings().first()
            out.append({"path": path, "status": row["status"] if row is not None else "missing",
                        "error": row["error"] if row is not None else "not registered",
                        "image_score": result["image_score"] if result else None,
                        "text_score": result["text_score"] if result else None,
                        "topk_score": result["topk_score"] if result else None,
                        "latency_ms": result["latency_ms"] if result else None,
                        "anomaly_map_png": result["anomaly_map"] if result else None})
    engine.dispose()
    return out, detector
