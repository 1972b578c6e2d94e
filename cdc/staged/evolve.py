"""Column DDL carried into staged: RENAME COLUMN and ADD COLUMN ... DEFAULT (pure planning and
one rewrite).

A raw column's field metadata names its identity at the source, ``pg_relid`` and
``pg_attnum`` (``source/catalog.py``), which a rename keeps; the name is only a label. So:

- raw files written before a rename have their column renamed to the newest name when a
  chunk is read (raw itself stays as written), and a staged column of the same identity is
  renamed (one rewrite of the staged table, before the chunk's commit);
- a column added with a constant default has ``pg_missing``: the value PostgreSQL shows for
  every row older than the column (``attmissingval``, no WAL is written for them). Older raw
  rows take it, and so do the staged rows when the column first reaches staged.

Volatile defaults (``DEFAULT random()``) rewrite the table at the source without row changes;
no value exists in the WAL for the older rows, which stay NULL: ``cdc resync`` re-reads them.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from cdc.staged.delta_types import for_delta

log = structlog.get_logger("cdc.staged.evolve")

Identity = tuple[bytes, bytes]


def identity(field: pa.Field) -> Identity | None:
    meta = field.metadata or {}
    relid, attnum = meta.get(b"pg_relid"), meta.get(b"pg_attnum")
    return None if relid is None or attnum is None else (relid, attnum)


def renames(older: pa.Schema, newest: pa.Schema) -> dict[str, str]:
    """Old name → new name for the columns of ``older`` that ``newest`` holds under another
    name (same table OID and attribute number)."""
    current = {identity(f): f.name for f in newest if identity(f) is not None}
    out: dict[str, str] = {}
    for f in older:
        new = current.get(identity(f)) if identity(f) is not None else None
        if new is not None and new != f.name and new not in older.names:
            out[f.name] = new
    return out


def missing_value(field: pa.Field, n: int) -> pa.Array | None:
    """``n`` copies of the column's ``pg_missing`` value, or None when it has none (or it
    cannot be converted: the rows then stay NULL, as before, and a warning says so)."""
    text = (field.metadata or {}).get(b"pg_missing")
    if text is None:
        return None
    value = text.decode()
    if pa.types.is_boolean(field.type):
        value = {"t": "true", "f": "false"}.get(value, value)
    try:
        scalar = pc.cast(pa.array([value]), field.type)[0]
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        log.warning("add_column_default_not_filled", column=field.name, value=value,
                    type=str(field.type))
        return None
    return pa.repeat(scalar, n)


def align(part: pa.Table, newest: pa.Schema) -> pa.Table:
    """A raw part under the newest names, with ADD COLUMN defaults where it lacks a column."""
    renamed = renames(part.schema, newest)
    if renamed:
        fields = [newest.field(renamed[f.name]) if f.name in renamed else f
                  for f in part.schema]
        part = pa.Table.from_arrays(part.columns, schema=pa.schema(fields,
                                                                   part.schema.metadata))
    for field in newest:
        if field.name not in part.column_names:
            filled = missing_value(field, part.num_rows)
            if filled is not None:
                part = part.append_column(field, filled)
    return part


def evolves(staged: pa.Schema, newest: pa.Schema) -> bool:
    """True when the staged table must be rewritten before rows of ``newest`` apply."""
    renamed = renames(staged, newest)
    return bool(renamed) or any(_added(staged, newest, renamed))


def _added(staged: pa.Schema, newest: pa.Schema, renamed: dict[str, str]) -> list[pa.Field]:
    return [f for f in newest if f.name not in staged.names and f.name not in renamed.values()
            and (f.metadata or {}).get(b"pg_missing") is not None]


def evolved(staged: pa.Table, newest: pa.Schema) -> pa.Table:
    """The staged rows with renamed columns and ADD COLUMN defaults applied."""
    renamed = renames(staged.schema, newest)
    added = _added(staged.schema, newest, renamed)
    fields = [newest.field(renamed[f.name]).with_type(f.type) if f.name in renamed else f
              for f in staged.schema]
    out = pa.Table.from_arrays(staged.columns, schema=pa.schema(fields, staged.schema.metadata))
    for field in added:
        filled = missing_value(field, out.num_rows)
        if filled is not None:
            column = for_delta(pa.chunked_array([filled]), f"column {field.name!r}")
            out = out.append_column(pa.field(field.name, column.type, metadata=field.metadata),
                                    column)
    log.info("staged_schema_evolved", renamed=renamed, defaults=[f.name for f in added])
    return out
