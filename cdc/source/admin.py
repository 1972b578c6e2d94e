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
from cdc.source.connection import describe, translated


@dataclass(frozen=True)
class SlotInfo:
    name: str
    plugin: str
    database: str
    confirmed_flush: Lsn | None
    active_pid: int | None


def parse_table_name(name: str) -> tuple[str, str]:
    """``schema.table`` or ``table`` (schema public) → (schema, table)."""
    schema, dot, table = name.strip().rpartition(".")
    return (schema if dot else "public"), table


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
        row = self._one("SHOW wal_level")
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

    def ensure_publication(self, name: str, tables: Sequence[str], *,
                           via_partition_root: bool = True) -> None:
        """Create the publication when missing (FOR ALL TABLES, or the named tables).

        ``via_partition_root`` (PostgreSQL 13+): changes to a partition are published as
        changes of its partitioned table, so they land under the parent in raw.
        """
        exists = self._one("SELECT 1 FROM pg_publication WHERE pubname = %s", (name,))
        if exists is None:
            if tables:
                self._check_tables_exist(tables)
                idents = sql.SQL(", ").join(sql.Identifier(*parse_table_name(t)) for t in tables)
                stmt = sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                    sql.Identifier(name), idents)
            else:
                stmt = sql.SQL("CREATE PUBLICATION {} FOR ALL TABLES").format(sql.Identifier(name))
            if via_partition_root and self.conn.info.server_version >= 130000:
                stmt = sql.SQL("{} WITH (publish_via_partition_root = true)").format(stmt)
            try:
                with self.conn.transaction():
                    self.conn.execute(stmt)
            except psycopg.Error as exc:
                raise PublicationError(
                    f"publication {name!r} does not exist and could not be created: "
                    f"{str(exc).strip().splitlines()[0]}",
                    fix=f"create it as a superuser or table owner: {stmt.as_string(self.conn)}",
                ) from exc
        row = self._one("SELECT p.puballtables, (SELECT count(*) FROM pg_publication_tables t "
                        "WHERE t.pubname = p.pubname) FROM pg_publication p WHERE p.pubname = %s",
                        (name,))
        # FOR ALL TABLES picks up tables created later, so it is never "empty"
        if row is not None and not row[0] and row[1] == 0:
            raise PublicationError(
                f"publication {name!r} publishes no tables",
                fix=f"add tables: ALTER PUBLICATION {name} ADD TABLE <schema.table>, "
                "or create tables first",
            )

    def published_tables(self, publication: str) -> list[tuple[str, str]]:
        """(schema, table) of every table the publication publishes, sorted."""
        with translated(self.dsn):
            rows = self.conn.execute(
                "SELECT schemaname::text, tablename::text FROM pg_publication_tables "
                "WHERE pubname = %s ORDER BY 1, 2", (publication,)).fetchall()
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
                "ORDER BY a.attnum", (regclass,)).fetchall()
        if not rows:
            raise PublicationError(f"table {schema}.{table} has no columns or does not exist",
                                   fix="check --tables")
        columns = tuple(Column(str(r[0]), int(r[1]), int(r[2]), bool(r[3])) for r in rows)
        type_names = {int(r[1]): str(r[5]) for r in rows}
        return Relation(int(rows[0][4]), schema, table, "d", columns), type_names

    def type_facts(self, relation: Relation) -> dict[int, PgType]:
        """Catalog facts of the relation's non-built-in column types (domains, arrays, enums)."""
        def fetch(wanted: list[int]) -> list[tuple[Any, ...]]:
            return self.conn.execute(TYPE_FACTS_QUERY, (wanted,)).fetchall()

        with translated(self.dsn):
            return load_type_facts(fetch, [c.type_oid for c in relation.columns])

    def _check_tables_exist(self, tables: Sequence[str]) -> None:
        for table in tables:
            schema, name = parse_table_name(table)
            regclass = sql.Identifier(schema, name).as_string(self.conn)
            row = self._one("SELECT to_regclass(%s)", (regclass,))
            if row is None or row[0] is None:
                raise PublicationError(
                    f"table {schema}.{name} named in --tables does not exist",
                    fix="check the --tables list (schema.table, comma-separated)")


