"""Backfill of the tables that join the publication while the lake follows the slot.

pgoutput decides by publication membership as it decodes, so a table added to the publication
(by the table sync of a managed publication, at a start after it was created while cdc was
down, or a ``--tables`` list that grew) streams only the changes committed after its
``ALTER PUBLICATION ... ADD TABLE``: the rows it held before are in no WAL the slot sends.
``cdc stream`` backfills them itself, exactly:

1. Before the statement that adds the table commits, ``_cdc/backfill/<slot>/<table>.json``
   records it (:class:`Backfills`), so a stream killed at any point after finds it at its
   next start.
2. A thread beside the read loop (which goes on answering the server) runs ``cdc resync`` of
   each recorded table once it is in the publication: a keyed table in chunks between WAL
   watermarks, a keyless (insert-only) one whole in a temporary slot's exported snapshot,
   no lock taken (``snapshot/resync.py``). Its record says when it started, its chunks, its
   last error; ``cdc status`` shows it.
3. Once the resync is done the record is deleted. A resync that stopped (the stream stopped
   or was killed, the source failed) runs again from its start, at the next start or after a
   backoff: its truncate replaces staged from there, so a run cut short leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

import structlog
from psycopg import sql

from cdc.config import Settings
from cdc.errors import CdcError, CheckpointError, first_line
from cdc.lake.layout import segment_of
from cdc.lake.store import Lake
from cdc.names import TableName
from cdc.snapshot.resync import Resync, ResyncStopped
from cdc.source.admin import Admin
from cdc.source.connection import connect, translated

log = structlog.get_logger("cdc.snapshot.backfill")

RESCAN_SECONDS = 30.0  # records another process made (a stream waiting for the slot)
MAX_RETRY_SECONDS = 600.0


@dataclass(frozen=True)
class Backfill:
    """One table's backfill as recorded in the lake."""

    schema: str
    table: str
    insert_only: bool
    recorded_at: str
    started_at: str | None = None  # the latest attempt
    chunks: int = 0  # of the latest attempt
    attempts: int = 0
    error: str | None = None  # the latest attempt's, if it failed

    @property
    def name(self) -> TableName:
        return TableName(self.schema, self.table)

    @property
    def state(self) -> str:
        return "failed" if self.error else "running" if self.started_at else "pending"


class Backfills:
    """The backfills a slot's stream owes (``_cdc/backfill/<slot>/<table>.json``)."""

    def __init__(self, lake: Lake, slot: str) -> None:
        self.lake = lake
        self.prefix = f"_cdc/backfill/{slot}/"

    def _key(self, name: TableName) -> str:
        return f"{self.prefix}{segment_of(name)}.json"

    def record(self, name: TableName, *, insert_only: bool) -> None:
        """Owe ``name`` a backfill (kept as it is when it is owed already)."""
        if self.load(name) is None:
            self.save(Backfill(name.schema, name.table, insert_only,
                               datetime.now(UTC).isoformat()))

    def load(self, name: TableName) -> Backfill | None:
        return self._parse(self._key(name), self.lake.read_bytes(self._key(name)))

    def load_all(self) -> list[Backfill]:
        found = [self._parse(k, self.lake.read_bytes(k)) for k in self.lake.list(self.prefix)
                 if k.endswith(".json")]
        return [b for b in found if b is not None]

    def save(self, backfill: Backfill) -> None:
        self.lake.write_bytes(self._key(backfill.name), json.dumps(asdict(backfill)).encode())

    def done(self, name: TableName) -> None:
        self.lake.delete(self._key(name))

    def superseded(self, copied: Sequence[str], started_us: int) -> list[str]:
        """Delete the backfills a finished ``cdc snapshot`` of the slot made needless: those
        of the tables it copied (``Relation.qualified_name``), recorded before it began (a
        stream of the slot's earlier generation owed them). Returns their names."""
        gone = []
        for backfill in self.load_all():
            recorded = datetime.fromisoformat(backfill.recorded_at).timestamp() * 1e6
            if backfill.name.display() in copied and recorded < started_us:
                self.done(backfill.name)
                gone.append(backfill.name.display())
        return gone

    def _parse(self, key: str, data: bytes | None) -> Backfill | None:
        if data is None:
            return None
        try:
            return Backfill(**json.loads(data))
        except (ValueError, TypeError) as exc:
            raise CheckpointError(
                f"{key} in {self.lake.uri} is unreadable: {exc}",
                fix=f"delete it and run cdc resync --tables <the table> while cdc stream "
                f"runs ({key} names the table)") from exc


class Backfiller:
    """Runs a slot's backfills in a thread beside the stream; the stream's
    :class:`~cdc.source.publication.Joining`."""

    def __init__(self, settings: Settings, lake: Lake) -> None:
        self.settings = settings
        self.lake = lake
        self.records = Backfills(lake, settings.slot)
        self.enabled = settings.backfill_new_tables
        self._lock = threading.Lock()
        self._todo: dict[TableName, float] = {}  # runnable from this monotonic time on
        self._failed: set[TableName] = set()  # failed in this process: waiting to retry
        self._running: TableName | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- Joining ---------------------------------------------------------------------------------

    def before_add(self, tables: Sequence[TableName], *, insert_only: bool) -> None:
        if self.enabled:
            for name in tables:
                self.records.record(name, insert_only=insert_only)

    def added(self, tables: Sequence[TableName]) -> None:
        if self.enabled:
            with self._lock:
                for name in tables:
                    self._todo.setdefault(name, 0.0)
            self._wake.set()

    # -- the thread ------------------------------------------------------------------------------

    def busy(self) -> bool:
        """A backfill runs, or one can run now (``--until-caught-up`` waits for them)."""
        with self._lock:
            return self._running is not None or any(n not in self._failed for n in self._todo)

    def start(self) -> Backfiller:
        """Pick up what earlier runs owe, and start the thread (once)."""
        if self.enabled and self._thread is None:
            self._rescan()
            self._thread = threading.Thread(target=self._loop, name="cdc-backfill",
                                            daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        rescan = time.monotonic() + RESCAN_SECONDS
        while not self._stop.is_set():
            name = self._next()
            if name is not None:
                try:
                    self._backfill(name)
                except Exception as exc:  # its record unreadable, the lake failing: retried
                    log.warning("backfill_failed", table=name.display(), error=first_line(exc),
                                retry_in_s=MAX_RETRY_SECONDS)
                    self._finish(name, retry_in=MAX_RETRY_SECONDS)
                continue
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            if time.monotonic() >= rescan:
                rescan = time.monotonic() + RESCAN_SECONDS
                self._rescan()

    def _next(self) -> TableName | None:
        now = time.monotonic()
        with self._lock:
            due = [n for n, at in self._todo.items() if at <= now]
            self._running = due[0] if due else None
            return self._running

    def _rescan(self) -> None:
        """Owed backfills of tables in the publication become runnable (a table whose ADD
        did not commit waits for the table sync to add it again)."""
        try:
            owed = self.records.load_all()
            if not owed:
                return
            with connect(self.settings.dsn) as conn:
                published = set(Admin(conn, self.settings.dsn).published_tables(
                    self.settings.publication))
        except Exception as exc:  # a thread that died would owe silently
            log.warning("backfill_scan_failed", error=first_line(exc), retry_in_s=RESCAN_SECONDS)
            return
        with self._lock:
            for b in owed:
                if (b.schema, b.table) in published:
                    self._todo.setdefault(b.name, 0.0)

    def _backfill(self, name: TableName) -> None:
        """One attempt; a failure is recorded and retried after a backoff."""
        record = self.records.load(name)
        if record is None:  # done by another stream meanwhile
            self._finish(name)
            return
        attempt = replace(record, started_at=datetime.now(UTC).isoformat(), chunks=0,
                          attempts=record.attempts + 1, error=None)
        started = time.monotonic()
        try:
            if not self._exists(name):
                self.records.done(name)
                log.warning("backfill_dropped", table=name.display(),
                            note="the table no longer exists")
                self._finish(name)
                return
            self.records.save(attempt)
            log.info("backfill_started", table=name.display(), attempt=attempt.attempts,
                     insert_only=attempt.insert_only)
            result = Resync(
                self.settings, self.lake, name.display(),
                chunk_rows=self.settings.resync_chunk_rows,
                wait_seconds=self.settings.resync_wait_seconds,
                after_chunk=lambda n: self.records.save(replace(attempt, chunks=n)),
                stopping=self._stop.is_set).run()
            self.records.done(name)
        except ResyncStopped:
            log.info("backfill_interrupted", table=name.display(),
                     note="the stream stops: the backfill runs again at its next start")
            self._finish(name)
            return
        except Exception as exc:  # reported and retried: never lost
            delay = min(30.0 * 2 ** max(attempt.attempts - 1, 0), MAX_RETRY_SECONDS)
            with contextlib.suppress(Exception):  # the lake may be what fails
                self.records.save(replace(attempt, error=first_line(exc)))
            log.warning("backfill_failed", table=name.display(), error=first_line(exc),
                        retry_in_s=delay, fix=exc.fix if isinstance(exc, CdcError) else
                        "cdc stream retries it; cdc status shows the error")
            self._finish(name, retry_in=delay)
            return
        self._finish(name)
        log.info("backfill_done", table=name.display(), rows=result.rows,
                 chunks=result.chunks, seconds=round(time.monotonic() - started, 1))

    def _finish(self, name: TableName, *, retry_in: float | None = None) -> None:
        with self._lock:
            self._running = None
            if retry_in is None:
                self._todo.pop(name, None)
                self._failed.discard(name)
            else:
                self._todo[name] = time.monotonic() + retry_in
                self._failed.add(name)

    def _exists(self, name: TableName) -> bool:
        with connect(self.settings.dsn) as conn, translated(self.settings.dsn):
            row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (
                sql.Identifier(name.schema, name.table).as_string(conn),)).fetchone()
        return bool(row and row[0])

