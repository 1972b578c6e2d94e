"""``cdc query``: SQL over the lake with DuckDB, offline (no extension download).

Each lake table becomes a DuckDB view:

- a staged Delta table ``staged/<schema>.<table>/`` is the view ``<schema>.<table>``
  (``public.invoice``; views carry the tables' real names, see ``cdc.ops.names``), read
  through ``DeltaTable.to_pyarrow_dataset()`` (only the files of the current version, never
  removed ones);
- a history table ``history/<schema>.<table>/`` (every committed version of each row) is
  the view ``history_<schema>.<table>``;
- with ``as_of`` (a commit LSN or a time), each staged view instead shows its table as it
  was then: the history versions valid at that point (keyless tables, which have no
  history: the staged rows committed by then);
- a raw history ``raw/<schema>.<table>/`` is the view ``raw_<schema>.<table>``
  (``raw_public.invoice``): every change with its metadata columns (``_op``, ``_lsn``,
  ``_commit_lsn``, ``_seq``, ``_xid``, ``_commit_ts``, ``_unchanged``) plus ``load_date``
  (DATE) from the hive partition path. Files written before a schema change lack the
  columns added later: the view has the union of all files' columns, NULL where a file
  has none.

DuckDB has no nested schemas, so the raw layer gets one schema per source schema with the
``raw_`` prefix rather than a ``raw`` catalog. Views are registered for the tables the
query names (all of them when it names none, e.g. ``SHOW ALL TABLES``); the datasets are
lazy, so only the files the query scans are read. A local lake is read in place; another
backend's raw files are read through the lake interface into memory.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import datetime as dt
import io
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from decimal import Decimal
from typing import IO, Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from cdc.errors import (
    CdcError,
    HistoryTableUnreadable,
    LakeError,
    RawFileUnreadable,
    StagedTableUnreadable,
    first_line,
)
from cdc.history.as_of import AsOf
from cdc.history.versions import HISTORY_META
from cdc.history.writer import history_location
from cdc.lake.layout import (
    HISTORY,
    RAW,
    STAGED,
    display_name,
    raw_keys,
    segment_table,
    staged_key,
)
from cdc.lake.store import Lake
from cdc.names import quote_ident
from cdc.ops.names import view_map

FORMATS = ("table", "csv", "json")
_BATCH = 10_000


class QueryError(CdcError):
    """The SQL is not valid or names something the lake does not have."""

    exit_code = 2


def raw_tables(lake: Lake) -> dict[str, list[str]]:
    """Table segment → its raw parquet keys (``raw/<t>/load_date=.../x.parquet``)."""
    return {table: [k.key for k in keys] for table, keys in raw_keys(lake.list(RAW)).items()}


def staged_tables(lake: Lake) -> list[str]:
    """Segments of the tables that have a staged Delta table (a ``_delta_log`` folder)."""
    return _delta_tables(lake, STAGED)


def history_tables(lake: Lake) -> list[str]:
    """Segments of the tables that have a history Delta table."""
    return _delta_tables(lake, HISTORY)


def _delta_tables(lake: Lake, prefix: str) -> list[str]:
    names = {key.split("/")[1] for key in lake.list(prefix)
             if len(key.split("/")) > 3 and key.split("/")[2] == "_delta_log"}
    return sorted(n for n in names if segment_table(n) is not None)


def raw_schema(lake: Lake, keys: list[str], table: str) -> pa.Schema:
    """The union of a raw table's file schemas, in the newest file's column order.

    Keys are in log order (file names start with the first LSN), so the last is the newest.
    """
    fs = lake.arrow_filesystem()
    schemas = [_file_schema(fs, key) for key in keys]
    schemas.reverse()  # the newest file's column order first; dropped columns go last
    try:
        unified = pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise LakeError(f"the raw files of {table} have incompatible column types: "
                        f"{first_line(exc)}",
                        fix=f"inspect raw/{table}; a column's type changed at the source") from exc
    latest = next((s.metadata for s in schemas if s.metadata), None)
    return unified.with_metadata(latest or {})


def _file_schema(fs: pafs.FileSystem, key: str) -> pa.Schema:
    """One raw file's schema, from its footer (a ranged read, not the whole file)."""
    try:
        return pq.read_schema(key, filesystem=fs)
    except FileNotFoundError as exc:
        raise LakeError(f"raw file {key} vanished", fix="run the command again") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise RawFileUnreadable(key, exc) from exc


def raw_dataset(lake: Lake, table: str, keys: list[str]) -> ds.Dataset:
    """A lazy dataset over a raw table's files with ``load_date`` (DATE) from the path.

    Files are read through the lake's pyarrow filesystem when the query scans them: on S3
    only the footers and the column chunks the query needs are fetched.
    """
    schema = raw_schema(lake, keys, table)
    date = pa.field("load_date", pa.date32())
    full = schema.append(date) if "load_date" not in schema.names else schema
    partitioning = ds.partitioning(pa.schema([date]), flavor="hive")
    return ds.dataset(keys, schema=full, format="parquet", filesystem=lake.arrow_filesystem(),
                      partitioning=partitioning, partition_base_dir=f"{RAW}{table}")


def duckdb_views(lake: Lake, sql: str | None = None,
                 as_of: AsOf | None = None) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with the lake's views (those ``sql`` names, or all);
    with ``as_of``, staged names show their tables as they were then."""
    try:
        found = duckdb.get_table_names(sql, qualified=False) if sql is not None else set()
        named = {n.lower() for n in found}
    except duckdb.ParserException as exc:
        raise _query_error(exc, []) from exc
    except duckdb.Error:  # it binds some clauses (JOIN ... USING): register every view
        named = set()
    raws, staged, histories = raw_tables(lake), staged_tables(lake), history_tables(lake)
    views = view_map(staged, raws, histories)

    def wanted(layer: str, table: str) -> bool:
        view = views.get((layer, table))
        return view is not None and (not named or view[1].lower() in named)  # case-blind

    con = duckdb.connect()
    with contextlib.suppress(duckdb.Error):  # fails only without the ICU extension
        con.execute("SET TimeZone = 'UTC'")
    for table in histories:
        if wanted("history", table):
            uri, storage = history_location(lake, table)
            dataset = _delta_table(uri, storage, HistoryTableUnreadable).to_pyarrow_dataset()
            _register(con, views[("history", table)], dataset)
            if as_of is not None and ("staged", table) in views:
                columns = [c for c in dataset.schema.names if c not in HISTORY_META]
                select = ", ".join(_ident(c) for c in [*columns, "_valid_from", "_valid_from_lsn"])
                _register(con, views[("staged", table)], dataset,
                          f"SELECT {select} FROM {{}} WHERE {as_of.versions()}")
    for table in staged:
        if not wanted("staged", table) or (as_of is not None and table in histories):
            continue
        uri, storage = lake.delta_location(staged_key(table))
        delta = _delta_table(uri, storage, StagedTableUnreadable)
        select = "SELECT *"
        if as_of is not None:
            if not _is_append(delta):  # keyed, but its history is off or not built yet
                if named:
                    raise QueryError(f"{display_name(table)} has no history table, so --as-of "
                                     "cannot show "
                                     "it as it was", fix="build it from raw: cdc compact "
                                     "--history on (the default)")
                continue
            select = f"SELECT * FROM {{}} WHERE {as_of.appended()}"
        _register(con, views[("staged", table)], delta.to_pyarrow_dataset(), select)
    for table, keys in sorted(raws.items()):
        if wanted("raw", table):
            _register(con, views[("raw", table)], raw_dataset(lake, table, keys))
    con.execute("SET schema = 'main'")
    return con


def _is_append(staged: DeltaTable) -> bool:
    """A staged table of a table without a key: an append of its inserts (its description
    says so, see ``staged.compactor``), so its rows committed by a point are its state then."""
    return "has no primary key" in (staged.metadata().description or "")


def _delta_table(uri: str, storage: dict[str, str] | None,
                 unreadable: type[StagedTableUnreadable | HistoryTableUnreadable]) -> DeltaTable:
    try:
        return DeltaTable(uri, storage_options=storage)
    except Exception as exc:  # delta-rs raises DeltaError and plain Exception
        raise unreadable(uri, exc) from exc


def _register(con: duckdb.DuckDBPyConnection, view: tuple[str, str], data: Any,
              select: str = "SELECT *") -> None:
    """Register ``data`` and create the view ``schema.name`` as ``select`` over it (its
    ``{}`` is the data; without one, ``SELECT *`` of it)."""
    schema, name = view
    hidden = f"_cdc_dataset_{len(schema)}_{schema}.{name}"  # a temporary view in main
    con.register(hidden, data)
    con.execute(f"CREATE SCHEMA IF NOT EXISTS {_ident(schema)}")
    body = select.format(_ident(hidden)) if "{}" in select else f"{select} FROM {_ident(hidden)}"
    con.execute(f"CREATE VIEW {_ident(schema)}.{_ident(name)} AS {body}")


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def lake_views(lake: Lake) -> list[str]:
    """Every view name a query can use, e.g. ``public.invoice``, ``raw_public.invoice``."""
    views = view_map(staged_tables(lake), raw_tables(lake), history_tables(lake))
    order = {"staged": 0, "history": 1, "raw": 2}
    return [f"{quote_ident(schema)}.{quote_ident(name)}"
            for _, (schema, name) in sorted(views.items(),
                                             key=lambda kv: (order[kv[0][0]], kv[0][1]))]


def run_query(lake: Lake, sql: str, out: IO[str], fmt: str = "table",
              as_of: AsOf | None = None) -> None:
    """Run ``sql`` over the lake (as of ``as_of``) and write its result to ``out`` as ``fmt``."""
    if fmt not in FORMATS:
        raise QueryError(f"unknown output format {fmt!r}", fix=f"use one of: {', '.join(FORMATS)}")
    con = duckdb_views(lake, sql, as_of)
    try:
        if fmt == "table":
            relation = con.sql(sql)
            if relation is not None:  # None: a statement without a result
                tty = hasattr(out, "isatty") and out.isatty()
                out.write(_render(relation, shutil.get_terminal_size().columns if tty
                                  else 100_000))
            return
        cursor = con.execute(sql)
        if cursor.description is None:
            return
        names = [d[0] for d in cursor.description]
        rows = _rows(cursor)
        if fmt == "csv":
            write_csv(names, rows, out)
        else:
            write_json_lines(names, rows, out)
    except duckdb.Error as exc:
        raise _query_error(exc, lake_views(lake)) from exc
    except BrokenPipeError:
        raise
    except (pa.ArrowInvalid, OSError) as exc:
        raise LakeError(f"reading the lake failed: {first_line(exc)}",
                        fix="check the lake's permissions and files") from exc
    finally:
        con.close()


def _render(relation: duckdb.DuckDBPyRelation, width: int) -> str:
    """DuckDB's box rendering; pipes and files get every column."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        relation.show(max_width=width, max_rows=1_000_000)
    return buffer.getvalue()


def _rows(cursor: duckdb.DuckDBPyConnection) -> Iterator[tuple[Any, ...]]:
    while True:
        batch = cursor.fetchmany(_BATCH)
        if not batch:
            return
        yield from batch


def write_csv(names: list[str], rows: Iterable[tuple[Any, ...]], out: IO[str]) -> None:
    """RFC 4180 CSV with a header; NULL is an empty field, lists are JSON arrays."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(names)
    for row in rows:
        writer.writerow(["" if v is None else _text(v) for v in row])


def write_json_lines(names: list[str], rows: Iterable[tuple[Any, ...]], out: IO[str]) -> None:
    """One JSON object per row; decimals as strings (exact), times ISO 8601, bytes base64."""
    for row in rows:
        out.write(json.dumps(dict(zip(names, row, strict=True)), default=_json_value,
                             ensure_ascii=False))
        out.write("\n")


def _text(value: Any) -> str:
    if isinstance(value, list | dict):
        return json.dumps(value, default=_json_value, ensure_ascii=False)
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    return str(value)


def _json_value(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, dt.timedelta):
        return value.total_seconds()
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    return str(value)


def _query_error(exc: duckdb.Error, views: list[str]) -> CdcError:
    message = " ".join(str(exc).split("\n")[0].split())
    if isinstance(exc, duckdb.IOException):
        return LakeError(f"reading the lake failed: {message}",
                         fix="check the lake's permissions and files")
    if isinstance(exc, duckdb.ParserException):
        return QueryError(f"bad SQL: {message}",
                          fix="check the syntax (DuckDB SQL); in a shell, put the query in "
                          "single quotes")
    if isinstance(exc, duckdb.CatalogException):
        known = ", ".join(views[:20]) + (", ..." if len(views) > 20 else "")
        return QueryError(message, fix=f"the lake's tables are: {known or 'none yet'} "
                          "(staged <schema>.<table>, versions history_<schema>.<table>, raw "
                          "history raw_<schema>.<table>)")
    return QueryError(message, fix="fix the query (see cdc query --help)")


def query_main(lake: Lake, sql: str, fmt: str, as_of: AsOf | None = None) -> None:
    """Entry for the CLI: the result on stdout; a reader that stops early (``| head``) is fine."""
    try:
        run_query(lake, sql, sys.stdout, fmt, as_of)
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
