"""The replication connection, slot and publication admin, keepalives and feedback.

psycopg 3 has no replication API, but a connection opened with
``replication="database"`` can run ``START_REPLICATION``; the COPY BOTH
stream is then read with libpq's ``get_copy_data`` and answered with
``put_copy_data`` + ``flush`` (what pg_recvlogical does). Every psycopg
error is translated into the cdc exception tree here and nowhere else.
"""

from __future__ import annotations

import contextlib
import select
import struct
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import ExecStatus

from cdc.errors import (
    CdcError,
    ConnectionLost,
    PublicationError,
    SlotBusy,
    SlotError,
    SourceError,
)
from cdc.events import Column, Lsn, Relation, format_lsn, parse_lsn
from cdc.pgoutput import PG_EPOCH_OFFSET_US
from cdc.pgtypes import TYPE_FACTS_QUERY, PgType, load_type_facts

#: session settings that make the server's text output what pgtypes parses
SESSION_OPTIONS = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres " \
                  "-c extra_float_digits=3 -c bytea_output=hex"

_status_update = struct.Struct("!cQQQqB")


def describe(dsn: str) -> str:
    """The DSN as safe to log: host, port, database and user, never the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return (f"{params.get('user') or '(default user)'}@{host}:{params.get('port') or 5432}"
            f"/{params.get('dbname') or '(default db)'}")


def translate(exc: psycopg.Error, dsn: str) -> CdcError:
    """Map a psycopg error to a cdc error with a fix (never quoting the DSN's password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = describe(dsn)
    if isinstance(exc, pgerrors.InsufficientPrivilege) or "replication role" in text:
        return SourceError(f"{where}: {text}",
                           fix="grant the role replication rights: ALTER ROLE <user> REPLICATION "
                           "(and allow it in pg_hba.conf)")
    if "wal_level" in text:
        return SourceError(f"{where}: {text}",
                           fix="set wal_level = logical in postgresql.conf and restart the server")
    if isinstance(exc, pgerrors.ObjectInUse):
        return SlotBusy(f"{where}: {text}",
                         fix="another consumer is reading this slot; stop it or use another --slot")
    if isinstance(exc, psycopg.OperationalError):
        if "password authentication failed" in text or "no password supplied" in text:
            return SourceError(f"cannot log in to {where}: {text}",
                               fix="check the user and password in --dsn / CDC_DSN")
        if "does not exist" in text and "database" in text:
            return SourceError(f"{where}: {text}", fix="check the database name in --dsn")
        return ConnectionLost(f"cannot reach PostgreSQL at {where}: {text}",
                              fix="check that the server is running and --dsn host/port are "
                              "right")
    return SourceError(f"{where}: {text}", fix="see the server's message")


@contextmanager
def translated(dsn: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, dsn) from exc


def connect(dsn: str, *, replication: bool = False) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection with the session settings cdc relies on."""
    kwargs: dict[str, object] = {"options": SESSION_OPTIONS, "application_name": "cdc"}
    if replication:
        kwargs["replication"] = "database"
    with translated(dsn):
        params = conninfo_to_dict(dsn)
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = 10
        return psycopg.connect(make_conninfo(dsn, **kwargs), autocommit=True)  # type: ignore[arg-type]


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


class ReplicationStream:
    """One START_REPLICATION session: read CopyData frames, send standby status updates."""

    def __init__(self, dsn: str, slot: str, publication: str, start_lsn: Lsn,
                 plugin: str = "pgoutput") -> None:
        self.dsn = dsn
        self.conn = connect(dsn, replication=True)
        self.pgconn = self.conn.pgconn
        if plugin == "wal2json":  # tables are filtered by the decoder (the publication's)
            from cdc.wal2json import OPTIONS
            options = sql.SQL(", ").join(sql.SQL("{} {}").format(
                sql.Identifier(k), sql.Literal(v)) for k, v in OPTIONS)
        else:
            options = sql.SQL("proto_version '1', publication_names {}").format(
                sql.Literal(publication))
        command = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(slot), sql.SQL(format_lsn(start_lsn)), options)
        query = command.as_bytes(self.conn)
        self.pgconn.send_query(query)
        result = self.pgconn.get_result()
        if result is None or result.status != ExecStatus.COPY_BOTH:
            message = (result.error_message.decode(errors="replace").strip()
                       if result is not None else "no result")
            self.close()
            lowered = message.lower()
            if "invalidated" in lowered or "can no longer get changes" in lowered:
                raise SlotError(f"slot {slot!r} has been invalidated: {message}",
                                fix="the server removed WAL it needed (max_slot_wal_keep_size); "
                                "drop the slot (cdc slot drop) and take a new snapshot")
            if "is active for pid" in lowered:
                raise SlotBusy(f"slot {slot!r}: {message}",
                                fix="another consumer is reading this slot; stop it or use "
                                "another --slot")
            if "publication" in lowered and "does not exist" in lowered:
                raise PublicationError(message,
                                       fix="create the publication or check --publication")
            raise SourceError(f"START_REPLICATION failed: {message}",
                              fix="see the server's message")
        self.socket = self.pgconn.socket

    def read(self, timeout: float) -> memoryview | bytes | None:
        """The next CopyData payload, or None when nothing arrives within ``timeout`` seconds."""
        pgconn = self.pgconn
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes > 0:
            return data
        if nbytes == 0:
            ready, _, _ = select.select([self.socket], [], [], timeout)
            if not ready:
                return None
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                raise translate(exc, self.dsn) from exc
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                return data
            if nbytes == 0:
                return None
        # -1: the server ended the COPY; -2: an error
        error = pgconn.error_message.decode(errors="replace").strip()
        raise ConnectionLost(f"replication stream ended by the server: {error or 'no message'}",
                             fix="cdc reconnects by itself; check the server log if this repeats")

    def send_status(self, flush_lsn: Lsn, *, reply: bool = False) -> None:
        """Report ``flush_lsn`` as written, flushed and applied (the slot may advance to it)."""
        now = int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US
        message = _status_update.pack(b"r", flush_lsn, flush_lsn, flush_lsn, now, int(reply))
        try:
            self.pgconn.put_copy_data(message)
            self.pgconn.flush()
        except psycopg.OperationalError as exc:
            raise translate(exc, self.dsn) from exc

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):  # the connection may already be broken
            self.conn.close()
