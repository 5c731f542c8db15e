"""Worker: claim a batch -> read, hash and decode in a thread pool -> score in one batch -> store in one
transaction -> repeat. Many workers may share one Postgres; SQLite has one writer at a time.

Errors are sorted into three kinds:
* the image's own fault (not an image, truncated, too many pixels, vanished): recorded on the image as a
  permanent failure with a clear reason;
* transient (an I/O error on a share, CUDA out of memory): the image goes back to the queue with backoff,
  and fails for good after ``max_attempts``;
* the database is unreachable: the batch's results are kept in memory and written when it comes back;
  if the worker dies first, the lease expires and the images are scored again by someone.

SIGTERM / Ctrl-C: the current batch is finished and stored, claimed-but-unstarted images are released,
then the worker exits 0. A second signal exits at once (leases make that safe too).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from .imaging import ImageDecodeError, content_seed, open_image, to_model_input
from .store.maps import encode_map
from .store.queue import Claimed, Outcome, claim, complete, release

log = logging.getLogger(__name__)


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass
class Loaded:
    claimed: Claimed
    pixels: torch.Tensor | None = None
    width: int | None = None
    height: int | None = None
    error: str | None = None
    permanent: bool = True
    seed: int | None = None  # content_seed of the pixels, computed here rather than on the scoring thread


def load(item: Claimed, size: int) -> Loaded:
    """Read the file once, check it is still the content that was registered, decode, preprocess."""
    try:
        with open(item.path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return Loaded(item, error="file disappeared before it could be scored")
    except PermissionError:
        return Loaded(item, error="cannot read the file: permission denied")
    except IsADirectoryError:
        return Loaded(item, error="not a file")
    except OSError as exc:
        return Loaded(item, error=f"read error: {exc.strerror or exc}", permanent=False)
    if item.sha256 and hashlib.sha256(data).hexdigest() != item.sha256:
        return Loaded(item, error="the file was replaced after it was discovered; its new content is queued "
                                  "as a new image")
    try:
        image = open_image(io.BytesIO(data), name=item.path)
        pixels = to_model_input(image, size)
        return Loaded(item, pixels, image.width, image.height, seed=content_seed(pixels))
    except ImageDecodeError as exc:
        return Loaded(item, error=str(exc))
    except MemoryError:
        return Loaded(item, error="image too large to decode in memory")


class Worker:
    """Scores queued jobs of the model versions in ``models`` (version id -> loaded detector).

    ``refresh`` (optional) is called every ``refresh_seconds`` to bring ``models`` up to date with the
    routing in the database (a promotion, a new shadow); a batch is always one version's jobs."""

    def __init__(self, engine: Engine, models: dict[int, Any], batch_size: int = 8,
                 lease_seconds: float = 300.0, max_attempts: int = 5, map_size: int = 256,
                 decode_threads: int = 4, name: str | None = None,
                 on_batch: Callable[[int, int, float], None] | None = None,
                 refresh: Callable[[Worker], None] | None = None, refresh_seconds: float = 5.0):
        if batch_size < 1:
            raise ValueError(f"[model] batch_size must be at least 1, not {batch_size}")
        self.engine = engine
        self.models = models
        self.batch_size = batch_size
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.map_size = map_size
        self.name = name or worker_id()
        self.on_batch = on_batch
        self.refresh = refresh
        self.refresh_seconds = refresh_seconds
        self._refreshed = 0.0
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self.stored = 0
        self.failed = 0

    def close(self) -> None:
        self.pool.shutdown(wait=True)

    def _claim_and_load(self) -> tuple[list[Claimed], list[Future], Any] | None:
        """Claim a batch and start reading and decoding it in the pool (returns at once)."""
        if self.refresh is not None and time.monotonic() - self._refreshed >= self.refresh_seconds:
            self.refresh(self)
            self._refreshed = time.monotonic()
        batch = claim(self.engine, self.name, self.batch_size, self.lease_seconds, versions=list(self.models),
                      max_attempts=self.max_attempts)
        if not batch:
            return None
        detector = self.models[batch[0].model_version_id]
        return batch, [self.pool.submit(load, item, detector.image_size) for item in batch], detector

    def _finish(self, pending: tuple[list[Claimed], list[Future], Any], stop: threading.Event | None,
                started: float) -> int:
        batch, futures, detector = pending
        outcomes = self._score([f.result() for f in futures], detector)
        data = list(self.pool.map(self._encode, outcomes))
        for o, encoded in zip(outcomes, data):
            if o.result is not None:
                o.result.update(encoded)
        elapsed = time.perf_counter() - started
        for o in outcomes:
            if o.result is not None:
                o.result["latency_ms"] = elapsed * 1000 / len(batch)
        stored = self._store(outcomes, stop)
        self.stored += stored
        self.failed += sum(1 for o in outcomes if o.result is None and o.permanent)
        if self.on_batch:
            self.on_batch(len(batch), stored, elapsed)
        return len(batch)

    def _encode(self, outcome: Outcome) -> dict[str, Any]:
        if outcome.result is None:
            return {}
        data, width, height = encode_map(outcome.result.pop("anomaly_map_tensor"), self.map_size)
        return {"anomaly_map": data, "map_width": width, "map_height": height}

    def step(self, stop: threading.Event | None = None) -> int:
        """Claim and process one batch; returns how many images were claimed (0: the queue is empty)."""
        started = time.perf_counter()
        pending = self._claim_and_load()
        return 0 if pending is None else self._finish(pending, stop, started)

    def _score(self, loaded: list[Loaded], detector: Any) -> list[Outcome]:
        outcomes = [Outcome(x.claimed.id, error=x.error, permanent=x.permanent) for x in loaded]
        good = [i for i, x in enumerate(loaded) if x.pixels is not None]
        if not good:
            return outcomes
        pixels = torch.stack([loaded[i].pixels for i in good])
        names = [loaded[i].claimed.class_name for i in good]
        try:
            prediction = detector.predict_tensors(pixels, names, seeds=[loaded[i].seed for i in good]).cpu()
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            for i in good:
                outcomes[i] = Outcome(loaded[i].claimed.id, error="GPU out of memory", permanent=False)
            return outcomes
        except ValueError as exc:  # e.g. a class name the model cannot use: the images' own fault
            for i in good:
                outcomes[i] = Outcome(loaded[i].claimed.id, error=f"cannot score: {exc}")
            return outcomes
        for j, i in enumerate(good):
            outcomes[i] = Outcome(loaded[i].claimed.id, width=loaded[i].width, height=loaded[i].height, result={
                "image_score": float(prediction.image_score[j]), "text_score": float(prediction.text_score[j]),
                "topk_score": float(prediction.topk_score[j]), "anomaly_map_tensor": prediction.probability_map[j]})
        return outcomes

    def _store(self, outcomes: list[Outcome], stop: threading.Event | None) -> int:
        """Write the batch; while the database is unreachable, keep trying (the results are in memory)."""
        delay = 0.5
        while True:
            try:
                return complete(self.engine, self.name, outcomes, self.max_attempts)
            except OperationalError as exc:
                log.warning("database unavailable while storing a batch (%s); retrying in %.1fs",
                            str(exc).splitlines()[0], delay)
                if stop is not None and stop.is_set() and delay >= 30:
                    log.error("giving up on a batch at shutdown; its leases will expire and it will be rescored")
                    return 0
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def run(self, stop: threading.Event, until_empty: Callable[[], bool] | None = None,
            idle_seconds: float = 0.5) -> None:
        """Loop until ``stop`` is set, or (``until_empty``) until the queue is empty and nothing is coming."""
        delay = 0.5
        pending = None
        try:
            while not stop.is_set():
                try:
                    started = time.perf_counter()
                    if pending is None:
                        pending = self._claim_and_load()
                    claimed = 0
                    if pending is not None:
                        current, pending = pending, None
                        try:  # claim the next batch now, so that it is read and decoded while this one is scored
                            pending = self._claim_and_load()
                        except OperationalError:
                            pending = None  # the database is down; storing the current batch will wait for it
                        claimed = self._finish(current, stop, started)
                    delay = 0.5
                except OperationalError as exc:
                    log.warning("database unavailable (%s); retrying in %.1fs", str(exc).splitlines()[0], delay)
                    stop.wait(delay)
                    delay = min(delay * 2, 30.0)
                    continue
                if claimed == 0:
                    if until_empty is not None and until_empty():
                        return
                    stop.wait(idle_seconds)
        finally:
            try:
                release(self.engine, self.name)
            except SQLAlchemyError:
                pass  # the leases expire on their own
            self.close()
