"""``COPY ... TO STDOUT (FORMAT binary)`` data → the raw layer's Arrow columns.

The snapshot reads each chunk as a binary COPY: the server skips the text output
functions (numeric's and timestamptz's were a third of its time), and the values are read
with the same per-type binary rules as pgoutput's ``binary 'true'`` (``binary.py``, and
``_binary.pxd`` in the compiled core): one piece of code serves both callers. A column
whose type has no codec there is selected as its text server-side (``readers``) and
arrives as text in the COPY.

Each column lands in one :class:`Layout`: integers, floats, booleans, bytea, dates, times
and timestamps directly as the raw layer's Arrow type (the values the text path's casts
would give: ±infinity as ``pgtypes.DATE_INFINITY`` / ``TIMESTAMP_INFINITY``, NaN as the one
canonical NaN), every other column as the text its output function writes
(``binary.text_of``), which the usual converters then type. So the raw files equal the
stream's.

The data is what PostgreSQL sends (copyto.c): the 11-byte signature, flags and header
extension in front of the first row, then one CopyData message per row (an Int16 field
count, then per field an Int32 length, -1 for NULL, and the bytes), and an Int16 -1 end
marker. A row never spans two messages. Anything else (a short row, a field count that is
not the table's, a value its type's receive function would reject, data after the end
marker, no end marker) is a DecodeError, never a guess.

:class:`PureCopyParser` is the reference and the fallback (``CDC_PURE_PYTHON=1``); the
compiled ``_copy.CopyParser`` does the same with the same messages (the differential tests
hold both to it).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from enum import IntEnum

import pyarrow as pa

from cdc.decoding import pgtypes as t
from cdc.decoding.binary import CODECS, Codec, text_of
from cdc.errors import ConversionError, DecodeError

SIGNATURE = b"PGCOPY\n\xff\r\n\x00"
#: flags bit 16: every row carries its OID (never for COPY (SELECT ...))
FLAG_OIDS = 1 << 16
#: the raw layer's ±infinity for dates and timestamps, and the shift of the epochs
PG_EPOCH_DAYS = 10_957
PG_EPOCH_US = PG_EPOCH_DAYS * 86_400_000_000
#: Arrow string offsets are int32
OFFSET_LIMIT = 2**31 - 1


class Layout(IntEnum):
    """How a column is stored (``_copy.pyx`` has the same numbers)."""

    TEXT = 0  # the value's text (``binary.text_of``), a string column
    INT = 1  # int2, int4, int8: the integer
    FLOAT = 2  # float4, float8: the float (NaN canonical)
    BOOL = 3
    BYTES = 4  # bytea: the bytes
    DATE = 5  # days since 1970-01-01
    TIMESTAMP = 6  # µs since 1970-01-01 (with or without time zone)
    TIME = 7  # µs since midnight


_LAYOUTS = {
    Codec.INT2: (Layout.INT, pa.int16()), Codec.INT4: (Layout.INT, pa.int32()),
    Codec.INT8: (Layout.INT, pa.int64()), Codec.FLOAT4: (Layout.FLOAT, pa.float32()),
    Codec.FLOAT8: (Layout.FLOAT, pa.float64()), Codec.BOOL: (Layout.BOOL, pa.bool_()),
    Codec.BYTEA: (Layout.BYTES, pa.binary()), Codec.DATE: (Layout.DATE, pa.date32()),
    Codec.TIME: (Layout.TIME, pa.time64("us")),
    Codec.TIMESTAMP: (Layout.TIMESTAMP, pa.timestamp("us")),
    Codec.TIMESTAMPTZ: (Layout.TIMESTAMP, pa.timestamp("us", tz="UTC")),
}


def column_plan(type_oid: int) -> tuple[Codec, Layout, pa.DataType]:
    """How a column of this type is read: its codec (TEXT when the server sends its text,
    i.e. the type has no binary codec), layout and Arrow type."""
    codec = CODECS.get(type_oid)
    if codec is None:
        return Codec.TEXT, Layout.TEXT, pa.string()
    layout, arrow_type = _LAYOUTS.get(codec, (Layout.TEXT, pa.string()))
    return codec, layout, arrow_type


def malformed(table: str, what: str) -> DecodeError:
    return DecodeError(f"malformed binary COPY data of {table}: {what}",
                       fix="report this as a bug with the server version")


def invalid_value(table: str, column: str, codec: int) -> DecodeError:
    return malformed(table, f"an invalid {Codec(codec).name.lower()} value in column "
                     f"{column!r}")


def out_of_range(table: str, column: str) -> ConversionError:
    return ConversionError(f"a value of {table}.{column} is outside the range Arrow can hold "
                           "(beyond year 294246)",
                           fix="change or remove the value at the source, then run cdc "
                           "snapshot again")


def too_much_text(table: str, column: str) -> DecodeError:
    return DecodeError(f"more than 2 GiB of data in column {table}.{column} of one chunk",
                       fix="lower --chunk-rows")


_TOP32, _TOP64 = 2**31 - 1, 2**63 - 1


def _typed(layout: Layout, codec: Codec, data: bytes) -> object:  # noqa: PLR0911  one return per layout
    """A valid binary value as the raw layer's Python value (None: out of range)."""
    if layout is Layout.INT:
        return int.from_bytes(data, "big", signed=True)
    if layout is Layout.FLOAT:
        value = struct.unpack("!f" if codec is Codec.FLOAT4 else "!d", data)[0]
        return math.nan if value != value else value  # noqa: PLR0124  NaN
    if layout is Layout.BOOL:
        return data[0] != 0
    if layout is Layout.BYTES:
        return data
    if layout is Layout.DATE:
        days = int.from_bytes(data, "big", signed=True)
        if days in (-_TOP32 - 1, _TOP32):
            return t.DATE_INFINITY if days > 0 else -t.DATE_INFINITY
        return days + PG_EPOCH_DAYS
    if layout is Layout.TIME:
        return int.from_bytes(data, "big", signed=True)
    us = int.from_bytes(data, "big", signed=True)
    if us in (-_TOP64 - 1, _TOP64):
        return t.TIMESTAMP_INFINITY if us > 0 else -t.TIMESTAMP_INFINITY
    us += PG_EPOCH_US
    return us if -_TOP64 < us < _TOP64 else None


class PureCopyParser:
    """Binary COPY messages → Arrow columns, in Python (the reference of ``_copy``)."""

    def __init__(self, table: str, names: Sequence[str], codecs: Sequence[int],
                 layouts: Sequence[int], types: Sequence[pa.DataType]) -> None:
        self.table = table
        self.names = tuple(names)
        self.codecs = [Codec(c) for c in codecs]
        self.layouts = [Layout(k) for k in layouts]
        self.types = list(types)
        self.values: list[list[object]] = [[] for _ in self.names]
        self.sizes = [0] * len(self.names)
        self.header_done = False
        self.trailer_seen = False

    def feed(self, message: bytes | bytearray | memoryview) -> None:
        """One CopyData message: the header (first message), rows, the end marker."""
        data = bytes(message)
        pos = 0
        if not self.header_done:
            if data[:11] != SIGNATURE:
                raise malformed(self.table, "no binary COPY signature")
            if len(data) < 19:
                raise malformed(self.table, "a header cut short")
            flags, extension = struct.unpack_from("!Ii", data, 11)
            if extension < 0 or len(data) < 19 + extension:
                raise malformed(self.table, "a header cut short")
            if flags & FLAG_OIDS:
                raise malformed(self.table, "rows with OIDs")
            pos = 19 + extension
            self.header_done = True
        while pos < len(data):
            if self.trailer_seen:
                raise malformed(self.table, "data after the end marker")
            pos = self._row(data, pos)

    def _row(self, data: bytes, pos: int) -> int:
        if len(data) - pos < 2:
            raise malformed(self.table, "a row cut short")
        (count,) = struct.unpack_from("!h", data, pos)
        pos += 2
        if count == -1:
            self.trailer_seen = True
            return pos
        if count != len(self.names):
            raise malformed(self.table, f"a row of {count} fields for {len(self.names)} "
                            "columns")
        fields, pos = self._fields(data, pos)
        self._append(fields)
        return pos

    def _fields(self, data: bytes, pos: int) -> tuple[list[bytes | None], int]:
        fields: list[bytes | None] = []
        for _ in self.names:
            if len(data) - pos < 4:
                raise malformed(self.table, "a row cut short")
            (length,) = struct.unpack_from("!i", data, pos)
            pos += 4
            if length == -1:
                fields.append(None)
                continue
            if length < 0 or len(data) - pos < length:
                raise malformed(self.table, "a row cut short")
            fields.append(data[pos:pos + length])
            pos += length
        return fields, pos

    def _append(self, fields: list[bytes | None]) -> None:
        row: list[object] = []
        for i, value in enumerate(fields):
            if value is None:
                row.append(None)
                continue
            text = text_of(self.codecs[i], value)  # None: the receive function rejects it
            if text is None:
                raise invalid_value(self.table, self.names[i], self.codecs[i])
            if self.layouts[i] is Layout.TEXT:
                row.append(text)
                continue
            typed = _typed(self.layouts[i], self.codecs[i], value)
            if typed is None:
                raise out_of_range(self.table, self.names[i])
            row.append(typed)
        for i, stored in enumerate(row):
            if isinstance(stored, str | bytes):
                size = len(stored.encode()) if isinstance(stored, str) else len(stored)
                self.sizes[i] += size
                if self.sizes[i] > OFFSET_LIMIT:
                    raise too_much_text(self.table, self.names[i])
            self.values[i].append(stored)

    def finish(self) -> list[pa.Array]:
        """The columns read so far; DecodeError when the end marker never came."""
        if not self.trailer_seen:
            raise malformed(self.table, "the end marker is missing")
        columns = []
        for values, layout, kind in zip(self.values, self.layouts, self.types, strict=True):
            if layout in (Layout.DATE, Layout.TIMESTAMP, Layout.TIME):
                storage = pa.int32() if layout is Layout.DATE else pa.int64()
                columns.append(pa.array(values, storage).view(kind))
            else:
                columns.append(pa.array(values, kind))
        return columns
