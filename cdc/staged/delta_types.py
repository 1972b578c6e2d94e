"""Raw Arrow types to what a staged Delta table can hold (and any engine can read)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from cdc.decoding.pgtypes import DATE_INFINITY, TIMESTAMP_INFINITY
from cdc.errors import CompactionError

#: what staged Delta tables hold instead (Delta's writers cannot handle the sentinels)
DELTA_DATE_MAX, DELTA_DATE_MIN = 2932896, -719162  # 9999-12-31, 0001-01-01
DELTA_TIMESTAMP_MAX = 253402300799999999  # 9999-12-31 23:59:59.999999
DELTA_TIMESTAMP_MIN = -62135596800000000  # 0001-01-01 00:00:00




def delta_type(arrow_type: pa.DataType) -> pa.DataType:
    """The type a raw column has in a staged Delta table (see :func:`for_delta`)."""
    if pa.types.is_list(arrow_type):
        return pa.list_(delta_type(arrow_type.value_type))
    if pa.types.is_timestamp(arrow_type):
        return pa.timestamp(arrow_type.unit, tz="UTC")
    if pa.types.is_decimal256(arrow_type) or pa.types.is_time(arrow_type):
        return pa.string()
    return arrow_type


def for_delta(column: pa.Array | pa.ChunkedArray,  # noqa: PLR0911  one return per Arrow type family
              name: str = "a column") -> pa.Array | pa.ChunkedArray:
    """A raw column as Delta can hold it.

    Naive ``timestamp`` becomes UTC-zoned (Delta's ``timestampNtz`` needs reader 3 / writer
    7, which several engines cannot read); ``numeric`` wider than 38 digits and ``time``
    become text (Delta has neither); the ±infinity sentinels of dates and timestamps become
    9999-12-31 (23:59:59.999999) and 0001-01-01 (00:00:00): Delta's writer cannot hold them.
    Finite dates and timestamps outside years 1-9999 (BC, or five-digit years) raise
    CompactionError naming the column: Delta's writer fails past year ±262142 and its Python
    reader (``to_pyarrow_dataset``) cannot parse file statistics outside 1-9999. Nothing is
    clamped; raw keeps such values exactly.
    """
    if isinstance(column, pa.ChunkedArray):
        target = delta_type(column.type)
        if target == column.type and not _has_infinity_type(column.type):
            return column
        return pa.chunked_array([for_delta(c, name) for c in column.chunks], target)
    t = column.type
    if pa.types.is_list(t):
        values = for_delta(column.values, name)
        return pa.ListArray.from_arrays(column.offsets, values, type=delta_type(t),
                                        mask=column.is_null() if column.null_count else None)
    if pa.types.is_timestamp(t) or pa.types.is_date32(t):
        storage = pa.int64() if pa.types.is_timestamp(t) else pa.int32()
        top, low, high = ((TIMESTAMP_INFINITY, DELTA_TIMESTAMP_MIN, DELTA_TIMESTAMP_MAX)
                          if storage == pa.int64() else
                          (DATE_INFINITY, DELTA_DATE_MIN, DELTA_DATE_MAX))
        ints = column.view(storage)
        ints = pc.if_else(pc.equal(ints, top), pa.scalar(high, storage), ints)
        ints = pc.if_else(pc.equal(ints, -top), pa.scalar(low, storage), ints)
        _check_delta_range(ints, storage == pa.int64(), name)
        return ints.cast(delta_type(t) if storage == pa.int64() else t)
    if pa.types.is_time(t):
        return _time_text(column.cast(pa.time64("us")).view(pa.int64()))
    if pa.types.is_decimal256(t):
        return column.cast(pa.string())
    return column


_DELTA_DAYS = (DELTA_DATE_MIN, DELTA_DATE_MAX)


def _check_delta_range(ints: pa.Array, timestamp: bool, name: str) -> None:
    unit = 86_400_000_000 if timestamp else 1
    low, high = _DELTA_DAYS[0] * unit, (_DELTA_DAYS[1] + 1) * unit - 1
    bounds = pc.min_max(ints).as_py()
    if bounds["min"] is None or (low <= bounds["min"] and bounds["max"] <= high):
        return
    bad = bounds["min"] if bounds["min"] < low else bounds["max"]
    raise CompactionError(
        f"{name} holds a {'timestamp' if timestamp else 'date'} outside years 1-9999 "
        f"({bad} {'µs' if timestamp else 'days'} from 1970-01-01), which a Delta table cannot "
        "hold", fix="the raw layer keeps it exactly; leave the table out of compaction "
        "(--tables) or change the value in the source and re-snapshot")


def _time_text(micros: pa.Array) -> pa.Array:
    """µs since midnight → ``HH:MM:SS.ffffff`` (24:00:00 included, which Arrow's cast rejects)."""
    def padded(value: pa.Array, width: int) -> pa.Array:
        return pc.utf8_lpad(value.cast(pa.string()), width, "0")

    seconds = pc.divide(micros, 1_000_000)
    return pc.binary_join_element_wise(
        padded(pc.divide(seconds, 3600), 2), ":",
        padded(pc.divide(pc.subtract(seconds, pc.multiply(pc.divide(seconds, 3600), 3600)), 60),
               2), ":",
        padded(pc.subtract(seconds, pc.multiply(pc.divide(seconds, 60), 60)), 2), ".",
        padded(pc.subtract(micros, pc.multiply(seconds, 1_000_000)), 6), "")


def _has_infinity_type(t: pa.DataType) -> bool:
    if pa.types.is_list(t):
        return _has_infinity_type(t.value_type)
    return bool(pa.types.is_timestamp(t) or pa.types.is_date32(t))
