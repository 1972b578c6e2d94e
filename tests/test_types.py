"""Type fidelity: every common PostgreSQL type round-trips exactly through snapshot, stream
and compaction.

How values are compared (the normalisation): PostgreSQL is read with psycopg, per column
either as a Python value (integers, booleans, floats, decimals, bytes), as its text form
(``format('%s', col)``, per element for arrays: the types the lake stores as text), or, for dates,
timestamps and times, as an exact count (days / microseconds since the epoch or midnight,
``±Infinity`` for ±infinity, read through ``extract(epoch ...)``). The Arrow side is brought to
the same form: temporal columns are read as their integer storage (the ±infinity sentinels
become ±Infinity), NaN is compared as the string ``'NaN'``, decimals by value. Staged
Delta tables hold some types differently (delta_types.for_delta): time and wide decimals as
text (±infinity, BC and five-digit years are held exactly, as in raw).
"""

from __future__ import annotations

import functools
import math
import re
from decimal import Decimal
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from conftest import SourceDb, with_settings
from deltalake import DeltaTable
from hypothesis import given
from hypothesis import strategies as st
from rawlake import raw_files, stream_until_caught_up

from cdc.config import Settings
from cdc.decoding import pgtypes
from cdc.decoding.pgtypes import (
    DATE_INFINITY,
    TIMESTAMP_INFINITY,
    column_type,
    convert_column,
    parse_array,
)
from cdc.errors import ConversionError
from cdc.lake.store import LocalLake
from cdc.snapshot.consistent import ConsistentSnapshot
from cdc.snapshot.readers import AdbcReader, BinaryCopyReader, CsvReader
from cdc.staged import delta_types
from cdc.staged.runner import compact_lake

# -- the array text parser ---------------------------------------------------------------------


def encode_array(items: list[str | None]) -> str:
    """Postgres's array_out for one dimension: quote what needs it, escape \\ and "."""
    out = []
    for item in items:
        if item is None:
            out.append("NULL")
        elif (item == "" or item.upper() == "NULL"
              or re.search(r'[{},"\\\s]', item) is not None):
            out.append('"' + item.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            out.append(item)
    return "{" + ",".join(out) + "}"


@given(st.lists(st.one_of(st.none(), st.text())))
def test_array_text_round_trips(items: list[str | None]) -> None:
    assert parse_array(encode_array(items)) == items


@given(st.lists(st.one_of(st.none(), st.text(alphabet='ab,"\\{} NUL', max_size=6))))
def test_array_text_round_trips_the_awkward_characters(items: list[str | None]) -> None:
    assert parse_array(encode_array(items)) == items


@pytest.mark.parametrize("text", ["{{1,2},{3,4}}", "[0:1]={1,2}", '{"a', "{a", "{a,b}x"])
def test_array_text_the_lake_cannot_hold_exactly_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="array"):
        parse_array(text)


def test_a_nan_in_a_decimal_column_fails_loudly_naming_table_column_and_value() -> None:
    numeric_10_2 = (10 << 16 | 2) + 4
    with pytest.raises(ConversionError, match=r"'NaN' of public\.t\.price.*ALTER public\.t"):
        convert_column(["1.50", "NaN"], column_type(pgtypes.NUMERIC, numeric_10_2),
                       table="public.t", column="price")


def test_a_decimal_is_never_rounded() -> None:
    numeric_10_2 = (10 << 16 | 2) + 4
    with pytest.raises(ConversionError):
        convert_column(["1.555"], column_type(pgtypes.NUMERIC, numeric_10_2), table="t",
                       column="c")


# -- one table with a column per type, through snapshot, stream and compaction ----------------

TYPES_DDL = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy', 'naïve "q"');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE DOMAIN price AS numeric(10, 2);
CREATE DOMAIN stamp AS timestamptz;
CREATE TYPE pair AS (a int, b text);
"""

# name: (type, how compared, five SQL values: rows 2..6; row 1 is all NULL)
COLUMNS: dict[str, tuple[str, str, list[str]]] = {
    "i2": ("smallint", "py", ["0", "-32768", "32767", "1", "-1"]),
    "i4": ("integer", "py", ["0", "-2147483648", "2147483647", "1", "-1"]),
    "i8": ("bigint", "py", ["0", "-9223372036854775808", "9223372036854775807", "1", "-1"]),
    "n_ps": ("numeric(12,3)", "py", ["1.5", "-999999999.999", "999999999.999", "0", "0.001"]),
    "n_wide": ("numeric(50,10)", "py", [
        "1.5", "-" + "9" * 40 + ".9999999999", "9" * 40 + ".9999999999", "0.0000000001", "0"]),
    "n_any": ("numeric", "text", [
        "1.50", "'NaN'", "'Infinity'", "'-Infinity'",
        "1" + "0" * 200 + ".000000000000000000000000000000000000000000000000001"]),
    "f4": ("real", "py", ["1.5", "'-3.4028235e38'", "'3.4028235e38'", "'NaN'", "'1e-45'"]),
    "f8": ("double precision", "py", [
        "0.1", "'-Infinity'", "'Infinity'", "'NaN'", "'5e-324'"]),
    "m": ("money", "text", ["12.34", "'-92233720368547758.08'", "'92233720368547758.07'",
                            "0", "1"]),
    "t": ("text", "py", ["'hello'", "''", "repeat('xyz', 40000)", "'unicode ✓ é 😀'",
                         "E'tab\\t nl\\n \"q\" back\\\\slash, {brace} NULL'"]),
    "vc": ("varchar(20)", "py", ["'a'", "''", "'ünïcödé'", "' spaces '", "'NULL'"]),
    "ch": ("char(5)", "py", ["'ab'", "''", "'abcde'", "'é'", "' '"]),
    "b": ("bytea", "py", ["'\\x0001ff'", "'\\x'", "decode(repeat('ab', 50000), 'hex')",
                          "'\\x00'", "'\\xdeadbeef'"]),
    "bo": ("boolean", "py", ["true", "false", "true", "false", "true"]),
    "d": ("date", "days", ["'2024-02-29'", "'-infinity'", "'infinity'", "'0001-01-02'",
                           "'9999-12-30'"]),
    "ts": ("timestamp", "us", [
        "'2024-02-29 12:34:56.789012'", "'-infinity'", "'infinity'",
        "'0001-01-01 00:00:00.000001'", "'9999-12-31 23:59:59.999998'"]),
    "tstz": ("timestamptz", "us", [
        "'2024-02-29 12:34:56.789012+05:30'", "'-infinity'", "'infinity'",
        "'0001-01-01 00:00:01+00'", "'1970-01-01 00:00:00+00'"]),
    "tm": ("time", "time", ["'12:34:56.789012'", "'00:00:00'", "'24:00:00'",
                            "'23:59:59.999999'", "'00:00:00.000001'"]),
    "ttz": ("timetz", "text", ["'12:34:56+05:30'", "'00:00:00+00'", "'23:59:59.999999-15:59'",
                               "'00:00:00.000001+15:59'", "'12:00-01'"]),
    "iv": ("interval", "text", ["'1 year 2 mons 3 days 04:05:06.789'", "'-178000000 years'",
                                "'178000000 years'", "'0'", "'-1 days +01:00'"]),
    "u": ("uuid", "text", ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'",
                           "'00000000-0000-0000-0000-000000000000'",
                           "'ffffffff-ffff-ffff-ffff-ffffffffffff'",
                           "'A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A12'",
                           "'{a0eebc99-9c0b4ef8-bb6d6bb9-bd380a13}'"]),
    "j": ("json", "text", ["'{\"a\": [1, 2.50, \"x\"]}'", "'[]'", "'\"unicode ✓\"'", "'null'",
                           "'{\"big\": 123456789012345678901234567890.5e400}'"]),
    "jb": ("jsonb", "text", ["'{\"a\": [1, 2.50, \"x\"]}'", "'[]'", "'\"unicode ✓\"'",
                             "'null'", "'{\"b\": 1, \"a\": {\"c\": \"d,e\"}}'"]),
    "x": ("xml", "text", ["'<a>b</a>'", "''", "'<x y=\"1\">ü</x>'", "'text only'",
                          "'<a/><b/>'"]),
    "ip": ("inet", "text", ["'192.168.0.1/24'", "'::1'", "'10.0.0.1'", "'2001:db8::1/64'",
                            "'0.0.0.0/0'"]),
    "cn": ("cidr", "text", ["'10.0.0.0/8'", "'::/0'", "'192.168.1.0/24'", "'2001:db8::/32'",
                            "'1.2.3.4/32'"]),
    "mac": ("macaddr", "text", ["'08:00:2b:01:02:03'", "'00:00:00:00:00:00'",
                                "'ff:ff:ff:ff:ff:ff'", "'08002b010203'", "'0800.2b01.0204'"]),
    "e": ("mood", "text", ["'happy'", "'sad'", "'ok'", "'naïve \"q\"'", "'happy'"]),
    "dom": ("posint", "py", ["1", "2147483647", "42", "7", "1"]),
    "dprice": ("price", "py", ["1.50", "-99999999.99", "99999999.99", "0", "0.01"]),
    "dstamp": ("stamp", "us", ["'2024-01-01 00:00:00+00'", "'-infinity'", "'infinity'",
                               "'2000-01-01 00:00:00.000001+00'", "'1900-06-30 12:00+00'"]),
    "comp": ("pair", "text", ["ROW(1, 'a b')", "ROW(NULL, '\"q\"')", "ROW(-1, '')",
                              "ROW(NULL, NULL)", "ROW(2, 'x,y\\z')"]),
    "ai": ("integer[]", "py", ["'{1,NULL,3}'", "'{}'", "'{-2147483648,2147483647}'",
                               "'{NULL}'", "'{0}'"]),
    "at": ("text[]", "py", [
        "ARRAY['a', 'b c', NULL, 'NULL', 'null', '', 'q\"uote', 'back\\slash', 'com,ma',"
        " '{br}', ' lead', 'ü😀', E'new\\nline']", "'{}'", "ARRAY[repeat('y', 10000)]",
        "ARRAY[NULL, NULL]::text[]", "ARRAY['\"', '\\', ',', '{', '}']"]),
    "avc": ("varchar(10)[]", "py", ["ARRAY['a', NULL, '']", "'{}'", "ARRAY[' ']",
                                    "ARRAY['NULL']", "ARRAY['x']"]),
    "an": ("numeric(8,2)[]", "py", ["ARRAY[1.5, NULL, -999999.99]", "'{}'",
                                    "ARRAY[999999.99]", "ARRAY[0]", "ARRAY[NULL]::numeric[]"]),
    "anu": ("numeric[]", "text", ["ARRAY['NaN', 'Infinity', '-Infinity', '1e-20']::numeric[]",
                                  "'{}'", "ARRAY[1.5, NULL]", "ARRAY[0]", "ARRAY[1e100]"]),
    "af": ("float8[]", "py", ["ARRAY['NaN', 'Infinity', '-Infinity', 0.1, NULL]::float8[]",
                              "'{}'", "ARRAY[1.7976931348623157e308]", "ARRAY[-0.0]",
                              "ARRAY[5e-324]"]),
    "af4": ("real[]", "py", ["ARRAY['NaN', 1.1, NULL]::real[]", "'{}'", "ARRAY[3.4028235e38]",
                             "ARRAY[1e-45]", "ARRAY[0]"]),
    "abo": ("boolean[]", "py", ["ARRAY[true, false, NULL]", "'{}'", "ARRAY[true]",
                                "ARRAY[false]", "ARRAY[NULL]::boolean[]"]),
    "ab": ("bytea[]", "py", ["ARRAY['\\x00ff'::bytea, NULL, '\\x'::bytea]", "'{}'",
                             "ARRAY['\\x2c7b7d22'::bytea]", "ARRAY[NULL]::bytea[]",
                             "ARRAY['\\x5c'::bytea]"]),
    "ad": ("date[]", "days", ["ARRAY['infinity', NULL, '2020-01-01', '0044-03-15']::date[]",
                              "'{}'", "ARRAY['-infinity']::date[]", "ARRAY['1970-01-01']::date[]",
                              "ARRAY[NULL]::date[]"]),
    "ats": ("timestamptz[]", "us", [
        "ARRAY['-infinity', '2020-01-01 00:00:00.5+00', NULL]::timestamptz[]", "'{}'",
        "ARRAY['infinity']::timestamptz[]", "ARRAY['0044-03-15 12:00:00+00']::timestamptz[]",
        "ARRAY['1999-12-31 23:59:59.999999+00']::timestamptz[]"]),
    "atsn": ("timestamp[]", "us", [
        "ARRAY['2020-01-01 00:00:00.5', NULL]::timestamp[]", "'{}'",
        "ARRAY['infinity']::timestamp[]", "ARRAY['-infinity']::timestamp[]",
        "ARRAY['1900-01-01 00:00:00']::timestamp[]"]),
    "atm": ("time[]", "time", ["ARRAY['12:00:00.000001', NULL]::time[]", "'{}'",
                               "ARRAY['24:00:00']::time[]", "ARRAY['00:00']::time[]",
                               "ARRAY['23:59:59']::time[]"]),
    "aiv": ("interval[]", "text", ["ARRAY['1 day', NULL, '-1 mons +02:00']::interval[]", "'{}'",
                                   "ARRAY['0']::interval[]", "ARRAY['1 year']::interval[]",
                                   "ARRAY['00:00:00.000001']::interval[]"]),
    "aj": ("jsonb[]", "text", ["ARRAY['{\"a\": \"b,c\"}', '[1, \"x\\\"y\"]', NULL]::jsonb[]",
                               "'{}'", "ARRAY['null']::jsonb[]", "ARRAY['{}']::jsonb[]",
                               "ARRAY['\"\\\\\"']::jsonb[]"]),
    "au": ("uuid[]", "text", ["ARRAY['a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', NULL]::uuid[]",
                              "'{}'", "ARRAY['00000000-0000-0000-0000-000000000000']::uuid[]",
                              "ARRAY[NULL]::uuid[]", "'{}'"]),
    "ainet": ("inet[]", "text", ["ARRAY['10.0.0.1/8', '::1']::inet[]", "'{}'",
                                 "ARRAY[NULL]::inet[]", "ARRAY['1.2.3.4']::inet[]", "'{}'"]),
    "ae": ("mood[]", "text", ["ARRAY['happy', NULL, 'naïve \"q\"']::mood[]", "'{}'",
                              "ARRAY['sad']::mood[]", "ARRAY[NULL]::mood[]", "'{}'"]),
    "adom": ("posint[]", "py", ["ARRAY[1, NULL]::posint[]", "'{}'", "ARRAY[2147483647]::posint[]",
                                "ARRAY[NULL]::posint[]", "ARRAY[5]::posint[]"]),
    "am": ("money[]", "text", ["ARRAY[1.5, NULL]::money[]", "'{}'", "ARRAY[0]::money[]",
                               "ARRAY[-1]::money[]", "'{}'"]),
}

#: dates and timestamps outside years 1-9999 (raw and staged hold them exactly)
FAR: dict[str, tuple[str, str, list[str]]] = {
    "d": ("date", "days", ["'4713-01-01 BC'", "'5874897-12-31'", "'0001-12-31 BC'",
                           "'10000-01-01'", "'0044-03-15 BC'"]),
    "ts": ("timestamp", "us", [
        "'4713-01-01 00:00:00 BC'", "'294246-12-31 23:59:59.999999'",
        "'0001-12-31 23:59:59.999999 BC'", "'10000-01-01 00:00:00'",
        "'0044-03-15 12:00:00.5 BC'"]),
    "tstz": ("timestamptz", "us", [
        "'4713-01-01 00:00:00+00 BC'", "'294246-12-31 23:59:59.999999+00'",
        "'0001-12-31 23:59:59.999999+00 BC'", "'10000-01-01 00:00:00+00'",
        "'0044-03-15 12:00:00.5+00 BC'"]),
    "ad": ("date[]", "days", ["ARRAY['0044-03-15 BC', NULL, '2020-01-01']::date[]",
                              "ARRAY['12345-06-07']::date[]", "'{}'", "'{}'", "'{}'"]),
    "ats": ("timestamptz[]", "us", ["ARRAY['0044-03-15 12:00:00+00 BC']::timestamptz[]",
                                    "ARRAY['infinity', '20000-01-01 00:00:00+00']::timestamptz[]",
                                    "'{}'", "'{}'", "'{}'"]),
}

NROWS = 6  # row 1 all NULL, rows 2..6 from COLUMNS


def _is_array(pg_type: str) -> bool:
    return pg_type.endswith("[]")


def _source_expr(name: str, pg_type: str, kind: str) -> str:
    """The SELECT expression that reads one column in the compared form."""
    col = f'"{name}"'
    if kind == "py":
        if pg_type == "posint[]":
            return f"{col}::int[]"
        if pg_type.startswith("real"):  # float4 → float8 is exact; psycopg parses real as double
            return f"{col}::float8" + ("[]" if _is_array(pg_type) else "")
        return col
    if kind == "text":  # the type's output function (x::text differs for inet: it adds /128)
        def one(x: str) -> str:
            return f"CASE WHEN num_nulls({x}) = 1 THEN NULL ELSE format('%s', {x}) END"
    else:  # temporal: exact integers from extract(epoch ...) (±Infinity for ±infinity)
        scale = {"days": "/ 86400", "us": "* 1000000", "time": "* 1000000"}[kind]

        def one(x: str) -> str:
            return f"(extract(epoch FROM {x}) {scale})::numeric"

    if not _is_array(pg_type):
        return one(col)
    return (f"CASE WHEN {col} IS NULL THEN NULL ELSE ARRAY(SELECT {one('x')} FROM "
            f"unnest({col}) WITH ORDINALITY AS u(x, o) ORDER BY o) END")


def _norm(value: Any) -> Any:
    """Python values in the compared form: NaN as a string, decimals by exact value."""
    if isinstance(value, list):
        return [_norm(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return "NaN"
    if isinstance(value, float) and value == 0:
        return (0.0, math.copysign(1, value))
    if isinstance(value, Decimal):
        return "NaN" if value.is_nan() else value.normalize() if value.is_finite() else value
    if isinstance(value, memoryview):
        return bytes(value)
    return value


def _storage(column: pa.ChunkedArray | pa.Array, kind: str, *, staged: bool) -> list[Any]:
    """Arrow values in the compared form (temporal ones as exact integers)."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    t = column.type
    if pa.types.is_list(t):
        values = _storage(column.flatten(), kind, staged=staged)
        offsets = column.offsets.to_pylist()
        valid = column.is_valid().to_pylist()
        return [values[offsets[i]:offsets[i + 1]] if valid[i] else None
                for i in range(len(column))]
    if kind in ("days", "us"):
        return _epoch_storage(column, staged=staged)
    if kind == "time":
        return _time_storage(column)
    # decimals, and numeric wider than 38 digits (text in staged), compare as they are
    return column.to_pylist()


def _epoch_storage(column: pa.Array, *, staged: bool) -> list[Any]:
    """Dates (days) and timestamps (µs) as exact integers, their infinity sentinels as ±Infinity."""
    t = column.type
    storage = pa.int32() if pa.types.is_date32(t) else pa.int64()
    top = DATE_INFINITY if pa.types.is_date32(t) else TIMESTAMP_INFINITY
    out: list[Any] = []
    for v in column.view(storage).to_pylist():
        if v is None:
            out.append(None)
        elif v == top:
            out.append(Decimal("Infinity"))
        elif v == -top:
            out.append(Decimal("-Infinity"))
        else:
            out.append(Decimal(v))
    return out


def _time_storage(column: pa.Array) -> list[Decimal | None]:
    """Times as exact microseconds: time64 in raw, ``HH:MM:SS.ffffff`` text in staged."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        def micros(s: str | None) -> Decimal | None:
            if s is None:
                return None
            h, m, sec = s.split(":")
            return Decimal(int(h) * 3600 + int(m) * 60) * 1_000_000 + Decimal(sec) * 1_000_000
        return [micros(s) for s in column.to_pylist()]
    return [None if v is None else Decimal(v) for v in column.view(pa.int64()).to_pylist()]


Columns = dict[str, tuple[str, str, list[str]]]


def _source_values(source: SourceDb, table: str = "typed",
                   spec: Columns = COLUMNS) -> dict[int, dict[str, Any]]:
    exprs = ", ".join(_source_expr(n, t, k) for n, (t, k, _) in spec.items())
    rows = source.execute(f"SELECT id, {exprs} FROM {table} ORDER BY id")
    return {r[0]: {n: _norm(v) for n, v in zip(spec, r[1:], strict=True)} for r in rows}


def _arrow_values(table: pa.Table, *, staged: bool,
                  spec: Columns = COLUMNS) -> dict[int, dict[str, Any]]:
    ids = table["id"].to_pylist()
    columns = {}
    for name, (_, kind, _) in spec.items():
        values = _storage(table[name], kind, staged=staged)
        if staged and name == "n_wide":
            values = [None if v is None else Decimal(v) for v in values]
        columns[name] = [_norm(v) for v in values]
    return {i: {n: columns[n][row] for n in spec} for row, i in enumerate(ids)}


def _assert_same(got: dict[int, dict[str, Any]], want: dict[int, dict[str, Any]],
                 where: str) -> None:
    assert sorted(got) == sorted(want), where
    for key, row in want.items():
        for name, value in row.items():
            assert got[key][name] == value, f"{where}: id {key} column {name}"


def _create(source: SourceDb, table: str, spec: Columns) -> None:
    ddl = ", ".join(f'"{n}" {t}' for n, (t, _, _) in spec.items())
    source.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, {ddl})")
    source.execute(f"INSERT INTO {table} (id) VALUES (1)")
    for row in range(NROWS - 1):
        values = ", ".join(v[row] for _, _, v in spec.values())
        source.execute(f"INSERT INTO {table} VALUES ({row + 2}, {values})")


#: every snapshot reader: binary COPY (compiled core and pure-Python parser), ADBC, CSV
READERS = [BinaryCopyReader, functools.partial(BinaryCopyReader, pure=True), AdbcReader,
           CsvReader]
READER_IDS = ["binary", "binary-pure", "adbc", "csv"]


def _as_stored(table: pa.Table, names: list[str]) -> bytes:
    """The columns by id as one parquet file: equal bytes, equal stored values (NaN, -0,
    ±infinity and far dates included, also inside lists)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table.sort_by("id").select(names), sink)
    return bytes(sink.getvalue())


def _raw(settings: Settings, op: str, table: str = "typed") -> pa.Table:
    files = raw_files(Path(settings.lake), f"public.{table}")
    table = pa.concat_tables([pq.read_table(f) for f in files])
    return table.filter(pc.equal(table["_op"], op))


@pytest.mark.parametrize("reader", READERS, ids=READER_IDS)
def test_every_type_round_trips_through_snapshot_stream_and_compaction(
    source: SourceDb, settings: Settings, reader: Any
) -> None:
    """Edge values of every type: raw and staged equal PostgreSQL, with either reader."""
    source.execute(TYPES_DDL)
    _create(source, "typed", COLUMNS)
    _create(source, "far", FAR)
    ConsistentSnapshot(settings, LocalLake(settings.lake), reader=reader).run()
    for table, spec in (("typed", COLUMNS), ("far", FAR)):
        source.execute(f"INSERT INTO {table} SELECT id + 100, " + ", ".join(
            f'"{n}"' for n in spec) + f" FROM {table}")
    stream_until_caught_up(settings)
    want = _source_values(source)

    far = _source_values(source, "far", FAR)
    _assert_same(_arrow_values(_raw(settings, "r", "far"), staged=False, spec=FAR),
                 {k: v for k, v in far.items() if k < 100}, "far snapshot")
    _assert_same(_arrow_values(_raw(settings, "c", "far"), staged=False, spec=FAR),
                 {k: v for k, v in far.items() if k > 100}, "far stream")

    snap = _raw(settings, "r")
    _assert_same(_arrow_values(snap, staged=False),
                 {k: v for k, v in want.items() if k < 100}, "snapshot")
    streamed = _raw(settings, "c")
    _assert_same(_arrow_values(streamed, staged=False),
                 {k: v for k, v in want.items() if k > 100}, "stream")
    # both paths write the same schema, with the Postgres type recorded per field, and the
    # same stored values for the same source rows (streamed ids are the snapshot's + 100)
    assert snap.schema.remove_metadata() == streamed.schema.remove_metadata()
    assert snap.schema == streamed.schema
    assert _as_stored(snap, list(COLUMNS)) == _as_stored(streamed, list(COLUMNS))
    meta = {f.name: (f.metadata or {}).get(b"pg_type", b"").decode() for f in streamed.schema}
    assert meta["n_ps"] == "numeric(12,3)"
    assert meta["e"].endswith("mood")
    assert meta["dom"].endswith("posint")
    assert meta["ai"] == "integer[]"
    assert streamed.schema.field("dom").type == pa.int32()
    assert streamed.schema.field("dprice").type == pa.decimal128(10, 2)
    assert streamed.schema.field("adom").type == pa.list_(pa.int32())
    assert streamed.schema.field("ad").type == pa.list_(pa.date32())

    compact_lake(LocalLake(settings.lake), settings.slot, ["public.typed"])
    staged = DeltaTable(f"{settings.lake}/staged/public.typed").to_pyarrow_table()
    _assert_same(_arrow_values(staged, staged=True), want, "staged")
    # a second merge into the existing Delta table (its schema read back from Delta)
    source.execute("UPDATE typed SET i2 = 7 WHERE id IN (1, 2, 104)")
    source.execute("DELETE FROM typed WHERE id = 3")
    stream_until_caught_up(settings)
    compact_lake(LocalLake(settings.lake), settings.slot, ["public.typed"])
    staged = DeltaTable(f"{settings.lake}/staged/public.typed").to_pyarrow_table()
    _assert_same(_arrow_values(staged, staged=True), _source_values(source), "staged again")
    # BC and five-digit years are staged exactly too (no statistics for those columns)
    compact_lake(LocalLake(settings.lake), settings.slot, ["public.far"])
    staged_far = DeltaTable(f"{settings.lake}/staged/public.far").to_pyarrow_table()
    _assert_same(_arrow_values(staged_far, staged=True, spec=FAR), far, "far staged")


def test_arrays_map_to_lists_of_their_element_type_except_geometric_ones() -> None:
    facts = {
        1020: pgtypes.PgType(1020, "box[]", "A", elem_oid=603),
        603: pgtypes.PgType(603, "box", "G"),
        5000: pgtypes.PgType(5000, "public._mood", "A", elem_oid=5001),
        5001: pgtypes.PgType(5001, "public.mood", "E"),
        5002: pgtypes.PgType(5002, "public.price", "N", base_oid=pgtypes.NUMERIC,
                             base_typmod=(10 << 16 | 2) + 4),
    }
    boxes = column_type(1020, -1, None, facts)
    assert boxes.arrow_type == pa.string()
    assert boxes.convert(pa.array(["{(1,1),(0,0);(2,2),(1,1)}"])).to_pylist() == [
        "{(1,1),(0,0);(2,2),(1,1)}"]
    moods = column_type(5000, -1, None, facts)
    assert moods.pg_type == "public.mood[]"
    assert moods.convert(pa.array(['{happy,NULL,"a b"}'])).to_pylist() == [
        ["happy", None, "a b"]]
    price = column_type(5002, -1, None, facts)
    assert price.pg_type == "public.price"
    assert price.arrow_type == pa.decimal128(10, 2)


def _raw_all(settings: Settings, table: str) -> pa.Table:
    files = raw_files(Path(settings.lake), f"public.{table}")
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by(
        [("_commit_lsn", "ascending"), ("_seq", "ascending")])


def test_every_type_lands_the_same_raw_rows_from_either_decoder(
    source: SourceDb, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inserts, updates (one with an unchanged TOASTed value, one of the key) and deletes of
    every type: the compiled and the pure-Python decoder write identical raw rows."""
    source.execute(TYPES_DDL)
    _create(source, "typed", COLUMNS)
    source.execute("ALTER TABLE typed ADD COLUMN big text")
    runs = {kind: with_settings(settings, slot=f"{settings.slot}_{kind}",
                                lake=str(tmp_path / kind)) for kind in ("pure", "native")}
    for run in runs.values():
        stream_until_caught_up(run)  # creates the slot: both see the same changes
    source.execute("INSERT INTO typed SELECT id + 100, " + ", ".join(
        f'"{n}"' for n in COLUMNS) + ", (SELECT string_agg(md5(g::text || id::text), '') "
        "FROM generate_series(1, 300) g) FROM typed")
    source.execute("UPDATE typed SET i2 = 7 WHERE id > 100")  # big: unchanged TOAST
    source.execute("UPDATE typed SET id = id + 1000 WHERE id = 101")
    source.execute("DELETE FROM typed WHERE id = 102")
    monkeypatch.setenv("CDC_PURE_PYTHON", "1")
    stream_until_caught_up(runs["pure"])
    monkeypatch.setenv("CDC_PURE_PYTHON", "0")
    stream_until_caught_up(runs["native"])
    files = {kind: {f.name: f.read_bytes() for f in raw_files(Path(run.lake), "public.typed")}
             for kind, run in runs.items()}
    assert files["native"] == files["pure"]  # the same files, byte for byte
    pure = _raw_all(runs["pure"], "typed")
    assert pc.sum(pc.is_valid(pure["_unchanged"])).as_py() > 0  # the TOAST case was hit
    assert sorted(set(pure["_op"].to_pylist())) == ["c", "d", "u"]


@pytest.mark.parametrize("reader", READERS, ids=READER_IDS)
def test_a_timestamp_beyond_what_arrow_holds_fails_the_snapshot_naming_the_column(
    source: SourceDb, settings: Settings, reader: Any
) -> None:
    """Year 294270 is a PostgreSQL timestamp but no int64 of microseconds since 1970: the
    snapshot stops with a ConversionError naming the column (the binary reader never wraps
    it around into a wrong value)."""
    source.execute("CREATE TABLE late (id int PRIMARY KEY, ts timestamptz)")
    source.execute("INSERT INTO late VALUES (1, '2024-01-01'), (2, '294270-01-01 00:00:00+00')")
    with pytest.raises(ConversionError, match=r"public\.late\.ts"):
        ConsistentSnapshot(settings, LocalLake(settings.lake), reader=reader).run()


def test_infinity_and_the_last_real_date_stay_apart_in_staged_also_inside_arrays() -> None:
    """`infinity` vs `9999-12-31` and `-infinity` vs `0001-01-01` are distinct staged values."""
    dates = convert_column(["infinity", "9999-12-31", "-infinity", "0001-01-01", "0044-03-15 BC"],
                           column_type(pgtypes.DATE, -1), table="t", column="d")
    staged = delta_types.for_delta(dates).view(pa.int32()).to_pylist()
    assert len(set(staged)) == 5
    assert staged == dates.view(pa.int32()).to_pylist()  # exactly raw's values
    stamps = convert_column(["infinity", "9999-12-31 23:59:59.999999", "-infinity"],
                            column_type(pgtypes.TIMESTAMP, -1), table="t", column="ts")
    as_lists = pa.ListArray.from_arrays(pa.array([0, 3]), stamps)
    staged_list = delta_types.for_delta(as_lists)
    assert len(set(staged_list.flatten().view(pa.int64()).to_pylist())) == 3
    schema = pa.schema([("id", pa.int64()), ("d", pa.date32()), ("ts", stamps.type),
                        ("a", as_lists.type), ("odd name", pa.string()),
                        ("_commit_ts", pa.timestamp("us", tz="UTC"))])
    assert delta_types.stats_columns(schema) == "id,`odd name`,_commit_ts"
