"""Lag figures: the slot's LSNs from the server and the lake's watermarks.

``collect`` gathers one :class:`Status`; ``check`` turns thresholds into the
one-line reasons ``cdc status`` exits non-zero with. Nothing here writes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cdc.errors import RawFileUnreadable, new_generation_fix
from cdc.events import Lsn, format_lsn
from cdc.lake.checkpoint import CheckpointStore, ResyncHold
from cdc.lake.layout import RAW, display_name, raw_keys
from cdc.lake.store import Lake
from cdc.snapshot.backfill import Backfills
from cdc.source.admin import Admin
from cdc.source.connection import connect, translated
from cdc.staged.failures import failure

#: without track_commit_timestamp, less unacknowledged WAL than this counts as caught up
#: (checkpoints, heartbeats, other databases' writes between two status updates)
IDLE_LAG_BYTES = 1 * 2**20
LOW_SAFE_WAL_BYTES = 1 * 2**30


@dataclass
class SlotStatus:
    name: str
    exists: bool
    active: bool = False
    active_pid: int | None = None
    plugin: str | None = None
    restart_lsn: str | None = None
    confirmed_flush_lsn: str | None = None
    server_lsn: str | None = None
    retained_wal_bytes: int | None = None
    confirmed_lag_bytes: int | None = None
    wal_status: str | None = None
    safe_wal_size: int | None = None


@dataclass
class TableStatus:
    table: str
    raw_files: int
    raw_last_commit_lsn: str | None
    raw_last_commit_ts: str | None
    staged_commit_lsn: str | None = None
    staged_commit_ts: str | None = None
    compaction_lag_seconds: float | None = None
    history_commit_lsn: str | None = None  # every change below the next LSN is in history
    compaction_error: str | None = None  # the last compaction failed (with its fix)


@dataclass
class BackfillStatus:
    """A table that joined the publication and whose earlier rows the stream re-reads."""

    table: str
    state: str  # pending (not started), running (its latest attempt started), failed (retried)
    insert_only: bool
    recorded_at: str
    started_at: str | None
    chunks: int  # written by the latest attempt
    attempts: int
    error: str | None


@dataclass
class Status:
    slot: SlotStatus
    checkpoint_lsn: str | None
    lag_seconds: float | None
    last_acked_commit_ts: str | None
    server_last_commit_ts: str | None
    tables: list[TableStatus] = field(default_factory=list)
    backfills: list[BackfillStatus] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _iso(ts: datetime | None) -> str | None:
    return ts.isoformat() if ts is not None else None


def slot_status(admin: Admin, slot: str) -> tuple[SlotStatus, datetime | None]:
    """The slot as the server sees it, and the server's last commit time (if tracked)."""
    row: tuple[Any, ...] | None = admin.conn.execute(
        "SELECT s.active, s.active_pid, s.plugin::text, s.restart_lsn::text, "
        "s.confirmed_flush_lsn::text, pg_current_wal_lsn()::text, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), s.restart_lsn)::bigint, "
        "pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint, "
        "s.wal_status, s.safe_wal_size FROM pg_replication_slots s WHERE s.slot_name = %s",
        (slot,)).fetchone()
    tracked = admin.conn.execute("SELECT current_setting('track_commit_timestamp')").fetchone()
    server_ts: datetime | None = None
    if tracked and tracked[0] == "on":
        last: tuple[Any, ...] | None = admin.conn.execute(
            "SELECT timestamp FROM pg_last_committed_xact()").fetchone()
        server_ts = last[0] if last else None
    if row is None:
        return SlotStatus(slot, exists=False), server_ts
    return SlotStatus(slot, True, bool(row[0]), *row[1:]), server_ts


def raw_progress(lake: Lake) -> dict[str, tuple[int, Lsn, str]]:
    """Per table: number of raw files, highest commit LSN, key of the file holding it."""
    result: dict[str, tuple[int, Lsn, str]] = {}
    for table, keys in raw_keys(lake.list(RAW)).items():
        newest = max(keys, key=lambda k: k.last_commit_lsn)
        result[table] = (len(keys), newest.last_commit_lsn, newest.key)
    return result


def last_commit_ts(fs: pafs.FileSystem, key: str) -> datetime | None:
    """Latest ``_commit_ts`` in one raw file, from its parquet statistics (no data read).

    Only the footer is read (ranged reads through the lake's pyarrow filesystem).
    """
    try:
        meta = pq.read_metadata(key, filesystem=fs)
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowInvalid) as exc:
        raise RawFileUnreadable(key, exc) from exc
    column = meta.schema.to_arrow_schema().get_field_index("_commit_ts")
    latest = None
    for i in range(meta.num_row_groups):
        stats = meta.row_group(i).column(column).statistics
        if stats is not None and stats.has_min_max:
            value = stats.max
            if isinstance(value, datetime) and value.tzinfo is None:
                value = value.replace(tzinfo=UTC)
            latest = value if latest is None or value > latest else latest
    return latest


StagedProbe = Callable[[Lake, str], tuple[Lsn | None, datetime | None]]
HistoryProbe = Callable[[Lake, str], Lsn | None]


def partitioned_via_root(admin: Admin, publication: str) -> list[str]:
    """Partitioned tables the publication publishes through their root: a TRUNCATE of one
    of their partitions is never published (PostgreSQL 15), so staged would keep its rows."""
    with translated(admin.dsn):
        rows = admin.conn.execute(
            "SELECT format('%%s.%%s', t.schemaname, t.tablename) FROM pg_publication p "
            "JOIN pg_publication_tables t ON t.pubname = p.pubname "
            "JOIN pg_namespace n ON n.nspname = t.schemaname "
            "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = t.tablename "
            "WHERE p.pubname = %s AND p.pubviaroot AND c.relkind = 'p' ORDER BY 1",
            (publication,)).fetchall()
    return [str(r[0]) for r in rows]


def collect(dsn: str, lake: Lake, slot: str, staged: StagedProbe | None = None,  # noqa: PLR0913  keyword-only probes, each optional
            now: datetime | None = None, *, history: HistoryProbe | None = None,
            publication: str | None = None) -> Status:
    now = now or datetime.now(UTC)
    with connect(dsn) as conn:
        slot_info, server_ts = slot_status(Admin(conn, dsn), slot)
        partitioned = partitioned_via_root(Admin(conn, dsn), publication) if publication else []
    checkpoint = CheckpointStore(lake, slot).load()
    tables = []
    acked_ts: datetime | None = None
    fs = lake.arrow_filesystem()
    progress = raw_progress(lake)
    for table, (files, last_lsn, key) in sorted(progress.items()):
        ts = last_commit_ts(fs, key)
        if ts is not None and (checkpoint is None or last_lsn < checkpoint):
            acked_ts = ts if acked_ts is None or ts > acked_ts else acked_ts
        entry = TableStatus(display_name(table), files, format_lsn(last_lsn), _iso(ts))
        failed = failure(lake, table)
        entry.compaction_error = failed.error if failed is not None else None
        if staged is not None:
            staged_lsn, staged_ts = staged(lake, table)
            entry.staged_commit_lsn = format_lsn(staged_lsn) if staged_lsn is not None else None
            entry.staged_commit_ts = _iso(staged_ts)
            entry.compaction_lag_seconds = compaction_lag(last_lsn, ts, staged_lsn, staged_ts)
        if history is not None:
            history_lsn = history(lake, table)
            entry.history_commit_lsn = (format_lsn(history_lsn) if history_lsn is not None
                                        else None)
        tables.append(entry)
    status = Status(slot_info, format_lsn(checkpoint) if checkpoint is not None else None,
                    lag_seconds(slot_info, acked_ts, server_ts, now), _iso(acked_ts),
                    _iso(server_ts), tables)
    status.backfills = [BackfillStatus(b.name.display(), b.state, b.insert_only, b.recorded_at,
                                       b.started_at, b.chunks, b.attempts, b.error)
                        for b in Backfills(lake, slot).load_all()]
    owed = {b.table for b in status.backfills}
    status.warnings = warnings(status)
    status.warnings += [
        f"{t} is partitioned and published through its root: a TRUNCATE of one of its "
        "partitions is not published, so staged keeps that partition's rows; truncate the "
        f"parent instead, or run cdc resync --tables {t} after one" for t in partitioned]
    status.warnings += [
        f"compaction of {display_name(t)} is held below {format_lsn(held)} by a cdc resync "
        f"that has not finished: run cdc resync --tables {display_name(t)} again"
        for t in sorted(progress) if (held := ResyncHold(lake, t).load()) is not None
        and display_name(t) not in owed]  # a backfill's hold: cdc stream runs it again
    return status


def compaction_lag(raw_lsn: Lsn, raw_ts: datetime | None, staged_lsn: Lsn | None,
                   staged_ts: datetime | None) -> float | None:
    """How far staged is behind raw, in source commit time (None: never compacted)."""
    if staged_lsn is not None and staged_lsn >= raw_lsn:
        return 0.0
    if raw_ts is None or staged_ts is None:
        return None
    return max((raw_ts - staged_ts).total_seconds(), 0.0)


def lag_seconds(slot: SlotStatus, acked_ts: datetime | None, server_ts: datetime | None,
                now: datetime) -> float | None:
    """Time behind the source: its last commit minus ours; 0 when nothing is pending."""
    if not slot.exists:
        return None
    if server_ts is not None and acked_ts is not None:
        return max((server_ts - acked_ts).total_seconds(), 0.0)
    if (slot.confirmed_lag_bytes or 0) <= IDLE_LAG_BYTES:
        return 0.0
    return (now - acked_ts).total_seconds() if acked_ts is not None else None


def warnings(status: Status) -> list[str]:
    slot = status.slot
    found = [f"{t.table}: compaction fails: {t.compaction_error}"
             for t in status.tables if t.compaction_error]
    found += [f"{b.table}: its backfill failed ({b.attempts} attempts so far; cdc stream "
              f"retries it): {b.error}" for b in status.backfills if b.error]
    if not slot.exists:
        found.append(f"slot {slot.name!r} does not exist")
        return found
    if slot.wal_status in ("unreserved", "lost"):
        found.append(f"slot {slot.name!r} wal_status is {slot.wal_status!r}: "
                     + (f"it has been invalidated; {new_generation_fix(slot.name)}"
                        if slot.wal_status == "lost" else
                        "the server is about to remove WAL it needs; catch up now"))
    if slot.safe_wal_size is not None and slot.safe_wal_size < LOW_SAFE_WAL_BYTES:
        found.append(f"slot {slot.name!r} is {slot.safe_wal_size} bytes from losing WAL "
                     "(safe_wal_size)")
    if not slot.active:
        found.append(f"slot {slot.name!r} is not being read (no cdc stream running)")
    return found


def check(status: Status, *, max_lag_bytes: int | None = None,
          max_lag_seconds: float | None = None,
          max_compaction_lag_seconds: float | None = None) -> list[str]:
    """One line per exceeded threshold (empty: healthy)."""
    slot = status.slot
    reasons = []
    if not slot.exists and (max_lag_bytes is not None or max_lag_seconds is not None):
        reasons.append(f"slot {slot.name!r} does not exist")
    if max_lag_bytes is not None and (slot.confirmed_lag_bytes or 0) > max_lag_bytes:
        reasons.append(f"slot {slot.name!r} lags {slot.confirmed_lag_bytes} bytes "
                       f"(max {max_lag_bytes})")
    if (max_lag_seconds is not None and status.lag_seconds is not None
            and status.lag_seconds > max_lag_seconds):
        reasons.append(f"stream lags {status.lag_seconds:.0f} s (max {max_lag_seconds:.0f} s)")
    if max_compaction_lag_seconds is not None:
        for table in status.tables:
            if table.compaction_error:
                reasons.append(f"{table.table}: compaction fails: {table.compaction_error}")
            lag = table.compaction_lag_seconds
            if lag is not None and lag > max_compaction_lag_seconds:
                reasons.append(f"{table.table}: staged lags raw by {lag:.0f} s "
                               f"(max {max_compaction_lag_seconds:.0f} s)")
    if slot.wal_status == "lost":
        reasons.append(f"slot {slot.name!r} has been invalidated (wal_status lost)")
    return reasons


def render(status: Status) -> str:
    """A readable report for a terminal."""
    s = status.slot
    lines = [f"slot {s.name}: " + ("missing" if not s.exists else
             f"{'active (pid ' + str(s.active_pid) + ')' if s.active else 'inactive'}, "
             f"plugin {s.plugin}, wal_status {s.wal_status}")]
    if s.exists:
        lines += [
            f"  server WAL     {s.server_lsn}",
            f"  confirmed      {s.confirmed_flush_lsn}   lag {_bytes(s.confirmed_lag_bytes)}",
            f"  restart        {s.restart_lsn}   retains {_bytes(s.retained_wal_bytes)}",
            "  safe_wal_size  "
            + (_bytes(s.safe_wal_size) if s.safe_wal_size is not None else "unlimited"),
        ]
    lag = "unknown" if status.lag_seconds is None else f"{status.lag_seconds:.1f} s"
    if status.server_last_commit_ts is None and status.lag_seconds is not None:
        lag += " (estimated: set track_commit_timestamp = on for the exact figure)"
    lines.append(f"checkpoint {status.checkpoint_lsn or '-'}; time lag {lag}")
    if status.tables:
        header = ("table", "files", "raw commit lsn", "raw commit time", "staged lsn",
                  "compaction lag", "history lsn")
        rows = [(t.table, str(t.raw_files), t.raw_last_commit_lsn or "-",
                 (t.raw_last_commit_ts or "-")[:19], t.staged_commit_lsn or "-",
                 "-" if t.compaction_lag_seconds is None else f"{t.compaction_lag_seconds:.0f} s",
                 t.history_commit_lsn or "-")
                for t in status.tables]
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        for r in [header, *rows]:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
    lines += [f"backfill {b.table}: {b.state}"
              + (f" since {b.started_at[:19]}, {b.chunks} chunks written" if b.started_at
                 else f" since {b.recorded_at[:19]}") for b in status.backfills]
    lines += [f"warning: {w}" for w in status.warnings]
    return "\n".join(lines)


def _bytes(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"
