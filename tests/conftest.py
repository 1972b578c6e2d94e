"""Test fixtures: a real PostgreSQL with wal_level=logical, one database per test.

Where the server comes from, in order:
- ``CDC_TEST_DSN``: an existing server (superuser, wal_level=logical);
- ``CDC_TEST_TESTCONTAINERS=1`` and a Docker engine: testcontainers' Postgres;
- otherwise a throwaway cluster started with initdb/pg_ctl (``cdc.sandbox``),
  run as the ``postgres`` user when the tests run as root.

Each test gets its own database, slot and publication names, and they are
dropped afterwards, so tests never see each other's tables or slots.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import psycopg
import pytest
from hypothesis import settings as hypothesis_settings
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.config import Settings
from cdc.lake.store import LocalLake
from cdc.sandbox import LocalCluster

# shared CI machines are noisy: no per-example deadline; print the seed to replay a failure
hypothesis_settings.register_profile("cdc", deadline=None, print_blob=True)
hypothesis_settings.load_profile("cdc")

#: short so the idle test outlasts it in seconds, not minutes
WAL_SENDER_TIMEOUT = "10s"


def _docker_available() -> bool:
    return shutil.which("docker") is not None and os.path.exists("/var/run/docker.sock")


@pytest.fixture(scope="session")
def server_dsn() -> Iterator[str]:
    """DSN of a superuser connection to a server with wal_level=logical."""
    if os.environ.get("CDC_TEST_DSN"):
        yield os.environ["CDC_TEST_DSN"]
        return
    if os.environ.get("CDC_TEST_TESTCONTAINERS") == "1" and _docker_available():
        from testcontainers.postgres import PostgresContainer

        container = PostgresContainer("postgres:15").with_command(
            f"postgres -c wal_level=logical -c wal_sender_timeout={WAL_SENDER_TIMEOUT}")
        with container as pg:
            yield (f"postgresql://{pg.username}:{pg.password}@{pg.get_container_host_ip()}:"
                   f"{pg.get_exposed_port(5432)}/{pg.dbname}")
        return
    with LocalCluster(settings={"wal_sender_timeout": WAL_SENDER_TIMEOUT}) as cluster:
        yield cluster.dsn()


@dataclass
class SourceDb:
    """A fresh database for one test, with unique slot and publication names."""

    dsn: str
    name: str
    slot: str
    publication: str

    def execute(self, query: str | sql.Composable, params: Any = None) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(query, params)  # type: ignore[arg-type]
            return cur.fetchall() if cur.description else []

    def connect(self) -> psycopg.Connection[tuple[Any, ...]]:
        return psycopg.connect(self.dsn, autocommit=True)

    def current_lsn(self) -> int:
        from cdc.events import parse_lsn

        return parse_lsn(self.execute("SELECT pg_current_wal_insert_lsn()::text")[0][0])

    def slot_confirmed_lsn(self) -> int | None:
        from cdc.events import parse_lsn

        rows = self.execute("SELECT confirmed_flush_lsn::text FROM pg_replication_slots "
                            "WHERE slot_name = %s", (self.slot,))
        return parse_lsn(rows[0][0]) if rows and rows[0][0] else None


@pytest.fixture
def source(server_dsn: str) -> Iterator[SourceDb]:
    name = f"t_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(server_dsn, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    dsn = make_conninfo(server_dsn, dbname=name)
    db = SourceDb(dsn=dsn, name=name, slot=f"s_{name}", publication=f"p_{name}")
    try:
        yield db
    finally:
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            # with a timeout it waits for the walsender to end (and release its slot): a
            # plain terminate only signals it, and the drop below could still find it active
            admin.execute("SELECT pg_terminate_backend(active_pid, 30000) FROM "
                          "pg_replication_slots WHERE database = %s AND active_pid IS NOT NULL",
                          (name,))
            admin.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                          "WHERE database = %s", (name,))
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@pytest.fixture
def lake_dir(tmp_path: Path) -> Path:
    return tmp_path / "lake"


@pytest.fixture
def lake(lake_dir: Path) -> LocalLake:
    return LocalLake(lake_dir)


@pytest.fixture
def settings(source: SourceDb, lake_dir: Path) -> Settings:
    """Stream settings for the test's database: small status interval, quick flushes."""
    return Settings(dsn=source.dsn, lake=str(lake_dir), slot=source.slot,
                    publication=source.publication, flush_seconds=1.0, status_seconds=1.0,
                    progress_seconds=30.0, max_backoff_seconds=2.0, compact_every=0.0)


def with_settings(settings: Settings, **changes: Any) -> Settings:
    return replace(settings, **changes)


def server_user(dsn: str) -> str:
    return str(conninfo_to_dict(dsn).get("user") or "postgres")


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """URL of an S3 API on loopback (moto's server), one per session; tests make buckets."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
