"""Raw changes → history Delta tables (``history/<schema>.<table>/``), exactly once.

A history table holds one row per committed version of each key (``versions.py``). It is
maintained beside the staged table from the same raw files, with its own watermark: app
transaction ``cdc-history`` with version ``w`` in the Delta commit that wrote the data,
meaning "every change of a commit LSN up to ``w`` is in history" (whole LSNs: a backfill
at one LSN sorts before that LSN's streamed changes). It is re-read and checked before
every commit, so a crash before a commit changes nothing, a crash after it leaves the new
watermark, and a rerun continues exactly after it: no version is added or lost. A change
at or before its key's current version, or the end of one of its closed versions, is
skipped, so re-reading one is harmless (a deleted key has only the latter).

Slices hold whole transactions (one version per key per transaction needs every change of
the transaction at once): a chunk ends before a file that starts at a later commit LSN, or
between the files of a backfill (one read per key, so its keys are independent); a
streamed transaction larger than the chunk limits is read whole. The last slice ends at
the checkpoint like staged's, (checkpoint, 0): a backfill at the checkpoint LSN is in, and
re-read (and skipped) by the next run until the stream moves past it.

Each chunk is incremental: one MERGE per touched file group (``staged/target.py``, as
staged merges) closes the current versions of the changed keys (matched on key and
``_is_current``: set ``_valid_to``, ``_valid_to_lsn``, ``_ended_by``) and inserts the new
versions, sorted by key so a key's versions stay clustered; the versions of keys outside
every file are appended last. The last commit records the watermark. Without closes it is
an append. Tables without a key have no history: raw is already theirs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake

from cdc import faults
from cdc.errors import CompactionError, HistoryTableUnreadable
from cdc.events import Lsn, format_lsn
from cdc.history.lookup import current_versions, ended_versions
from cdc.history.retype import conformed, retyped, widened_parts, with_types
from cdc.history.versions import HISTORY_META, Plan, plan_versions
from cdc.lake.layout import history_key
from cdc.lake.store import Lake
from cdc.staged.commits import (
    check_watermark,
    configuration,
    cut,
    ensure_file_size,
    slices,
    table_lock,
    translated,
)
from cdc.staged.compactor import CompactOptions, open_staged
from cdc.staged.files import RawFile
from cdc.staged.merge import Pos, between, dedupe, staged_columns, unify
from cdc.staged.moves import COLUMNS, fill_borrowed, plan_moves_around_truncates
from cdc.staged.target import INSERT, flagged, match, merge_groups, quote, split

log = structlog.get_logger("cdc.history")

APP_ID = "cdc-history"
_MIN = -(2**63)


@dataclass(frozen=True)
class HistoryResult:
    table: str
    changes: int  # changes read (replayed copies dropped)
    opened: int  # versions added
    closed: int  # versions that were current and got closed
    commits: int
    watermark: Lsn | None  # every change of a commit LSN <= watermark is in history
    version: int | None  # Delta version after the run (None: no history table yet)
    seconds: float


def history_location(lake: Lake, table: str) -> tuple[str, dict[str, str] | None]:
    """The Delta table URI of ``table``'s history and the storage options to open it."""
    return lake.delta_location(history_key(table))


def history_watermark(lake: Lake, table: str) -> Lsn | None:
    """Every change of a commit LSN <= watermark is in ``table``'s history; None: none yet."""
    uri, storage = history_location(lake, table)
    try:
        dt = open_staged(uri, storage)
    except Exception as exc:  # delta-rs raises DeltaError and plain Exception
        raise HistoryTableUnreadable(uri, exc) from exc
    return dt.transaction_version(APP_ID) if dt is not None else None


def table_key(schema: pa.Schema, override: Sequence[str] | None) -> tuple[str, ...]:
    """The named key, or the primary key recorded in the raw schema (may be empty)."""
    recorded = (schema.metadata or {}).get(b"cdc_key", b"").decode()
    return tuple(override or ()) or tuple(k for k in recorded.split(",") if k)


def keyed(lake: Lake, newest: RawFile | None, key: Sequence[str] | None = None) -> bool:
    """Whether the table has a key (so a history), from its newest raw file's footer (no
    data read; ``staged.files.newest_file`` finds it without listing all of raw)."""
    if key or newest is None:  # no file: nothing to decide by, let the listing tell
        return True
    try:
        schema = pq.read_schema(newest.key, filesystem=lake.arrow_filesystem())
    except FileNotFoundError:  # gone meanwhile: let the chunk reader report it
        return True
    return bool(table_key(schema, None))


def compact_history(  # noqa: PLR0913  the table, its raw files, bound and settings
    lake: Lake, table: str, files: list[RawFile], bound: Lsn, *,
    key: Sequence[str] | None = None, options: CompactOptions | None = None,
    fence: Callable[[], None] = lambda: None,
) -> HistoryResult | None:
    """Bring ``table``'s history up to the checkpoint ``bound``; None for a keyless table.
    ``fence`` runs right before each commit (the table's lease must still be ours)."""
    writer = _HistoryWriter(lake, table, key, options or CompactOptions(), fence)
    started = time.monotonic()
    pa.default_memory_pool().release_unused()  # what the staged pass before it left there
    with table_lock(writer.uri), translated(
            f"writing the history of {table} into {writer.uri}",
            fix="fix the cause and run cdc compact again; versions written are never "
            "written twice"):
        counts = writer.run(files, bound)
    if counts is None:
        return None
    dt = open_staged(writer.uri, writer.storage)
    result = HistoryResult(table, *counts, dt.transaction_version(APP_ID) if dt else None,
                           dt.version() if dt else None, round(time.monotonic() - started, 3))
    log.info("history_compacted", **{**asdict(result), "watermark": format_lsn(result.watermark)
                                     if result.watermark is not None else None})
    return result


class _HistoryWriter:
    def __init__(self, lake: Lake, table: str, key: Sequence[str] | None,
                 options: CompactOptions, fence: Callable[[], None]) -> None:
        self.lake, self.table, self.key_override, self.options = lake, table, key, options
        self.fence = fence
        # history's sorted versions compress better than staged rows (a 16 MiB file held
        # 818k of them against ~500k): half the size keeps a group's MERGE (whose memory
        # follows its rows, staged/target.py) as small as staged's
        self.file_bytes = max(1, options.file_bytes // 2)
        self.uri, self.storage = history_location(lake, table)
        self.fs = lake.arrow_filesystem()
        self.independent: dict[Lsn, bool] = {}  # a transaction's keys are independent

    def run(self, files: list[RawFile], bound: Lsn) -> tuple[int, int, int, int] | None:
        if files and not keyed(self.lake, files[-1], self.key_override):
            return None
        dt = open_staged(self.uri, self.storage)
        before = dt.version() if dt else 0
        watermark = dt.transaction_version(APP_ID) if dt else None
        cursor: Pos = (-1 if watermark is None else watermark + 1, _MIN)
        end: Pos = (bound, 0)  # changes below it are complete (the stream's checkpoint)
        changes = opened = closed = commits = 0
        for rows, upper, clean in slices(files, cursor, end, self._read_chunk):
            key = table_key(rows.schema, self.key_override)
            if not key:
                return None
            moved = upper[0] - 1 if clean and upper[0] - 1 != watermark else None
            if dt is not None and rows.num_rows:
                dt = self._follow_types(dt, rows)
            plan = self._plan(dt, rows, key) if rows.num_rows else None
            if plan is not None and (moved is not None or plan.opened.num_rows
                                     or plan.closes.num_rows):
                dt = self._commit(dt, plan, key, watermark, moved)
                watermark = moved if moved is not None else watermark
                changes, commits = changes + rows.num_rows, commits + 1
                opened, closed = opened + plan.opened.num_rows, closed + plan.closes.num_rows
        if dt is not None and commits:
            self._maintain(dt, before)
        return changes, opened, closed, commits

    def _read_chunk(self, todo: list[RawFile], cursor: Pos,
                    end: Pos) -> tuple[pa.Table, Pos, set[str], bool]:
        """Whole transactions in [cursor, upper), up to the chunk limits; returns them,
        ``upper``, the files read completely and whether the cut is clean (every change of
        a commit LSN below upper's is then in hand, so the watermark moves to it - 1).

        A chunk ends before a file whose first commit LSN is past the cursor's (nothing
        unread lies below it: clean), or between the labelled files of the backfill at the
        cursor's LSN (not clean: such files hold one read per key, so the next chunk adds
        the other keys' first versions, and a rerun after a crash skips the keys whose
        version at that LSN is in, see ``versions.plan_versions``; nothing else is in such
        a chunk). A chunk that fills up inside a backfill past the cursor's LSN ends before
        the backfill (clean): the changes below it must not share an unclean chunk, as a
        rerun re-reads them and a key they leave deleted has no version to skip them by.
        A streamed transaction is cut only where it changes each key once, with no
        truncate and no unchanged TOAST value (``_one_change_per_key``): then, like a
        backfill, its keys are independent and a rerun skips those already in (not clean).
        """
        read: list[tuple[RawFile, pa.Table]] = []
        rows = nbytes = 0
        upper, clean, group = end, True, None
        for i, f in enumerate(todo):
            part = between(self._read(f), cursor, end)
            read.append((f, part))
            rows, nbytes = rows + part.num_rows, nbytes + part.nbytes
            full = rows >= self.options.chunk_rows or nbytes >= self.options.chunk_bytes
            if not full or i + 1 == len(todo):
                continue
            nxt = todo[i + 1]
            if nxt.first_lsn > max(cursor[0], f.first_lsn):  # rows below it are in hand
                upper = (nxt.first_lsn, _MIN)
                break
            if nxt.first_seq is None and f.first_seq is None:  # inside a backfill
                if f.first_lsn > cursor[0]:  # changes below it are in hand: cut before it
                    upper = (f.first_lsn, _MIN)
                else:  # the backfill at the cursor, nothing else in hand
                    upper, clean, group = (nxt.first_lsn, _MIN), False, nxt.first_lsn
                break
            if nxt.first_seq is not None and self._one_change_per_key(todo, nxt.first_lsn):
                if nxt.first_lsn > cursor[0]:  # changes below it are in hand: cut before it
                    upper = (nxt.first_lsn, _MIN)
                    break
                if nxt.first > cursor:  # inside the transaction at the cursor: its keys
                    upper, clean = nxt.first, False  # are independent
                    break
                # a replayed copy starting at the cursor: read on, or the cut never moves
        parts, done = cut(read, cursor, upper, group)
        return dedupe(unify(widened_parts(parts), self.table)), upper, done, clean

    def _one_change_per_key(self, todo: list[RawFile], lsn: Lsn) -> bool:
        """Whether the transaction at ``lsn`` changes each key once, truncates nothing and
        borrows no unchanged TOAST value (read from its files' key and metadata columns;
        a replayed copy of a change has its ``_seq``, so it counts once)."""
        if lsn not in self.independent:
            files = [g for g in todo if g.first_lsn <= lsn <= g.last_lsn]
            key = list(table_key(pq.read_schema(files[0].key, filesystem=self.fs),
                                 self.key_override))
            self.independent[lsn], parts = bool(key), []
            for g in files:
                part = pq.ParquetFile(g.key, filesystem=self.fs).read(
                    columns=[*key, "_op", "_commit_lsn", "_seq", "_unchanged"])
                part = part.filter(pc.equal(part["_commit_lsn"], lsn))
                if pc.any(pc.equal(part["_op"], "t")).as_py() or pc.max(
                        pc.list_value_length(part["_unchanged"])).as_py():
                    self.independent[lsn] = False
                    break
                parts.append(part.select([*key, "_seq"]))
            if self.independent[lsn]:
                rows = pa.concat_tables(parts, promote_options="permissive")
                self.independent[lsn] = (rows.group_by(key).aggregate([]).num_rows
                                         == pc.count_distinct(rows["_seq"]).as_py())
        return self.independent[lsn]

    def _read(self, f: RawFile) -> pa.Table:
        try:
            return pq.ParquetFile(f.key, filesystem=self.fs).read()
        except FileNotFoundError as exc:
            raise CompactionError(f"raw file {f.key} vanished while compacting {self.table}",
                                  fix="run cdc compact again") from exc

    def _plan(self, dt: DeltaTable | None, rows: pa.Table, key: tuple[str, ...]) -> Plan:
        """Convert the changes to the history table's types and plan them against its
        current versions of the changed keys (of every key at a truncate)."""
        rows = self._moved(dt, rows, key)
        target = None
        if dt is not None:
            schema = pa.schema(dt.schema().to_arrow())
            target = pa.schema([f for f in schema if f.name not in HISTORY_META])
            rows = conformed(rows, target)  # changes from before a type change it follows
        converted = staged_columns(rows, target, self.table)
        converted = (converted.append_column("_op", rows["_op"])
                     .append_column("_unchanged", rows["_unchanged"]))
        toasted = pc.unique(pc.list_flatten(rows["_unchanged"])).to_pylist()
        ended = None
        if dt is None:
            current = pa.table({**{k: pa.array([], converted.schema.field(k).type) for k in key},
                                "_valid_from_lsn": pa.array([], pa.int64())})
        else:
            current = current_versions(dt, converted, key, toasted)
            ended = ended_versions(dt, converted, key)
        return plan_versions(converted, key, current, self.table, ended)

    def _follow_types(self, dt: DeltaTable, rows: pa.Table) -> DeltaTable:
        """The history table, rewritten with the changes' column types where a column's
        type changed exactly (``retype.py``): one overwrite commit of every version,
        streamed, keeping the watermark; a crash before it changes nothing and a rerun
        does it again."""
        types = retyped(pa.schema(dt.schema().to_arrow()),
                        staged_columns(rows.slice(0, 0), None, self.table).schema)
        if not types:
            return dt
        watermark = dt.transaction_version(APP_ID)
        log.warning("history_column_retyped", table=self.table,
                    columns={n: str(t) for n, t in types.items()},
                    note="the column's type changed at the source; every version converted")
        dataset = dt.to_pyarrow_dataset()
        schema = with_types(dataset.schema, types)
        batches = (b.cast(schema) for b in dataset.to_batches())
        self._before_commit(dt, watermark)
        write_deltalake(dt, pa.RecordBatchReader.from_batches(schema, batches),
                        mode="overwrite", schema_mode="overwrite",
                        storage_options=self.storage, target_file_size=self.file_bytes,
                        commit_properties=CommitProperties(app_transactions=None
                                                           if watermark is None else
                                                           [Transaction(APP_ID, watermark)]))
        faults.hit("history.after_commit", table=self.table)
        return DeltaTable(self.uri, storage_options=self.storage)

    def _moved(self, dt: DeltaTable | None, rows: pa.Table, key: tuple[str, ...]) -> pa.Table:
        """Key changes inside a transaction resolved as staged resolves them (its net change
        per key, staged/moves.py); a moved row's unchanged TOAST value from its old key's
        current version where the chunk does not hold it."""
        moves = plan_moves_around_truncates(rows, key)
        current = None
        if moves.borrow is not None and dt is not None:
            names = sorted({n for ns in moves.borrow[COLUMNS].to_pylist() for n in ns})
            old = moves.borrow.append_column(
                "_op", pa.repeat(pa.scalar("u", pa.string()), moves.borrow.num_rows))
            current = current_versions(dt, old, key, names)
        return fill_borrowed(moves.rows, moves.borrow, key, current)

    def _commit(self, dt: DeltaTable | None, plan: Plan, key: tuple[str, ...],
                expected: Lsn | None, watermark: Lsn | None) -> DeltaTable:
        """Close, insert, record ``watermark`` (None: leave it): one MERGE per touched file
        group (``staged/target.py``), then an append of the versions outside every group,
        the last commit carrying the watermark; the stored watermark is checked before each."""
        commit = CommitProperties(app_transactions=None if watermark is None
                                  else [Transaction(APP_ID, watermark)])
        opened = plan.opened.sort_by([(k, "ascending") for k in key])
        if dt is not None and plan.closes.num_rows:
            ensure_file_size(dt, self.options.checkpoint_interval, self.file_bytes)
            merges, opened = split(dt, flagged(plan.closes, opened), key[0], self.file_bytes)
            history = dt
            merge_groups(merges, commit, appends=opened.num_rows > 0,
                         merge=lambda source, done: self._merge(history, source, key, done),
                         before=lambda: self._before_commit(history, expected))
            if merges and not opened.num_rows:
                faults.hit("history.after_commit", table=self.table)
                return dt
        self._before_commit(dt, expected)
        write_deltalake(self.uri if dt is None else dt, opened, mode="append",
                        schema_mode="merge", storage_options=self.storage,
                        commit_properties=commit, target_file_size=self.file_bytes,
                        description=self._description(key) if dt is None else None,
                        configuration=None if dt is not None else configuration(
                            opened.schema, self.options.checkpoint_interval, self.file_bytes))
        faults.hit("history.after_commit", table=self.table)
        return DeltaTable(self.uri, storage_options=self.storage)

    def _before_commit(self, dt: DeltaTable | None, expected: Lsn | None) -> None:
        faults.hit("history.before_commit", table=self.table)
        if dt is not None:  # the watermark must not have moved since we read it
            check_watermark(dt, APP_ID, expected, f"history table {self.table}", self.fence)
        else:
            self.fence()

    def _merge(self, dt: DeltaTable, source: pa.Table, key: tuple[str, ...],
               commit: CommitProperties | None) -> None:
        """Close the current versions of the source's closes, insert its new versions (a
        ``target.flagged`` source): one commit."""
        names = [c for c in source.column_names if c != INSERT]
        target = set(pa.schema(dt.schema().to_arrow()).names)
        # the source-only term is ``NOT s.<flag>``: with a bare boolean column there,
        # delta-rs 1.6.2 derives no key range from the source and scans every file (10M
        # rows: 6.5 s instead of 0.7 s); the target term is a comparison likewise
        (dt.merge(source, f"{match(key)} AND t._is_current = true AND NOT s.{INSERT}",
                  source_alias="s", target_alias="t", streamed_exec=False,
                  merge_schema=bool(set(names) - target), commit_properties=commit)
         .when_matched_update({"_valid_to": "s._valid_to", "_valid_to_lsn": "s._valid_to_lsn",
                               "_ended_by": "s._ended_by", "_is_current": "false"})
         .when_not_matched_insert({quote(c): f"s.{quote(c)}" for c in names}, f"s.{INSERT}")
         .execute())

    def _description(self, key: tuple[str, ...]) -> str:
        return (f"cdc history table: every committed version of each row of {self.table} "
                f"(key {', '.join(key)}), valid from _valid_from to _valid_to (NULL: current)")

    def _maintain(self, dt: DeltaTable, before: int) -> None:
        """OPTIMIZE and VACUUM when the version crosses a multiple of ``optimize_every``."""
        every = self.options.optimize_every
        if every <= 0 or dt.version() // every == before // every:
            return
        dt.optimize.compact(target_size=self.file_bytes)  # files a group MERGE can take
        dt.vacuum(retention_hours=self.options.vacuum_retention_hours, dry_run=False,
                  enforce_retention_duration=False, full=True)  # full: also files no version
        # ever named (a rewrite or MERGE killed before its commit), past the retention

