"""Worker: claim a batch -> read, hash and decode in a thread pool -> score in one batch -> store in one
transaction -> repeat. Many workers may share one Postgres; SQLite has one writer at a time.

Errors are sorted into three kinds:
* the image's own fault (not an image, truncated, too many pixels, vanished): recorded on the image as a
  permanent failure with a clear reason;
* transient (an I/O error on a share, CUDA out of memory): the image goes back to the queue with backoff,
  and fails for good after ``max_attempts``;
* the database is unreachable: the batch's results are kept in memory and written when it comes back;
  if the worker dies first, the lease expires and the images are scored again by someone.

Never stalled, never lost: only regular files are opened (a FIFO named ``*.png`` is recorded, not read); a
file gone from its claimed path is read where intake has since seen it (a rename), and ``complete`` promotes
a copy of it when there is one; the frames of a multi-frame DICOM file in one batch share one read
(``BatchFiles``) and are decoded in parallel, and its hash is checked once per file (``CheckedFiles``), not
once per frame; a batch that fails is retried one image at a time (``claim`` takes a job
claimed before alone); the decode threads hold at most ``[watch] batch_pixel_budget`` pixels decoded at
once; a heartbeat thread renews the leases of the batches in hand; a database error other than a lost
connection (a corrupt page) is logged and survived.

SIGTERM / Ctrl-C: the current batch is finished and stored, claimed-but-unstarted images are released,
then the worker exits 0. A second signal exits at once (leases make that safe too).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import socket
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from .backoff import Backoff
from .dicom import DicomError, decode_frame, is_dicom, read_header
from .hashing import sha256_of
from .imaging import ImageDecodeError, content_seed, open_image, to_model_input
from .intake import NotRegularFile, open_regular
from .store.decisions import DecisionPolicy
from .store.maps import encode_map
from .store.queue import VANISHED, Claimed, Outcome, claim, complete, current_paths, release, renew

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
    vanished: bool = False  # the file was gone (see Outcome.vanished)


#: pixels decoded at once by one worker's decode threads unless ``[watch] batch_pixel_budget`` says otherwise
DEFAULT_PIXEL_BUDGET = 100_000_000


class PixelBudget:
    """Pixels a worker's decode threads may hold decoded at once (``[watch] batch_pixel_budget``): a decode
    that would go over it waits until the others are done; one image alone always proceeds (the per-image
    limit is Pillow's). 0 = no limit."""

    def __init__(self, pixels: int = 0):
        self.pixels = pixels
        self.in_use = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextlib.contextmanager
    def hold(self, pixels: int):
        if not self.pixels:
            yield
            return
        with self._cond:
            while self.in_use and self.in_use + pixels > self.pixels:
                self._cond.wait()
            self.in_use += pixels
            self.peak = max(self.peak, self.in_use)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= pixels
                self._cond.notify_all()


_TRIM_PIXELS = 4_000_000  # after decoding an image this large, give the freed memory back to the system


def _libc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


_malloc_trim = _libc_trim()


def _header_pixels(data: bytes) -> int:
    """Width x height from the image header, without decoding (0 when the header is unreadable: the
    decoder then says why)."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                return int(image.width) * int(image.height)
    except Exception:  # noqa: BLE001 - any header problem is reported by open_image
        return 0


class CheckedFiles:
    """Files already checked against their registered hash, by (path, device, inode, size, mtime) -> hash:
    the frames of one multi-frame DICOM file, claimed over several batches, hash it once. A file rewritten
    since changes its size or mtime (or inode) and is checked again (intake trusts the same facts to know a
    file unchanged). Holds the last ``size`` files; shared by a worker's decode threads."""

    def __init__(self, size: int = 64):
        self.size = size
        self._seen: OrderedDict[tuple, str] = OrderedDict()
        self._lock = threading.Lock()

    def checked(self, key: tuple, sha256: str) -> bool:
        with self._lock:
            if self._seen.get(key) != sha256:
                return False
            self._seen.move_to_end(key)
            return True

    def add(self, key: tuple, sha256: str) -> None:
        with self._lock:
            self._seen[key] = sha256
            self._seen.move_to_end(key)
            while len(self._seen) > self.size:
                self._seen.popitem(last=False)


class BatchFiles:
    """The files of one batch, each read (and checked against its registered hash) once however many of its
    frames the batch holds: the decode threads of a multi-frame DICOM file's frames share one read and still
    decode in parallel. A file's bytes are let go once every claimed frame of it has taken them."""

    def __init__(self, batch: list[Claimed] | None = None, checked: CheckedFiles | None = None):
        self.checked = checked
        self._lock = threading.Lock()
        self._files: dict[tuple[str, str | None], dict[str, Any]] = {}
        self._users: dict[tuple[str, str | None], int] = {}
        for item in batch or ():
            key = (item.path, item.sha256)
            self._users[key] = self._users.get(key, 0) + 1

    def read(self, path: str, sha256: str | None) -> tuple[bytes | None, dict[str, Any] | None]:
        """(the file's bytes, None), or (None, the ``Loaded`` fields of why it cannot be scored)."""
        key = (path, sha256)
        with self._lock:
            entry = self._files.setdefault(key, {"lock": threading.Lock()})
        with entry["lock"]:
            if "outcome" not in entry:
                entry["outcome"] = _read_checked(path, sha256, self.checked)
            outcome = entry["outcome"]
        with self._lock:
            self._users[key] = self._users.get(key, 1) - 1
            if self._users[key] <= 0:  # the last of its frames: nothing here keeps the bytes any more
                self._files.pop(key, None)
                self._users.pop(key, None)
        return outcome


def _read_checked(path: str, sha256: str | None, checked: CheckedFiles | None
                  ) -> tuple[bytes | None, dict[str, Any] | None]:
    """Read a regular file and check it is the content registered (``checked``: hashes known good)."""
    try:
        with open_regular(path) as handle:
            st = os.fstat(handle.fileno())
            data = handle.read()
    except FileNotFoundError:
        return None, {"error": VANISHED, "vanished": True}
    except NotRegularFile as exc:
        return None, {"error": exc.strerror}
    except PermissionError:
        return None, {"error": "cannot read the file: permission denied"}
    except IsADirectoryError:
        return None, {"error": "not a file"}
    except OSError as exc:
        return None, {"error": f"read error: {exc.strerror or exc}", "permanent": False}
    key = (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if sha256 and not (checked is not None and checked.checked(key, sha256)):
        if sha256_of(data) != sha256:
            return None, {"error": "the file was replaced after it was discovered; its new content is queued as "
                                   "a new image"}
        if checked is not None:
            checked.add(key, sha256)
    return data, None


def load(item: Claimed, to_input: Callable[[Image.Image], torch.Tensor] | int,
         budget: PixelBudget | None = None, files: BatchFiles | None = None) -> Loaded:
    """Read the file (once per batch with ``files``), check it is still the content that was registered,
    decode (a DICOM file: the claimed frame), preprocess with the detector's ``to_input`` (an int: the default
    preprocessing at that size)."""
    if isinstance(to_input, int):
        size = to_input
        to_input = lambda image: to_model_input(image, size)
    data, failure = (files or BatchFiles()).read(item.path, item.sha256)
    if failure is not None:
        return Loaded(item, **failure)
    dicom = None
    if is_dicom(item.path, data[:132]):  # one frame of a DICOM file, in its window (inspector/dicom.py)
        try:
            dicom = read_header(io.BytesIO(data), "", len(data))  # the reason without the path (README: paths)
        except DicomError as exc:
            return Loaded(item, error=str(exc))
    return _decode(item, data, dicom, to_input, budget)


def _decode(item: Claimed, data: bytes, dicom: Any, to_input: Callable[[Image.Image], torch.Tensor],
            budget: PixelBudget | None) -> Loaded:
    area = dicom.frame_pixels if dicom is not None else _header_pixels(data)
    try:
        with budget.hold(area) if budget is not None else contextlib.nullcontext():
            try:
                image = decode_frame(data, dicom, item.frame, item.window).image \
                    if dicom is not None else open_image(io.BytesIO(data), name=item.path)
                pixels = to_input(image)
                width, height = image.width, image.height
                del image
            finally:
                # glibc keeps what each decode thread freed in that thread's arena: without a trim, four
                # threads decoding huge images one after another still hold four images' worth of memory
                if area >= _TRIM_PIXELS and _malloc_trim is not None:
                    _malloc_trim(0)
        return Loaded(item, pixels, width, height, seed=content_seed(pixels))
    except (ImageDecodeError, DicomError) as exc:
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
                 refresh: Callable[[Worker], None] | None = None, refresh_seconds: float = 5.0,
                 policy: DecisionPolicy | None = None, pixel_budget: int = DEFAULT_PIXEL_BUDGET):
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
        self.policy = policy  # decide live results as they are stored (None: store scores only)
        self._refreshed = 0.0
        self.pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="decode")
        self.budget = PixelBudget(pixel_budget)
        self.checked = CheckedFiles()
        self.stored = 0
        self.failed = 0
        self._held: set[int] = set()  # jobs claimed and not yet stored or released: their leases are renewed
        self._held_lock = threading.Lock()
        self._closing = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def close(self) -> None:
        self._closing.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        self.pool.shutdown(wait=True)

    def _hold(self, job_ids: list[int]) -> None:
        with self._held_lock:
            self._held.update(job_ids)
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._renew_loop, name="lease-renewal", daemon=True)
            self._heartbeat.start()

    def _drop(self, job_ids: list[int]) -> None:
        with self._held_lock:
            self._held.difference_update(job_ids)

    def _renew_loop(self) -> None:
        """Renew the leases of every job this worker holds, three times per lease: a batch slower than its
        lease (a slow model, a huge image, a busy box) is not taken over and scored twice."""
        interval = max(0.05, self.lease_seconds / 3)
        while not self._closing.wait(interval):
            with self._held_lock:
                held = sorted(self._held)
            if not held:
                continue
            try:
                kept = renew(self.engine, self.name, held, self.lease_seconds)
            except SQLAlchemyError as exc:  # the database is down: the leases run on; storing will wait
                log.warning("cannot renew leases (%s)", str(exc).splitlines()[0])
                continue
            if kept < len(held):
                log.debug("%d of %d leases were taken over", len(held) - kept, len(held))

    def _claim_and_load(self) -> tuple[list[Claimed], list[Future], Any] | None:
        """Claim a batch and start reading and decoding it in the pool (returns at once)."""
        if self.refresh is not None and time.monotonic() - self._refreshed >= self.refresh_seconds:
            self.refresh(self)
            self._refreshed = time.monotonic()
        batch = claim(self.engine, self.name, self.batch_size, self.lease_seconds, versions=list(self.models),
                      max_attempts=self.max_attempts)
        if not batch:
            return None
        self._hold([c.id for c in batch])
        detector = self.models[batch[0].model_version_id]
        files = BatchFiles(batch, self.checked)  # a file is read once per batch, however many frames it holds
        return batch, [self.pool.submit(load, item, detector.to_input, self.budget, files) for item in batch], detector

    def _finish(self, pending: tuple[list[Claimed], list[Future], Any], stop: threading.Event | None,
                started: float) -> int:
        batch, futures, detector = pending
        try:
            return self._finish_held(batch, futures, detector, stop, started)
        finally:
            self._drop([c.id for c in batch])  # stored, or lost with an error: its leases may expire now

    def _relocate(self, loaded: list[Loaded], to_input: Callable[[Image.Image], torch.Tensor]) -> list[Loaded]:
        """Files gone from their claimed path: read again where intake has since seen them (a rename)."""
        gone = [x for x in loaded if x.vanished]
        if not gone:
            return loaded
        try:
            now_at = current_paths(self.engine, [x.claimed.image_id for x in gone])
        except SQLAlchemyError:
            return loaded  # complete() checks the row's path again in its own transaction
        out = []
        for x in loaded:
            moved = now_at.get(x.claimed.image_id) if x.vanished else None
            if moved and moved != x.claimed.path:
                x = load(dataclasses.replace(x.claimed, path=moved), to_input, self.budget,
                         BatchFiles(checked=self.checked))
            out.append(x)
        return out

    def _finish_held(self, batch: list[Claimed], futures: list[Future], detector: Any,
                     stop: threading.Event | None, started: float) -> int:
        loaded = self._relocate([f.result() for f in futures], detector.to_input)
        outcomes = self._score(loaded, detector)
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
        outcomes = [Outcome(x.claimed.id, error=x.error, permanent=x.permanent, vanished=x.vanished) for x in loaded]
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
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the line
            # a batch of several: each image is retried alone (claim() isolates jobs claimed before), so only
            # the one the model cannot score fails. Alone: a ValueError (e.g. a class name the model cannot
            # use) is the image's own fault; anything else is retried up to max_attempts.
            alone = len(good) == 1
            if not alone or not isinstance(exc, ValueError):
                log.warning("scoring a batch of %d failed (%s: %s)%s", len(good), type(exc).__name__, exc,
                            "" if alone else "; its images are retried one at a time")
            for i in good:
                outcomes[i] = Outcome(loaded[i].claimed.id, error=f"cannot score: {exc}",
                                      permanent=alone and isinstance(exc, ValueError))
            return outcomes
        for j, i in enumerate(good):
            outcomes[i] = Outcome(loaded[i].claimed.id, width=loaded[i].width, height=loaded[i].height, result={
                "image_score": float(prediction.image_score[j]), "text_score": float(prediction.text_score[j]),
                "topk_score": float(prediction.topk_score[j]), "anomaly_map_tensor": prediction.probability_map[j]})
        return outcomes

    def _store(self, outcomes: list[Outcome], stop: threading.Event | None) -> int:
        """Write the batch; while the database is unreachable, keep trying (the results are in memory)."""
        backoff = Backoff(0.5, 30.0)
        while True:
            try:
                return complete(self.engine, self.name, outcomes, self.max_attempts, self.policy)
            except OperationalError as exc:
                delay = backoff.next()
                log.warning("database unavailable while storing a batch (%s); retrying in %.1fs",
                            str(exc).splitlines()[0], delay)
                if stop is not None and stop.is_set() and delay >= 30:
                    log.error("giving up on a batch at shutdown; its leases will expire and it will be rescored")
                    return 0
                time.sleep(delay)

    def run(self, stop: threading.Event, until_empty: Callable[[], bool] | None = None,
            idle_seconds: float = 0.5) -> None:
        """Loop until ``stop`` is set, or (``until_empty``) until the queue is empty and nothing is coming."""
        down, failing = Backoff(0.5, 30.0), Backoff(0.5, 60.0)  # database unreachable; database errors
        errors = 0
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
                    down.reset()
                    failing.reset()
                except OperationalError as exc:
                    delay = down.next()
                    log.warning("database unavailable (%s); retrying in %.1fs", str(exc).splitlines()[0], delay)
                    stop.wait(delay)
                    continue
                except DBAPIError as exc:  # e.g. a corrupt page: log it, keep serving (a lost batch is re-leased)
                    errors += 1
                    if until_empty is not None and errors >= 3:
                        raise  # a one-off run ends with the error instead of looping on it
                    delay = failing.next()
                    log.error("database error (%s); retrying in %.1fs", str(exc).splitlines()[0], delay)
                    stop.wait(delay)
                    continue
                errors = 0
                if claimed == 0:
                    if until_empty is not None and until_empty():
                        return
                    stop.wait(idle_seconds)
        finally:
            with self._held_lock:
                self._held.clear()
            try:
                release(self.engine, self.name)
            except SQLAlchemyError:
                pass  # the leases expire on their own
            self.close()
