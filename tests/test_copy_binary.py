"""The snapshot's binary COPY parsers: the compiled one against the pure-Python reference,
and both against what the server sends."""

from __future__ import annotations

import math
import os
import struct
from typing import Any

import pyarrow as pa
import pytest
from conftest import SourceDb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql
from test_binary import VALID

from cdc.decoding import pgtypes as t
from cdc.decoding.copy_binary import SIGNATURE, PureCopyParser, column_plan
from cdc.decoding.core import native_module
from cdc.errors import CdcError
from cdc.events import Column, Relation
from cdc.snapshot.readers import BinaryCopyReader, CsvReader
from cdc.source import libpq

NATIVE = native_module("_copy")
HEADER = SIGNATURE + struct.pack("!Ii", 0, 0)
TRAILER = struct.pack("!h", -1)
_TYPES = [*VALID, t.INTERVAL, t.VARCHAR, t.BPCHAR, t.JSON]  # interval: sent as its text


def _parsers(types: list[int]) -> list[Any]:
    plans = [column_plan(o) for o in types]
    args = ("public.b", [f"c{i}" for i in range(len(types))], [p[0] for p in plans],
            [p[1] for p in plans], [p[2] for p in plans])
    made = [PureCopyParser(*args)]
    if NATIVE is not None:
        made.append(NATIVE.CopyParser(*args))
    return made


def _field(data: bytes | None) -> bytes:
    return struct.pack("!i", -1) if data is None else struct.pack("!i", len(data)) + data


@st.composite
def copy_stream(draw: st.DrawFn) -> tuple[list[int], list[bytes]]:
    """Column types, then CopyData messages: header with the first row, rows, end marker;
    values valid, random or NULL, and now and then a message cut short or a stray one."""
    types = draw(st.lists(st.sampled_from(_TYPES), min_size=1, max_size=5))
    value = {o: st.one_of(VALID.get(o, st.text(max_size=5).map(str.encode)),
                          st.binary(max_size=9), st.none()) for o in set(types)}
    rows = [struct.pack("!h", len(types)) + b"".join(_field(draw(value[o])) for o in types)
            for _ in range(draw(st.integers(0, 6)))]
    messages = [HEADER + (rows[0] if rows else TRAILER)]
    messages += rows[1:]
    if rows:
        messages.append(TRAILER)
    if draw(st.integers(0, 5)) == 0:
        i = draw(st.integers(0, len(messages) - 1))
        messages[i] = messages[i][:draw(st.integers(0, len(messages[i]) - 1))]
    if draw(st.integers(0, 9)) == 0:
        messages.insert(draw(st.integers(0, len(messages))),
                        draw(st.sampled_from([struct.pack("!h", len(types) + 1), TRAILER,
                                              b"\x00", HEADER])))
    return types, messages


def _outcome(parser: Any, messages: list[bytes]) -> Any:
    try:
        for message in messages:
            parser.feed(message)
        columns = parser.finish()
    except CdcError as exc:
        return type(exc).__name__, str(exc)
    # floats compared by their bits: the same NaN, the same -0.0
    return [c.view(pa.int32() if c.type == pa.float32() else pa.int64())
            if pa.types.is_floating(c.type) else c for c in columns]


@settings(max_examples=int(os.environ.get("CDC_DIFF_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(copy_stream())
def test_compiled_copy_parser_matches_the_reference(stream: tuple[list[int], list[bytes]],
                                                    ) -> None:
    """Rows of every supported type (valid, malformed, NULL), truncated messages, stray
    rows and end markers: the same columns, or the same DecodeError, from both parsers."""
    if NATIVE is None:
        pytest.skip("the compiled COPY parser is not built")
    types, messages = stream
    pure, native = (_outcome(p, messages) for p in _parsers(types))
    if isinstance(pure, tuple):
        assert native == pure
        return
    assert not isinstance(native, tuple), native
    for got, want in zip(native, pure, strict=True):
        assert got.equals(want), (got, want)


@pytest.mark.parametrize("kind", ["pure", "native"])
@pytest.mark.parametrize(("messages", "error"), [
    ([b"PGCOPY\n\xff\r\n"], "no binary COPY signature"),
    ([SIGNATURE + b"\0\0"], "a header cut short"),
    ([SIGNATURE + struct.pack("!Ii", 1 << 16, 0) + TRAILER], "rows with OIDs"),
    ([HEADER + struct.pack("!hi", 1, 8) + b"\0\0\0\0"], "a row cut short"),
    ([HEADER + struct.pack("!hi", 1, -2)], "a row cut short"),
    ([HEADER + struct.pack("!hi", 2, -1)], "a row of 2 fields for 1 columns"),
    ([HEADER + struct.pack("!hi", 1, 4) + b"\0\0\0\0"], "an invalid int8 value in column 'c0'"),
    ([HEADER + TRAILER, struct.pack("!hi", 1, -1)], "data after the end marker"),
    ([HEADER + struct.pack("!hi", 1, -1)], "the end marker is missing"),
])
def test_malformed_copy_data_is_a_decode_error_saying_what_is_wrong(
        kind: str, messages: list[bytes], error: str) -> None:
    parsers = dict(zip(["pure", "native"], _parsers([t.INT8]), strict=False))
    if kind not in parsers:
        pytest.skip("the compiled COPY parser is not built")
    outcome = _outcome(parsers[kind], messages)
    assert outcome[0] == "DecodeError"
    assert outcome[1].startswith(f"malformed binary COPY data of public.b: {error};")


@pytest.mark.parametrize("kind", ["pure", "native"])
def test_a_timestamp_past_what_arrow_holds_is_a_conversion_error(kind: str) -> None:
    parsers = dict(zip(["pure", "native"], _parsers([t.TIMESTAMPTZ]), strict=False))
    if kind not in parsers:
        pytest.skip("the compiled COPY parser is not built")
    row = struct.pack("!hiq", 1, 8, 9_223_371_331_199_999_999)
    assert _outcome(parsers[kind], [HEADER + row, TRAILER])[0] == "ConversionError"


EDGE_DDL = """
CREATE TABLE edge (id int PRIMARY KEY, n numeric, n2 numeric(6,2), f8 float8, f4 real,
                   d date, ts timestamp, tstz timestamptz, tm time, big text, b bytea,
                   bo boolean, iv interval, i2 smallint, u uuid, jb jsonb)
"""
EDGE_ROWS = [
    "(1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
    "NULL)",
    "(2, 'NaN', -9999.99, 'NaN', '-0', '-infinity', 'infinity', '-infinity', '24:00:00', "
    "repeat('toast ✓', 200000), decode(repeat('00ff', 300000), 'hex'), false, '-1 day', "
    "-32768, '00000000-0000-0000-0000-000000000001', '{\"a\": 1.50}')",
    "(3, 'Infinity', 0.01, '-Infinity', 'Infinity', '4713-01-01 BC', "
    "'294276-12-31 23:59:59.999999', '4713-11-24 00:00:00+00 BC', '00:00:00.000001', '', "
    "'\\x', true, '178000000 years', 32767, 'ffffffff-ffff-ffff-ffff-ffffffffffff', '[]')",
    "(4, '-Infinity', 0, 5e-324, 1e-45, '5874897-12-31', '0001-01-01 00:00:00', "
    "'10000-01-01 00:00:00.5+00', '12:34:56.789012', 'x', '\\x00', NULL, '0', 0, NULL, "
    "'null')",
    "(5, '0.000000000000000000001000', 123.4, 0.1, 3.4028235e38, '2024-02-29', "
    "'2024-02-29 12:00:00.000001', '1970-01-01 00:00:00+00', '00:00:00', NULL, NULL, true, "
    "'1 mon', -1, NULL, NULL)",
    "(6, ('-1' || repeat('0', 130) || '.' || repeat('0', 50) || '1')::numeric, -0.5, "
    "1.7976931348623157e308, 'NaN', '0001-01-01', '0044-03-15 12:00:00 BC', "
    "'2000-01-01 00:00:00+00', '23:59:59.999999', 'ü', '\\xdeadbeef', false, "
    "'-178000000 years', 1, NULL, '\"✓\"')",
]


def _relation(source: SourceDb) -> Relation:
    rows = source.execute(
        "SELECT attname, atttypid::int, atttypmod, attname = 'id' FROM pg_attribute "
        "WHERE attrelid = 'edge'::regclass AND attnum > 0 ORDER BY attnum")
    return Relation(int(source.execute("SELECT 'edge'::regclass::oid::int")[0][0]), "public",
                    "edge", "d", tuple(Column(n, o, m, bool(k)) for n, o, m, k in rows))


def _typed(relation: Relation, columns: list[pa.ChunkedArray]) -> list[list[Any]]:
    out = []
    for column, meta in zip(columns, relation.columns, strict=True):
        ctype = t.column_type(meta.type_oid, meta.type_modifier)
        values = t.convert_column(column, ctype, table="public.edge", column=meta.name)
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if pa.types.is_temporal(values.type):  # as stored: ±infinity, far years
            values = values.view(pa.int32() if values.type == pa.date32() else pa.int64())
        if pa.types.is_floating(values.type):
            values = values.cast(pa.float64())
            out.append([None if v is None else ("nan", math.copysign(1, v)) if math.isnan(v)
                        else v for v in values.to_pylist()])
        else:
            out.append(values.to_pylist())
    return out


@pytest.mark.parametrize(("pure", "through_libpq"), [(False, True), (False, False), (True, False)],
                         ids=["native", "native-psycopg-copy", "pure"])
def test_binary_copy_reads_the_values_the_text_copy_reads(source: SourceDb, pure: bool,
                                                          through_libpq: bool) -> None:
    """NULLs, TOAST-size text and bytea, far and infinite dates and timestamps, numeric
    NaN/±Infinity and unconstrained scales, -0 and NaN floats, a type sent as text
    (interval): a binary COPY gives the values the CSV reader (the server's text) gives."""
    if not pure and (NATIVE is None or libpq.functions() is None):
        pytest.skip("the compiled COPY parser is not built")
    source.execute(EDGE_DDL)
    source.execute("INSERT INTO edge VALUES " + ", ".join(
        r for r in EDGE_ROWS if "294276" not in r))
    relation = _relation(source)
    where = sql.SQL("id > 0")
    binary = BinaryCopyReader(source.dsn, None, pure=pure)
    if not through_libpq:  # where psycopg's libpq cannot be found: its Copy feeds the parser
        binary.libpq = None
    text = CsvReader(source.dsn, None)
    try:
        got, want = binary.read(relation, where), text.read(relation, where)
        assert _typed(relation, got) == _typed(relation, want)
        assert len(got[0]) == len(EDGE_ROWS) - 1
        # the same reader again on the same connection (the next chunk)
        assert _typed(relation, binary.read(relation, where)) == _typed(relation, want)
    finally:
        binary.close()
        text.close()


def test_a_server_error_during_the_binary_copy_is_a_source_error(source: SourceDb) -> None:
    """A query the server rejects (here a division by zero in the chunk's condition) raises
    the translated error, and the reader's connection reads the next chunk."""
    source.execute(EDGE_DDL)
    source.execute("INSERT INTO edge VALUES " + EDGE_ROWS[0])
    relation = _relation(source)
    reader = BinaryCopyReader(source.dsn, None)
    try:
        with pytest.raises(CdcError, match="division by zero"):
            reader.read(relation, sql.SQL("id / (id - 1) > 0"))
        reader.conn.execute("ROLLBACK")
        reader.conn.execute("BEGIN")
        assert len(reader.read(relation, sql.SQL("true"))[0]) == 1
    finally:
        reader.close()
