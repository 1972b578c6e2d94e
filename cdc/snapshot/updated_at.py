"""The ``updated_at`` export: rows whose change-time column passed a stored watermark.

This is the batch export many teams start with, done carefully: pages are
read in keyset order on ``(updated_at, primary key)``, so rows sharing a
timestamp at a page or run boundary are neither lost nor read twice, and a
table's watermark advances only after the page's file is durable.

What it cannot do, by construction: see deletes, or see more than the last
version of a row between two runs. A transaction that commits *after* a run
with an ``updated_at`` *before* that run's watermark would be missed: so each
run also re-reads the rows whose ``updated_at`` is within ``lookback`` of the
previous run's start (by the source's clock), and compaction's upsert by key
absorbs the overlap. Log-based streaming (`cdc snapshot` + `cdc stream`) has
none of these gaps.

Rows land in raw as ``_op = 'r'`` with ``_commit_lsn`` = the run's position
(the WAL insert position when the run started, after every earlier run's:
``ExportRuns``) and ``_seq`` counting the run's rows of the table. A finished
run is recorded, and ``cdc compact`` applies the rows of finished runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import structlog
from psycopg import sql

from cdc.config import Settings
from cdc.decoding.pgtypes import column_type
from cdc.errors import ConfigError, SourceError
from cdc.events import Relation
from cdc.lake.checkpoint import ExportRuns
from cdc.lake.layout import table_segment
from cdc.lake.raw import RawSink
from cdc.lake.store import Lake
from cdc.names import TableName
from cdc.snapshot.consistent import select_query, snapshot_batch
from cdc.snapshot.readers import csv_columns
from cdc.source.admin import Admin, parse_table_name
from cdc.source.catalog import column_facts
from cdc.source.connection import connect, translated

log = structlog.get_logger("cdc.snapshot.updated_at")


def parse_column_overrides(items: Sequence[str]) -> dict[str, str]:
    """``["public.t=modified_at"]`` → ``{"public.t": "modified_at"}``."""
    result = {}
    for item in items:
        table, sep, column = item.partition("=")
        if not sep or not column.strip():
            raise ConfigError(f"--updated-at {item!r} is not schema.table=column",
                              fix="write e.g. --updated-at public.invoice=modified_at")
        schema, name = parse_table_name(table)
        result[TableName(schema, name).display()] = column.strip()  # = qualified_name
    return result


def watermark_key(relation: Relation) -> str:
    return f"_cdc/watermarks/{table_segment(relation.schema, relation.name)}.json"


class UpdatedAtExport:
    def __init__(self, settings: Settings, lake: Lake, *, default_column: str = "updated_at",
                 columns: Mapping[str, str] | None = None, page_rows: int = 500_000,
                 lookback_seconds: float | None = None) -> None:
        self.settings = settings
        self.lookback = (settings.updated_at_lookback if lookback_seconds is None
                         else lookback_seconds)
        self.lake = lake
        self.default_column = default_column
        self.columns = dict(columns or {})
        self.page_rows = page_rows
        self.sink = RawSink(lake)

    def run(self) -> dict[str, int]:
        """Export every table's new rows; returns rows written per table."""
        s = self.settings
        self.lake.check_writable()
        exported: dict[str, int] = {}
        with connect(s.dsn) as conn:
            admin = Admin(conn, s.dsn)
            tables = ([parse_table_name(t) for t in s.tables] if s.tables
                      else self._user_tables(admin))
            runs = ExportRuns(self.lake)
            run_lsn = runs.start(admin.current_wal_lsn())
            with translated(admin.dsn):
                started = conn.execute("SELECT now()::text").fetchone()
            assert started is not None
            run_ts = int(time.time() * 1e6)
            for schema, table in tables:
                relation, type_names = admin.describe_table(schema, table)
                exported[relation.qualified_name] = self._export_table(
                    admin, relation, type_names, run_lsn, run_ts, started=str(started[0]))
            runs.finish(run_lsn)
        return exported

    def _user_tables(self, admin: Admin) -> list[tuple[str, str]]:
        with translated(admin.dsn):
            rows = admin.conn.execute(
                "SELECT table_schema::text, table_name::text FROM information_schema.tables "
                "WHERE table_type = 'BASE TABLE' AND table_schema NOT IN "
                "('pg_catalog', 'information_schema') ORDER BY 1, 2").fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def _export_table(self, admin: Admin, relation: Relation, type_names: dict[int, str],
                      run_lsn: int, run_ts: int, *, started: str) -> int:
        name = relation.qualified_name
        column = self.columns.get(name, self.default_column)
        names = [c.name for c in relation.columns]
        if column not in names:
            raise SourceError(f"table {name} has no column {column!r}",
                              fix="name its change-time column with --updated-at "
                              f"{name}=<column>, or leave the table out of --tables")
        keys = list(relation.key_columns)
        if not keys:
            raise SourceError(f"table {name} has no primary key; updated_at paging needs one",
                              fix="add a primary key or leave the table out of --tables")
        order = [column, *keys]
        positions = [names.index(c) for c in order]
        facts = admin.type_facts(relation)
        types = [column_type(c.type_oid, c.type_modifier, type_names.get(c.type_oid), facts)
                 for c in relation.columns]
        facts_of_columns = column_facts(admin.conn, admin.dsn, relation.schema, relation.name)
        stored = self.lake.read_bytes(watermark_key(relation))
        doc: dict[str, Any] = json.loads(stored) if stored else {}
        mark: list[str] | None = doc.get("after")
        previous = doc.get("run_started")  # the source's clock at the previous run's start
        written = seq = page = 0
        where = self._after(order, mark, previous)
        while True:
            query = select_query(relation, where, self._page_tail(order))
            with translated(admin.dsn):
                columns = csv_columns(admin.conn, query, len(names))
            rows = len(columns[0])
            if rows == 0:
                break
            batch = snapshot_batch(relation, types, columns, lsn=run_lsn, first_seq=seq,
                                   ts_us=run_ts, label=f"u{run_ts}-{page}",
                                   column_facts=facts_of_columns)
            self.sink.write(batch)
            last = [_text(columns[i][rows - 1]) for i in positions]
            if any(v is None for v in last):
                raise SourceError(f"{name}.{column} is NULL in some rows; they cannot be paged",
                                  fix=f"fill {column} (e.g. with a default) or use cdc stream")
            mark = [str(v) for v in last]
            where = self._after(order, mark, None)
            self.lake.write_bytes(watermark_key(relation), json.dumps(
                {"table": name, "columns": order, "after": mark,
                 "run_started": previous}).encode())
            written += rows
            seq += rows
            page += 1
            log.info("updated_at_page", table=name, rows=rows, total=written, after=mark[0])
            if rows < self.page_rows:
                break
        if written == 0:
            log.info("updated_at_nothing_new", table=name)
        # the next run's lookback starts from this run's start (recorded once the table is
        # done: a crashed run keeps the window of the run before)
        self.lake.write_bytes(watermark_key(relation), json.dumps(
            {"table": name, "columns": order, "after": mark, "run_started": started}).encode())
        return written

    def _after(self, order: list[str], mark: list[str] | None,
               previous: str | None) -> sql.Composable:
        """Rows past ``mark`` in (updated_at, key) order, and — on a run's first page — those
        changed within the lookback before the previous run's start. Both sets are upward
        closed in that order, so keyset paging from the page's last row continues either."""
        if mark is None:
            return sql.SQL("{} IS NOT NULL").format(sql.Identifier(order[0]))
        after = sql.SQL("({}) > ({})").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in order),
            sql.SQL(", ").join(sql.Literal(v) for v in mark))
        if previous is None or self.lookback <= 0:
            return after
        return sql.SQL("({} OR {} >= {}::timestamptz - make_interval(secs => {}))").format(
            after, sql.Identifier(order[0]), sql.Literal(previous),
            sql.Literal(self.lookback))

    def _page_tail(self, order: list[str]) -> sql.Composable:
        return sql.SQL(" ORDER BY {} LIMIT {}").format(
            sql.SQL(", ").join(sql.Identifier(c) for c in order), sql.Literal(self.page_rows))


def _text(scalar: Any) -> str | None:
    value = scalar.as_py() if isinstance(scalar, pa.Scalar) else scalar
    return None if value is None else str(value)
