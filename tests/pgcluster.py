"""A throwaway PostgreSQL cluster for tests: initdb + pg_ctl in a temporary folder, on a free port.

As root (CI), the server runs as the ``postgres`` system user that Debian's package creates (initdb and
postgres refuse to run as root). `.ci/run` installs Debian's ``postgresql`` when it is missing; tests never
skip for lack of it.

    with PgCluster() as pg:                  # initdb in a mkdtemp() folder, start on 127.0.0.1:<free port>
        url = pg.create_database("t1")       # postgresql+psycopg://postgres@127.0.0.1:<port>/t1
        pg.stop(); pg.start()                # same port, same data
"""

from __future__ import annotations

import atexit
import glob
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing_extensions import Self

_MISSING = ("PostgreSQL server binaries (initdb, pg_ctl, postgres) not found in /usr/lib/postgresql/*/bin "
            "or on PATH. Install Debian's 'postgresql' package (`.ci/run` does this: apt-get install "
            "postgresql); the tests need a real PostgreSQL and do not skip without it.")


def find_pg_bin() -> Path:
    """The newest /usr/lib/postgresql/<ver>/bin with initdb, else the folder of initdb on PATH."""

    def version(path: str) -> tuple[int, ...]:
        ver = Path(path).parent.parent.name
        return tuple(int(x) for x in re.findall(r"\d+", ver)) or (0,)

    candidates = [p for p in glob.glob("/usr/lib/postgresql/*/bin/initdb") if os.access(p, os.X_OK)]
    if candidates:
        return Path(max(candidates, key=version)).parent
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).parent
    raise RuntimeError(_MISSING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drop_to_postgres_prefix() -> list[str]:
    """Command prefix that runs a program as the ``postgres`` system user (we are root)."""
    if shutil.which("runuser"):
        return ["runuser", "-u", "postgres", "--"]
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
    if shutil.which("su"):
        return ["su", "-s", "/bin/sh", "-c", 'exec "$0" "$@"', "postgres", "--"]
    raise RuntimeError("running as root but none of runuser, setpriv or su is available to run PostgreSQL "
                       "as the 'postgres' user (install util-linux)")


class PgCluster:
    """A private PostgreSQL cluster (trust auth, 127.0.0.1 only) living in a temporary folder."""

    def __init__(self, bin_dir: str | os.PathLike | None = None):
        self.bin = Path(bin_dir) if bin_dir else find_pg_bin()
        self._as_postgres = os.geteuid() == 0
        if self._as_postgres:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root but there is no 'postgres' system user; "
                                   "Debian's 'postgresql' package creates it (`.ci/run` installs it)") from None
            self._prefix = _drop_to_postgres_prefix()
        else:
            self._prefix = []
        self.root = Path(tempfile.mkdtemp(prefix="inspector-pg-"))
        os.chmod(self.root, 0o755)  # traversable by the postgres user
        self.data = self.root / "data"
        self.sockets = self.root / "sockets"
        self.log = self.root / "server.log"
        self.port = free_port()
        self._closed = False
        self._initialized = False
        self._watchdog_pipe = None
        atexit.register(self.close)
        try:
            self.sockets.mkdir(mode=0o755)
            self.log.touch()
            if self._as_postgres:
                for p in (self.root, self.sockets, self.log):
                    shutil.chown(p, "postgres", "postgres")
            self._run(["initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8",
                       "--locale=C", "--no-instructions"])
            with open(self.data / "postgresql.conf", "a") as conf:
                conf.write(
                    "\n# inspector test cluster\n"
                    "listen_addresses = '127.0.0.1'\n"
                    f"port = {self.port}\n"
                    f"unix_socket_directories = '{self.sockets}'\n"
                    "fsync = off\n"
                    "synchronous_commit = off\n"
                    "full_page_writes = off\n"
                    "max_connections = 100\n"
                )
            self._initialized = True
            self._start_watchdog()
        except BaseException:
            self.close()
            raise

    # -- processes ---------------------------------------------------------------------------------------

    def _run(self, argv: list[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [*self._prefix, str(self.bin / argv[0]), *argv[1:]]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=self.root, timeout=timeout,
                              stdin=subprocess.DEVNULL, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({proc.returncode}): {proc.stdout}{proc.stderr}"
                               f"{self._log_tail()}")
        return proc

    def _log_tail(self, n: int = 2000) -> str:
        try:
            text = self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""
        return f"\n--- {self.log} ---\n{text}" if text else ""

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def start(self) -> None:
        """Start the server (no-op if it runs); returns once it accepts connections on the same port."""
        if self._closed:
            raise RuntimeError("PgCluster is closed")
        if self.is_running():
            return
        self._run(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60", "start"])
        deadline = time.monotonic() + 30
        while not self._accepting():
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not accept connections on port {self.port}{self._log_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (clients are disconnected); data and port are kept for a later start()."""
        if self._initialized and self.root.is_dir():
            self._run(["pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop"], check=False)
            if self._status():
                self._run(["pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop"], check=False)

    def _status(self) -> bool:
        if not self._initialized or not self.root.is_dir():
            return False
        return self._run(["pg_ctl", "-D", str(self.data), "status"], check=False).returncode == 0

    def is_running(self) -> bool:
        return not self._closed and self._status()

    def _start_watchdog(self) -> None:
        """A detached helper that stops the server and removes the folder if this process dies without
        close() (SIGKILL, SIGTERM, os._exit: cases atexit does not cover). It waits on a pipe whose write end
        only this process holds: EOF means we died; a byte means close() did the cleanup itself. It forks
        away from us (reparented to init, own session, like the postmaster), so killing the test run's process
        group or its process tree does not take the watchdog down with it."""
        script = (
            "import os, shutil, subprocess, sys\n"
            "if os.fork():\n"
            "    os._exit(0)\n"
            "os.setsid()\n"
            "if sys.stdin.buffer.read():\n"
            "    sys.exit(0)\n"
            "prefix, pg_ctl, data, root = sys.argv[1:-3], *sys.argv[-3:]\n"
            "try:\n"
            "    subprocess.run([*prefix, pg_ctl, '-D', data, '-m', 'immediate', '-w', 'stop'], cwd=root,\n"
            "                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,\n"
            "                   timeout=60)\n"
            "finally:\n"
            "    shutil.rmtree(root, ignore_errors=True)\n"
        )
        import sys

        launcher = subprocess.Popen(
            [sys.executable, "-c", script, *self._prefix, str(self.bin / "pg_ctl"), str(self.data), str(self.root)],
            stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/",
            start_new_session=True,
        )
        launcher.wait(timeout=30)  # exits at once; its forked child keeps the pipe's read end
        self._watchdog_pipe = launcher.stdin

    def _dismiss_watchdog(self) -> None:
        pipe, self._watchdog_pipe = self._watchdog_pipe, None
        if pipe is None:
            return
        try:
            pipe.write(b"x")
            pipe.close()
        except OSError:
            pass

    # -- URLs and databases ------------------------------------------------------------------------------

    def url_for(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the cluster's ``postgres`` database."""
        return self.url_for("postgres")

    def create_database(self, name: str | None = None) -> str:
        """Create an empty database (a unique name when none is given); return its SQLAlchemy URL."""
        import psycopg
        from psycopg import sql

        name = name or f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user="postgres", dbname="postgres",
                             autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    # -- lifetime ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop for good and delete the temporary folder (idempotent; also registered with atexit)."""
        if self._closed:
            return
        self._closed = True
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self._dismiss_watchdog()
            atexit.unregister(self.close)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
