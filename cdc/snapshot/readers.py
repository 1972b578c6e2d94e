"""Reading a table chunk as Arrow text columns, for the snapshot's workers.

The readers give the same columns: every value as the text its type's output
function writes (what pgoutput sends), NULL kept apart from '', or for a few built-in
types already the raw layer's Arrow type. The converters in ``pgtypes`` then type the
text, so snapshot rows equal streamed ones.

- ``BinaryCopyReader`` (when the compiled ``_copy`` core is built, the default): a
  ``COPY (SELECT ...) TO STDOUT (FORMAT binary)`` drained by the compiled core, which
  calls libpq itself (no Python call per row) and reads each value with the pgoutput
  binary path's decoders (``decoding/copy_binary.py``): the server sends every type cdc
  decodes in binary, the rest as text.
- ``AdbcReader`` (when ``adbc-driver-postgresql`` is installed, the default):
  the ADBC driver runs the query as a binary COPY and builds the Arrow arrays
  in C++ without holding the GIL; about twice the rows per CPU-second of
  the CSV path (docs/benchmarks.md).
- ``CsvReader``: psycopg's ``COPY ... TO STDOUT (FORMAT csv)`` parsed by
  Arrow's CSV reader; one Python iteration per row.

Both run inside a REPEATABLE READ transaction, importing the exported snapshot
when there is one.
"""

from __future__ import annotations

import contextlib
import io
import select
from typing import Any, Protocol

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from psycopg import sql
from psycopg.conninfo import make_conninfo

from cdc.decoding import pgtypes
from cdc.decoding.binary import CODECS
from cdc.decoding.copy_binary import PureCopyParser, column_plan
from cdc.decoding.core import native_module
from cdc.events import Relation
from cdc.source import libpq
from cdc.source.connection import SESSION_OPTIONS, connect, translated

#: built-in types whose cast to text is their output function; any other type (boolean
#: gives 'true', bpchar drops its padding, inet adds a netmask, domains cast as their
#: base type) is read with format('%s', ...), which calls the output function
_TEXT_CAST_SAFE = {
    pgtypes.INT2, pgtypes.INT4, pgtypes.INT8, pgtypes.OID, pgtypes.NUMERIC, pgtypes.FLOAT4,
    pgtypes.FLOAT8, pgtypes.TEXT, pgtypes.VARCHAR, pgtypes.NAME, pgtypes.DATE, pgtypes.TIME,
    pgtypes.TIMESTAMP, pgtypes.TIMESTAMPTZ, pgtypes.INTERVAL, pgtypes.UUID, pgtypes.JSON,
    pgtypes.JSONB, pgtypes.BYTEA,
}


#: built-in types the ADBC reader fetches in binary and hands over already typed: the
#: server skips their text output, and no cast is needed on our side
_NATIVE = {
    pgtypes.INT2: pa.int16(), pgtypes.INT4: pa.int32(), pgtypes.INT8: pa.int64(),
    pgtypes.FLOAT4: pa.float32(), pgtypes.FLOAT8: pa.float64(), pgtypes.BOOL: pa.bool_(),
    pgtypes.TEXT: pa.string(), pgtypes.VARCHAR: pa.string(), pgtypes.BYTEA: pa.binary(),
    # the server's text output of these is a third of a narrow table's COPY time
    pgtypes.DATE: pa.date32(), pgtypes.TIME: pa.time64("us"),
    pgtypes.TIMESTAMP: pa.timestamp("us"), pgtypes.TIMESTAMPTZ: pa.timestamp("us", tz="UTC"),
}

#: the driver shifts binary dates and timestamps from the PostgreSQL epoch (2000) to the
#: Unix epoch without an overflow check, so ±infinity (int32/int64 max and min) arrive
#: wrapped around (adbc-driver-postgresql 1.x); anything else below the first day
#: PostgreSQL can hold (4714-11-24 BC) wrapped too: a value the raw layer cannot hold
_SHIFT = {pgtypes.DATE: (10_957, 32, -2_440_588, pgtypes.DATE_INFINITY),
          pgtypes.TIMESTAMP: (946_684_800_000_000, 64, -210_866_803_200_000_000,
                              pgtypes.TIMESTAMP_INFINITY)}
_SHIFT[pgtypes.TIMESTAMPTZ] = _SHIFT[pgtypes.TIMESTAMP]


def unwrap_infinity(column: pa.ChunkedArray, type_oid: int, *, table: str,
                    name: str) -> pa.ChunkedArray:
    """A date/timestamp column from the binary COPY with ±infinity as the raw layer's
    sentinels (``pgtypes.DATE_INFINITY`` …); a wrapped finite value raises ConversionError."""
    offset, bits, first, infinity = _SHIFT[type_oid]
    storage = pa.int32() if bits == 32 else pa.int64()
    values = column.cast(storage)
    wrapped = pc.less(values, first)
    if not pc.any(wrapped).as_py():
        return column
    top = 2 ** (bits - 1)
    plus, minus = top - 1 + offset - 2 * top, -top + offset
    bad = pc.and_(wrapped, pc.and_(pc.not_equal(values, plus), pc.not_equal(values, minus)))
    if pc.any(bad).as_py():
        from cdc.errors import ConversionError
        raise ConversionError(f"a value of {table}.{name} is outside the range Arrow can "
                              "hold (beyond year 294246)",
                              fix="change or remove the value at the source, then run cdc "
                              "snapshot again")
    fixed = pc.if_else(pc.equal(values, plus), pa.scalar(infinity, storage),
                       pc.if_else(pc.equal(values, minus), pa.scalar(-infinity, storage),
                                  values))
    return fixed.cast(column.type)


class TextReader(Protocol):
    def read(self, relation: Relation, where: sql.Composable) -> list[pa.ChunkedArray]:
        """The rows of ``relation`` matching ``where``: one Arrow column each, text (the
        type's output) or, for a few built-in types, already of the raw layer's type."""

    def close(self) -> None: ...


def csv_columns(conn: psycopg.Connection[Any], query: sql.Composed,
                ncols: int) -> list[pa.ChunkedArray]:
    """Run a COPY ... (FORMAT csv) and return its columns as Arrow strings (NULL ≠ '')."""
    buffer = io.BytesIO()
    with conn.cursor() as cur, cur.copy(query) as copy:
        for block in copy:
            buffer.write(block)
    if buffer.tell() == 0:
        return [pa.chunked_array([], pa.string()) for _ in range(ncols)]
    names = [f"c{i}" for i in range(ncols)]
    buffer.seek(0)
    table = pacsv.read_csv(
        buffer,
        # single-threaded: the workers already run in parallel; Arrow's CSV threads on top
        # cost 60% more CPU for the same wall time (docs/benchmarks.md)
        read_options=pacsv.ReadOptions(column_names=names, block_size=16 << 20,
                                       use_threads=False),
        parse_options=pacsv.ParseOptions(newlines_in_values=True),
        convert_options=pacsv.ConvertOptions(
            column_types=dict.fromkeys(names, pa.string()), null_values=[""],
            strings_can_be_null=True, quoted_strings_can_be_null=False),
    )
    return list(table.columns)


def _begin_sql(snapshot_name: str | None) -> list[sql.SQL | sql.Composed]:
    statements: list[sql.SQL | sql.Composed] = [
        sql.SQL("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")]
    if snapshot_name is not None:
        statements.append(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
            sql.Literal(snapshot_name)))
    return statements


class CsvReader:
    def __init__(self, dsn: str, snapshot_name: str | None) -> None:
        self.dsn = dsn
        self.conn = connect(dsn)
        with translated(dsn):
            for statement in _begin_sql(snapshot_name):
                self.conn.execute(statement)

    def read(self, relation: Relation, where: sql.Composable) -> list[pa.ChunkedArray]:
        columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in relation.columns)
        query = sql.SQL("COPY (SELECT {} FROM {} WHERE {}) TO STDOUT (FORMAT csv)").format(
            columns, sql.Identifier(relation.schema, relation.name), where)
        with translated(self.dsn):
            return csv_columns(self.conn, query, len(relation.columns))

    def close(self) -> None:
        self.conn.close()


def text_expression(column: str, type_oid: int) -> sql.Composable:
    ident = sql.Identifier(column)
    if type_oid in _TEXT_CAST_SAFE:
        return sql.SQL("{}::text").format(ident)
    # num_nulls: a composite whose fields are all NULL "IS NULL", but is a value
    return sql.SQL("CASE WHEN num_nulls({0}) = 1 THEN NULL ELSE format('%s', {0}) END").format(
        ident)


class AdbcReader:
    def __init__(self, dsn: str, snapshot_name: str | None) -> None:
        import adbc_driver_manager
        import adbc_driver_postgresql.dbapi as adbc

        self.dsn = dsn
        self.errors: tuple[type[Exception], ...] = (adbc_driver_manager.Error,)
        # a psycopg connection renders the SQL (identifiers, literals) for the ADBC one
        self.render = connect(dsn)
        try:
            self.conn = adbc.connect(make_conninfo(dsn, options=SESSION_OPTIONS),
                                     autocommit=True)
            self.cursor = self.conn.cursor()
            for statement in _begin_sql(snapshot_name):
                self.cursor.execute(statement.as_string(self.render))
        except self.errors as exc:
            self.close()
            raise translate_adbc(exc, dsn) from exc

    def read(self, relation: Relation, where: sql.Composable) -> list[pa.ChunkedArray]:
        columns = sql.SQL(", ").join(
            sql.SQL("{} AS {}").format(
                sql.Identifier(c.name) if c.type_oid in _NATIVE
                else text_expression(c.name, c.type_oid), sql.Identifier(f"c{i}"))
            for i, c in enumerate(relation.columns))
        query = sql.SQL("SELECT {} FROM {} WHERE {}").format(
            columns, sql.Identifier(relation.schema, relation.name), where)
        try:
            self.cursor.execute(query.as_string(self.render))
            table: pa.Table = self.cursor.fetch_arrow_table()
        except self.errors as exc:
            raise translate_adbc(exc, self.dsn) from exc
        wanted = [_NATIVE.get(c.type_oid, pa.string()) for c in relation.columns]
        typed = [column if column.type == kind else column.cast(kind)
                 for column, kind in zip(table.columns, wanted, strict=True)]
        return [unwrap_infinity(column, c.type_oid, table=relation.qualified_name, name=c.name)
                if c.type_oid in _SHIFT else column
                for column, c in zip(typed, relation.columns, strict=True)]

    def close(self) -> None:
        for closer in ("cursor", "conn", "render"):
            obj = getattr(self, closer, None)
            if obj is not None:
                with contextlib.suppress(Exception):  # closing a broken connection
                    obj.close()


def translate_adbc(exc: Exception, dsn: str) -> Exception:
    from cdc.errors import SourceError, first_line
    from cdc.source.connection import describe

    return SourceError(f"{describe(dsn)}: {first_line(exc)}", fix="see the server's message")


def adbc_available() -> bool:
    try:
        import adbc_driver_postgresql.dbapi  # noqa: F401
    except ImportError:
        return False
    return True


class BinaryCopyReader:
    """Chunks as binary COPY, parsed by the compiled core (or, with ``pure=True`` or
    without it, by the pure-Python reference: correct, about 20x the CPU)."""

    def __init__(self, dsn: str, snapshot_name: str | None, *, pure: bool = False) -> None:
        self.dsn = dsn
        native = None if pure else native_module("_copy")
        self.parser: Any = PureCopyParser if native is None else native.CopyParser
        self.libpq = None if native is None else libpq.functions()
        self.conn = connect(dsn)
        with translated(dsn):
            for statement in _begin_sql(snapshot_name):
                self.conn.execute(statement)

    def read(self, relation: Relation, where: sql.Composable) -> list[pa.ChunkedArray]:
        plans = [column_plan(c.type_oid) for c in relation.columns]
        # a type without a binary codec is sent as its text (a text value in the COPY)
        columns = sql.SQL(", ").join(
            sql.Identifier(c.name) if c.type_oid in CODECS
            else text_expression(c.name, c.type_oid) for c in relation.columns)
        query = sql.SQL("COPY (SELECT {} FROM {} WHERE {}) TO STDOUT (FORMAT binary)").format(
            columns, sql.Identifier(relation.schema, relation.name), where)
        parser = self.parser(relation.qualified_name, [c.name for c in relation.columns],
                             [p[0] for p in plans], [p[1] for p in plans],
                             [p[2] for p in plans])
        with translated(self.dsn):
            if self.libpq is not None:
                copy_out(self.conn, query, parser, self.libpq)
            else:
                with self.conn.cursor() as cur, cur.copy(query) as copy:
                    for block in copy:
                        parser.feed(block)
        return [pa.chunked_array([column]) for column in parser.finish()]

    def close(self) -> None:
        self.conn.close()


def _wait(pgconn: Any, *, write: bool = False) -> None:
    socket = pgconn.socket
    select.select([] if write else [socket], [socket] if write else [], [])


def _result(pgconn: Any) -> Any:
    """The next result of the query in flight, read without blocking the other workers."""
    while pgconn.is_busy():
        _wait(pgconn)
        pgconn.consume_input()
    return pgconn.get_result()


def _failed(result: Any, pgconn: Any) -> psycopg.Error:
    message = (result.error_message if result is not None else pgconn.error_message) or b""
    sqlstate = result.error_field(psycopg.pq.DiagnosticField.SQLSTATE) if result else None
    kind: type[psycopg.Error] = psycopg.OperationalError
    if sqlstate:
        with contextlib.suppress(KeyError):
            kind = psycopg.errors.lookup(sqlstate.decode())
    return kind(message.decode("utf-8", "replace").strip())


def copy_out(conn: psycopg.Connection[Any], query: sql.Composed, parser: Any,
             functions: libpq.LibpqFunctions) -> None:
    """Run a ``COPY ... TO STDOUT`` on ``conn`` and let the compiled ``parser`` drain it
    through libpq (psycopg's ``Copy`` would make a Python call per row)."""
    pgconn = conn.pgconn
    pgconn.send_query(query.as_bytes(conn))
    while pgconn.flush():
        _wait(pgconn, write=True)
    started = _result(pgconn)
    if started is None or started.status != psycopg.pq.ExecStatus.COPY_OUT:
        while _result(pgconn) is not None:  # leave the connection idle
            pass
        raise _failed(started, pgconn)
    # pgconn_ptr: in every psycopg implementation, not in its type stubs
    status = parser.read_libpq(pgconn.pgconn_ptr,  # type: ignore[attr-defined]
                               functions.get_copy_data, functions.freemem,
                               functions.consume_input, functions.socket)
    if status == -2:
        raise _failed(None, pgconn)
    final = _result(pgconn)
    while _result(pgconn) is not None:
        pass
    if final is None or final.status != psycopg.pq.ExecStatus.COMMAND_OK:
        raise _failed(final, pgconn)


def open_reader(dsn: str, snapshot_name: str | None) -> TextReader:
    """The fastest reader available here."""
    if native_module("_copy") is not None:
        return BinaryCopyReader(dsn, snapshot_name)
    if adbc_available():
        return AdbcReader(dsn, snapshot_name)
    return CsvReader(dsn, snapshot_name)
