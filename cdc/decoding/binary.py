"""pgoutput binary column values (``binary 'true'``) → the text the server would have sent.

With ``binary 'true'`` PostgreSQL 14/15's pgoutput sends *every* non-NULL column whose type
has a send function in that binary format (``logicalrep_write_tuple`` in
``src/backend/replication/logical/proto.c``: ``if (binary && OidIsValid(typclass->typsend))``)
— there is no per-column text fallback. cdc decodes exactly the types in :data:`CODECS`;
a session uses binary only when every published column has one of them
(``cdc.source.replication.binary_refusals``).

Each binary value is turned into exactly the text the type's output function sends under
the stream session's settings (``DateStyle=ISO``, ``TimeZone=UTC``, ``bytea_output=hex``),
so the raw layer's conversions (``pgtypes``) see the same input as in text mode and store
the same values: numeric is written digit for digit as ``numeric_out`` does (its display
scale, so unconstrained numeric keeps its exact text; ``NaN``, ``Infinity``, ``-Infinity``),
dates and timestamps as ``EncodeDateOnly`` / ``EncodeDateTime`` do (BC years, five-digit
years, ``infinity``, ``-infinity``). Floats are the one exception: their text is
``%.17g`` (``%.9g`` for real), not the server's shortest form, which parses to the same
float; the raw column holds the float, not the text.

This module is the reference; the compiled decoder (``_binary.pxd``) implements the same
rules and the differential tests hold both to the same text and the same refusals. A value
that its type's receive function would reject (wrong length, a digit past 9999, a date out
of range, invalid UTF-8 ...) is a DecodeError, never a guess.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from enum import IntEnum

from cdc.decoding import pgtypes as t
from cdc.errors import DecodeError
from cdc.events import Relation, Row, Value


class Codec(IntEnum):
    """How a binary value is read (``_binary.pxd`` has the same numbers)."""

    NONE = 0  # no binary decoder: binary transfer is not used for a table with such a column
    BOOL = 1
    INT2 = 2
    INT4 = 3
    INT8 = 4
    OID = 5
    FLOAT4 = 6
    FLOAT8 = 7
    NUMERIC = 8
    TEXT = 9  # text, varchar, bpchar, name, json: the text itself
    BYTEA = 10
    UUID = 11
    JSONB = 12  # a version byte (1), then the text
    DATE = 13
    TIME = 14
    TIMESTAMP = 15
    TIMESTAMPTZ = 16


#: type OID → codec: the types cdc decodes in binary (domains and arrays are not among them)
CODECS: dict[int, Codec] = {
    t.BOOL: Codec.BOOL, t.INT2: Codec.INT2, t.INT4: Codec.INT4, t.INT8: Codec.INT8,
    t.OID: Codec.OID, t.FLOAT4: Codec.FLOAT4, t.FLOAT8: Codec.FLOAT8,
    t.NUMERIC: Codec.NUMERIC, t.TEXT: Codec.TEXT, t.VARCHAR: Codec.TEXT,
    t.BPCHAR: Codec.TEXT, t.NAME: Codec.TEXT, t.JSON: Codec.TEXT, t.BYTEA: Codec.BYTEA,
    t.UUID: Codec.UUID, t.JSONB: Codec.JSONB, t.DATE: Codec.DATE, t.TIME: Codec.TIME,
    t.TIMESTAMP: Codec.TIMESTAMP, t.TIMESTAMPTZ: Codec.TIMESTAMPTZ,
}

#: the type OIDs of :data:`CODECS` (for the catalog query that decides a session's format)
SUPPORTED_TYPES = tuple(sorted(CODECS))

NUMERIC_POS, NUMERIC_NEG, NUMERIC_NAN = 0x0000, 0x4000, 0xC000
NUMERIC_PINF, NUMERIC_NINF = 0xD000, 0xF000
NUMERIC_DSCALE_MAX = 0x3FFF
#: microseconds in a day; days between 1970-01-01 and 2000-01-01
USECS_PER_DAY = 86_400_000_000
PG_EPOCH_DAYS = 10_957
#: the receive functions' ranges (datatype/timestamp.h): days / µs since 2000-01-01
DATE_MIN, DATE_END = -2_451_545, 2_145_031_949
TIMESTAMP_MIN, TIMESTAMP_END = -211_813_488_000_000_000, 9_223_371_331_200_000_000
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1

_FIXED: dict[int, int] = {Codec.BOOL: 1, Codec.INT2: 2, Codec.INT4: 4, Codec.INT8: 8, Codec.OID: 4,
          Codec.FLOAT4: 4, Codec.FLOAT8: 8, Codec.UUID: 16, Codec.DATE: 4, Codec.TIME: 8,
          Codec.TIMESTAMP: 8, Codec.TIMESTAMPTZ: 8}
_numeric_head = struct.Struct("!HhHH")


def _float_text(value: float, digits: int) -> str:
    if value != value:  # noqa: PLR0124  NaN
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return f"%.{digits}g" % value


def _numeric_text(data: bytes) -> str | None:
    """``numeric_out``'s text of a ``numeric_send`` value (``get_str_from_var``)."""
    if len(data) < _numeric_head.size:
        return None
    ndigits, weight, sign, dscale = _numeric_head.unpack_from(data)
    if len(data) != 8 + 2 * ndigits or dscale > NUMERIC_DSCALE_MAX:
        return None
    special = {NUMERIC_NAN: "NaN", NUMERIC_PINF: "Infinity", NUMERIC_NINF: "-Infinity"}
    if sign in special:
        return special[sign]
    digits = struct.unpack_from(f"!{ndigits}H", data, 8)
    if sign not in (NUMERIC_POS, NUMERIC_NEG) or any(d > 9999 for d in digits):
        return None

    def digit(i: int) -> int:
        return digits[i] if 0 <= i < ndigits else 0

    text = "-" if sign == NUMERIC_NEG else ""
    if weight < 0:
        text += "0"
    else:  # the first group without its leading zeros
        text += str(digit(0)) + "".join(f"{digit(i):04d}" for i in range(1, weight + 1))
    if dscale > 0:
        first = weight + 1
        groups = "".join(f"{digit(i):04d}" for i in range(first, first + (dscale + 3) // 4))
        text += "." + groups[:dscale]
    return text


def _civil(days: int) -> tuple[int, int, int]:
    """Days since 1970-01-01 → (astronomical year, month, day), proleptic Gregorian
    (H. Hinnant's ``civil_from_days``; PostgreSQL's ``j2date`` gives the same dates)."""
    z = days + 719_468
    era = z // 146_097
    doe = z - era * 146_097
    yoe = (doe - doe // 1460 + doe // 36_524 - doe // 146_096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + 3 if mp < 10 else mp - 9
    return yoe + era * 400 + (month <= 2), month, day


def _date_text(pg_days: int) -> str:
    year, month, day = _civil(pg_days + PG_EPOCH_DAYS)
    return f"{year if year > 0 else 1 - year:04d}-{month:02d}-{day:02d}"


def _time_text(us: int) -> str:
    seconds, fraction = divmod(us, 1_000_000)
    text = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
    return text + (f".{fraction:06d}".rstrip("0") if fraction else "")


def _timestamp_text(us: int, *, tz: bool) -> str | None:
    if us in (INT64_MIN, INT64_MAX):
        return "-infinity" if us < 0 else "infinity"
    if not TIMESTAMP_MIN <= us < TIMESTAMP_END:
        return None
    days, time = divmod(us, USECS_PER_DAY)
    year = _civil(days + PG_EPOCH_DAYS)[0]
    text = f"{_date_text(days)} {_time_text(time)}{'+00' if tz else ''}"
    return text + (" BC" if year <= 0 else "")


def _utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonb(data: bytes) -> str | None:
    return _utf8(data[1:]) if data[:1] == b"\x01" else None


def _uuid(data: bytes) -> str:
    h = data.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _date(data: bytes) -> str | None:
    (days,) = struct.unpack("!i", data)
    if days in (INT32_MIN, INT32_MAX):
        return "-infinity" if days < 0 else "infinity"
    if not DATE_MIN <= days < DATE_END:
        return None
    return _date_text(days) + (" BC" if _civil(days + PG_EPOCH_DAYS)[0] <= 0 else "")


def _time(data: bytes) -> str | None:
    (us,) = struct.unpack("!q", data)
    return _time_text(us) if 0 <= us <= USECS_PER_DAY else None


def _number(fmt: str) -> Callable[[bytes], str]:
    def read(data: bytes) -> str:
        return str(struct.unpack(fmt, data)[0])

    return read


def _float(fmt: str, digits: int) -> Callable[[bytes], str]:
    def read(data: bytes) -> str:
        return _float_text(struct.unpack(fmt, data)[0], digits)

    return read


def _timestamp(*, tz: bool) -> Callable[[bytes], str | None]:
    def read(data: bytes) -> str | None:
        return _timestamp_text(struct.unpack("!q", data)[0], tz=tz)

    return read


_READERS: dict[int, Callable[[bytes], str | None]] = {
    Codec.BOOL: lambda data: "t" if data[0] else "f",
    Codec.INT2: _number("!h"), Codec.INT4: _number("!i"), Codec.INT8: _number("!q"),
    Codec.OID: _number("!I"), Codec.FLOAT4: _float("!f", 9), Codec.FLOAT8: _float("!d", 17),
    Codec.NUMERIC: _numeric_text, Codec.TEXT: _utf8, Codec.JSONB: _jsonb,
    Codec.BYTEA: lambda data: "\\x" + data.hex(), Codec.UUID: _uuid, Codec.DATE: _date,
    Codec.TIME: _time, Codec.TIMESTAMP: _timestamp(tz=False),
    Codec.TIMESTAMPTZ: _timestamp(tz=True),
}


def text_of(codec: int, data: bytes) -> str | None:
    """The text form of one binary value, or None when the value is malformed."""
    reader = _READERS.get(codec)
    if reader is None or len(data) != _FIXED.get(codec, len(data)):
        return None
    return reader(data)


def malformed(relation: Relation, index: int, data: bytes) -> DecodeError:
    column = relation.columns[index]
    codec = CODECS.get(column.type_oid, Codec.NONE)
    what = ("cdc has no binary decoder for its type" if codec == Codec.NONE
            else f"{len(data)} bytes that are no valid {codec.name.lower()} value")
    return DecodeError(
        f"binary value of {relation.qualified_name}.{column.name} (type oid "
        f"{column.type_oid}): {what}",
        fix="stream with --binary off (CDC_BINARY=off): the values then arrive as text")


def text_row(relation: Relation, row: Row) -> Row:
    """``row`` with its binary values (bytes) as their text; DecodeError for a bad one."""
    if not any(type(v) is bytes for v in row):
        return row
    out: list[Value] = list(row)
    for i, value in enumerate(row):
        if type(value) is bytes:
            text = text_of(CODECS.get(relation.columns[i].type_oid, Codec.NONE), value)
            if text is None:
                raise malformed(relation, i, value)
            out[i] = text
    return tuple(out)
