"""Raw change rows → staged rows: pure Arrow, no I/O (the compactor in ``compact.py`` does that).

Everything here is vectorised (``pyarrow.compute``, ``Table.sort_by``); no loop runs
per row. The order of changes is (``_commit_lsn``, ``_seq``).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc

from cdc.errors import CompactionError
from cdc.staged.delta_types import for_delta
from cdc.staged.evolve import align

Pos = tuple[int, int]
"""A position in a table's change order: (``_commit_lsn``, ``_seq``)."""

#: metadata columns staged tables keep (for the guard and for lineage)
META = ("_commit_lsn", "_seq", "_commit_ts")
_RAW_ONLY = ("_op", "_lsn", "_xid", "_unchanged")
#: helper columns of a merge source: the change is a delete; keep the staged value of a column
DELETED, KEEP = "__cdc_del", "__cdc_keep_"
_STAGED = "__cdc_staged_"


def between(table: pa.Table, lower: Pos, upper: Pos) -> pa.Table:
    """Rows with lower <= (_commit_lsn, _seq) < upper."""
    lsn, seq = table["_commit_lsn"], table["_seq"]
    below = pc.or_(pc.less(lsn, upper[0]),
                   pc.and_(pc.equal(lsn, upper[0]), pc.less(seq, upper[1])))
    above = pc.or_(pc.greater(lsn, lower[0]),
                   pc.and_(pc.equal(lsn, lower[0]), pc.greater_equal(seq, lower[1])))
    return table.filter(pc.and_(below, above))


def from_last_truncate(parts: list[pa.Table]) -> list[pa.Table]:
    """The parts cut to start at the chunk's last truncate (everything before it is gone at
    the source), so the schemas of raw files from before it — a type since changed and
    re-read by ``cdc resync`` — never need to unify with later ones."""
    last: Pos | None = None
    for part in parts:
        marks = part.filter(pc.equal(part["_op"], "t"))
        for lsn, seq in zip(marks["_commit_lsn"].to_pylist(), marks["_seq"].to_pylist(),
                            strict=True):
            last = (lsn, seq) if last is None or (lsn, seq) > last else last
    if last is None:
        return parts
    cut = [between(p, last, (2**63 - 1, 0)) for p in parts]
    return [p for p in cut if p.num_rows] or cut[:1]


def unify(parts: list[pa.Table], table: str) -> pa.Table:
    """Concatenate raw parts whose schemas grew (added columns) or lost columns; older parts
    take the newest column names (RENAME COLUMN) and ADD COLUMN defaults (``evolve.py``)."""
    if parts:
        newest = parts[-1].schema
        parts = [align(p, newest) for p in parts]
    try:
        schema = pa.unify_schemas([p.schema for p in parts], promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise type_change(table, [p.schema for p in parts]) from exc
    combined = pa.concat_tables(parts, promote_options="permissive")
    latest = next((p.schema.metadata for p in reversed(parts) if p.schema.metadata), None)
    if parts:  # field metadata (identity, defaults) as the newest part has it
        newest = parts[-1].schema
        combined = combined.cast(pa.schema(
            [f.with_metadata(newest.field(f.name).metadata) if f.name in newest.names else f
             for f in combined.schema]))
    return combined.replace_schema_metadata(latest or schema.metadata)


def type_change(table: str, schemas: Sequence[pa.Schema]) -> CompactionError:
    seen: dict[str, pa.DataType] = {}
    for schema in schemas:
        for f in schema:
            if f.name in seen and seen[f.name] != f.type:
                return CompactionError(
                    f"column {f.name!r} of {table} changed type from {seen[f.name]} to {f.type}, "
                    "which its staged Delta table cannot hold",
                    fix=f"re-read the table while cdc stream runs: cdc resync --tables "
                    f"{table}, then cdc compact (staged is replaced from the resync on; raw "
                    "keeps every change)")
            seen[f.name] = f.type
    return CompactionError(f"the raw files of {table} have incompatible schemas",
                           fix=f"re-read the table while cdc stream runs: cdc resync --tables "
                           f"{table}, then cdc compact")


def dedupe(table: pa.Table) -> pa.Table:
    """Sort by (_commit_lsn, _seq) and drop replayed copies of a change."""
    table = table.sort_by([("_commit_lsn", "ascending"), ("_seq", "ascending")])
    if table.num_rows < 2:
        return table
    first = run_starts(table, ("_commit_lsn", "_seq"))
    return table if pc.all(first).as_py() else table.filter(first)


def check_key(rows: pa.Table, key: Sequence[str], table: str) -> None:
    """Raise unless every key column is present and never NULL in ``rows``."""
    for k in key:
        missing = k not in rows.column_names
        if missing or rows[k].null_count:
            problem = "not in its raw changes" if missing else "NULL in some changes"
            raise CompactionError(f"key column {k!r} of {table} is {problem}",
                                  fix=f"name NOT NULL key columns: --key {table}=col1,col2")


def latest_per_key(rows: pa.Table, key: Sequence[str],
                   table: str) -> tuple[pa.Table, list[str]]:
    """The last change per key with unchanged TOAST values filled from earlier ones.

    Returns the rows (with a delete flag) and the names of ``keep`` flag columns: true where
    a value is still unchanged and the staged row's value must stay.
    """
    check_key(rows, key, table)
    order = row_numbers(rows.num_rows)
    rows = rows.append_column("__cdc_i", order)
    rows = rows.sort_by([*((k, "ascending") for k in key), ("__cdc_i", "ascending")])
    start = run_starts(rows, key)
    end = pa.concat_arrays([start.slice(1), pa.array([True])]) if len(start) else start
    unchanged = rows["_unchanged"].combine_chunks()
    flat = pc.list_flatten(unchanged)
    parents = pc.list_parent_indices(unchanged)
    latest = rows.filter(end)
    keep: list[str] = []
    for name in pc.unique(flat).to_pylist():
        if name not in latest.column_names:
            continue
        marked = pc.is_in(order, value_set=parents.filter(pc.equal(flat, name)))
        # index of the row holding the value: the last one of the key not marked unchanged
        holder = pc.if_else(pc.and_(marked, pc.invert(start)), pa.scalar(None, pa.int64()),
                            order)
        source = pc.fill_null_forward(holder).filter(end)
        index = latest.schema.get_field_index(name)
        latest = latest.set_column(index, name, rows[name].take(source))
        latest = latest.append_column(KEEP + name, pc.and_(marked, start).take(source))
        keep.append(KEEP + name)
    deleted = pc.equal(latest["_op"], "d")
    return latest.drop_columns(["__cdc_i"]).append_column(DELETED, deleted), keep


def against_staged(state: pa.Table, staged: pa.Table, key: Sequence[str],
                   keep: Sequence[str]) -> tuple[pa.Table, pa.Table]:
    """Resolve the latest change per key against the staged rows of those keys.

    ``staged`` holds key, ``_commit_lsn``, ``_seq`` and the kept columns of the staged rows.
    A change not newer than its staged row is dropped (an older change never overwrites a
    newer row); a value still unchanged takes the staged one. Returns the keys whose
    staged row goes and the rows to insert.
    """
    right = staged.rename_columns([c if c in key else _STAGED + c for c in staged.column_names])
    joined = _left_join(state, right, list(key))
    lsn, seq = joined[_STAGED + "_commit_lsn"], joined[_STAGED + "_seq"]
    newer = pc.or_(pc.greater(joined["_commit_lsn"], lsn),
                   pc.and_(pc.equal(joined["_commit_lsn"], lsn), pc.greater(joined["_seq"], seq)))
    exists = pc.is_valid(lsn)
    joined = joined.filter(pc.or_kleene(pc.invert(exists), newer))
    for flag in keep:
        name = flag[len(KEEP):]
        if _STAGED + name in joined.column_names:
            kept = pc.if_else(joined[flag], joined[_STAGED + name], joined[name])
        else:  # not staged yet: nothing to keep
            kept = pc.if_else(joined[flag], pa.scalar(None, joined[name].type), joined[name])
        joined = joined.set_column(joined.schema.get_field_index(name), name, kept)
    removals = joined.filter(pc.is_valid(joined[_STAGED + "_commit_lsn"])).select(list(key))
    helpers = [c for c in joined.column_names if c.startswith((_STAGED, KEEP)) or c == DELETED]
    inserts = joined.filter(pc.invert(joined[DELETED])).drop_columns(helpers)
    return removals, inserts.select(state.select(
        [c for c in state.column_names if c not in helpers]).column_names)


def _left_join(left: pa.Table, right: pa.Table, key: list[str]) -> pa.Table:
    """Left outer join on ``key`` carrying columns of any type (Acero's join cannot carry
    list columns: it joins row numbers here, and the columns are taken by them)."""
    li, ri = "__cdc_li", "__cdc_ri"
    rows = left.select(key).append_column(li, row_numbers(left.num_rows)).join(
        right.select(key).append_column(ri, row_numbers(right.num_rows)), keys=key,
        join_type="left outer")
    joined = left.take(rows[li])
    for name in right.column_names:
        if name not in key:
            joined = joined.append_column(name, right[name].take(rows[ri]))
    return joined


def row_numbers(n: int) -> pa.Array:
    """0, 1, ..., n - 1 as an int64 array."""
    return pc.subtract(pc.cumulative_sum(pa.nulls(n, pa.int64()).fill_null(1)), 1)


def run_starts(table: pa.Table, columns: Sequence[str]) -> pa.Array:
    """True where a row's ``columns`` differ from the previous row's (NULLs equal each other)."""
    n = table.num_rows
    if n == 0:
        return pa.array([], pa.bool_())
    differs: pa.Array | None = None
    for name in columns:
        column = table[name].combine_chunks()
        a, b = column.slice(1), column.slice(0, n - 1)
        ne = pc.not_equal(a, b)
        ne = pc.if_else(pc.is_null(ne), pc.xor(pc.is_null(a), pc.is_null(b)), ne)
        differs = ne if differs is None else pc.or_(differs, ne)
    return pa.concat_arrays([pa.array([True]), differs])


def staged_columns(state: pa.Table, target: pa.Schema | None, table: str) -> pa.Table:
    """Source columns as Delta holds them, aligned with the staged table's columns.

    Types Delta cannot hold are mapped by ``delta_types.for_delta``: naive ``timestamp`` becomes
    UTC-zoned, ``numeric`` wider than 38 digits and ``time`` become text; dates and
    timestamps (±infinity, BC and five-digit years included) are kept exactly.
    Columns staged has but the source no longer sends (dropped) are NULL from now on.
    """
    columns: dict[str, pa.ChunkedArray] = {}
    for field in state.schema:
        if field.name in _RAW_ONLY:
            continue
        column = state[field.name]
        columns[field.name] = for_delta(column, f"column {field.name!r} of {table}")
    if target is not None:
        for field in target:
            have = columns.get(field.name)
            if have is None:
                columns[field.name] = pa.chunked_array([pa.nulls(state.num_rows, field.type)])
            elif have.type != field.type:
                if not _widens(have.type, field.type):
                    raise type_change(table, [target, pa.schema([(field.name, have.type)])])
                columns[field.name] = have.cast(field.type)
    order = [c for c in (target.names if target is not None else []) if c in columns]
    order += [c for c in columns if c not in order and c not in META and c != DELETED
              and not c.startswith(KEEP)]
    order += [c for c in (*META, DELETED) if c in columns and c not in order]
    order += [c for c in columns if c.startswith(KEEP)]
    meta = {f.name: f.metadata for f in state.schema}  # a column's identity (evolve.py)
    return pa.table([columns[c] for c in order], schema=pa.schema(
        [pa.field(c, columns[c].type, metadata=meta.get(c)) for c in order]))


def _widens(source: pa.DataType, target: pa.DataType) -> bool:
    """True when every value of ``source`` fits ``target`` exactly."""
    if pa.types.is_integer(source) and pa.types.is_integer(target):
        return bool(target.bit_width >= source.bit_width)
    if pa.types.is_floating(source) and pa.types.is_floating(target):
        return bool(target.bit_width >= source.bit_width)
    text = (pa.string(), pa.large_string())
    return source in text and target in text
