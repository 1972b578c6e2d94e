"""PostgreSQL types → Arrow types, and whole-column conversion of text values.

Named ``pgtypes`` rather than ``types`` so it never shadows the standard
library module. Values arrive as the server's text output (the replication and
snapshot sessions run with ``DateStyle=ISO``, ``TimeZone=UTC``,
``IntervalStyle=postgres``, ``extra_float_digits=3``, ``bytea_output=hex``);
each column is converted at flush time with whole-column Arrow compute
functions, never value by value on the common path. Types without an exact
Arrow mapping land as their text form; the declared Postgres type is always
recorded in the parquet field metadata (``pg_type``).

The mapping (README "The lake" documents it for users):

* ``smallint``/``integer``/``bigint``/``oid`` → int16/int32/int64/int64
* ``numeric(p, s)`` with 0 <= s <= p → decimal128(p, s), decimal256 past 38 digits
  (staged: text past 38 digits); a ``NaN`` in such a column cannot be a decimal and
  fails the batch with ConversionError (never rounded, never NULLed)
* unconstrained ``numeric`` (and ``numeric(p, s)`` with s < 0 or s > p) → exact text,
  ``NaN``/``Infinity``/``-Infinity`` kept: no Arrow decimal holds every value of it
* ``real``/``double precision`` → float32/float64 (NaN and ±Infinity kept)
* ``date`` → date32; ``timestamp`` → timestamp[us]; ``timestamptz`` → timestamp[us, UTC].
  ``infinity``/``-infinity`` → the DuckDB sentinels (int32/int64 max and -max), which
  DuckDB reads back as ±infinity; BC and five-digit years are converted exactly.
  Staged Delta tables hold the same values, sentinels included (see ``for_delta``).
* ``time`` → time64[us] (staged: its text ``HH:MM:SS.ffffff``, Delta has no time type)
* ``boolean`` → bool; ``bytea`` → binary
* arrays of a mapped type (one dimension, lower bound 1) → list<element type>
* domains → their base type; enums, ``money``, ``timetz``, ``interval``, ``uuid``,
  ``json``/``jsonb``, ``xml``, ``inet``/``cidr``/``macaddr``, composites, ranges and
  anything else → their text form (string)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from cdc.decoding.pgtext import (
    DATE_INFINITY,
    TIMESTAMP_INFINITY,
    Converter,
    as_text,
    bytea_chunk,
    cast_to,
    parse_array,
    per_chunk,
    temporal,
    time_chunk,
    to_bool,
)
from cdc.errors import ConversionError

__all__ = ["DATE_INFINITY", "TIMESTAMP_INFINITY", "parse_array"]  # re-exported

BOOL, BYTEA, CHAR, NAME, INT8, INT2, INT4, TEXT, OID = 16, 17, 18, 19, 20, 21, 23, 25, 26
JSON, XML, FLOAT4, FLOAT8, MONEY, MACADDR, INET, CIDR = 114, 142, 700, 701, 790, 829, 869, 650
MACADDR8, BPCHAR, VARCHAR = 774, 1042, 1043
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, INTERVAL, TIMETZ = 1082, 1083, 1114, 1184, 1186, 1266
NUMERIC, UUID, JSONB = 1700, 2950, 3802

_NAMES = {
    BOOL: "boolean", BYTEA: "bytea", CHAR: '"char"', NAME: "name", INT8: "bigint",
    INT2: "smallint", INT4: "integer", TEXT: "text", OID: "oid", JSON: "json", XML: "xml",
    FLOAT4: "real", FLOAT8: "double precision", MONEY: "money", MACADDR: "macaddr",
    MACADDR8: "macaddr8", INET: "inet", CIDR: "cidr", BPCHAR: "character",
    VARCHAR: "character varying", DATE: "date", TIME: "time without time zone",
    TIMESTAMP: "timestamp without time zone", TIMESTAMPTZ: "timestamp with time zone",
    INTERVAL: "interval", TIMETZ: "time with time zone", NUMERIC: "numeric", UUID: "uuid",
    JSONB: "jsonb",
}

#: built-in array types → their element type (others are looked up in the catalog)
ARRAYS = {
    1000: BOOL, 1001: BYTEA, 1002: CHAR, 1003: NAME, 1005: INT2, 1007: INT4, 1009: TEXT,
    1014: BPCHAR, 1015: VARCHAR, 1016: INT8, 1021: FLOAT4, 1022: FLOAT8, 1028: OID,
    1115: TIMESTAMP, 1182: DATE, 1183: TIME, 1185: TIMESTAMPTZ, 1187: INTERVAL, 1231: NUMERIC,
    1270: TIMETZ, 2951: UUID, 199: JSON, 3807: JSONB, 143: XML, 1041: INET, 651: CIDR,
    1040: MACADDR, 775: MACADDR8, 791: MONEY,
}

_CASTS: dict[int, pa.DataType] = {
    INT2: pa.int16(), INT4: pa.int32(), INT8: pa.int64(), OID: pa.int64(),
    FLOAT4: pa.float32(), FLOAT8: pa.float64(),
}

#: numeric wider than this has no decimal128; it lands as decimal256
_DECIMAL128_MAX_PRECISION = 38
_DECIMAL256_MAX_PRECISION = 76



@dataclass(frozen=True)
class ColumnType:
    """How one source column is stored in raw: Arrow type, converter and Postgres type name."""

    pg_type: str
    arrow_type: pa.DataType
    convert: Converter


@dataclass(frozen=True)
class PgType:
    """Catalog facts about a type that is not built in (see :func:`load_type_facts`)."""

    oid: int
    name: str  # schema-qualified unless in pg_catalog
    category: str  # pg_type.typcategory: A array, E enum, C composite, ...
    base_oid: int = 0  # a domain's base type
    base_typmod: int = -1
    elem_oid: int = 0  # an array's element type


TypeFacts = Mapping[int, PgType]

TYPE_FACTS_QUERY = (
    "SELECT t.oid::int, CASE WHEN n.nspname = 'pg_catalog' THEN format_type(t.oid, NULL) "
    "ELSE quote_ident(n.nspname) || '.' || quote_ident(t.typname) END, t.typcategory::text, "
    "t.typbasetype::int, t.typtypmod, t.typelem::int "
    "FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = ANY(%s)"
)


def is_builtin(type_oid: int) -> bool:
    """True for types this module maps without a catalog lookup."""
    return type_oid in _NAMES or type_oid in ARRAYS


def load_type_facts(fetch: Callable[[list[int]], Iterable[Sequence[Any]]],
                    oids: Iterable[int], known: TypeFacts | None = None) -> dict[int, PgType]:
    """Facts of the non-built-in ``oids`` and of the base/element types they refer to.

    ``fetch(oids)`` runs :data:`TYPE_FACTS_QUERY` with the list and returns its rows.
    """
    have: dict[int, PgType] = dict(known or {})
    found: dict[int, PgType] = {}
    todo = {o for o in oids if not is_builtin(o) and o not in have}
    for _ in range(8):  # domains over arrays of domains ...: a few rounds at most
        if not todo:
            break
        rows = fetch(sorted(todo))
        todo = set()
        for r in rows:
            facts = PgType(int(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), int(r[5]))
            found[facts.oid] = have[facts.oid] = facts
            for ref in (facts.base_oid, facts.elem_oid):
                if ref and not is_builtin(ref) and ref not in have:
                    todo.add(ref)
    return found


def _array(element: ColumnType) -> Converter:
    arrow_type = pa.list_(element.arrow_type)

    def convert(values: pa.Array) -> pa.Array:
        offsets = [0]
        flat: list[str | None] = []
        nulls = []
        for text in values.to_pylist():
            if text is None:
                nulls.append(True)
            else:
                nulls.append(False)
                flat.extend(parse_array(text))
            offsets.append(len(flat))
        elements = element.convert(pa.array(flat, pa.string()))
        if isinstance(elements, pa.ChunkedArray):
            elements = elements.combine_chunks()
        return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), elements, type=arrow_type,
                                        mask=pa.array(nulls, pa.bool_()))

    return per_chunk(convert, arrow_type)


# -- the mapping -------------------------------------------------------------------------------


def numeric_precision_scale(type_modifier: int) -> tuple[int, int] | None:
    """``numeric(p, s)``'s typmod → (p, s); None for unconstrained numeric."""
    if type_modifier < 4:
        return None
    packed = type_modifier - 4
    scale = ((packed & 0x7FF) ^ 1024) - 1024  # 11-bit signed since PostgreSQL 15
    return (packed >> 16) & 0xFFFF, scale


_DATE = ColumnType("date", pa.date32(),
                   temporal(pa.date32(), timestamp=False, placeholder="1970-01-01"))
_TIMESTAMP = temporal(pa.timestamp("us"), timestamp=True, placeholder="1970-01-01 00:00:00")
_TIMESTAMPTZ = temporal(pa.timestamp("us", tz="UTC"), timestamp=True,
                         placeholder="1970-01-01 00:00:00+00")


def column_type(type_oid: int, type_modifier: int, type_name: str | None = None,  # noqa: PLR0911  dispatch on the type OID: one return per type family
                facts: TypeFacts | None = None) -> ColumnType:
    """The raw-layer representation of a Postgres column type.

    ``facts`` resolves types that are not built in: domains map as their base type,
    arrays as lists of their element type; anything unknown lands as text.
    """
    known = (facts or {}).get(type_oid)
    name = _NAMES.get(type_oid) or (known.name if known else None) or type_name \
        or f"oid:{type_oid}"
    if type_oid in _CASTS:
        arrow_type = _CASTS[type_oid]
        return ColumnType(name, arrow_type, cast_to(arrow_type))
    if type_oid == BOOL:
        return ColumnType(name, pa.bool_(), to_bool)
    if type_oid == BYTEA:
        return ColumnType(name, pa.binary(), per_chunk(bytea_chunk, pa.binary()))
    if type_oid == DATE:
        return _DATE
    if type_oid == TIMESTAMP:
        return ColumnType(name, pa.timestamp("us"), _TIMESTAMP)
    if type_oid == TIMESTAMPTZ:
        return ColumnType(name, pa.timestamp("us", tz="UTC"), _TIMESTAMPTZ)
    if type_oid == TIME:
        return ColumnType(name, pa.time64("us"), per_chunk(time_chunk, pa.time64("us")))
    if type_oid == NUMERIC:
        ps = numeric_precision_scale(type_modifier)
        if ps is not None and ps[0] <= _DECIMAL256_MAX_PRECISION and 0 <= ps[1] <= ps[0]:
            precision, scale = ps
            name = f"numeric({precision},{scale})"
            arrow_type = (pa.decimal128(precision, scale)
                          if precision <= _DECIMAL128_MAX_PRECISION
                          else pa.decimal256(precision, scale))
            return ColumnType(name, arrow_type, cast_to(arrow_type))
    element_oid = ARRAYS.get(type_oid) or (known.elem_oid if known and known.category == "A"
                                           else 0)
    element_facts = (facts or {}).get(element_oid)
    if element_facts is not None and element_facts.category == "G":
        element_oid = 0  # geometric: box[] separates elements with ';', kept as text
    if element_oid:
        element = column_type(element_oid, type_modifier, None, facts)
        name = f"{element.pg_type}[]"
        return ColumnType(name, pa.list_(element.arrow_type), _array(element))
    if known is not None and known.base_oid:  # a domain: stored as its base type
        base = column_type(known.base_oid,
                           type_modifier if type_modifier != -1 else known.base_typmod, None,
                           facts)
        return ColumnType(name, base.arrow_type, base.convert)
    return ColumnType(name, pa.string(), as_text)


def convert_column(
    values: Sequence[str | None] | pa.Array | pa.ChunkedArray, ctype: ColumnType, *, table: str,
    column: str,
) -> pa.Array | pa.ChunkedArray:
    """Convert one column's text values; a value that does not fit raises ConversionError.

    A column that already has the target type (the snapshot's binary reader fetches a few
    built-in types typed) is taken as it is.
    """
    if isinstance(values, pa.Array | pa.ChunkedArray) and values.type == ctype.arrow_type:
        return values
    text = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values,
                                                                                  pa.string())
    try:
        return ctype.convert(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        bad = _first_bad_value(text, ctype)
        hint = ""
        if bad is not None and "NaN" in bad and ctype.pg_type.startswith("numeric("):
            hint = (f"a NaN cannot be stored in a decimal column: ALTER {table}.{column} to "
                    "unconstrained numeric (stored exactly as text) or remove the NaN; ")
        raise ConversionError(
            f"cannot convert value {bad!r} of {table}.{column} ({ctype.pg_type}) "
            f"to {ctype.arrow_type}: {exc}",
            fix=f"{hint}nothing past this change was acknowledged. The WAL keeps the change "
            "with its old type, so for cdc stream: restart it with --unconvertible quarantine "
            "(the rows go to raw/_rejected, compaction of the table waits), fix the column, "
            f"then run cdc resync --tables {table}; for cdc snapshot: fix it and run again",
        ) from exc


def _first_bad_value(text: pa.Array, ctype: ColumnType) -> str | None:
    for value in text.to_pylist():
        try:
            ctype.convert(pa.array([value], pa.string()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            return str(value)[:80]
    return None
