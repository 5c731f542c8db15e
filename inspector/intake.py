"""Intake: find new image files in watched folders and register them in the queue. It never scores.

Three feeders, one idempotent path (``_consider`` -> stability gate -> ``register_file``):

* watchdog events (created, modified, moved-to, closed-write), or the polling observer (``--polling``,
  for network shares, where inotify sees nothing written by other machines);
* a full scan at start-up (the backlog);
* a periodic rescan, because inotify drops events under load without telling anyone.

A file is taken only when its size and mtime have not changed for ``stable_seconds`` (a file whose
mtime is already that old is taken at once). Temporary names (``.tmp``, ``.part``, ``~``, dot-files) and
non-image suffixes are ignored. A file already known by path and size/mtime is not hashed again; one
known by path and content is not enqueued again; a renamed file is recognised by its content hash.

DICOM files (``.dcm``, or no suffix and the DICM preamble: PACS exports) are read as far as their header
(``inspector/dicom.py``) before they are hashed: one image row per frame; a file that cannot become images
is recorded as failed with the reason; a file without a suffix that is not DICOM is ignored.
"""

from __future__ import annotations

import errno
import logging
import os
import queue
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine
from sqlalchemy.exc import OperationalError

from .config import check_name
from .dicom import DicomError, inspect_file, is_dicom, is_dicom_name
from .hashing import stream_sha256
from .imaging import IMAGE_SUFFIXES
from .store.queue import ensure_source, known_files, register_file

log = logging.getLogger(__name__)
TEMP_SUFFIXES = {".tmp", ".part", ".partial", ".crdownload", ".swp", ".download"}


@dataclass
class WatchedFolder:
    path: Path  # absolute, symlinks resolved
    class_name: str
    recursive: bool = False
    line: str | None = None
    source_id: int | None = None
    #: the model version this folder is pinned to: a registry name, or a detector kind built from the
    #: settings (``[[sources]]`` model / detector, ``watch --model`` / ``--detector``); None = follow promotions
    model: str | None = None
    detector: str | None = None
    #: poll this folder instead of using inotify (None: the daemon's ``[watch] polling``)
    polling: bool | None = None
    #: DICOM window preset of its images (``inspector.dicom.PRESETS`` or "center/width"; None: the file's)
    window: str | None = None
    #: AA-CLIP domain of its version ("industrial" / "medical"; None: ``[aa_clip] domain``)
    domain: str | None = None
    #: the words its version's text prompts use for the class (None: the class name)
    class_description: str | None = None
    #: its events leave the path out (``[[sources]] hide_paths``, ``delivery.Dispatcher``)
    hide_paths: bool = False


def ignored_name(name: str) -> bool:
    lower = name.lower()
    if name.startswith(".") or name.endswith("~"):
        return True
    suffix = os.path.splitext(lower)[1]
    return suffix in TEMP_SUFFIXES or (suffix not in IMAGE_SUFFIXES and not is_dicom_name(lower))


class NotRegularFile(OSError):
    """A path that is not a regular file (a FIFO, a socket, a device): never opened for reading, because
    opening or reading one can block forever."""


def kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    return "not a regular file"


def not_regular(mode: int) -> str:
    return f"not a regular file: {kind_of(mode)}"


def open_regular(path: str):
    """Open ``path`` for reading only if it is a regular file: stat first (a FIFO is never opened), then open
    non-blocking and check the opened file again (it may have been swapped in between). Raises
    ``NotRegularFile`` otherwise."""
    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        raise NotRegularFile(errno.EINVAL, not_regular(mode), path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(errno.EINVAL, not_regular(mode), path)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _dicom_record(handle, path: str, window: str | None) -> dict | None:
    """The ``dicom_images`` record of the open file (``inspector.dicom``); None when it is not DICOM (a name
    without a suffix whose content is something else). Raises DicomError, OSError."""
    if not is_dicom(path, handle.read(132)):
        return None
    handle.seek(0)
    return inspect_file(handle, "", window)


@dataclass
class Examined:
    """What is learned about a file before it is registered: its content hash and size, and for a DICOM
    file its ``dicom_images`` record (``frames`` included: one image row per frame)."""

    sha256: str
    size: int
    dicom: dict | None = None


def examine(path: str, window: str | None = None, images_too: bool = False) -> Examined | None:
    """Read a file once for registration, the one reading code of intake and `inspector score`: a name that
    may be DICOM (``is_dicom_name``, not an image suffix) has its header read within limits
    (``inspector.dicom``, the source's ``window``), then the whole file is hashed from the same handle.
    None: a DICOM-style name whose content is not DICOM (intake ignores it; ``images_too``: it is hashed as an
    image instead, for files named on the command line). Raises DicomError (the file cannot become images,
    the message says why) and OSError."""
    with open_regular(path) as handle:
        record = None
        if os.path.splitext(path.lower())[1] not in IMAGE_SUFFIXES:
            record = _dicom_record(handle, path, window)
            if record is None and not images_too:
                return None
            handle.seek(0)
        sha, size = stream_sha256(handle)
    return Examined(sha, size, record)


def is_candidate(path: str) -> bool:
    """A file a folder given to `inspector score` contributes: an image suffix, or a DICOM file (``.dcm``,
    or a suffix-less name with the DICM preamble). Unreadable files count (their error is reported)."""
    name = os.path.basename(path)
    if os.path.splitext(name.lower())[1] in IMAGE_SUFFIXES:
        return True
    if ignored_name(name):  # temporary names, dot-files, and suffixes neither image nor DICOM
        return False
    try:
        with open_regular(path) as handle:
            return is_dicom(path, handle.read(132))
    except OSError:
        return True


class Intake:
    """Discovers files under ``folders`` and registers them in ``engine``'s queue."""

    def __init__(self, engine: Engine, folders: list[WatchedFolder], stable_seconds: float = 2.0,
                 rescan_seconds: float = 30.0, polling: bool = False):
        self.engine = engine
        self.folders = folders
        self.stable_seconds = stable_seconds
        self.rescan_seconds = rescan_seconds
        self.polling = polling
        self.counts = {"event": 0, "scan": 0, "registered": 0, "failed": 0, "duplicate": 0, "renamed": 0}
        self._events: queue.SimpleQueue[str] = queue.SimpleQueue()
        self._candidates: dict[str, tuple[int, int, float, WatchedFolder]] = {}  # path -> size, mtime, since, folder
        self._known: dict[str, tuple[int | None, int | None]] = {}
        self._observers: list = []
        self._armed: dict[str, tuple[int, int] | None] = {}  # watched folder -> (device, inode) when armed
        self._last_scan = 0.0
        for folder in folders:
            if not folder.path.is_dir():
                raise FileNotFoundError(f"watched folder not found: {folder.path}")
            folder.class_name = check_name(folder.class_name, f"class name of {folder.path}")
            if folder.line:
                folder.line = check_name(folder.line, f"line of {folder.path}", required=False)
            folder.source_id = ensure_source(engine, str(folder.path), folder.class_name, folder.line,
                                             folder.recursive)
            self._known.update(known_files(engine, folder.source_id))

    # ---------------------------------------------------------------------------------------------
    # feeders

    def scan(self) -> None:
        """Walk every folder; anything not known with the same size and mtime becomes a candidate."""
        for folder in self.folders:
            for path in self._walk(folder):
                self._consider(path, folder, "scan")
        self._last_scan = time.monotonic()

    def _walk(self, folder: WatchedFolder):
        stack = [str(folder.path)]
        while stack:
            current = stack.pop()
            try:
                with os.scandir(current) as listing:
                    entries = sorted(listing, key=lambda e: e.name)
                    for entry in entries:
                        if entry.is_dir(follow_symlinks=False):
                            if folder.recursive and not entry.name.startswith("."):
                                stack.append(entry.path)
                        elif not ignored_name(entry.name):
                            yield entry.path
            except OSError as exc:  # a folder vanished or is unreadable: report and go on
                log.warning("cannot list %s: %s", current, exc)

    def start_observer(self) -> None:
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        intake = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event):
                if event.event_type in ("deleted", "opened", "closed_no_write"):
                    return
                path = getattr(event, "dest_path", "") or event.src_path
                if isinstance(path, bytes):
                    path = os.fsdecode(path)
                if event.is_directory:
                    if event.event_type in ("created", "moved"):
                        intake._events.put(path + os.sep)  # a new folder: scan it
                    return
                intake._events.put(path)

        self._armed = self._root_ids()
        polled = [f for f in self.folders if (self.polling if f.polling is None else f.polling)]
        notified = [f for f in self.folders if f not in polled]
        self._observers = []
        for kind, group in ((PollingObserver, polled), (Observer, notified)):
            if not group:
                continue
            observer = kind(timeout=1.0) if kind is PollingObserver else kind()
            for folder in group:
                try:
                    observer.schedule(Handler(), str(folder.path), recursive=folder.recursive)
                except OSError as exc:  # gone right now: armed again when it is back (roots_changed)
                    log.warning("cannot watch %s: %s", folder.path, exc)
                    self._armed[str(folder.path)] = None
            observer.daemon = True
            observer.start()
            self._observers.append(observer)

    def observer_alive(self) -> bool:
        return bool(self._observers) and all(o.is_alive() for o in self._observers)

    def _root_ids(self) -> dict[str, tuple[int, int] | None]:
        out: dict[str, tuple[int, int] | None] = {}
        for folder in self.folders:
            try:
                st = os.stat(folder.path)
                out[str(folder.path)] = (st.st_dev, st.st_ino)
            except OSError:
                out[str(folder.path)] = None
        return out

    def roots_changed(self) -> bool:
        """A watched folder was deleted and re-created (or replaced) since the observer armed its watch:
        inotify watches the old folder, which is gone, so nothing would be seen until the next rescan."""
        now = self._root_ids()
        changed = any(ident is not None and ident != self._armed.get(root) for root, ident in now.items())
        for root, ident in now.items():  # a folder that is gone for now: re-armed once it is back
            if ident is None:
                self._armed[root] = None
        return changed

    def stop(self) -> None:
        for observer in self._observers:
            observer.stop()
            observer.join(timeout=5)
        self._observers = []

    def _folder_of(self, path: str, is_dir: bool = False) -> WatchedFolder | None:
        """The watched folder an event's path belongs to, by the scan's rules: a non-recursive folder owns
        only its own files (no sub-folder), a recursive one everything but dot-folders."""
        for folder in self.folders:
            root = str(folder.path)
            if path.startswith(root + os.sep):
                parts = path[len(root) + 1:].rstrip(os.sep).split(os.sep)
                folders = parts if is_dir else parts[:-1]
                if folders and not folder.recursive:
                    continue
                if any(p.startswith(".") for p in folders):
                    continue
                return folder
        return None

    def _drain_events(self) -> None:
        while True:
            try:
                path = self._events.get_nowait()
            except queue.Empty:
                return
            is_dir = path.endswith(os.sep)
            folder = self._folder_of(path.rstrip(os.sep), is_dir)
            if folder is None:
                continue
            if is_dir:  # a folder created or moved in (only a recursive watch gets here): its files
                sub = WatchedFolder(Path(path.rstrip(os.sep)), folder.class_name, folder.recursive, folder.line,
                                    folder.source_id)
                for found in self._walk(sub):
                    self._consider(found, folder, "event")
            elif not ignored_name(os.path.basename(path)):
                self._consider(path, folder, "event")

    # ---------------------------------------------------------------------------------------------
    # the gate

    def _consider(self, path: str, folder: WatchedFolder, origin: str) -> None:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):  # a dangling link: record it, it will never become an image
                self._register_error(path, folder, "symlink target does not exist")
            self._candidates.pop(path, None)
            return
        except OSError as exc:
            self._register_error(path, folder, f"cannot stat: {exc.strerror or exc}")
            return
        if not stat.S_ISREG(st.st_mode):  # a FIFO, socket or device is recorded, never opened
            self._candidates.pop(path, None)
            if self._known.get(path) != (None, None):
                self._register_error(path, folder, not_regular(st.st_mode))
            return
        state = (st.st_size, st.st_mtime_ns)
        if self._known.get(path) == state:
            return
        previous = self._candidates.get(path)
        if previous is None or previous[:2] != state:
            if previous is None:
                self.counts[origin] += 1
            self._candidates[path] = (*state, time.monotonic(), folder)

    def tick(self) -> int:
        """Drain events, rescan when due, register candidates that are stable. Returns how many registered."""
        self._drain_events()
        if self.rescan_seconds and time.monotonic() - self._last_scan >= self.rescan_seconds:
            self.scan()
        registered = 0
        now_mono, now_wall = time.monotonic(), time.time()
        for path, (size, mtime_ns, since, folder) in list(self._candidates.items()):
            try:
                st = os.stat(path)
            except OSError:
                self._candidates.pop(path, None)  # gone before it was complete: nothing to record
                continue
            state = (st.st_size, st.st_mtime_ns)
            if state != (size, mtime_ns):
                self._candidates[path] = (*state, now_mono, folder)
                continue
            old_enough = now_wall - mtime_ns / 1e9 >= self.stable_seconds
            if not old_enough and now_mono - since < self.stable_seconds:
                continue
            self._candidates.pop(path, None)
            registered += self._register(path, folder, state)
        return registered

    def pending_candidates(self) -> int:
        return len(self._candidates)

    def _register(self, path: str, folder: WatchedFolder, state: tuple[int, int]) -> int:
        if os.path.islink(path):
            target = os.path.realpath(path)
            if not target.startswith(str(folder.path) + os.sep):
                return self._register_error(path, folder, f"symlink points outside the watched folder ({target})")
        try:
            examined = examine(path, folder.window)
            if examined is None:  # a file without a suffix that is not DICOM: not ours, never hashed
                self._known[path] = state
                return 0
        except DicomError as exc:
            return self._register_error(path, folder, str(exc))
        except FileNotFoundError:
            return 0
        except NotRegularFile as exc:
            return self._register_error(path, folder, exc.strerror)
        except PermissionError:
            return self._register_error(path, folder, "cannot read the file: permission denied")
        except OSError as exc:
            return self._register_error(path, folder, f"cannot read the file: {exc.strerror or exc}")
        if examined.size != state[0]:  # changed while hashing: look again later
            self._candidates[path] = (examined.size, state[1], time.monotonic(), folder)
            return 0
        outcome = register_file(self.engine, folder.source_id, folder.class_name, path, examined.sha256,
                                examined.size, state[1], dicom=examined.dicom)
        self._known[path] = state
        if outcome in self.counts:
            self.counts[outcome] += 1
        if outcome == "new":
            self.counts["registered"] += 1
            return 1
        log.debug("%s: %s", path, outcome)
        return 0

    def _register_error(self, path: str, folder: WatchedFolder, error: str) -> int:
        outcome = register_file(self.engine, folder.source_id, folder.class_name, path, None, None, None, error=error)
        self._known[path] = (None, None)
        if outcome == "failed":
            self.counts["failed"] += 1
            log.warning("%s: %s", path, error)
        return 0

    # ---------------------------------------------------------------------------------------------

    def run(self, stop: threading.Event, interval: float = 0.25) -> None:
        """The intake loop (a thread of `inspector watch`): events, rescans, the stability gate."""
        self.scan()
        self.start_observer()
        try:
            while not stop.is_set():
                if not self.observer_alive():
                    log.warning("file observer died; restarting it (a rescan covers the gap)")
                    self.stop()
                    self.start_observer()
                    self.scan()
                elif self.roots_changed():
                    log.warning("a watched folder was deleted and re-created; watching the new one")
                    self.stop()
                    self.start_observer()
                    self.scan()
                try:
                    self.tick()
                except OperationalError as exc:  # the database is down: files are found again by the rescan
                    log.warning("intake: database unavailable (%s); retrying", str(exc).splitlines()[0])
                    stop.wait(2.0)
                except Exception:
                    log.exception("intake tick failed; retrying")
                    stop.wait(2.0)
                stop.wait(interval)
        finally:
            self.stop()
