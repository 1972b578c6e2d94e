"""Raw Arrow types to what a staged Delta table can hold (and any engine can read)."""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from cdc.errors import CompactionError

#: the Delta table property naming the columns that get file statistics
STATS_PROPERTY = "delta.dataSkippingStatsColumns"
_SIMPLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


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
    become text (Delta has neither). Dates and timestamps are kept exactly, BC and
    five-digit years included, and ``±infinity`` stays raw's sentinel (the int32 / int64
    extremes, which DuckDB reads back as ``±infinity``), so ``infinity`` and a real
    ``9999-12-31`` stay apart: delta-rs can store any such value, it only cannot compute
    file statistics past year ±262142, nor can its Python reader parse statistics outside
    years 1-9999 — so staged tables keep no statistics of date and timestamp columns
    (:func:`stats_columns`).
    """
    if isinstance(column, pa.ChunkedArray):
        target = delta_type(column.type)
        if target == column.type:
            return column
        return pa.chunked_array([for_delta(c, name) for c in column.chunks], target)
    t = column.type
    if pa.types.is_list(t):
        values = for_delta(column.values, name)
        return pa.ListArray.from_arrays(column.offsets, values, type=delta_type(t),
                                        mask=column.is_null() if column.null_count else None)
    if pa.types.is_timestamp(t):
        return column.cast(delta_type(t))  # naive → UTC-zoned: the same integers
    if pa.types.is_time(t):
        return _time_text(column.cast(pa.time64("us")).view(pa.int64()))
    if pa.types.is_decimal256(t):
        return column.cast(pa.string())
    return column


def limit_stats(dt: DeltaTable) -> None:
    """Give a table made before statistics were limited the limit (for BC dates etc.)."""
    if STATS_PROPERTY not in dt.metadata().configuration:
        dt.alter.set_table_properties(
            {STATS_PROPERTY: stats_columns(pa.schema(dt.schema().to_arrow()))})


def stats_columns(schema: pa.Schema) -> str:
    """The value of :data:`STATS_PROPERTY` for a staged table of ``schema``: every flat
    column except dates and timestamps (``_commit_ts`` is always finite and kept: status
    reads its maximum), so any date or timestamp PostgreSQL holds can be staged."""
    names = []
    for f in schema:
        temporal = pa.types.is_date(f.type) or pa.types.is_timestamp(f.type)
        nested = pa.types.is_nested(f.type)
        if f.name == "_commit_ts" or not (temporal or nested):
            if "`" in f.name or "," in f.name:
                raise CompactionError(f"column name {f.name!r} contains a backtick or comma",
                                      fix="rename the column at the source")
            names.append(f.name if _SIMPLE.match(f.name) else f"`{f.name}`")
    return ",".join(names)


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
