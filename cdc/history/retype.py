"""A column's type changed at the source: history follows it when every old value converts
exactly.

A history table holds every version of a row, so after ``ALTER COLUMN ... TYPE`` (and the
``cdc resync`` it needs) it holds values of both types. When each value of the old type has
exactly one value of the new type that means the same (a wider integer or float, a decimal
with room for its digits, an integer or decimal as the text PostgreSQL prints for it), the
history column takes the new type: older raw changes are read in it, and the history table
is rewritten once with the column converted (streamed batch by batch, in one commit that
keeps the watermark). Any other change (text → int, say) stops history's compaction with
the type-change error while staged goes on (``--history off`` then, README).
"""

from __future__ import annotations

import pyarrow as pa


def converts_exactly(source: pa.DataType,  # noqa: PLR0911  one return per type family
                     target: pa.DataType) -> bool:
    """True when every ``source`` value has one ``target`` value meaning the same."""
    if source == target:
        return True
    if pa.types.is_integer(source):
        if pa.types.is_integer(target):
            return bool(pa.types.is_signed_integer(target) and target.bit_width >= source.bit_width)
        if pa.types.is_decimal(target):  # digits of the widest value of the integer type
            return bool(target.precision - target.scale >= len(str(2 ** source.bit_width)))
        return target in (pa.string(), pa.large_string())
    if pa.types.is_floating(source):
        return pa.types.is_floating(target) and bool(target.bit_width >= source.bit_width)
    if pa.types.is_decimal(source):
        if pa.types.is_decimal(target):
            return bool(target.scale >= source.scale and target.precision - target.scale
                        >= source.precision - source.scale)
        return False  # a decimal's text keeps its scale (1.50), pyarrow's cast does too,
        # but a column of a changed scale would then mix both: not exact enough to promise
    text = (pa.string(), pa.large_string())
    return source in text and target in text


def widened_parts(parts: list[pa.Table]) -> list[pa.Table]:
    """Older raw parts with each column in the newest part's type where it converts exactly
    (so ``staged.merge.unify`` can concatenate them); other differences are left to it."""
    if len(parts) < 2:
        return parts
    return [conformed(part, parts[-1].schema) for part in parts]


def conformed(rows: pa.Table, target: pa.Schema) -> pa.Table:
    """``rows`` with each column in ``target``'s type where it converts exactly: older raw
    parts in the newest part's types, or a chunk of changes from before a type change the
    history table already follows (a rerun after a crash, or other chunk limits, read it on
    its own) in the history's."""
    for i, field in enumerate(rows.schema):
        if field.name in target.names:
            want = target.field(field.name).type
            if field.type != want and converts_exactly(field.type, want):
                rows = rows.set_column(i, field.with_type(want), rows[field.name].cast(want))
    return rows


def retyped(history: pa.Schema, rows: pa.Schema) -> dict[str, pa.DataType]:
    """History columns whose type the changes' type replaces exactly: name → new type."""
    return {f.name: rows.field(f.name).type for f in history
            if f.name in rows.names and rows.field(f.name).type != f.type
            and converts_exactly(f.type, rows.field(f.name).type)}


def with_types(schema: pa.Schema, types: dict[str, pa.DataType]) -> pa.Schema:
    """``schema`` with the retyped columns' new types."""
    return pa.schema([f.with_type(types[f.name]) if f.name in types else f for f in schema],
                     metadata=schema.metadata)
