"""PostgreSQL types → Arrow types, and whole-column conversion of text values.

Named ``pgtypes`` rather than ``types`` so it never shadows the standard
library module. Values arrive as the server's text output (the replication
session runs with ``DateStyle=ISO`` and ``TimeZone=UTC``); each column is
converted at flush time in one vectorised Arrow cast, never value by value.
Types without a mapping here land as their text form; the Postgres type is
always recorded in the parquet field metadata (``pg_type``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cdc.errors import ConversionError

BOOL, BYTEA, INT8, INT2, INT4, TEXT, OID = 16, 17, 20, 21, 23, 25, 26
JSON, FLOAT4, FLOAT8, BPCHAR, VARCHAR = 114, 700, 701, 1042, 1043
DATE, TIME, TIMESTAMP, TIMESTAMPTZ, NUMERIC, UUID, JSONB = 1082, 1083, 1114, 1184, 1700, 2950, 3802

_NAMES = {
    BOOL: "boolean", BYTEA: "bytea", INT8: "bigint", INT2: "smallint", INT4: "integer",
    TEXT: "text", OID: "oid", JSON: "json", FLOAT4: "real", FLOAT8: "double precision",
    BPCHAR: "character", VARCHAR: "character varying", DATE: "date",
    TIME: "time without time zone", TIMESTAMP: "timestamp without time zone",
    TIMESTAMPTZ: "timestamp with time zone", NUMERIC: "numeric", UUID: "uuid",
    JSONB: "jsonb",
}

_CASTS: dict[int, pa.DataType] = {
    INT2: pa.int16(), INT4: pa.int32(), INT8: pa.int64(), OID: pa.int64(),
    FLOAT4: pa.float32(), FLOAT8: pa.float64(), DATE: pa.date32(),
    TIMESTAMP: pa.timestamp("us"), TIMESTAMPTZ: pa.timestamp("us", tz="UTC"),
}

#: numeric wider than this has no decimal128; it lands as decimal256
_DECIMAL128_MAX_PRECISION = 38
_DECIMAL256_MAX_PRECISION = 76

Converter = Callable[[pa.Array], pa.Array]


@dataclass(frozen=True)
class ColumnType:
    """How one source column is stored in raw: Arrow type, converter and Postgres type name."""

    pg_type: str
    arrow_type: pa.DataType
    convert: Converter


def _cast_to(arrow_type: pa.DataType) -> Converter:
    def convert(values: pa.Array) -> pa.Array:
        return pc.cast(values, arrow_type)

    return convert


def _to_bool(values: pa.Array) -> pa.Array:
    return pc.equal(values, "t")


def _to_bytea(values: pa.Array) -> pa.Array:
    # bytea's text output is hex: \x0a1b...
    return pa.array(
        [None if v is None else bytes.fromhex(v[2:]) for v in values.to_pylist()], pa.binary()
    )


def _as_text(values: pa.Array) -> pa.Array:
    return values


def numeric_precision_scale(type_modifier: int) -> tuple[int, int] | None:
    """``numeric(p, s)``'s typmod → (p, s); None for unconstrained numeric."""
    if type_modifier < 4:
        return None
    packed = type_modifier - 4
    return (packed >> 16) & 0xFFFF, packed & 0xFFFF


def column_type(type_oid: int, type_modifier: int, type_name: str | None = None) -> ColumnType:
    """The raw-layer representation of a Postgres column type."""
    name = _NAMES.get(type_oid) or type_name or f"oid:{type_oid}"
    if type_oid in _CASTS:
        arrow_type = _CASTS[type_oid]
        return ColumnType(name, arrow_type, _cast_to(arrow_type))
    if type_oid == BOOL:
        return ColumnType(name, pa.bool_(), _to_bool)
    if type_oid == BYTEA:
        return ColumnType(name, pa.binary(), _to_bytea)
    if type_oid == NUMERIC:
        ps = numeric_precision_scale(type_modifier)
        if ps is not None and ps[0] <= _DECIMAL256_MAX_PRECISION:
            precision, scale = ps
            name = f"numeric({precision},{scale})"
            arrow_type = (pa.decimal128(precision, scale)
                          if precision <= _DECIMAL128_MAX_PRECISION
                          else pa.decimal256(precision, scale))
            return ColumnType(name, arrow_type, _cast_to(arrow_type))
    return ColumnType(name, pa.string(), _as_text)


def convert_column(
    values: Sequence[str | None] | pa.Array | pa.ChunkedArray, ctype: ColumnType, *, table: str,
    column: str,
) -> pa.Array | pa.ChunkedArray:
    """Convert one column's text values; a value that does not fit raises ConversionError."""
    text = values if isinstance(values, pa.Array | pa.ChunkedArray) else pa.array(values,
                                                                                  pa.string())
    try:
        return ctype.convert(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError) as exc:
        bad = _first_bad_value(text, ctype)
        raise ConversionError(
            f"cannot convert value {bad!r} of {table}.{column} ({ctype.pg_type}) "
            f"to {ctype.arrow_type}: {exc}",
            fix="nothing past this change was acknowledged; report the value "
            "(full type fidelity for such values is planned)",
        ) from exc


def _first_bad_value(text: pa.Array, ctype: ColumnType) -> str | None:
    for value in text.to_pylist():
        try:
            ctype.convert(pa.array([value], pa.string()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError):
            return str(value)[:80]
    return None
