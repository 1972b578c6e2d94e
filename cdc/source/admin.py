"""Slot and publication admin over a normal (non-replication) connection."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from cdc.decoding.pgtypes import TYPE_FACTS_QUERY, PgType, load_type_facts
from cdc.errors import (
    PublicationError,
    SlotError,
    SourceError,
)
from cdc.events import Column, Lsn, Relation, parse_lsn
from cdc.names import parse_table_name as parse_name
from cdc.source.connection import describe, translated


@dataclass(frozen=True)
class SlotInfo:
    name: str
    plugin: str
    database: str
    confirmed_flush: Lsn | None
    active_pid: int | None


def parse_table_name(name: str) -> tuple[str, str]:
    """``schema.table``, ``table`` (schema public) or ``"a.b"."c d"`` → (schema, table)."""
    parsed = parse_name(name)
    return parsed.schema, parsed.table


class Admin:
    """Checks and creates what streaming needs, over a normal (non-replication) connection."""

    def __init__(self, conn: psycopg.Connection[tuple[object, ...]], dsn: str) -> None:
        self.conn = conn
        self.dsn = dsn

    def _one(
        self, query: sql.Composable | str, params: Sequence[object] = ()
    ) -> tuple[object, ...] | None:
        with translated(self.dsn):
            return self.conn.execute(query, params).fetchone()  # type: ignore[arg-type]

    def check_wal_level(self) -> None:
        row = self._one("SELECT current_setting('wal_level')")
        level = str(row[0]) if row else "?"
        if level != "logical":
            raise SourceError(
                f"{describe(self.dsn)}: wal_level is {level!r}, logical replication needs "
                "'logical'",
                fix="set wal_level = logical in postgresql.conf and restart the server",
            )

    def current_wal_lsn(self) -> Lsn:
        """The end of the WAL written so far, commits not yet flushed included.

        pg_current_wal_lsn() lags behind asynchronous commits (synchronous_commit=off);
        the insert position does not.
        """
        row = self._one("SELECT pg_current_wal_insert_lsn()::text")
        assert row is not None
        return parse_lsn(str(row[0]))

    def slot(self, name: str) -> SlotInfo | None:
        row = self._one(
            "SELECT slot_name::text, coalesce(plugin::text, ''), coalesce(database::text, ''), "
            "confirmed_flush_lsn::text, active_pid FROM pg_replication_slots "
            "WHERE slot_name = %s", (name,))
        if row is None:
            return None
        return SlotInfo(str(row[0]), str(row[1]), str(row[2]),
                        parse_lsn(str(row[3])) if row[3] else None,
                        int(str(row[4])) if row[4] is not None else None)

    def ensure_slot(self, name: str, plugin: str) -> tuple[SlotInfo, bool]:
        """The slot, created when missing; True when it was created now."""
        info = self.slot(name)
        created = False
        if info is None:
            self._one("SELECT lsn::text FROM pg_create_logical_replication_slot(%s, %s)",
                      (name, plugin))
            info = self.slot(name)
            assert info is not None
            created = True
        dbname = str(self._one("SELECT current_database()")[0])  # type: ignore[index]
        if info.plugin != plugin:
            raise SlotError(
                f"slot {name!r} uses output plugin {info.plugin or '(physical)'!r}, not {plugin!r}",
                fix=f"run with --plugin {info.plugin} or choose another --slot",
            )
        if info.database != dbname:
            raise SlotError(f"slot {name!r} belongs to database {info.database!r}, not {dbname!r}",
                            fix="choose another --slot or connect to that database")
        return info, created

    def drop_slot(self, name: str) -> bool:
        if self.slot(name) is None:
            return False
        self._one("SELECT pg_drop_replication_slot(%s)", (name,))
        return True

    def published_tables(self, publication: str) -> list[tuple[str, str]]:
        """(schema, table) of every table the publication (and its insert-only companion,
        ``<publication>_inserts``) publishes, sorted."""
        from cdc.source.publication import inserts_name

        return self._published([publication, inserts_name(publication)])

    def insert_only_tables(self, publication: str) -> list[tuple[str, str]]:
        """(schema, table) of the tables only the insert-only companion publishes."""
        from cdc.source.publication import inserts_name

        main, both = (set(self._published([publication])),
                      self._published([publication, inserts_name(publication)]))
        return [t for t in both if t not in main]

    def _published(self, names: list[str]) -> list[tuple[str, str]]:
        with translated(self.dsn):
            rows = self.conn.execute(
                "SELECT DISTINCT schemaname::text, tablename::text FROM pg_publication_tables "
                "WHERE pubname = ANY(%s) ORDER BY 1, 2", (names,)).fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def describe_table(self, schema: str, table: str) -> tuple[Relation, dict[int, str]]:
        """The table as a Relation message would describe it (key = primary key columns),
        and the names of its column types."""
        regclass = sql.Identifier(schema, table).as_string(self.conn)
        with translated(self.dsn):
            rows: list[tuple[Any, ...]] = self.conn.execute(
                "SELECT a.attname::text, a.atttypid::int, a.atttypmod, "
                "coalesce(a.attnum = ANY(i.indkey), false), c.oid::int, "
                "format_type(a.atttypid, NULL) "
                "FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid "
                "LEFT JOIN pg_index i ON i.indrelid = c.oid AND i.indisprimary "
                "WHERE c.oid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped "
                "AND a.attgenerated = '' "  # never copied: pgoutput does not send them
                "ORDER BY a.attnum", (regclass,)).fetchall()
        if not rows:
            raise PublicationError(f"table {schema}.{table} has no columns or does not exist",
                                   fix="check --tables")
        columns = tuple(Column(str(r[0]), int(r[1]), int(r[2]), bool(r[3])) for r in rows)
        type_names = {int(r[1]): str(r[5]) for r in rows}
        return Relation(int(rows[0][4]), schema, table, "d", columns), type_names

    def generated_columns(self, schema: str, table: str) -> set[str]:
        """The table's generated columns (none of them is ever copied or streamed)."""
        regclass = sql.Identifier(schema, table).as_string(self.conn)
        with translated(self.dsn):
            try:
                rows = self.conn.execute(
                    "SELECT attname::text FROM pg_attribute WHERE attrelid = %s::regclass "
                    "AND attnum > 0 AND NOT attisdropped AND attgenerated <> ''",
                    (regclass,)).fetchall()
            except psycopg.errors.UndefinedTable:  # dropped since: nothing to leave out
                return set()
        return {str(r[0]) for r in rows}

    def type_facts(self, relation: Relation) -> dict[int, PgType]:
        """Catalog facts of the relation's non-built-in column types (domains, arrays, enums)."""
        def fetch(wanted: list[int]) -> list[tuple[Any, ...]]:
            return self.conn.execute(TYPE_FACTS_QUERY, (wanted,)).fetchall()

        with translated(self.dsn):
            return load_type_facts(fetch, [c.type_oid for c in relation.columns])
