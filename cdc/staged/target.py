"""The table side of a merge: which data files a chunk touches, and merging them in groups.

History (``history/writer.py``) merges this way: it builds a ``flagged`` MERGE source per
group, ``merge_groups`` commits them. Staged (``staged/compactor.py``) uses the same groups
but rewrites them itself, one commit per chunk (``staged/rewrite.py``), and keeps the MERGE
for keys without exact statistics and for a chunk that adds a column.

delta-rs' MERGE holds memory in proportion to the target rows it reads and rewrites, so one
MERGE of changes spread over a large table grows with the table (870 MB at 10M rows). Here
the staged table's data files are grouped by the key ranges in the Delta log's add actions
(``min``/``max`` statistics of the first key column): files whose ranges overlap are in one
group, and adjacent groups are packed up to ``group_bytes`` and ``GROUP_ROWS``. A chunk's
changes are split by group; each touched group is one MERGE whose source keys lie inside
the group's range, so delta-rs prunes it to that group's files (``streamed_exec=False``:
file pruning from the source's key range), and untouched groups are never read. Changes
of keys outside every file's range cannot match a staged row: they are inserts, appended
in the chunk's last commit, which also records the watermark. Memory then follows the
group, not the table.

Only exact statistics qualify: integer and date key columns (string statistics
may be truncated, so a key could fall outside its file's recorded range); any other key, or
a file without statistics, keeps the single MERGE over the whole table.

A crash between two group commits leaves the watermark where it was: the re-run redoes the
chunk, and changes already applied are not newer than their staged rows, so they are
dropped (``merge.against_staged``); in history, a change at or before its key's current
version is skipped (``history.versions.plan_versions``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from deltalake import CommitProperties, DeltaTable

from cdc.errors import CompactionError
from cdc.staged.merge import KEEP

#: the MERGE source's flag column: true for a row to insert, false for one to match
INSERT = "__cdc_insert"


@dataclass(frozen=True)
class FileGroup:
    """Staged data files whose first-key ranges lie inside [low, high] (inclusive, as int64)."""

    low: int
    high: int
    files: int
    bytes: int
    rows: int
    paths: tuple[str, ...] = ()  # the files (as the Delta log names them)
    sizes: tuple[int, ...] = ()  # their sizes in bytes


#: the part of a table without usable statistics: any staged file may hold any of its keys
EVERYWHERE = FileGroup(-(2**63), 2**63 - 1, 0, 0, 0)


#: at most this many target rows in one group's MERGE (unless one file holds more): delta-rs'
#: MERGE memory follows the rows it reads (~150 MB for 500k staged rows), not the bytes
GROUP_ROWS = 500_000


def file_groups(dt: DeltaTable, column: str, group_bytes: int) -> list[FileGroup] | None:
    """The table's files grouped by their range of ``column``, adjacent ones packed up to
    ``group_bytes`` and ``GROUP_ROWS``; None when the statistics don't allow it."""
    actions = pa.table(dt.get_add_actions(flatten=True))
    low, high = f"min.{column}", f"max.{column}"
    if actions.num_rows == 0 or low not in actions.column_names or high not in actions.column_names:
        return None
    if _ordinal(actions[low]) is None or actions[low].null_count or actions[high].null_count:
        return None  # a file without statistics could hold any key
    ranges = pa.table({"low": _ordinal(actions[low]), "high": _ordinal(actions[high]),
                       "bytes": actions["size_bytes"], "rows": actions["num_records"],
                       "path": actions["path"]}).sort_by("low").to_pylist()
    groups: list[FileGroup] = []
    for r in ranges:
        last = groups[-1] if groups else None
        if last is not None and (r["low"] <= last.high or (
                last.bytes + r["bytes"] <= group_bytes and last.rows + r["rows"] <= GROUP_ROWS)):
            groups[-1] = FileGroup(last.low, max(last.high, r["high"]), last.files + 1,
                                   last.bytes + r["bytes"], last.rows + r["rows"],
                                   (*last.paths, r["path"]), (*last.sizes, r["bytes"]))
        else:  # overlapping ranges share a group: a key could be in either file
            groups.append(FileGroup(r["low"], r["high"], 1, r["bytes"], r["rows"],
                                    (r["path"],), (r["bytes"],)))
    return groups


def by_group(state: pa.Table, column: str,
             groups: list[FileGroup] | None) -> Iterator[tuple[FileGroup | None, pa.Table]]:
    """``state`` split into the rows of each group it touches, then the rows outside every
    group (None: no staged row can match them). Without groups, ``state`` is one part
    (``EVERYWHERE``)."""
    keys = _ordinal(state[column]) if groups else None
    if groups is None or keys is None:
        yield EVERYWHERE, state
        return
    state = state.sort_by(column)
    keys = _ordinal(state[column])
    assert keys is not None
    g, n = len(groups), state.num_rows
    lows = pa.array([x.low for x in groups], pa.int64())
    highs = pa.array([x.high for x in groups], pa.int64())
    # sort the group lows in among the keys (lows first on ties): the lows at or before a
    # key, minus one, is the only group whose range can hold it
    events = pa.table({"v": pa.concat_arrays([lows, keys]),
                       "low": pa.concat_arrays([constant(True, g), constant(False, n)])})
    events = events.sort_by([("v", "ascending"), ("low", "descending")])
    below = pc.cumulative_sum(pc.cast(events["low"], pa.int64()))
    index = pc.subtract(below.filter(pc.invert(events["low"])), 1).combine_chunks()
    inside = pc.and_(pc.greater_equal(index, 0),
                     pc.less_equal(keys, pc.take(highs, pc.max_element_wise(index, 0))))
    index = pc.if_else(inside, index, -1)  # -1: outside every group
    runs = pc.run_end_encode(index)
    start = 0
    for end, at in zip(runs.run_ends.to_pylist(), runs.values.to_pylist(), strict=True):
        if at >= 0:
            yield groups[at], state.slice(start, end - start)
        start = end
    rest = state.filter(pc.equal(index, -1))
    if rest.num_rows:
        yield None, rest


def _ordinal(values: pa.ChunkedArray | pa.Array) -> pa.Array | None:
    """Integer and date values as int64 (order kept); None for other types."""
    kind = values.type
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_integer(kind):
        return values.cast(pa.int64())
    if pa.types.is_date32(kind):
        return values.cast(pa.int32()).cast(pa.int64())
    return None


def staged_rows(dataset: ds.Dataset, state: pa.Table, key: tuple[str, ...], keep: list[str],
                group: FileGroup | None = EVERYWHERE) -> pa.Table:
    """Key, position and kept columns of the staged rows whose keys ``state`` touches.

    ``dataset`` is the staged table's (``DeltaTable.to_pyarrow_dataset``). The filter has
    each key column's range, so files outside it are skipped by their statistics; for
    composite keys it selects a superset that the join then narrows. Outside every file
    group (``group`` None) there are none: nothing is read.
    """
    wanted = staged_columns_of(dataset.schema, key, keep)
    if group is None:
        return dataset.schema.empty_table().select(wanted)
    where = None
    for k in key:
        values = pc.unique(state[k])
        bounds = pc.min_max(values)
        term = ((pc.field(k) >= bounds["min"]) & (pc.field(k) <= bounds["max"])
                & pc.field(k).isin(values))
        where = term if where is None else where & term
    return dataset.to_table(columns=wanted, filter=where)


def staged_columns_of(schema: pa.Schema, key: tuple[str, ...], keep: list[str]) -> list[str]:
    """The staged columns a chunk is resolved against: key, position, kept TOAST columns."""
    return [*key, "_commit_lsn", "_seq",
            *(c[len(KEEP):] for c in keep if c[len(KEEP):] in schema.names)]


def flagged(removals: pa.Table, inserts: pa.Table) -> pa.Table:
    """One MERGE source: ``inserts`` flagged ``INSERT`` true, then ``removals`` false."""
    new = inserts.append_column(INSERT, constant(True, inserts.num_rows))
    gone = removals.append_column(INSERT, constant(False, removals.num_rows))
    return pa.concat_tables([new, gone], promote_options="default")


def split(dt: DeltaTable, source: pa.Table, column: str,
          group_bytes: int) -> tuple[list[pa.Table], pa.Table]:
    """A flagged MERGE source (``flagged``) split by the table's file groups: the source of
    each touched group's MERGE, and the inserts outside every group (appended: no row of the
    table can match them; removals there match nothing and are dropped)."""
    merges, rest = [], [source.slice(0, 0)]
    for group, part in by_group(source, column, file_groups(dt, column, group_bytes)):
        if group is None:
            rest.append(part.filter(part[INSERT]))
        else:
            merges.append(part)
    return merges, pa.concat_tables(rest).drop_columns([INSERT])


def merge_groups(merges: list[pa.Table], commit: CommitProperties | None, *, appends: bool,
                 merge: Callable[[pa.Table, CommitProperties | None], None],
                 before: Callable[[], None]) -> None:
    """One MERGE per group, each its own commit, ``before`` right before each (fault point,
    watermark check); the last carries ``commit`` (the watermark) unless ``appends`` are
    still to be committed after them, which then carry it."""
    for i, source in enumerate(merges):
        before()
        # what the chunk's reads left in Arrow's pool goes back first: the MERGE's memory
        # comes on top of it (10M-row history: 619 → 563 MB peak)
        pa.default_memory_pool().release_unused()
        merge(source, commit if i + 1 == len(merges) and not appends else None)


def replace(dt: DeltaTable, source: pa.Table, key: tuple[str, ...],
            commit: CommitProperties | None) -> None:
    """Delete the staged rows of the removals' keys and insert the inserts of ``source``
    (``flagged``), in one commit.

    A MERGE of this shape (matched: unconditional delete; not matched: insert) rather
    than matched-update: deltalake 1.6.0-1.6.1 reject a matched update or conditional
    delete with a false "multiple source rows" error once a target file is read in more
    than one batch (delta-rs #4475, fixed in 1.6.2); unconditional deletes are exempt.
    Guard and TOAST values were resolved against the staged rows already.
    """
    names = [c for c in source.column_names if c != INSERT]
    columns = {quote(c): f"s.{quote(c)}" for c in names}
    target = set(pa.schema(dt.schema().to_arrow()).names)
    (dt.merge(source, f"{match(key)} AND NOT s.{INSERT}", source_alias="s", target_alias="t",
              streamed_exec=False, merge_schema=bool(set(names) - target),
              commit_properties=commit)
     .when_matched_delete()
     .when_not_matched_insert(columns, f"s.{INSERT}")
     .execute())


def match(key: tuple[str, ...]) -> str:
    """The MERGE predicate's key equality (target ``t``, source ``s``)."""
    return " AND ".join(f"t.{quote(k)} = s.{quote(k)}" for k in key)


def quote(name: str) -> str:
    if "`" in name:
        raise CompactionError(f"column name {name!r} contains a backtick",
                              fix="rename the column at the source")
    return f"`{name}`"


def constant(value: bool, n: int) -> pa.Array:
    return pa.nulls(n, pa.bool_()).fill_null(value)
