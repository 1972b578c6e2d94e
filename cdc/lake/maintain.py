"""Raw layer upkeep: consolidate a closed day's small files, and optional retention.

A quiet table gets one raw file per flush interval (8,640 a day at 10 s). ``consolidate``
rewrites a closed day's stream files of a table as a few large ones, in the same
``load_date=`` partition and named by the lake contract (first/last commit LSN, first
``_seq``), then removes the originals:

- nothing is lost: each new file is durable (``Lake.write_bytes``) before any original is
  removed, and it holds every change of the files it replaces (replayed copies dropped on
  (``_commit_lsn``, ``_seq``)); a crash in between leaves both, which readers that dedupe on
  (``_commit_lsn``, ``_seq``) see as one;
- it never races the stream: only days before yesterday (UTC) qualify, and the stream
  writes today's partition (a replay too: it lands in the day it is written);
- it never races the compactor: only files whose changes are all at or below the table's
  watermarks are touched (``applied``: staged's, and history's where it exists), and
  compaction never reads those again (it lists from its floor, ``staged/files.py``, and
  skips files below the watermark).
  The snapshot's labelled files are left as they are.

``expire`` deletes raw files of partitions older than a retention, again only where every
change is at or below the watermark, and never a table folder's newest file. Afterwards a
staged table cannot be rebuilt from raw.

Neither lists all of ``raw/``: each lists the table folders and their partition names
(folder listings), then the files of the partitions it may still change. A closed day,
once done, stays done (the stream writes today's partition, a writer's clock at most a
day behind), so each table records (``_cdc/compaction/maintain/<table>.json``) the day
up to which every closed day is consolidated (``consolidated``: the oldest day that kept
a stream file the watermark had not reached yet, else ``--before``; with the file size,
another size redoes them all) and expired
(``expired``: likewise, the oldest day that kept a file); later runs list from there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, timedelta

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import structlog

from cdc import faults
from cdc.errors import ConfigError, LakeError
from cdc.events import Lsn
from cdc.lake import lease
from cdc.lake.layout import RAW, RawKey, compaction_floor_key, parse_raw_key, raw_key, staged_key
from cdc.lake.raw import encode
from cdc.lake.store import Lake
from cdc.staged.files import load_dates, newest_file, raw_tables

log = structlog.get_logger("cdc.lake.maintain")

#: rows per consolidated file (the raw writer's row group size)
FILE_ROWS = 1_000_000


@dataclass(frozen=True)
class DayResult:
    table: str
    load_date: str
    files_before: int
    files_after: int
    changes: int  # distinct changes in the consolidated files


def closed_before(before: date, today: date) -> None:
    """Refuse a ``--before`` that would reach a day the stream may still write."""
    if before > today - timedelta(days=1):
        raise ConfigError(f"--before {before} reaches yesterday or today (UTC {today}), "
                          "whose partitions the stream may still write",
                          fix=f"use --before {today - timedelta(days=1)} or earlier")


def consolidate(lake: Lake, before: date, applied: Mapping[str, Lsn | None], *,
                today: date, file_rows: int = FILE_ROWS) -> list[DayResult]:
    """Consolidate each table's stream files of days before ``before`` (see the module)."""
    closed_before(before, today)
    results = []
    for table in raw_tables(lake):
        watermark = applied.get(table)
        with _held(lake, table):
            # days done with another file size are done again (into files of this one)
            record = _recorded(lake, table)
            since = (record.get("consolidated")
                     if record.get("file_rows") == str(file_rows) else None)
            days = _days(lake, table, since, before)
            kept = before.isoformat()  # the oldest day left with a change to consolidate
            for day, keys in days.items():
                done = [k for k in keys if k.first_seq is not None and watermark is not None
                        and k.last_commit_lsn <= watermark]
                if len(done) > 1:
                    results.append(_consolidate_day(lake, table, day, done, file_rows))
                if len(done) < sum(k.first_seq is not None for k in keys):
                    kept = min(kept, day)
            _record(lake, table, consolidated=kept, file_rows=str(file_rows))
    return results


def expire(lake: Lake, retention_days: int, applied: Mapping[str, Lsn | None], *,
           today: date) -> int:
    """Delete raw files older than ``retention_days`` whose changes are all applied."""
    if retention_days < 2:
        raise ConfigError("--retention-days must be at least 2",
                          fix="keep at least yesterday's and today's raw files")
    cutoff = today - timedelta(days=retention_days)
    removed = 0
    for table in raw_tables(lake):
        watermark = applied.get(table)
        with _held(lake, table):
            # each folder's newest file stays: its footer has the table's OID, which
            # compaction follows through ALTER TABLE ... RENAME TO (staged/renames.py)
            newest = newest_file(lake, table)
            kept = cutoff.isoformat()  # the oldest day left with a file
            days = _days(lake, table, _recorded(lake, table).get("expired"), cutoff)
            for day, keys in days.items():
                old = [k.key for k in keys if watermark is not None
                       and k.last_commit_lsn <= watermark
                       and (newest is None or k.key != newest.key)]
                _delete(lake, old)
                removed += len(old)
                if len(old) < len(keys):
                    kept = min(kept, day)
            _record(lake, table, expired=kept)
        log.info("raw_expired", table=table, before=str(cutoff), files=removed)
    return removed


@contextmanager
def _held(lake: Lake, table: str) -> Iterator[None]:
    """Hold the table's single-writer lease (the compactor's, ``cdc.lake.lease``) while its
    raw files are rewritten or removed, so no compaction lists a file being replaced."""
    got = lease.acquire(lake, staged_key(table), "cdc maintain raw")
    if not isinstance(got, lease.Lease):  # acquire waits, so this is a holder that vanished
        raise LakeError(f"{table}: could not take the compaction lease ({got.describe()})",
                        fix="run cdc maintain raw again once the compactor is idle")
    try:
        yield
    finally:
        got.release()


def _days(lake: Lake, table: str, since: str | None,
          before: date) -> dict[str, list[RawKey]]:
    """The table's raw files per day from ``since`` (None: the first) to before ``before``:
    one folder listing, then a listing per partition in that range."""
    days: dict[str, list[RawKey]] = {}
    for day in load_dates(lake, table):
        if (since is None or day >= since) and day < before.isoformat():
            for key in lake.list(f"{RAW}{table}/load_date={day}/"):
                parsed = parse_raw_key(key)
                if parsed is not None and parsed.table == table:
                    days.setdefault(day, []).append(parsed)
    return days


def _recorded(lake: Lake, table: str) -> dict[str, str]:
    """The days up to which ``table``'s closed days are done (see the module); {}: none."""
    data = lake.read_bytes(compaction_floor_key(table, "maintain"))
    try:
        doc = json.loads(data) if data is not None else {}
        return {k: str(v) if k == "file_rows" else date.fromisoformat(str(v)).isoformat()
                for k, v in doc.items()}
    except (ValueError, TypeError, AttributeError):
        log.warning("maintain_record_unreadable", table=table, action="listing all days")
        return {}


def _record(lake: Lake, table: str, **done: str) -> None:
    """Record up to which day every closed day is ``consolidated`` (into files of
    ``file_rows``) or ``expired`` (under the table's lease)."""
    doc = _recorded(lake, table)
    if {**doc, **done} != doc:
        lake.write_bytes(compaction_floor_key(table, "maintain"),
                         json.dumps({**doc, **done}).encode())


def _consolidate_day(lake: Lake, table: str, day: str, keys: Sequence[RawKey],
                     file_rows: int) -> DayResult:
    """Rewrite one day's files as runs of one schema, ``file_rows`` rows at most per file.

    Files are taken in log order. A stream file holds every change of its table between
    its first and its last, so once a file is written, a later file's changes at or below
    its last one are copies; within a file being built, copies are dropped exactly.
    """
    ordered = sorted(keys, key=lambda k: (k.first_commit_lsn, k.first_seq or 0, k.key))
    written: list[str] = []
    pending: list[pa.Table] = []
    high: tuple[int, int] | None = None  # the last change written so far
    changes = 0

    def flush() -> None:
        nonlocal high, changes
        if not pending:
            return
        rows = _distinct(pa.concat_tables(pending))
        pending.clear()
        first, last = rows.slice(0, 1).to_pylist()[0], rows.slice(rows.num_rows - 1).to_pylist()[0]
        key = raw_key(table, day, first["_commit_lsn"], last["_commit_lsn"], first["_seq"])
        lake.write_bytes(key, encode(rows))  # durable before any original goes
        written.append(key)
        high, changes = (last["_commit_lsn"], last["_seq"]), changes + rows.num_rows

    for k in ordered:
        data = lake.read_bytes(k.key)
        if data is None:
            raise LakeError(f"raw file {k.key} vanished while consolidating it",
                            fix="another cdc maintain ran at the same time; run it again")
        part = pq.read_table(pa.BufferReader(data))
        if pending and (part.schema != pending[0].schema
                        or sum(p.num_rows for p in pending) + part.num_rows > file_rows):
            flush()
        part = _after(part, high)
        if part.num_rows:
            pending.append(part)
    flush()
    faults.hit("maintain.after_write", table=table, load_date=day)
    _delete(lake, [k.key for k in keys if k.key not in written])
    log.info("raw_consolidated", table=table, load_date=day, files_before=len(keys),
             files_after=len(written), changes=changes)
    return DayResult(table, day, len(keys), len(written), changes)


def _distinct(rows: pa.Table) -> pa.Table:
    """Rows in (``_commit_lsn``, ``_seq``) order, each change once."""
    rows = rows.sort_by([("_commit_lsn", "ascending"), ("_seq", "ascending")])
    if rows.num_rows < 2:
        return rows
    lsn, seq = rows["_commit_lsn"].combine_chunks(), rows["_seq"].combine_chunks()
    same = pc.and_(pc.equal(lsn.slice(1), lsn.slice(0, len(lsn) - 1)),
                   pc.equal(seq.slice(1), seq.slice(0, len(seq) - 1)))
    return rows.filter(pa.concat_arrays([pa.array([True]), pc.invert(same)]))


def _after(part: pa.Table, high: tuple[int, int] | None) -> pa.Table:
    """``part``'s changes after ``high``."""
    if high is None:
        return part
    lsn, seq = part["_commit_lsn"], part["_seq"]
    return part.filter(pc.or_(pc.greater(lsn, high[0]),
                              pc.and_(pc.equal(lsn, high[0]), pc.greater(seq, high[1]))))


def _delete(lake: Lake, keys: Sequence[str]) -> None:
    for key in keys:
        lake.delete(key)
