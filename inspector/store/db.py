"""Engines and schema management for SQLite (default) and Postgres.

SQLite runs in WAL mode with a busy timeout. Every write transaction (``engine.begin()``) starts with
``BEGIN IMMEDIATE``: the write lock is taken up front, so a claim (select then update) can never interleave
with another writer's. Reads (``engine.connect()``) start a deferred transaction and read a snapshot, so
readers never block writers. Postgres claims use ``FOR UPDATE SKIP LOCKED`` instead (see ``queue.py``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import logging
from collections.abc import Iterator
from importlib import resources
from pathlib import Path

from sqlalchemy import Connection, Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError

from ..errors import InspectorError

log = logging.getLogger(__name__)


class StoreError(InspectorError, RuntimeError):
    """The database cannot be used as asked (bad URL, schema missing or outdated); the message says why."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def db_now(conn: Connection) -> dt.datetime:
    """The database's current time, naive UTC (the one clock every box shares: leases, backoff, routing)."""
    from sqlalchemy import func, select

    if conn.dialect.name == "sqlite":
        text = conn.execute(select(func.strftime("%Y-%m-%d %H:%M:%f", "now"))).scalar_one()
        return dt.datetime.fromisoformat(text)
    if conn.dialect.name == "postgresql":
        return conn.execute(select(func.timezone("utc", func.now()))).scalar_one()
    return utcnow()  # pragma: no cover - only SQLite and Postgres are supported


def is_sqlite(engine: Engine) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"bad database URL {url!r}: {exc}") from None
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _sqlite_connect(dbapi_connection, _record):
            dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=60000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _sqlite_begin(conn):
            write = conn.get_execution_options().get(_WRITE, False)
            conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

        engine.begin = functools.partial(_write_transaction, engine)  # type: ignore[method-assign]
        return engine
    if parsed.get_backend_name() == "postgresql":
        if parsed.drivername == "postgresql":
            parsed = parsed.set(drivername="postgresql+psycopg")
        return create_engine(parsed, pool_pre_ping=True, pool_size=5, max_overflow=5)
    raise StoreError(f"unsupported database {parsed.get_backend_name()!r}: use sqlite:/// or postgresql://")


_WRITE = "inspector_write"


@contextlib.contextmanager
def _write_transaction(engine: Engine) -> Iterator[Connection]:
    """SQLite's ``engine.begin()``: a transaction that takes the write lock up front (``BEGIN IMMEDIATE``), so a
    claim's select-then-update never interleaves with another writer's. Reads (``engine.connect()``) begin a
    deferred transaction instead: in WAL mode they read a snapshot and never hold the write lock, so a CSV
    export or a dashboard page never makes a worker's claim wait."""
    with engine.connect() as conn:
        conn.execution_options(**{_WRITE: True})
        with conn.begin():
            yield conn


def alembic_config(url: str):
    from alembic.config import Config

    # the top-level migrations/ folder, installed as the package inspector._migrations (pyproject.toml)
    migrations = Path(str(resources.files("inspector._migrations")))
    if not (migrations / "env.py").is_file():
        raise StoreError(f"migrations not found at {migrations}")
    config = Config()
    config.set_main_option("script_location", str(migrations))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> str:
    """Create or migrate the schema; returns the revision now current."""
    from alembic import command

    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            raw = connection.connection.dbapi_connection
            if is_sqlite(engine):  # SQLite alters a table by copying it; foreign keys must be off meanwhile
                raw.execute("PRAGMA foreign_keys=OFF")  # (outside a transaction, or SQLite ignores it)
            connection.execution_options(**{_WRITE: True})  # one migrator at a time on SQLite
            try:
                with connection.begin():
                    config = alembic_config(url)
                    config.attributes["connection"] = connection
                    command.upgrade(config, revision)
                    if is_sqlite(engine):
                        broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                        if broken:
                            raise StoreError(f"migration left {len(broken)} rows with broken references; "
                                             "nothing was changed")
            finally:
                if is_sqlite(engine):
                    raw.execute("PRAGMA foreign_keys=ON")
        return current_revision(engine) or ""
    finally:
        engine.dispose()


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def check_schema(engine: Engine) -> None:
    """Refuse to run on a missing or outdated schema (explicit `inspector db upgrade` is safer with many workers)."""
    try:
        current = current_revision(engine)
    except SQLAlchemyError as exc:
        raise StoreError(f"cannot reach the database: {exc.__class__.__name__}: {exc}") from None
    head = head_revision()
    if current != head:
        state = "has no inspector schema" if current is None else f"is at revision {current}, code needs {head}"
        raise StoreError(f"the database {state}: run `inspector db upgrade`")


def open_store(url: str, auto_upgrade: bool = False) -> Engine:
    """An engine on a database with the current schema (created first when ``auto_upgrade``)."""
    engine = make_engine(url)
    if auto_upgrade:
        try:
            current = current_revision(engine)
        except SQLAlchemyError as exc:
            raise StoreError(f"cannot reach the database: {exc}") from None
        if current is None and not inspect(engine).get_table_names():
            log.info("creating the inspector schema in %s", engine.url.render_as_string(hide_password=True))
            upgrade(url)
    check_schema(engine)
    return engine
