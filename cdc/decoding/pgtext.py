"""Whole-column Arrow converters of PostgreSQL's text output (``pgtypes`` picks one per
column type): casts, booleans, hex ``bytea``, dates and timestamps (±infinity, BC and
five-digit years exactly), times, and one-dimensional array literals."""

from __future__ import annotations

import binascii
import re
from collections.abc import Callable
from datetime import date

import pyarrow as pa
import pyarrow.compute as pc

#: ±infinity of date / timestamp columns in raw (DuckDB's own encoding of ±infinity)
DATE_INFINITY = 2**31 - 1
TIMESTAMP_INFINITY = 2**63 - 1

Converter = Callable[[pa.Array], pa.Array]


def cast_to(arrow_type: pa.DataType) -> Converter:
    def convert(values: pa.Array) -> pa.Array:
        return pc.cast(values, arrow_type)

    return convert


def per_chunk(convert: Converter, arrow_type: pa.DataType) -> Converter:
    def run(values: pa.Array) -> pa.Array:
        if isinstance(values, pa.ChunkedArray):
            return pa.chunked_array([convert(c) for c in values.chunks], arrow_type)
        return convert(values)

    return run


def to_bool(values: pa.Array) -> pa.Array:
    return pc.equal(values, "t")


def bytea_chunk(values: pa.Array) -> pa.Array:
    # bytea's text output is hex: \x0a1b...; decode the whole data buffer in one call
    n = len(values)
    if n in (0, values.null_count):
        return pa.nulls(n, pa.binary())
    valid = values.drop_null()
    if not pc.all(pc.starts_with(valid, "\\x")).as_py() or \
            pc.any(pc.equal(pc.bit_wise_and(pc.utf8_length(valid), 1), 1)).as_py():
        raise ValueError("bytea text is not in hex format (\\x...)")
    hexes = pc.utf8_slice_codeunits(values, 2)
    hexes = pa.concat_arrays([hexes]) if hexes.offset else hexes
    validity, offsets_buf, data = hexes.buffers()
    offsets = pa.Array.from_buffers(pa.int32(), n + 1, [None, offsets_buf])
    start, end = offsets[0].as_py(), offsets[n].as_py()
    raw = binascii.unhexlify(memoryview(data)[start:end]) if end > start else b""
    halved = pc.divide(pc.subtract(offsets, start), 2).cast(pa.int32())
    return pa.Array.from_buffers(pa.binary(), n, [validity, halved.buffers()[1],
                                                  pa.py_buffer(raw)], values.null_count)


def as_text(values: pa.Array) -> pa.Array:
    return values


# -- dates and timestamps ----------------------------------------------------------------------

_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()
_TEMPORAL = re.compile(
    r"(\d+)-(\d\d)-(\d\d)(?: (\d\d):(\d\d):(\d\d)(?:\.(\d{1,6}))?"
    r"(?:([+-])(\d\d)(?::(\d\d)(?::(\d\d))?)?)?)?( BC)?")


def _days(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 in the proleptic Gregorian calendar, any (astronomical) year."""
    cycles = 0
    if not 1 <= year <= 9999:
        cycles = (year - 2000) // 400  # the calendar repeats every 400 years (146097 days)
        year -= 400 * cycles
    return date(year, month, day).toordinal() - _EPOCH_ORDINAL + cycles * 146097


def _parsetemporal(text: str, *, timestamp: bool) -> int:
    """One date (days) or timestamp (µs) value the fast cast cannot take: infinity, BC, 5-digit
    years."""
    limit = TIMESTAMP_INFINITY if timestamp else DATE_INFINITY
    if text == "infinity":
        return limit
    if text == "-infinity":
        return -limit
    m = _TEMPORAL.fullmatch(text)
    if m is None:
        raise ValueError(f"unrecognised {'timestamp' if timestamp else 'date'} text {text!r}")
    year = int(m[1])
    if m[12]:
        year = 1 - year  # 1 BC is year 0
    days = _days(year, int(m[2]), int(m[3]))
    if not timestamp:
        result = days
    else:
        seconds = days * 86400 + int(m[4] or 0) * 3600 + int(m[5] or 0) * 60 + int(m[6] or 0)
        if m[8]:
            offset = int(m[9]) * 3600 + int(m[10] or 0) * 60 + int(m[11] or 0)
            seconds -= offset if m[8] == "+" else -offset
        result = seconds * 1_000_000 + int((m[7] or "").ljust(6, "0"))
    if not -limit < result < limit:
        raise ValueError(f"{text!r} is outside the range Arrow can hold")
    return result


_PLAIN_TEMPORAL = r"^\d{4}-\d\d-\d\d"


def temporal(arrow_type: pa.DataType, *, timestamp: bool, placeholder: str) -> Converter:
    storage = pa.int64() if timestamp else pa.int32()

    def convert(values: pa.Array) -> pa.Array:
        try:  # the common case: one cast (Arrow rejects infinity, BC and five-digit years)
            return pc.cast(values, arrow_type)
        except pa.ArrowInvalid:
            pass
        special = pc.or_(pc.invert(pc.match_substring_regex(values, _PLAIN_TEMPORAL)),
                         pc.ends_with(values, " BC")).fill_null(False)
        if not pc.any(special).as_py():
            return pc.cast(values, arrow_type)  # raises: a value is malformed
        plain = pc.cast(pc.if_else(special, placeholder, values), arrow_type)
        odd = [_parsetemporal(v, timestamp=timestamp) for v in values.filter(special).to_pylist()]
        exact = pc.replace_with_mask(plain.cast(storage), special, pa.array(odd, storage))
        return exact.cast(arrow_type)

    return per_chunk(convert, arrow_type)


def time_chunk(values: pa.Array) -> pa.Array:
    # HH:MM:SS[.ffffff] → microseconds since midnight (24:00:00 is a valid time)
    if len(values) and not pc.all(pc.match_substring_regex(
            values.drop_null(), r"^\d\d:\d\d:\d\d(\.\d{1,6})?$")).as_py():
        raise ValueError("time text is not HH:MM:SS[.ffffff]")

    def part(start: int, stop: int) -> pa.Array:
        return pc.cast(pc.utf8_slice_codeunits(values, start, stop), pa.int64())

    fraction = pc.cast(pc.utf8_slice_codeunits(
        pc.utf8_rpad(pc.utf8_slice_codeunits(values, 8), 7, "0"), 1, 7), pa.int64())
    seconds = pc.add(pc.multiply(pc.add(pc.multiply(part(0, 2), 60), part(3, 5)), 60),
                     part(6, 8))
    return pc.add(pc.multiply(seconds, 1_000_000), fraction).cast(pa.time64("us"))


# -- arrays ------------------------------------------------------------------------------------

_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_UNESCAPE = re.compile(r"\\(.)", re.DOTALL)


def parse_array(text: str) -> list[str | None]:
    """The elements of a one-dimensional Postgres array in text output form (``{a,"b c",NULL}``).

    Unquoted ``NULL`` is SQL NULL; quoted elements have ``\\"`` and ``\\\\`` unescaped.
    Multi-dimensional arrays and explicit bounds (``[0:1]={...}``) raise ValueError.
    """
    if not (text.startswith("{") and text.endswith("}")):
        raise ValueError(f"not a one-dimensional array with default bounds: {text[:80]!r}")
    body = text[1:-1]
    if not body:
        return []
    if '"' not in body:
        if "{" in body:
            raise ValueError(f"multi-dimensional arrays are not supported: {text[:80]!r}")
        return [None if item == "NULL" else item for item in body.split(",")]
    items: list[str | None] = []
    pos, n = 0, len(body)
    while True:
        if body.startswith('"', pos):
            m = _QUOTED.match(body, pos)
            if m is None:
                raise ValueError(f"unterminated quote in array {text[:80]!r}")
            items.append(_UNESCAPE.sub(r"\1", m[1]))
            pos = m.end()
        else:
            end = body.find(",", pos)
            end = n if end < 0 else end
            item = body[pos:end]
            if "{" in item or '"' in item:
                raise ValueError(f"multi-dimensional arrays are not supported: {text[:80]!r}")
            items.append(None if item == "NULL" else item)
            pos = end
        if pos == n:
            return items
        if body[pos] != ",":
            raise ValueError(f"malformed array text {text[:80]!r}")
        pos += 1
