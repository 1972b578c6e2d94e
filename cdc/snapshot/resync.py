"""``cdc resync``: re-read one table while ``cdc stream`` runs, and replace its staged state.

In the manner of DBLog and Debezium's incremental snapshots, with no lock held: the table is
read in key order, one chunk at a time, each between two watermarks written into the WAL
(``pg_logical_emit_message``, non-transactional, so each has an exact WAL position):

1. ``start``: a truncate row lands in raw at its position: staged is replaced from there
   (no phantom rows survive), raw keeps its history, append-only.
2. Per chunk: ``low`` (L), the chunk's ``SELECT`` (a snapshot taken after L), ``high`` (H).
   Once the stream's checkpoint passes H, every change committed between L and H is in raw;
   the chunk's rows of the keys those changes touched are dropped (the change is the newer
   truth, and the read may have seen either side of it), and so are those of transactions
   the snapshot saw as running (a commit written before L may not be visible yet); the rest
   land in raw as ``_op = 'r'`` rows just before H. Changes before L are in the read;
   changes after H order after.
3. While it runs, ``_cdc/resync/<table>.json`` holds compaction of the table below the next
   position a chunk will land at; at the end it is released.

A table without a key cannot be read in key order: it is read whole, in chunks, in the
snapshot a temporary replication slot exports at its consistent point ``P`` (no lock: the
slot waits for the transactions running when it is created, the application does not wait
for anything). Every transaction that snapshot holds committed before ``P``, and every one it
misses commits at or after ``P``: a truncate at (``P``, lowest ``_seq``) and the rows at ``P``
with negative ``_seq`` order between the two, as a consistent snapshot's rows do, so the
re-read is exact for keyless (insert-only) tables too, duplicates and all.

This is the way out where the WAL cannot help: a rewriting ``ALTER COLUMN ... TYPE``, a
``DROP`` + re-``CREATE`` of a table, rows dropped from the WAL history by a value the stream
could not store, a table added to the publication after its rows were written (``cdc stream``
does that one itself: ``snapshot/backfill.py``). A resync that stops half-way leaves
compaction of the table held: run it again.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog
from psycopg import sql

from cdc import faults
from cdc.config import Settings
from cdc.decoding.pgtypes import ColumnType, column_type
from cdc.errors import ConfigError, ResyncBusy, SourceError
from cdc.events import Lsn, Relation, format_lsn, parse_lsn
from cdc.lake import lease
from cdc.lake.checkpoint import CheckpointStore, ResyncHold
from cdc.lake.layout import RAW, raw_keys, table_segment
from cdc.lake.raw import RawSink
from cdc.lake.store import Lake
from cdc.snapshot.consistent import (
    CHUNK_SEQ_STRIDE,
    SNAPSHOT_SEQ_BASE,
    chunk_filter,
    select_query,
    snapshot_batch,
)
from cdc.snapshot.generation import MARKER_SEQ
from cdc.snapshot.planning import plan_table
from cdc.snapshot.readers import csv_columns
from cdc.source.admin import Admin, parse_table_name
from cdc.source.catalog import column_facts
from cdc.source.connection import connect, translated
from cdc.source.replication import exported_snapshot
from cdc.stream.batcher import Batch, raw_table

log = structlog.get_logger("cdc.snapshot.resync")

PREFIX = "cdc.resync"


class ResyncStopped(Exception):
    """The stream a backfill runs in stops: the resync is abandoned (its hold stays; the
    next start runs it again)."""


@dataclass(frozen=True)
class ResyncResult:
    table: str
    rows: int  # rows written into raw
    dropped: int  # rows of keys changed while their chunk was read (the change stands)
    chunks: int
    start: Lsn  # the truncate's position: staged is replaced from here


class Resync:
    def __init__(self, settings: Settings, lake: Lake, table: str, *, chunk_rows: int = 100_000,  # noqa: PLR0913  keyword-only tuning and hooks
                 wait_seconds: float = 300.0,
                 after_chunk: Callable[[int], None] | None = None,
                 stopping: Callable[[], bool] | None = None) -> None:
        self.settings, self.lake = settings, lake
        self.schema, self.name = parse_table_name(table)
        self.chunk_rows = chunk_rows
        self.wait_seconds = wait_seconds
        self.after_chunk = after_chunk  # tests: write while a resync runs; backfill progress
        self.stopping = stopping or (lambda: False)
        self.sink = RawSink(lake)
        self.checkpoint = CheckpointStore(lake, settings.slot)

    def run(self) -> ResyncResult:
        self.lake.check_writable()
        with connect(self.settings.dsn) as conn:
            admin = Admin(conn, self.settings.dsn)
            relation, type_names = admin.describe_table(self.schema, self.name)
            if self.checkpoint.load() is None:
                raise ConfigError(f"slot {self.settings.slot} has no checkpoint in "
                                  f"{self.lake.uri}: a resync needs the stream",
                                  fix="start cdc stream first, then run cdc resync")
            facts = admin.type_facts(relation)
            types = [column_type(c.type_oid, c.type_modifier, type_names.get(c.type_oid),
                                 facts) for c in relation.columns]
            cfacts = column_facts(conn, self.settings.dsn, self.schema, self.name)
            segment = table_segment(relation.schema, relation.name)
            held = self._only_one(relation, segment)
            try:
                hold = ResyncHold(self.lake, segment)
                # a hold from before (a quarantined batch, a resync that stopped) stays
                # until this one is done; otherwise hold below the next position a row lands at
                prior = hold.load()
                hold.hold(admin.current_wal_lsn() if prior is None else prior)
                if relation.key_columns:
                    result = self._by_key(conn, admin, relation, types=types, cfacts=cfacts,
                                          hold=hold, prior=prior)
                else:
                    result = self._whole(conn, relation, types, cfacts)
                held.fence()  # still ours: no other resync released the hold meanwhile
                hold.release()
            finally:
                held.release()
        log.info("resync_done", table=relation.qualified_name, rows=result.rows,
                 chunks=result.chunks)
        return result

    def _only_one(self, relation: Relation, segment: str) -> lease.Lease:
        """The table's resync lease (``_cdc/leases/resync/<table>/``): a second resync of
        the table (a manual one beside a stream's backfill, say) would release the hold the
        first still needs when it finishes, and the first's later chunks would land below
        staged's watermark."""
        got = lease.try_acquire(self.lake, f"resync/{segment}", "cdc resync")
        if not isinstance(got, lease.Lease):
            raise ResyncBusy(f"a resync of {relation.qualified_name} runs already "
                             f"({got.describe()})",
                             fix="wait for it to finish (cdc status shows a stream's "
                             "backfills; a stopped one's lease expires within a minute), "
                             "then run cdc resync again if you still need to")
        return got

    def _by_key(self, conn: psycopg.Connection[Any], admin: Admin,  # noqa: PLR0913  the table's facts, read once in run()
                relation: Relation, *, types: list[ColumnType],
                cfacts: dict[str, dict[str, str]], hold: ResyncHold,
                prior: Lsn | None) -> ResyncResult:
        """Chunks in key order, each between two watermarks (the module's steps 1-3)."""
        key = list(relation.key_columns)
        # positions are the watermark's end - 1: after every commit before the message,
        # before every commit after it, and below a checkpoint at the message's end
        start = self._emit(conn, relation, "start") - 1
        self.sink.write(self._truncate(relation, types, start, cfacts))
        rows = dropped = chunks = 0
        after: list[str] | None = None
        while True:
            if self.stopping():
                raise ResyncStopped(relation.qualified_name)
            hold.hold(admin.current_wal_lsn() if prior is None else prior)
            low = self._emit(conn, relation, "low", chunks)
            with translated(self.settings.dsn), conn.transaction():
                # one snapshot for the chunk, and the transactions it sees as running:
                # one may have written its commit before ``low`` and still be invisible
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                snap = conn.execute("SELECT pg_current_snapshot()::text").fetchone()
                columns = csv_columns(conn, select_query(
                    relation, self._after(key, after), self._tail(key)),
                    len(relation.columns))
            assert snap is not None
            running = [int(x) & 0xFFFFFFFF for x in str(snap[0]).split(":")[2].split(",")
                       if x]
            high = self._emit(conn, relation, "high", chunks) - 1
            n = len(columns[0])
            if n == 0:
                break
            last = [columns[[c.name for c in relation.columns].index(k)][n - 1]
                    for k in key]
            after = [str(v.as_py()) if isinstance(v, pa.Scalar) else str(v) for v in last]
            batch = snapshot_batch(relation, types, columns, lsn=high, first_seq=0,
                                   ts_us=int(time.time() * 1e6),
                                   label=f"s{start:016X}-{chunks:06d}",
                                   column_facts=cfacts)
            self._wait_for_stream(high + 1)
            kept = self._without_changed(batch.table, relation, key, low, high,
                                         running=running)
            dropped += batch.table.num_rows - kept.num_rows
            if kept.num_rows:
                self.sink.write(Batch(relation, kept, high, high, 0, batch.label))
            rows += kept.num_rows
            chunks += 1
            log.info("resync_chunk", table=relation.qualified_name, chunk=chunks,
                     rows=kept.num_rows, dropped=batch.table.num_rows - kept.num_rows,
                     at=format_lsn(high))
            faults.hit("resync.after_chunk", table=relation.qualified_name, chunk=chunks)
            if self.after_chunk is not None:
                self.after_chunk(chunks)
            if n < self.chunk_rows:
                break
        return ResyncResult(relation.qualified_name, rows, dropped, chunks, start)

    def _whole(self, conn: psycopg.Connection[Any], relation: Relation,
               types: list[ColumnType], cfacts: dict[str, dict[str, str]]) -> ResyncResult:
        """A table without a key, read whole in a temporary slot's snapshot at its point."""
        s = self.settings
        temporary = f"{s.slot[:40]}_resync_{uuid.uuid4().hex[:8]}"
        rows = chunks = 0
        with translated(s.dsn), conn.transaction():
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            with exported_snapshot(s.dsn, temporary, s.plugin, temporary=True) as (
                    point, snapshot):
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
            # imported: the snapshot is this transaction's now; the temporary slot is gone
            log.info("resync_snapshot_taken", table=relation.qualified_name, at=format_lsn(point))
            self.sink.write(self._truncate(relation, types, point, cfacts, seq=MARKER_SEQ))
            for bounds in plan_table(conn, relation, self.chunk_rows).chunks:
                if self.stopping():
                    raise ResyncStopped(relation.qualified_name)
                columns = csv_columns(conn, select_query(relation, chunk_filter(relation, bounds)),
                                      len(relation.columns))
                if len(columns[0]):
                    self.sink.write(snapshot_batch(
                        relation, types, columns, lsn=point,
                        first_seq=SNAPSHOT_SEQ_BASE + chunks * CHUNK_SEQ_STRIDE,
                        ts_us=int(time.time() * 1e6), label=f"s{point:016X}-{chunks:06d}",
                        column_facts=cfacts))
                rows += len(columns[0])
                chunks += 1
                log.info("resync_chunk", table=relation.qualified_name, chunk=chunks,
                         rows=len(columns[0]), at=format_lsn(point))
                faults.hit("resync.after_chunk", table=relation.qualified_name, chunk=chunks)
                if self.after_chunk is not None:
                    self.after_chunk(chunks)
        return ResyncResult(relation.qualified_name, rows, 0, chunks, point)

    def _emit(self, conn: psycopg.Connection[Any], relation: Relation, phase: str,
              chunk: int = 0) -> Lsn:
        """A watermark: a non-transactional logical message; the WAL position past it."""
        body = json.dumps({"table": relation.qualified_name, "phase": phase, "chunk": chunk})
        with translated(self.settings.dsn):
            row = conn.execute("SELECT pg_logical_emit_message(false, %s, %s)::text",
                               (PREFIX, body)).fetchone()
        assert row is not None
        return parse_lsn(str(row[0]))

    def _truncate(self, relation: Relation, types: list[ColumnType], at: Lsn,
                  cfacts: dict[str, dict[str, str]], *, seq: int = 0) -> Batch:
        one = [pa.chunked_array([pa.nulls(1, pa.string())]) for _ in relation.columns]
        table = raw_table(relation, types, one, ops=pa.array(["t"]),
                          lsns=pa.array([at], pa.int64()),
                          commit_lsns=pa.array([at], pa.int64()),
                          seqs=pa.array([seq], pa.int64()), xids=pa.array([0], pa.int64()),
                          commit_ts=pa.array([int(time.time() * 1e6)], pa.int64()),
                          unchanged=pa.nulls(1, pa.list_(pa.string())), column_facts=cfacts)
        return Batch(relation, table, at, at, seq, f"s{at:016X}-t")

    def _wait_for_stream(self, lsn: Lsn) -> None:
        deadline = time.monotonic() + self.wait_seconds
        while (CheckpointStore(self.lake, self.settings.slot).load() or 0) < lsn:
            if self.stopping():
                raise ResyncStopped(format_lsn(lsn))
            if time.monotonic() > deadline:
                raise SourceError(
                    f"the stream's checkpoint did not reach {format_lsn(lsn)} within "
                    f"{self.wait_seconds:.0f}s: cdc resync needs cdc stream running on slot "
                    f"{self.settings.slot}",
                    fix="start cdc stream (it keeps running beside the resync), then run "
                    "cdc resync again")
            time.sleep(0.2)

    def _without_changed(self, rows: pa.Table, relation: Relation, key: list[str], low: Lsn,
                         high: Lsn, *, running: list[int]) -> pa.Table:
        """The chunk without the keys of changes committed between ``low`` and ``high``, or
        before ``high`` by a transaction the chunk's snapshot saw as running."""
        segment = table_segment(relation.schema, relation.name)
        changed: list[pa.Table] = []
        for k in raw_keys(self.lake.list(RAW + segment + "/")).get(segment, []):
            if k.last_commit_lsn < low or k.first_commit_lsn > high or k.first_seq is None:
                continue
            data = self.lake.read_bytes(k.key)
            if data is None:
                continue
            part = pq.read_table(pa.BufferReader(data))
            unseen = pc.or_(pc.greater_equal(part["_commit_lsn"], low),
                            pc.is_in(part["_xid"], value_set=pa.array(running, pa.int64())))
            inside = pc.and_(unseen, pc.less(part["_commit_lsn"], high))
            if all(c in part.column_names for c in key):
                changed.append(part.filter(inside).select(key).cast(rows.select(key).schema))
        if not changed:
            return rows
        touched = pa.concat_tables(changed)
        if touched.num_rows == 0:
            return rows
        # Acero's join cannot carry list columns (_unchanged): join row numbers, take rows
        numbered = rows.select(key).append_column(
            "__cdc_i", pa.array(range(rows.num_rows), pa.int64()))
        kept = numbered.join(touched.group_by(key).aggregate([]), keys=key,
                             join_type="left anti")
        index = kept["__cdc_i"].combine_chunks()
        return rows.take(index.take(pc.sort_indices(index)))

    @staticmethod
    def _after(key: list[str], after: list[str] | None) -> sql.Composable:
        if after is None:
            return sql.SQL("true")
        return sql.SQL("({}) > ({})").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in key),
            sql.SQL(", ").join(sql.Literal(v) for v in after))

    def _tail(self, key: list[str]) -> sql.Composable:
        return sql.SQL(" ORDER BY {} LIMIT {}").format(
            sql.SQL(", ").join(sql.Identifier(k) for k in key), sql.Literal(self.chunk_rows))
