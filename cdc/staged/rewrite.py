"""Copy-on-write done by cdc: a chunk's touched file groups read, changed and written again
with pyarrow, committed in one Delta commit of remove + add actions and the watermark.

A MERGE in delta-rs 1.6 costs 1.5-2x what pyarrow needs to read a file and write it again
(it scans the target, joins, and writes through its own writer; 10M rows, 100k spread
changes: 6.5 s against a floor of 4.1 s). Here the staged side of a group is read once,
whole (``read_group``): its key columns resolve the chunk's changes against the staged rows
(the guard, unchanged TOAST values: ``merge.against_staged``), the rows of removed keys are
dropped, the new versions added, and the result, sorted by key, is written back in files
of about the table's target size (``Writer``). Rows of keys outside every group are new:
they are written as files of their own. Nothing is committed until every file is written;
then ``commit`` adds them and removes the files they replace in one
``create_write_transaction`` (deltalake >= 1.6.6 takes remove actions) with the app
transaction, checked right before: a chunk is one commit, so a crash leaves the table as
it was (the files written are never referenced; ``vacuum`` with ``full=True`` deletes
them) or the chunk applied with its watermark.

The files are written through the lake (``Lake.write_bytes``: durable before the commit that
names them; delta-rs 1.6's own Python filesystem cannot write: its output stream rejects
every buffer). Their statistics
(the add action's ``stats``) are computed from the data: row count, null counts of the
table's statistics columns, minimum and maximum of its integer columns and of
``_commit_ts`` (exact; other columns get none, which readers take as "may hold anything").
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from deltalake import CommitProperties, DeltaTable
from deltalake.transaction import AddAction, RemoveAction

from cdc.staged.delta_types import STATS_PROPERTY
from cdc.staged.target import FileGroup


def read_group(dataset: ds.FileSystemDataset, group: FileGroup) -> pa.Table:
    """Every row of the group's files (the table's schema: older files' missing columns
    NULL)."""
    wanted = set(group.paths)
    fragments = [f for f in dataset.get_fragments() if f.path in wanted]
    if len(fragments) != len(wanted):
        raise FileNotFoundError(f"data files missing from the table: {sorted(wanted)}")
    return ds.FileSystemDataset(fragments, dataset.schema, dataset.format,
                                dataset.filesystem).to_table()


def matching(rows: pa.Table, part: pa.Table, column: str) -> pa.Array:
    """For each row, the index of its ``column`` value among ``part``'s (null: none)."""
    return pc.index_in(rows[column], value_set=part[column]).combine_chunks()


def without_keys(rows: pa.Table, found: pa.Array, part: pa.Table, removals: pa.Table,
                 key: Sequence[str]) -> pa.Table:
    """``rows`` without the rows whose key is one of ``removals``' keys; ``found`` is
    ``matching(rows, part, key[0])`` and ``removals`` a subset of ``part``."""
    if len(key) == 1:  # one hash pass over the rows (``found``), the rest over the part
        gone = pc.is_in(part[key[0]], value_set=removals[key[0]])
        return rows.filter(pc.invert(pc.fill_null(pc.take(gone, found), False)))
    marked = removals.select(list(key)).append_column(
        "__cdc_gone", pa.nulls(removals.num_rows, pa.bool_()).fill_null(True))
    joined = rows.join(marked, keys=list(key), join_type="left outer")
    return joined.filter(pc.is_null(joined["__cdc_gone"])).drop_columns(["__cdc_gone"])


def conformed(parts: Sequence[pa.Table], schema: pa.Schema, key: Sequence[str], *,
              ordered: bool = True) -> pa.Table:
    """``parts`` as one table of ``schema`` (missing columns NULL), sorted by key unless
    not ``ordered``."""
    rows = pa.concat_tables([p.select([c for c in p.column_names if c in schema.names])
                             for p in parts], promote_options="permissive")
    columns = [rows[f.name].cast(f.type) if f.name in rows.column_names
               else pa.nulls(rows.num_rows, f.type) for f in schema]
    rows = pa.Table.from_arrays(columns, schema=schema)
    return rows.sort_by([(k, "ascending") for k in key]) if ordered else rows


#: ``change(rows, part)``: a group's rows (None outside every group) and the chunk's part
#: there → (the group's rows changed, None: its files stay; rows to add)
Change = Callable[[pa.Table | None, pa.Table], tuple[pa.Table | None, pa.Table]]


def rewrite(writer: Writer, parts: Iterable[tuple[FileGroup | None, pa.Table]],
            change: Change, key: Sequence[str], per_row: float | None) -> None:
    """Each touched group read whole and changed by ``change``: its files replaced by the
    result (sorted by key), and what ``change`` adds outside groups it leaves untouched
    written as new files; nothing committed yet (``Writer.commit``)."""
    dataset = writer.dt.to_pyarrow_dataset()  # one version for every group
    schema, rest = dataset.schema, []
    for group, part in parts:
        rows = read_group(dataset, group) if group is not None else None
        changed, added = change(rows, part)
        if group is None or changed is None:
            rest.append(added)
        else:  # one file needs no order (one row group); files cut from it keep key ranges
            files = writer.files(changed.num_rows + added.num_rows, writer.per_row([group]))
            writer.replace(group, conformed([changed, added], schema, key, ordered=files > 1))
        del rows, changed
        pa.default_memory_pool().release_unused()  # the next group's comes on top
    if rest:
        writer.write(conformed(rest, schema, key), per_row)


@dataclass
class Writer:
    """Writes data files into a Delta table's folder and keeps the actions that commit them."""

    dt: DeltaTable
    file_bytes: int
    put: Callable[[str, bytes], None]  # stores a file at a path inside the table's folder
    adds: list[AddAction] = field(default_factory=list)
    removes: list[RemoveAction] = field(default_factory=list)

    def __post_init__(self) -> None:
        setting = self.dt.metadata().configuration.get(STATS_PROPERTY)
        names = [n.strip().strip("`") for n in setting.split(",")] if setting else None
        self.stats_names = names

    def replace(self, group: FileGroup, rows: pa.Table) -> None:
        """``rows`` replace the group's files: written at the group's bytes per row."""
        self.write(rows, self.per_row([group]))
        now = _now_ms()
        self.removes += [RemoveAction(path, data_change=True, deletion_timestamp=now,
                                      size=size, partition_values={})
                         for path, size in zip(group.paths, group.sizes, strict=True)]

    @staticmethod
    def per_row(groups: Sequence[FileGroup]) -> float | None:
        """Bytes per row of the table's files (None: no file to go by)."""
        rows = sum(g.rows for g in groups)
        return sum(g.bytes for g in groups) / rows if rows else None

    def files(self, rows: int, per_row: float | None) -> int:
        """How many files ``rows`` are written as: up to 1.5 ``file_bytes`` in one."""
        return max(1, round(rows * (per_row or 0) / self.file_bytes))

    def write(self, rows: pa.Table, per_row: float | None = None) -> None:
        """``rows`` as new files of about ``file_bytes`` each (evenly cut)."""
        if not rows.num_rows:
            return
        if per_row is None:  # no file to go by: the in-memory size overestimates (compression)
            per_row = rows.nbytes / rows.num_rows / 3
        step = math.ceil(rows.num_rows / self.files(rows.num_rows, per_row))
        for start in range(0, rows.num_rows, step):
            self._file(rows.slice(start, step))

    def _file(self, rows: pa.Table) -> None:
        path = f"part-00000-{uuid.uuid4()}-c000.snappy.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(rows, sink, compression="snappy", use_dictionary=repetitive(rows))
        data = sink.getvalue().to_pybytes()
        self.put(path, data)
        self.adds.append(AddAction(path, len(data), {}, _now_ms(), True,
                                   json.dumps(stats(rows, self.stats_names))))

    def commit(self, commit: CommitProperties, before: Callable[[], None]) -> None:
        """One commit of every file written and removed (``before`` right before it)."""
        before()
        self.dt.create_write_transaction(
            [*self.adds, *self.removes], mode="append", schema=self.dt.schema(),
            commit_properties=commit)


def repetitive(rows: pa.Table, sample: int = 10_000) -> list[str]:
    """The columns worth dictionary encoding: at most half the values of their first
    ``sample`` rows distinct. Dictionary encoding of a column of distinct values (a key, a
    name, a time) falls back to plain after 1 MiB of dictionary and doubles the write time:
    a 660k-row staged file was written in 0.35 s with every column tried, 0.17 s with only
    these (and 8 % smaller)."""
    n = min(sample, rows.num_rows)
    return [f.name for f in rows.schema if not pa.types.is_nested(f.type)
            and pc.count_distinct(rows[f.name].slice(0, n)).as_py() <= n // 2]


def stats(rows: pa.Table, names: list[str] | None) -> dict[str, Any]:
    """A data file's Delta statistics: exact where given, absent (unknown) otherwise."""
    low: dict[str, Any] = {}
    high: dict[str, Any] = {}
    nulls: dict[str, int] = {}
    for f in rows.schema:
        if (names is not None and f.name not in names) or pa.types.is_nested(f.type):
            continue
        column = rows[f.name]
        nulls[f.name] = column.null_count
        exact = pa.types.is_integer(f.type) or (f.name == "_commit_ts"
                                                and pa.types.is_timestamp(f.type))
        if not exact or column.null_count == len(column):
            continue
        bounds = pc.min_max(column)
        low[f.name], high[f.name] = _json(bounds["min"]), _json(bounds["max"])
    return {"numRecords": rows.num_rows, "minValues": low, "maxValues": high,
            "nullCount": nulls}


def _json(value: pa.Scalar) -> Any:
    if pa.types.is_timestamp(value.type):  # as delta-rs writes them: UTC, microseconds
        micros = value.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).as_py()
        seconds, fraction = divmod(micros, 1_000_000)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        return f"{stamp}.{fraction:06d}Z"
    return value.as_py()


def _now_ms() -> int:
    return int(time.time() * 1000)
