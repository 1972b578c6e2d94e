"""The source beside the replication connection: catalog facts and heartbeats.

The replication stream does not carry everything: the primary key under REPLICA
IDENTITY FULL, the base and element types of domains, enums and arrays. These
are looked up on a normal connection, opened lazily and reopened after a drop,
which also writes the idle heartbeat.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import Any

import psycopg
import structlog

from cdc.errors import CdcError
from cdc.pgtypes import TYPE_FACTS_QUERY, PgType, TypeFacts, load_type_facts
from cdc.replication import connect, translated

log = structlog.get_logger("cdc.stream")


class SideConnection:
    """A lazily (re)opened normal connection beside the replication one."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.conn: psycopg.Connection[tuple[object, ...]] | None = None

    def get(self) -> psycopg.Connection[tuple[object, ...]]:
        if self.conn is None or self.conn.closed:
            self.conn = connect(self.dsn)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(psycopg.Error):
                self.conn.close()
            self.conn = None


class Catalog:
    """Catalog facts the replication stream does not carry."""

    def __init__(self, side: SideConnection) -> None:
        self.side = side

    def primary_key(self, oid: int) -> tuple[str, ...]:
        """The primary key columns of a table (empty when it has none)."""
        conn = self.side.get()
        with translated(self.side.dsn):
            rows = conn.execute(
                "SELECT a.attname::text FROM pg_index i JOIN pg_attribute a "
                "ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                "WHERE i.indrelid = %s AND i.indisprimary ORDER BY a.attnum", (oid,)).fetchall()
        return tuple(str(r[0]) for r in rows)

    def type_facts(self, oids: Iterable[int], known: TypeFacts) -> dict[int, PgType]:
        """Base, element and category of the non-built-in types among ``oids``."""
        conn = self.side.get()

        def fetch(wanted: list[int]) -> list[tuple[Any, ...]]:
            return conn.execute(TYPE_FACTS_QUERY, (wanted,)).fetchall()

        with translated(self.side.dsn):
            return load_type_facts(fetch, oids, known)


class Heartbeat:
    """Writes a logical decoding message to the source when the stream is idle.

    On a quiet database whose server keeps writing elsewhere, the message gives
    the slot something of its own to decode, so it keeps advancing (invariant 5).
    Failures only log: a heartbeat must never stop the stream.
    """

    def __init__(self, side: SideConnection, interval: float) -> None:
        self.side = side
        self.interval = interval
        self.next = time.monotonic() + interval

    def maybe_beat(self) -> None:
        if self.interval <= 0 or time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.interval
        try:
            self.side.get().execute("SELECT pg_logical_emit_message(false, 'cdc_heartbeat', "
                                    "now()::text)")
        except (CdcError, psycopg.Error) as exc:
            log.warning("heartbeat_failed", error=str(exc).splitlines()[0] if str(exc) else "",
                        fix="grant EXECUTE on pg_logical_emit_message or set "
                        "--heartbeat-seconds 0")
            self.side.close()
