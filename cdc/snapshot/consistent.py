"""Backfills into the raw layer: a consistent snapshot tied to the slot, and ``updated_at``.

Consistent mode creates the slot with an exported snapshot and reads every
published table inside that snapshot, so the rows (``_op = 'r'``) and the
slot's start describe the same instant: ``cdc stream`` continues exactly
where the snapshot ends. Tables are split into chunks (``planning``) read by the
fastest reader (``readers``: a binary COPY parsed by the compiled core).

Snapshot rows carry ``_commit_lsn`` = the consistent point and a negative
``_seq`` (unique per table), so they order before every streamed change.
A resumed snapshot (the process that held the exported snapshot died) keeps the tables it
finished and re-reads every unfinished table whole in a new snapshot tied to a known LSN
(see ``ConsistentSnapshot._resume`` for why only a whole table is exact).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import structlog
from psycopg import sql

from cdc import faults
from cdc.config import Settings
from cdc.decoding.pgtypes import ColumnType, column_type
from cdc.errors import SlotError, SourceError
from cdc.events import Lsn, Relation, format_lsn
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.contracts import Contracts
from cdc.lake.raw import RawSink
from cdc.lake.store import Lake
from cdc.snapshot.generation import start_generation, truncate_marker
from cdc.snapshot.planning import plan_table
from cdc.snapshot.progress import SUPERSEDED, Progress, ProgressDisplay, progress_key
from cdc.snapshot.readers import TextReader, open_reader
from cdc.source import publication
from cdc.source.admin import Admin, parse_table_name
from cdc.source.catalog import ColumnFacts, column_facts
from cdc.source.connection import connect
from cdc.source.replication import exported_snapshot
from cdc.stream.batcher import Batch, raw_table

log = structlog.get_logger("cdc.snapshot.consistent")

SNAPSHOT_SEQ_BASE = -(2**62)
CHUNK_SEQ_STRIDE = 2**32
# -- reading a chunk ------------------------------------------------------------------------------

def chunk_filter(relation: Relation, bounds: dict[str, Any]) -> sql.Composable:
    """The WHERE condition of one chunk."""
    kind = bounds["kind"]
    if kind == "all":
        return sql.SQL("true")
    if kind == "pk":
        column = sql.Identifier(bounds["column"])
        parts = []
        if bounds.get("lo") is not None:
            parts.append(sql.SQL("{} >= {}").format(column, sql.Literal(bounds["lo"])))
        if bounds.get("hi") is not None:
            parts.append(sql.SQL("{} < {}").format(column, sql.Literal(bounds["hi"])))
        return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")
    # ctid block ranges (TID range scans, PostgreSQL 14+)
    parts = []
    if bounds.get("lo") is not None:
        parts.append(sql.SQL("ctid >= {}::tid").format(sql.Literal(f"({bounds['lo']},0)")))
    if bounds.get("hi") is not None:
        parts.append(sql.SQL("ctid < {}::tid").format(sql.Literal(f"({bounds['hi']},0)")))
    return sql.SQL(" AND ").join(parts) if parts else sql.SQL("true")


_NO_TAIL = sql.SQL("")


def select_query(relation: Relation, where: sql.Composable,
                 tail: sql.Composable = _NO_TAIL) -> sql.Composed:
    columns = sql.SQL(", ").join(sql.Identifier(c.name) for c in relation.columns)
    table = sql.Identifier(relation.schema, relation.name)
    return sql.SQL("COPY (SELECT {} FROM {} WHERE {}{}) TO STDOUT (FORMAT csv)").format(
        columns, table, where, tail)


def snapshot_batch(relation: Relation, types: Sequence[ColumnType],  # noqa: PLR0913  the batch's constant columns, by keyword
                   columns: Sequence[pa.ChunkedArray], *, lsn: Lsn, first_seq: int, ts_us: int,
                   label: str, column_facts: ColumnFacts | None = None) -> Batch:
    """Rows read at ``lsn`` as a raw batch of ``_op = 'r'`` rows."""
    n = len(columns[0]) if columns else 0
    # constant columns built in Arrow, not from Python lists: this runs under the GIL
    table = raw_table(
        relation, types, columns,
        ops=pa.repeat(pa.scalar("r", pa.string()), n),
        lsns=pa.repeat(pa.scalar(lsn, pa.int64()), n),
        commit_lsns=pa.repeat(pa.scalar(lsn, pa.int64()), n),
        seqs=pa.arange(first_seq, first_seq + n),
        xids=pa.repeat(pa.scalar(0, pa.int64()), n),
        commit_ts=pa.repeat(pa.scalar(ts_us, pa.int64()), n),
        unchanged=pa.nulls(n, pa.list_(pa.string())), column_facts=column_facts,
    )
    return Batch(relation, table, lsn, lsn, first_seq, label=label,
                 constant=("_lsn", "_commit_lsn", "_xid", "_commit_ts"))


# -- the consistent snapshot ----------------------------------------------------------------------

@dataclass
class SnapshotResult:
    consistent_point: Lsn
    rows: dict[str, int]
    resumed: bool
    already_done: bool = False


class ConsistentSnapshot:
    def __init__(self, settings: Settings, lake: Lake, *, workers: int = 2,
                 chunk_rows: int = 500_000,
                 reader: Callable[[str, str | None], TextReader] = open_reader) -> None:
        self.settings = settings
        self.lake = lake
        self.workers = max(1, workers)
        self.chunk_rows = chunk_rows
        self.sink = RawSink(lake)
        self.contracts = Contracts.load(settings.contracts)
        self.lock = threading.Lock()
        self.open_reader = reader  # the fastest available; tests cover each
        self.column_facts: dict[str, ColumnFacts] = {}  # attnums and ADD COLUMN defaults
        self.display: ProgressDisplay | None = None

    def run(self) -> SnapshotResult:
        s = self.settings
        self.lake.check_writable()
        stored = self.lake.read_bytes(progress_key(s.slot))
        with connect(s.dsn) as conn:
            publication.prepare(conn, s)  # cdc check's findings first
            admin = Admin(conn, s.dsn)
            relations = self._relations(admin)
            existing = admin.slot(s.slot)
            previous = Progress.from_json(stored) if stored is not None else None
            if existing is not None and previous is not None and previous.status != SUPERSEDED:
                if previous.status == "done":
                    log.info("snapshot_already_done", slot=s.slot)
                    return SnapshotResult(previous.consistent_point, {}, resumed=False,
                                          already_done=True)
                return self._resume(previous, relations)
            if existing is not None:
                raise SlotError(
                    f"slot {s.slot!r} already exists; a consistent snapshot must create its "
                    "slot so that both start at the same instant",
                    fix=f"snapshot into a new slot (--slot another_name), or drop this one with "
                    f"`cdc slot drop --slot {s.slot}` (its changes not yet in the lake are then "
                    "covered by the new snapshot)")
        # no slot: the lake's first snapshot of it, or a new generation over a gone slot
        # (an unfinished snapshot whose slot is gone, or a checkpoint the slot followed)
        follows = previous is not None or CheckpointStore(self.lake, s.slot).load() is not None
        generation = (previous.generation if previous is not None else 1) + int(follows)
        if previous is not None:  # a crash from here on must not find it "done" or resumable
            previous.status = SUPERSEDED
            self.lake.write_bytes(progress_key(s.slot), previous.to_json())
        with exported_snapshot(s.dsn, s.slot, s.plugin) as (consistent_point, snapshot_name):
            log.info("snapshot_slot_created", slot=s.slot, lsn=format_lsn(consistent_point),
                     snapshot=snapshot_name)
            with connect(s.dsn) as conn:
                conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(
                    sql.Literal(snapshot_name)))
                plans = {r.qualified_name: plan_table(conn, r, self.chunk_rows)
                         for r, _ in relations.values()}
                conn.execute("COMMIT")
            progress = Progress(s.slot, consistent_point, int(time.time() * 1e6), plans,
                                generation=generation)
            if follows:  # before the progress file: a crash before it starts over
                start_generation(self.lake, relations, lsn=consistent_point,
                                 ts_us=progress.snapshot_ts_us, generation=generation)
            self.lake.write_bytes(progress_key(s.slot), progress.to_json())
            # the replication connection stays open (idle) while workers import its snapshot
            return self._copy(progress, relations, snapshot_name=snapshot_name, resumed=False)

    def _resume(self, progress: Progress,
                relations: dict[str, tuple[Relation, list[ColumnType]]]) -> SnapshotResult:
        """Finish a snapshot whose exported snapshot is gone, in a new one at a known LSN.

        Finished tables keep their rows. A table with an unfinished chunk is re-read whole in
        a snapshot exported by a temporary slot at LSN ``L``, its rows labelled ``L``: reading
        only its unfinished chunks in a later snapshot is not exact. Between the consistent
        point and ``L`` a row can leave an unfinished chunk for a finished one (an update that
        moves it to another page of a ctid-chunked table, a key changed into a finished key
        range): neither read holds it, and its streamed update carries only the
        unchanged-TOAST marker. Read at ``L``, every row alive at ``L`` has its full value there;
        the changes streamed before ``L`` only touch rows that ``L`` replaces or that died
        before ``L``, and those after it apply to exact rows. A keyless table cannot be
        deduplicated (rows inserted before ``L`` would land as streamed inserts *and* as rows
        read at ``L``), so it gets a truncate marker at ``L`` too: compaction drops its older
        rows and the changes streamed before ``L``.
        """
        s = self.settings
        redo = [n for n, plan in progress.tables.items()
                if len(plan.done) < len(plan.chunks) and n in relations]
        if not redo:
            return self._copy(progress, relations, snapshot_name=None, resumed=True)
        temporary = f"{s.slot[:40]}_resume_{uuid.uuid4().hex[:8]}"
        with exported_snapshot(s.dsn, temporary, s.plugin, temporary=True) as (
                point, snapshot_name):
            for name in redo:
                plan = progress.tables[name]
                plan.done.clear()
                plan.point = point
                relation, types = relations[name]
                if not any(c.is_key for c in relation.columns):
                    RawSink(self.lake).write(truncate_marker(relation, types, lsn=point,
                                                             ts_us=progress.snapshot_ts_us))
            self.lake.write_bytes(progress_key(s.slot), progress.to_json())
            log.info("snapshot_unfinished_tables_reread", tables=redo, lsn=format_lsn(point))
            return self._copy(progress, relations, snapshot_name=snapshot_name, resumed=True)

    def _relations(self, admin: Admin) -> dict[str, tuple[Relation, list[ColumnType]]]:
        published = admin.published_tables(self.settings.publication)
        wanted = {parse_table_name(t) for t in self.settings.tables}
        result = {}
        for schema, table in published:
            if wanted and (schema, table) not in wanted:
                continue
            relation, type_names = admin.describe_table(schema, table)
            facts = admin.type_facts(relation)
            types = [column_type(c.type_oid, c.type_modifier, type_names.get(c.type_oid), facts)
                     for c in relation.columns]
            self.contracts.check_schema(relation, types)  # ContractError under policy fail
            result[relation.qualified_name] = (relation, types)
            self.column_facts[relation.qualified_name] = column_facts(
                admin.conn, admin.dsn, schema, table)
        if not result:
            raise SourceError("no tables to snapshot",
                              fix="check --tables against the publication's tables")
        return result

    def _copy(self, progress: Progress, relations: dict[str, tuple[Relation, list[ColumnType]]],
              *, snapshot_name: str | None, resumed: bool) -> SnapshotResult:
        todo = [(name, i) for name, plan in progress.tables.items()
                for i in range(len(plan.chunks)) if str(i) not in plan.done]
        log.info("snapshot_copying", tables=len(progress.tables), chunks=len(todo),
                 workers=self.workers, resumed=resumed,
                 consistent_point=format_lsn(progress.consistent_point))
        missing = sorted(set(progress.tables) - set(relations))
        if missing:
            raise SourceError(f"tables of the unfinished snapshot are no longer published: "
                              f"{', '.join(missing)}",
                              fix="publish them again, or start over by deleting "
                              f"{progress_key(self.settings.slot)} and dropping the slot")
        self.display = display = ProgressDisplay(progress)
        queue = list(reversed(todo))
        failed = threading.Event()  # one worker's error stops the others at their next chunk

        def worker() -> None:
            # two stages per worker: chunk N is converted and written on the writer thread
            # (pyarrow's casts and parquet encoding release the GIL) while chunk N+1 is read,
            # so the worker's server backend never waits for the write (docs/benchmarks.md)
            reader = self.open_reader(self.settings.dsn, snapshot_name)
            writer = ThreadPoolExecutor(1, thread_name_prefix="snapshot-write")
            written: Future[int] | None = None
            try:
                while not failed.is_set():
                    with self.lock:
                        if not queue:
                            break
                        name, index = queue.pop()
                    relation, types = relations[name]
                    columns = self._read_chunk(reader, progress, relation, index)
                    if written is not None:
                        written.result()  # at most one chunk waits to be written
                    written = writer.submit(self._write_chunk, progress, relation, types,
                                            index, columns)
                if written is not None:
                    written.result()
            except BaseException:
                failed.set()
                raise
            finally:
                writer.shutdown(wait=True)
                reader.close()

        with ThreadPoolExecutor(self.workers, thread_name_prefix="snapshot") as pool:
            futures = [pool.submit(worker) for _ in range(min(self.workers, len(todo)) or 1)]
            for future in futures:
                future.result()
        display.finish()
        CheckpointStore(self.lake, self.settings.slot).save(progress.consistent_point)
        progress.status = "done"
        self.lake.write_bytes(progress_key(self.settings.slot), progress.to_json())
        from cdc.snapshot.backfill import Backfills  # it runs resyncs, which use this module

        superseded = Backfills(self.lake, self.settings.slot).superseded(
            list(progress.tables), progress.snapshot_ts_us)
        if superseded:
            log.info("snapshot_superseded_backfills", tables=superseded,
                     note="copied by this snapshot: no re-read needed")
        rows = {name: sum(plan.done.values()) for name, plan in progress.tables.items()}
        log.info("snapshot_done", rows=sum(rows.values()), tables=len(rows))
        return SnapshotResult(progress.consistent_point, rows, resumed)

    def _read_chunk(self, reader: TextReader, progress: Progress, relation: Relation,
                    index: int) -> list[pa.ChunkedArray]:
        plan = progress.tables[relation.qualified_name]
        return reader.read(relation, chunk_filter(relation, plan.chunks[index]))

    def _write_chunk(self, progress: Progress, relation: Relation,
                     types: list[ColumnType], index: int,
                     columns: list[pa.ChunkedArray]) -> int:
        """Convert and write a chunk read by ``_read_chunk``, then record it as done."""
        plan = progress.tables[relation.qualified_name]
        rows = len(columns[0]) if columns else 0
        if rows:
            point = plan.point if plan.point is not None else progress.consistent_point
            batch = snapshot_batch(relation, types, columns, lsn=point,
                                   first_seq=SNAPSHOT_SEQ_BASE + index * CHUNK_SEQ_STRIDE,
                                   ts_us=progress.snapshot_ts_us, label=f"r{index:06d}",
                                   column_facts=self.column_facts.get(relation.qualified_name))
            self.contracts.write(self.sink, batch)
        with self.lock:
            plan.done[str(index)] = rows
            self.lake.write_bytes(progress_key(self.settings.slot), progress.to_json())
            if self.display is not None:
                self.display.chunk_done(relation.qualified_name, rows)
        faults.hit("snapshot.after_chunk", table=relation.qualified_name, index=index)
        return rows
