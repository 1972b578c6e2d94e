"""Catalog facts beside the replication connection.

The replication stream does not carry everything: the primary key under REPLICA
IDENTITY FULL, the base and element types of domains, enums and arrays. These
are looked up on a normal connection, opened lazily and reopened after a drop.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, MutableSet
from typing import Any

import psycopg
import structlog

from cdc.decoding.pgtypes import TYPE_FACTS_QUERY, PgType, TypeFacts, load_type_facts
from cdc.errors import SourceError
from cdc.source.connection import connect, translated

log = structlog.get_logger("cdc.stream.session")

#: per column of a table (by name): its attribute number, and the value PostgreSQL shows for
#: rows older than an ``ADD COLUMN ... DEFAULT`` (``attmissingval``), as text
COLUMN_FACTS_QUERY = (
    "SELECT a.attname::text, a.attnum::int, a.attrelid::int, "
    "CASE WHEN a.atthasmissing THEN (a.attmissingval::text::text[])[1] END "
    "FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0 "
    "AND NOT a.attisdropped ORDER BY a.attnum")

ColumnFacts = dict[str, dict[str, str]]
"""Column name → raw field metadata: ``pg_relid`` (the table's OID) and ``pg_attnum`` — the
column's identity through a RENAME COLUMN — and ``pg_missing`` where PostgreSQL has one."""


def column_facts(conn: psycopg.Connection[tuple[object, ...]], dsn: str, schema: str,
                 table: str) -> ColumnFacts:
    """The table's :data:`ColumnFacts` from the catalog as it is now (empty when it is gone)."""
    from psycopg import sql

    regclass = sql.Identifier(schema, table).as_string(conn)
    with translated(dsn):
        try:
            rows = conn.execute(COLUMN_FACTS_QUERY, (regclass,)).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    facts: ColumnFacts = {}
    for name, attnum, relid, missing in rows:
        facts[str(name)] = {"pg_attnum": str(attnum), "pg_relid": str(relid)}
        if missing is not None:
            facts[str(name)]["pg_missing"] = str(missing)
    return facts


class SideConnection:
    """A lazily (re)opened normal connection beside the replication one."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection[tuple[object, ...]] | None = None
        #: the last :meth:`bounded` block ran out of time
        self.expired = False

    def get(self) -> psycopg.Connection[tuple[object, ...]]:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.dsn)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None

    @contextlib.contextmanager
    def bounded(self, seconds: float) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
        """The connection, for statements that must end within ``seconds``.

        Over a stalled network path a statement waits forever: nothing comes back, and TCP
        keepalives cannot tell when a middlebox keeps the TCP session alive. So a timer shuts
        the socket down (it does not close it: the statement's own thread still owns it) once
        the block has run for ``seconds``; the blocked read then fails as a lost connection,
        and the caller closes the connection as after any failure. :attr:`expired` says so.
        """
        conn = self.get()
        fd = conn.fileno()
        lock = threading.Lock()
        running = [True]
        self.expired = False

        def expire() -> None:
            with lock:
                if running[0]:
                    self.expired = True
                    _shut_down(fd)

        timer = threading.Timer(seconds, expire)
        timer.daemon = True
        timer.start()
        try:
            yield conn
        finally:
            with lock:
                running[0] = False
            timer.cancel()


def _shut_down(fd: int) -> None:
    """Shut the socket ``fd`` down both ways (a blocked read on it returns at once)."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as sock:
        sock.shutdown(socket.SHUT_RDWR)


class Catalog:
    """Catalog facts the replication stream does not carry."""

    def __init__(self, side: SideConnection) -> None:
        self.side = side
        self.facts_unavailable = False

    def primary_key(self, oid: int) -> tuple[str, ...]:
        """The primary key columns of a table (empty when it has none)."""
        conn = self.side.get()
        with translated(self.side.dsn):
            rows = conn.execute(
                "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s AND i.indisprimary ORDER BY a.attnum", (oid,)).fetchall()
        return tuple(str(r[0]) for r in rows)

    def column_facts(self, schema: str, table: str) -> ColumnFacts:
        """Attribute numbers and ``ADD COLUMN`` defaults of a table's columns.

        Metadata, not data: without the side connection the stream goes on without it (and
        does not try again this session), saying what staged then lacks.
        """
        if self.facts_unavailable:
            return {}
        try:
            return column_facts(self.side.get(), self.side.dsn, schema, table)
        except SourceError as exc:
            self.facts_unavailable = True
            log.warning("column_facts_unavailable", error=str(exc),
                        consequence="a RENAME COLUMN or ADD COLUMN ... DEFAULT streamed in this "
                        "session reaches staged as drop + add / NULL in older rows; cdc resync "
                        "of the table repairs it")
            return {}

    def type_facts(self, oids: Iterable[int], known: TypeFacts) -> dict[int, PgType]:
        """Base, element and category of the non-built-in types among ``oids``."""
        conn = self.side.get()

        def fetch(wanted: list[int]) -> list[tuple[Any, ...]]:
            return conn.execute(TYPE_FACTS_QUERY, (wanted,)).fetchall()

        with translated(self.side.dsn):
            return load_type_facts(fetch, oids, known)


class PublishedTables(MutableSet[tuple[str, str]]):
    """The publication's tables as a set that notices tables added while streaming.

    wal2json decodes every table, so the session filters by publication; a table created
    (``FOR ALL TABLES``) or added (``ALTER PUBLICATION ... ADD TABLE``) while the stream runs
    must not be skipped and acknowledged past. A table not seen before makes it re-read the
    membership at once; a table known to be outside is re-checked at most every
    ``recheck_seconds``.
    """

    def __init__(self, fetch: Callable[[], Iterable[tuple[str, str]]],
                 recheck_seconds: float = 5.0) -> None:
        self.fetch = fetch
        self.recheck_seconds = recheck_seconds
        self.published: set[tuple[str, str]] = set()
        self.outside: set[tuple[str, str]] = set()
        self.checked = float("-inf")
        self._refresh()

    def _refresh(self) -> None:
        self.published = set(self.fetch())
        self.outside -= self.published
        self.checked = time.monotonic()

    def __contains__(self, table: object) -> bool:
        if table in self.published:
            return True
        stale = time.monotonic() - self.checked >= self.recheck_seconds
        if table not in self.outside or stale:
            self._refresh()
            if table in self.published:
                log.info("table_published_while_streaming", table=".".join(map(str, table))
                         if isinstance(table, tuple) else str(table))
                return True
            if isinstance(table, tuple):
                self.outside.add(table)
        return False

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.published)

    def __len__(self) -> int:
        return len(self.published)

    def add(self, value: tuple[str, str]) -> None:  # published by the stream itself
        self.published.add(value)
        self.outside.discard(value)

    def discard(self, value: tuple[str, str]) -> None:
        self.published.discard(value)
