"""Keyless tables' appends, exactly once in bounded chunks.

A keyed chunk may end anywhere: re-applying a change after a crash is harmless, the merge
is guarded by the staged row's position. An append is not: a keyless chunk that ends inside
a transaction or a backfill commits without moving the watermark past it (the watermark
says "every change below (w + 1, 0) is applied"), and a rerun after a crash would append
that part again. Staged rows keep their position (``_commit_lsn``, ``_seq``), so the rows
a table holds above its watermark are exactly those partial appends: a run reads their
positions once, before its first commit, and drops those changes from what it appends.
Nothing else can be above the watermark, and a change is never appended at two
positions, so every change is appended once however the chunks are cut. A truncate in a
chunk replaces the table (overwrite): the positions read are then gone from it too.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

from cdc.events import Lsn

_POSITION = ["_commit_lsn", "_seq"]
_ROW = "__cdc_row"


def positions_above(dt: DeltaTable | None, watermark: Lsn | None) -> pa.Table:
    """(``_commit_lsn``, ``_seq``) of the staged rows above ``watermark`` (usually none:
    the Delta log's file statistics say so without reading data)."""
    empty = pa.table({"_commit_lsn": pa.array([], pa.int64()), "_seq": pa.array([], pa.int64())})
    if dt is None:
        return empty
    floor = -1 if watermark is None else watermark
    actions = pa.table(dt.get_add_actions(flatten=True))
    if "max._commit_lsn" in actions.column_names:
        top = pc.max(actions["max._commit_lsn"]).as_py()
        if top is None or top <= floor:
            return empty
    return dt.to_pyarrow_dataset().to_table(columns=_POSITION,
                                            filter=pc.field("_commit_lsn") > floor)


def not_yet_appended(rows: pa.Table, appended: pa.Table) -> pa.Table:
    """``rows`` without the changes whose position is in ``appended``."""
    if not appended.num_rows or not rows.num_rows:
        return rows
    number = pa.arange(0, rows.num_rows)
    index = pa.table({"_commit_lsn": rows["_commit_lsn"], "_seq": rows["_seq"], _ROW: number})
    kept = index.join(appended, _POSITION, join_type="left anti")[_ROW]
    return rows.filter(pc.is_in(number, value_set=kept.combine_chunks()))


class Appends:
    """A run's keyless appends: its changes, without those a crashed run appended."""

    def __init__(self) -> None:
        self.positions: pa.Table | None = None  # read before the run's first commit

    def new_rows(self, rows: pa.Table, dt: DeltaTable | None, watermark: Lsn | None, *,
                 truncated: bool) -> pa.Table:
        """The inserts and snapshot reads of ``rows`` to append (after the chunk's last
        truncate, which replaces the table: nothing of it is left to skip then)."""
        inserts = rows.filter(pc.is_in(rows["_op"], pa.array(["c", "r"])))
        if self.positions is None or truncated:
            self.positions = positions_above(None if truncated else dt, watermark)
        return not_yet_appended(inserts, self.positions)
