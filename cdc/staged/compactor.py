"""Raw changes → staged Delta tables (``staged/<schema>.<table>/``), exactly once.

Each staged table equals its source table as of its watermark. A run applies only changes
below the stream's durable checkpoint: (``_commit_lsn``, ``_seq``) < (checkpoint, 0) are
known complete. The watermark ``w`` is stored in the same Delta commit as the data (app
transaction ``cdc-compact``, version ``w``) and means "every change below (w + 1, 0) is
applied", so the next slice is [(w + 1, 0), (checkpoint, 0)): a crash before a commit
changes nothing, a crash after it leaves the new watermark, and a re-run picks up exactly
the rest. The watermark is re-read and checked before every commit.

Raw files are chosen by name (``<first hex16>-<last hex16>-<first_seq>.parquet``) and read
in bounded chunks (see ``_read_chunk``). Per chunk (``staged.py``): drop replayed copies,
start after the last truncate (the chunk's later changes then overwrite the table), fill
unchanged TOAST values from the key's earlier change, keep the last change per key, and
resolve it against the staged row of that key — an older change never overwrites a newer
row, a value still unchanged keeps the staged one. Then one commit deletes the staged rows
of the changed keys and inserts their new versions. Tables without a key get an append of
their inserts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import TableNotFoundError

from cdc import faults
from cdc.errors import CompactionError, StagedTableUnreadable
from cdc.events import Lsn, format_lsn
from cdc.lake import lease
from cdc.lake.layout import staged_key
from cdc.lake.store import Lake
from cdc.staged.appends import Appends
from cdc.staged.bounds import resync_start
from cdc.staged.commits import (
    check_watermark,
    configuration,
    cut,
    ensure_file_size,
    slices,
    translated,
)
from cdc.staged.files import RawFile, list_raw, record_floor
from cdc.staged.merge import (
    DELETED,
    Pos,
    against_staged,
    between,
    dedupe,
    from_last_truncate,
    latest_per_key,
    staged_columns,
    unify,
)
from cdc.staged.rewrite import Writer, matching, rewrite, without_keys
from cdc.staged.steps import evolve, resolve_moves
from cdc.staged.target import (
    by_group,
    file_groups,
    flagged,
    merge_groups,
    replace,
    staged_columns_of,
    staged_rows,
)

log = structlog.get_logger("cdc.staged.compactor")

APP_ID = "cdc-compact"


@dataclass(frozen=True)
class CompactOptions:
    """Chunk size (memory bound) and table maintenance; defaults suit most lakes."""

    chunk_rows: int = 1_000_000
    chunk_bytes: int = 512 * 2**20
    optimize_every: int = 10  # commits between OPTIMIZE (small-file compaction) runs
    vacuum_retention_hours: int = 168  # files removed longer ago than this are deleted
    checkpoint_interval: int = 10  # Delta log checkpoint every N versions (new tables)
    #: staged data files are written up to this size, and merged a group of about this size
    #: at a time (``staged/target.py``): a merge's memory follows it, not the table's size
    file_bytes: int = 16 * 2**20
    today: Callable[[], date] = field(default=lambda: datetime.now(UTC).date())  # UTC date
    lease_seconds: float = lease.DEFAULT_TTL  # term of a table's single-writer lease
    wait: bool = True  # a table another compactor holds: wait for it (else skip it)
    purpose: str = "cdc compact"  # who holds the lease, as rivals are told


@dataclass(frozen=True)
class TableResult:
    table: str
    changes: int  # changes in the applied slice (replayed copies dropped)
    commits: int
    watermark: Lsn | None  # every change below (watermark + 1, 0) is in staged
    version: int | None  # Delta version after the run (None: no staged table yet)
    seconds: float
    held_by: str = ""  # skipped: another compactor holds the table's lease
    error: str = ""  # failed: the error with its fix (the other tables went on)
    exit_code: int = 0  # failed: the error's exit code


_MIN = -(2**63)


def open_staged(uri: str, storage: dict[str, str] | None) -> DeltaTable | None:
    """The Delta table at ``uri``, or None when there is none yet.

    Not ``DeltaTable.is_deltatable``: in deltalake 1.6 it holds the GIL during its I/O,
    which stalls every other thread (the stream beside a background compaction) for the
    length of an S3 round trip, and deadlocks against an in-process S3 server.
    """
    try:
        return DeltaTable(uri, storage_options=storage)
    except TableNotFoundError:
        return None


def staged_watermark(lake: Lake, table: str) -> tuple[Lsn | None, datetime | None]:
    """A staged table's watermark and the newest source commit time among its rows.

    Every change below (watermark + 1, 0) is in the table; (None, None) before its first
    compaction. Read from the Delta log only (file statistics), never from the data.
    """
    uri, storage = lake.delta_location(staged_key(table))
    try:
        dt = open_staged(uri, storage)
        if dt is None:
            return None, None
        files = pa.table(dt.get_add_actions(flatten=True))
    except Exception as exc:  # delta-rs raises DeltaError and plain Exception
        raise StagedTableUnreadable(uri, exc) from exc
    newest = pc.max(files["max._commit_ts"]) if "max._commit_ts" in files.column_names else None
    return dt.transaction_version(APP_ID), newest.as_py() if newest is not None else None


class TableCompactor:
    """One table's compaction run (``run``), under the lease whose ``fence`` it is given."""

    def __init__(self, lake: Lake, table: str, key: tuple[str, ...] | None,
                 options: CompactOptions, fence: Callable[[], None], *,
                 earlier: list[str] | None = None) -> None:
        self.lake, self.table, self.key_override = lake, table, key
        self.options, self.fence, self.earlier = options, fence, earlier or []
        self.uri, self.storage = lake.delta_location(staged_key(table))

    def run(self, bound: Lsn) -> TableResult:
        started = time.monotonic()
        with translated(f"compacting {self.table} into {self.uri}",
                        fix="fix the cause and run cdc compact again; applied changes are "
                        "never applied twice"):
            dt, changes, commits = self._compact(bound)
        result = TableResult(self.table, changes, commits,
                             dt.transaction_version(APP_ID) if dt else None,
                             dt.version() if dt else None, round(time.monotonic() - started, 3))
        log.info("compacted", **{**asdict(result), "watermark": format_lsn(result.watermark)
                                 if result.watermark is not None else None})
        return result

    def _open(self) -> DeltaTable | None:
        return open_staged(self.uri, self.storage)

    def _compact(self, bound: Lsn) -> tuple[DeltaTable | None, int, int]:
        dt = self._open()
        before = dt.version() if dt else 0
        watermark = dt.transaction_version(APP_ID) if dt else None
        listing = list_raw(self.lake, self.table, watermark, folders=self.earlier)
        files = listing.files
        cursor: Pos = (-1, _MIN) if watermark is None else (watermark + 1, 0)
        end: Pos = (bound, 0)
        cursor = resync_start(files, cursor, end)  # a cdc resync replaces the table
        self.appends = Appends()  # keyless tables: what staged holds above the watermark
        changes = commits = 0
        for rows, upper, clean in slices(files, cursor, end, self._read_chunk):
            if rows.num_rows:
                advance = clean and upper[0] - 1 > (-1 if watermark is None else watermark)
                dt = self._apply(dt, rows, watermark, upper[0] - 1 if advance else None)
                watermark = upper[0] - 1 if advance else watermark
                changes += rows.num_rows
                commits += 1
                faults.hit("staged.after_commit", table=self.table)
        if dt is not None and commits:
            self._maintain(dt, before)
            faults.hit("staged.after_maintenance", table=self.table)
        if watermark is not None:  # the next run lists only what can hold the rest
            record_floor(self.lake, self.table, watermark, listing, self.options.today())
        return dt, changes, commits

    def _read_chunk(self, todo: list[RawFile], cursor: Pos,
                    end: Pos) -> tuple[pa.Table, Pos, set[str], bool]:
        """Read files up to the chunk limits; the changes in [cursor, upper) in order.

        Returns them (deduplicated), ``upper``, the files read completely, and whether the
        cut is clean: every change below (upper's LSN, 0) is then applied, so the watermark
        moves. All files after the next one start at or after its first change, so a chunk
        may end before it. A chunk may end inside a transaction or a backfill (re-doing part
        of it after a crash is harmless: the merge is guarded, and an append skips what
        staged holds above its watermark, ``staged/appends.py``); before a labelled backfill
        file the chunk takes the labelled files of that LSN read so far whole (not clean).
        """
        read: list[tuple[RawFile, pa.Table]] = []
        rows = nbytes = 0
        upper, clean, group = end, True, None
        for i, f in enumerate(todo):
            data = self.lake.read_bytes(f.key)
            if data is None:
                raise CompactionError(f"raw file {f.key} vanished while compacting {self.table}",
                                      fix="run cdc compact again")
            part = between(pq.read_table(pa.BufferReader(data)), cursor, end)
            read.append((f, part))
            rows, nbytes = rows + part.num_rows, nbytes + part.nbytes
            full = rows >= self.options.chunk_rows or nbytes >= self.options.chunk_bytes
            if not full or i + 1 == len(todo):
                continue
            nxt = todo[i + 1]
            if nxt.first_seq is None:
                upper, clean, group = (nxt.first_lsn, _MIN), False, nxt.first_lsn
            else:
                # a transaction's moves are resolved whole (staged/moves.py): a chunk ends
                # at a transaction's start unless it began before this chunk
                upper = nxt.first if (nxt.first_lsn, 0) <= cursor else (nxt.first_lsn, 0)
                clean, group = upper[1] >= 0, None
            whole = any(g.first_seq is None and g.first_lsn == group for g, _ in read)
            if upper > cursor or whole:
                break
            upper, clean, group = end, True, None
        applied, done = cut(read, cursor, upper, group)
        return dedupe(unify(from_last_truncate(applied), self.table)), upper, done, clean

    def _key(self, schema: pa.Schema) -> tuple[str, ...]:
        """The named key, or the primary key recorded in the raw schema (may be empty)."""
        recorded = (schema.metadata or {}).get(b"cdc_key", b"").decode()
        return self.key_override or tuple(k for k in recorded.split(",") if k)

    # -- applying a chunk ------------------------------------------------------------------------

    def _apply(self, dt: DeltaTable | None, rows: pa.Table, expected: Lsn | None,
               watermark: Lsn | None) -> DeltaTable:
        """One Delta commit of ``rows``, recording ``watermark`` (None: leave it)."""
        key = self._key(rows.schema)
        truncates = pc.indices_nonzero(pc.equal(rows["_op"], "t"))
        truncated = len(truncates) > 0
        if truncated:  # the table is empty at the last truncate; later changes apply
            rows = rows.slice(truncates[-1].as_py() + 1)
        if key:
            rows = resolve_moves(None if truncated else dt, rows, key)
            state, keep = latest_per_key(rows, key, self.table)
        else:
            state, keep = self.appends.new_rows(rows, dt, expected, truncated=truncated), []
        if dt is not None and not truncated:
            current = dt
            dt = evolve(dt, rows.schema, self.uri, self.storage, self.options.file_bytes,
                        guard=lambda: self._guard(current, expected))
        # after a truncate (or cdc resync's) the table is replaced: the source's schema now
        target = pa.schema(dt.schema().to_arrow()) if dt is not None and not truncated else None
        state = staged_columns(state, target, self.table)
        commit = CommitProperties(app_transactions=None if watermark is None
                                  else [Transaction(APP_ID, watermark)])
        merges: list[pa.Table] = []
        if dt is None or truncated:  # the table's whole content is in hand
            inserts = state
            if key:
                inserts = state.filter(pc.invert(state[DELETED])).drop_columns([DELETED, *keep])
        elif key:
            if self._rewrites(dt, state, key, keep, commit, expected):
                return DeltaTable(self.uri, storage_options=self.storage)
            merges, inserts = self._plan_groups(dt, state, key, keep)
        else:
            inserts = state
        if key:
            inserts = inserts.sort_by([(k, "ascending") for k in key])  # keeps keys clustered
        if dt is not None and merges:  # file group by file group
            staged = dt
            merge_groups(merges, commit, appends=inserts.num_rows > 0,
                         merge=lambda source, done: replace(staged, source, key, done),
                         before=lambda: self._before_commit(staged, expected))
            if not inserts.num_rows:
                return dt
        self._before_commit(dt, expected)
        mode: Literal["append", "overwrite"] = "overwrite" if dt is None or truncated else "append"
        write_deltalake(self.uri if dt is None else dt, inserts, mode=mode,
                        schema_mode="overwrite" if truncated else "merge",
                        storage_options=self.storage, commit_properties=commit,
                        target_file_size=self.options.file_bytes,
                        description=self._description(key) if dt is None else None,
                        configuration=self._configuration(inserts.schema) if dt is None
                        else None)
        return DeltaTable(self.uri, storage_options=self.storage)

    def _before_commit(self, dt: DeltaTable | None, expected: Lsn | None) -> None:
        faults.hit("staged.before_commit", table=self.table)
        self._guard(dt, expected)

    def _guard(self, dt: DeltaTable | None, expected: Lsn | None) -> None:
        """Right before a commit, under the lease: fail unless it is still ours to make
        (``staged/commits.py``); without a table yet, unless one appeared meanwhile."""
        if dt is not None:
            check_watermark(dt, APP_ID, expected, f"staged table {self.table}", self.fence)
            return
        if self._open() is not None:
            raise CompactionError(
                f"staged table {self.table} was created by someone else meanwhile; nothing "
                "was committed", fix=lease.RIVAL_FIX)
        self.fence()

    def _rewrites(self, dt: DeltaTable, state: pa.Table, key: tuple[str, ...],  # noqa: PLR0917
                  keep: list[str], commit: CommitProperties, expected: Lsn | None) -> bool:
        """Apply the chunk by rewriting its touched file groups (``staged/rewrite.py``), one
        commit; False (nothing done) where only a MERGE can: keys without exact statistics,
        or a column the table does not have yet (MERGE adds it)."""
        ensure_file_size(dt, self.options.checkpoint_interval, self.options.file_bytes)
        groups = file_groups(dt, key[0], self.options.file_bytes)
        dataset = dt.to_pyarrow_dataset()  # one version for every group
        helpers = {DELETED, *keep}
        if groups is None or not {c for c in state.column_names if c not in helpers} <= set(
                dataset.schema.names):
            return False
        folder = staged_key(self.table)
        writer = Writer(dt, self.options.file_bytes,
                        lambda name, data: self.lake.write_bytes(f"{folder}/{name}", data))
        wanted = staged_columns_of(dataset.schema, key, keep)

        def change(rows: pa.Table | None, part: pa.Table) -> tuple[pa.Table | None, pa.Table]:
            if rows is None:  # outside every group: no staged row
                return None, against_staged(part, dataset.schema.empty_table().select(wanted),
                                            key, keep)[1]
            found = matching(rows, part, key[0])  # part holds each key once
            staged = rows.select(wanted).filter(pc.is_valid(found))
            removals, inserts = against_staged(part, staged, key, keep)
            if not removals.num_rows:
                return None, inserts
            return without_keys(rows, found, part, removals, key), inserts

        rewrite(writer, by_group(state, key[0], groups), change, key, Writer.per_row(groups))
        writer.commit(commit, lambda: self._before_commit(dt, expected))
        return True

    def _plan_groups(self, dt: DeltaTable, state: pa.Table, key: tuple[str, ...],
                     keep: list[str]) -> tuple[list[pa.Table], pa.Table]:
        """(removals, inserts) per touched file group, and the inserts that remove nothing
        (``staged/target.py``): each group's staged rows are read and merged on their own."""
        ensure_file_size(dt, self.options.checkpoint_interval, self.options.file_bytes)
        groups = file_groups(dt, key[0], self.options.file_bytes)
        merges, rest = [], [state.drop_columns([DELETED, *keep]).slice(0, 0)]
        dataset = dt.to_pyarrow_dataset()  # one version for every group: no commit until all
        for group, part in by_group(state, key[0], groups):
            staged = staged_rows(dataset, part, key, keep, group)
            removals, inserts = against_staged(part, staged, key, keep)
            if removals.num_rows:
                merges.append(flagged(removals, inserts.sort_by([(k, "ascending") for k in key])))
            else:
                rest.append(inserts)
        return merges, pa.concat_tables(rest, promote_options="default")

    def _description(self, key: tuple[str, ...]) -> str:
        if key:
            return (f"cdc staged table: current state of {self.table} (key {', '.join(key)}) "
                    "merged from raw changes")
        return (f"cdc staged table: {self.table} has no primary key, so this table is an append "
                "of its inserted rows (updates and deletes cannot be matched); name a key with "
                f"cdc compact --key {self.table}=col1,col2 to merge instead")

    def _configuration(self, schema: pa.Schema) -> dict[str, str]:
        return configuration(schema, self.options.checkpoint_interval, self.options.file_bytes)

    def _maintain(self, dt: DeltaTable, before: int) -> None:
        """OPTIMIZE (bin-pack small files), then VACUUM past the retention, each time the
        table's version crosses a multiple of ``optimize_every`` (stateless, crash-safe:
        at worst one round is skipped)."""
        every = self.options.optimize_every
        if every <= 0 or dt.version() // every == before // every:
            return
        metrics = dt.optimize.compact(target_size=self.options.file_bytes)
        dt.vacuum(retention_hours=self.options.vacuum_retention_hours, dry_run=False,
                  enforce_retention_duration=False, full=True)  # full: also files no version
        # ever named (a rewrite or MERGE killed before its commit), past the retention
        log.info("optimized", table=self.table, files_removed=metrics.get("numFilesRemoved"),
                 files_added=metrics.get("numFilesAdded"), version=dt.version())

