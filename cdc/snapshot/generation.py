"""Snapshot generations: a new snapshot over a lake that already followed this slot.

When the slot a lake's checkpoint followed is gone (dropped by a DBA, by ``cdc slot drop``,
or after the server invalidated it), the changes between that checkpoint and now are lost to
the slot. A new consistent snapshot into a freshly created slot is the way back: it starts a
new *generation*. Its rows describe every table at the new consistent point, but rows
deleted at the source during the gap would survive in staged (snapshot rows only upsert).
So each table that already has raw files gets a truncate marker (``_op = 't'``) at the new
consistent point, ordered before every snapshot row (``_seq`` = the lowest int64, in a file
labelled to sort before the chunks): compaction empties the table there and the snapshot
rows then fill it, so staged equals the source at the consistent point, and the stream
continues from it. The checkpoint only moves forward: the new point is later in the WAL
than anything the old slot confirmed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pyarrow as pa
import structlog

from cdc.decoding.pgtypes import ColumnType
from cdc.errors import SlotError
from cdc.events import Lsn, Relation, format_lsn
from cdc.lake.layout import RAW, raw_keys, table_segment
from cdc.lake.raw import RawSink
from cdc.lake.store import Lake
from cdc.stream.batcher import Batch, raw_table

log = structlog.get_logger("cdc.snapshot.generation")

#: ``_seq`` of a generation's truncate marker: before every snapshot row of its point
MARKER_SEQ = -(2**63)
#: the marker file's label; sorts before the chunks' ``r000000`` labels at the same LSN
MARKER_LABEL = "r-generation"


def tables_in_raw(lake: Lake) -> set[str]:
    """The path segments of every table with raw files."""
    return set(raw_keys(lake.list(RAW)))


def truncate_marker(relation: Relation, types: Sequence[ColumnType], *, lsn: Lsn,
                    ts_us: int) -> Batch:
    """One ``_op = 't'`` row at (``lsn``, :data:`MARKER_SEQ`)."""
    table = raw_table(
        relation, types, [[None] for _ in relation.columns],
        ops=pa.array(["t"]), lsns=pa.array([lsn], pa.int64()),
        commit_lsns=pa.array([lsn], pa.int64()), seqs=pa.array([MARKER_SEQ], pa.int64()),
        xids=pa.array([0], pa.int64()), commit_ts=pa.array([ts_us], pa.int64()),
        unchanged=pa.nulls(1, pa.list_(pa.string())),
    )
    return Batch(relation, table, lsn, lsn, MARKER_SEQ, label=MARKER_LABEL)


def start_generation(lake: Lake, relations: Mapping[str, tuple[Relation, list[ColumnType]]],
                     *, lsn: Lsn, ts_us: int, generation: int) -> list[str]:
    """Write a truncate marker for every snapshotted table the lake already holds.

    Returns the tables marked. Tables in raw that this snapshot does not cover keep their
    old staged state (logged: their changes during the gap are not in the lake).
    """
    present = tables_in_raw(lake)
    sink = RawSink(lake)
    marked = []
    for name, (relation, types) in sorted(relations.items()):
        if table_segment(relation.schema, relation.name) in present:
            sink.write(truncate_marker(relation, types, lsn=lsn, ts_us=ts_us))
            marked.append(name)
    covered = {table_segment(r.schema, r.name) for r, _ in relations.values()}
    left = sorted(present - covered)
    if left:
        log.warning("snapshot_generation_leaves_tables", tables=left, generation=generation,
                    reason="in the lake but not in this snapshot: their changes while the "
                    "slot was gone are not in the lake; snapshot them too (--tables)")
    log.info("snapshot_generation_started", generation=generation, lsn=format_lsn(lsn),
             tables_reset=len(marked))
    return marked


def slot_gone(slot: str, checkpoint: Lsn) -> SlotError:
    """The error of a stream whose checkpointed slot no longer exists (invariant 10)."""
    return SlotError(
        f"slot {slot!r} is gone but the lake's checkpoint followed it up to "
        f"{format_lsn(checkpoint)}: a new slot would start at the server's current position "
        "and the changes in between would be missing from the lake",
        fix=f"take a new snapshot into it: cdc snapshot --slot {slot} (a new snapshot "
        "generation: every staged table is rebuilt as of its start), then cdc stream")
