"""The throwaway PostgreSQL cluster itself: connect, stop (connections fail), start again (same URL, same data)."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError

from .pgcluster import PgCluster, find_pg_bin


def _scalar(url: str, sql: str):
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar()
    finally:
        engine.dispose()


def test_find_pg_bin_has_server_binaries():
    bin_dir = find_pg_bin()
    for name in ("initdb", "pg_ctl", "postgres"):
        assert (bin_dir / name).exists(), name


def test_select_1(pg_url):
    assert pg_url.startswith("postgresql+psycopg://postgres@127.0.0.1:")
    assert _scalar(pg_url, "select 1") == 1


def test_databases_are_fresh_and_distinct(pg_cluster):
    a, b = pg_cluster.create_database(), pg_cluster.create_database()
    assert a != b
    assert _scalar(a, "select count(*) from pg_tables where schemaname = 'public'") == 0
    assert pg_cluster.create_database("named_db").endswith(f":{pg_cluster.port}/named_db")
    assert pg_cluster.url.endswith(f":{pg_cluster.port}/postgres")


def test_stop_then_start_keeps_port_and_data():
    # Its own cluster, so the session cluster other tests share is never taken down here.
    with PgCluster() as pg:
        url = pg.create_database("keep")
        port = pg.port
        engine = create_engine(url, connect_args={"connect_timeout": 3})
        try:
            with engine.begin() as conn:
                conn.execute(text("create table t (x int)"))
                conn.execute(text("insert into t values (1), (2), (3)"))

            pg.stop()
            assert not pg.is_running()
            with pytest.raises(OperationalError), engine.connect() as conn:
                conn.execute(text("select 1"))

            pg.start()
            assert pg.is_running()
            assert pg.port == port
            with engine.connect() as conn:  # same engine, same URL; stale pooled connections are discarded
                assert conn.execute(text("select sum(x) from t")).scalar() == 6
        finally:
            engine.dispose()
        root = pg.root
    assert not pg.is_running()
    assert not root.exists()
