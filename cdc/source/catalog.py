"""Catalog facts beside the replication connection.

The replication stream does not carry everything: the primary key under REPLICA
IDENTITY FULL, the base and element types of domains, enums and arrays. These
are looked up on a normal connection, opened lazily and reopened after a drop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import psycopg
import structlog

from cdc.decoding.pgtypes import TYPE_FACTS_QUERY, PgType, TypeFacts, load_type_facts
from cdc.source.connection import connect, translated

log = structlog.get_logger("cdc.stream.session")


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
