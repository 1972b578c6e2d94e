"""The reconnecting streamer: prepares the slot, then runs stream sessions until stopped.

A :class:`Streamer` checks the source and the lake, creates publication and slot when
missing, and runs one :class:`~cdc.stream.session.Session` per replication connection,
reconnecting with backoff when the server drops; :func:`stream` is the CLI's entry point.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import FrameType

import psycopg
import structlog

from cdc.config import Settings
from cdc.decoding.binary import SUPPORTED_TYPES
from cdc.errors import BinaryRefused, CdcError, SlotError, new_generation_fix
from cdc.events import Lsn, format_lsn
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.contracts import Contracts
from cdc.lake.raw import RawSink
from cdc.lake.store import Lake
from cdc.ops import metrics
from cdc.snapshot.backfill import Backfiller
from cdc.snapshot.generation import slot_gone
from cdc.snapshot.progress import snapshot_in_progress
from cdc.source import publication
from cdc.source.admin import Admin
from cdc.source.connection import connect, describe
from cdc.source.protocol import Source, SourceFactory
from cdc.source.replication import Reconnects, ReplicationStream, binary_refusals
from cdc.staged.runner import CompactionLoop, parse_keys
from cdc.stream.batcher import FlushLimits
from cdc.stream.session import Session

log = structlog.get_logger("cdc.stream.session")


@dataclass
class StreamStats:
    changes: int = 0
    transactions: int = 0
    files: int = 0
    rows_written: int = 0
    reconnects: int = 0
    binary_sessions: int = 0  # sessions that streamed with pgoutput's binary transfer
    started: float = field(default_factory=time.monotonic)


class Stopper:
    """Turns SIGTERM/SIGINT into a flag the loop checks; a second signal stops hard."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log.info("stop_requested", signal=signal.Signals(signum).name)


class Streamer:
    """Streams one slot into the raw layer until stopped or caught up."""

    def __init__(self, settings: Settings, lake: Lake, stopper: Stopper | None = None, *,
                 source: SourceFactory | None = None) -> None:
        self.settings = settings
        self.open_source: SourceFactory = source or self._replication
        self.lake = lake
        self.sink = RawSink(lake)
        self.checkpoint = CheckpointStore(lake, settings.slot)
        self.stopper = stopper or Stopper()
        self.stats = StreamStats()
        self.limits = FlushLimits(settings.flush_rows, settings.flush_bytes,
                                  settings.flush_seconds)
        self.contracts = Contracts.load(settings.contracts)
        self.publications = [settings.publication]  # and its insert-only companion, if any
        self.compactor: CompactionLoop | None = None
        #: re-reads the tables that join the publication (the table keeper tells it)
        self.backfills = Backfiller(settings, lake)
        #: the next session's transfer format (``choose_binary``), and why this process
        #: streams in text after a binary session met a column it cannot decode in binary
        self.binary = False
        self.binary_refused: str | None = None

    def _replication(self, start_lsn: Lsn) -> Source:
        s = self.settings
        return ReplicationStream(s.dsn, s.slot, ",".join(self.publications), start_lsn,
                                 s.plugin, silence_seconds=s.silence_seconds,
                                 binary=self.binary)

    def choose_binary(self, conn: Callable[[], psycopg.Connection[tuple[object, ...]]]) -> bool:
        """Whether the next session asks pgoutput for binary values (``--binary``): only
        when every published column has a binary decoder (``cdc.decoding.binary``)."""
        s = self.settings
        if s.binary == "off" or s.plugin != "pgoutput":
            return False
        reasons = ([self.binary_refused] if self.binary_refused is not None
                   else binary_refusals(conn(), self.publications, SUPPORTED_TYPES))
        if reasons:
            (log.warning if s.binary == "on" else log.info)(
                "binary_transfer_off", text_columns=reasons,
                why="cdc decodes these columns' types only in text, and PostgreSQL sends "
                "every column of a binary session in binary: this session streams every "
                "column in text")
            return False
        log.info("binary_transfer_on")
        return True

    # -- set-up ---------------------------------------------------------------------------------

    def prepare(self) -> Lsn:
        """Check the source, create publication and slot when missing; the LSN to start from."""
        s = self.settings
        self.lake.check_writable()
        if snapshot_in_progress(self.lake, s.slot):
            raise SlotError(f"the snapshot into slot {s.slot!r} has not finished",
                            fix="run cdc snapshot again to finish it, then cdc stream")
        stored = self.checkpoint.load()
        with connect(s.dsn) as conn:
            # cdc check's findings first; a table that joins a slot the lake follows is owed
            # its earlier rows (a new slot's tables: cdc snapshot's)
            self.publications = publication.prepare(
                conn, s, self.backfills if stored is not None else None)
            admin = Admin(conn, s.dsn)
            if stored is not None and admin.slot(s.slot) is None:
                raise slot_gone(s.slot, stored)
            slot, created = admin.ensure_slot(s.slot, s.plugin)
        if created or stored is None:
            assert slot.confirmed_flush is not None
            log.info("slot_created" if created else "slot_adopted", slot=s.slot,
                     lsn=format_lsn(slot.confirmed_flush))
            return self.checkpoint.save(slot.confirmed_flush)
        if slot.confirmed_flush is not None and slot.confirmed_flush > stored:
            raise SlotError(
                f"slot {s.slot!r} was consumed up to {format_lsn(slot.confirmed_flush)} but the "
                f"lake's checkpoint is at {format_lsn(stored)}: changes in between are not in "
                "the lake (another consumer read this slot, or the lake was replaced)",
                fix=f"stop the other consumer; to start over: {new_generation_fix(s.slot)}",
            )
        return stored

    def wal_target(self) -> Lsn:
        with connect(self.settings.dsn) as conn:
            return Admin(conn, self.settings.dsn).current_wal_lsn()

    # -- the loop -------------------------------------------------------------------------------

    def run(self, *, until_caught_up: bool = False) -> StreamStats:
        """Stream until stopped (or caught up), reconnecting with backoff when the server drops."""
        start = self.prepare()
        target = self.wal_target() if until_caught_up else None
        log.info("stream_starting", source=describe(self.settings.dsn), lake=self.lake.uri,
                 slot=self.settings.slot, publication=self.settings.publication,
                 start_lsn=format_lsn(start),
                 until=format_lsn(target) if target is not None else None)
        try:
            return self._stream(target)
        finally:
            self.backfills.stop()
            if self.compactor is not None:
                self.compactor.stop()

    def _start_compactor(self) -> None:
        """Once this stream holds the slot: a second stream waiting for it compacts nothing."""
        if self.compactor is None and self.settings.compact_every > 0:
            self.compactor = CompactionLoop(self.lake, self.settings.slot,
                                            self.settings.compact_every,
                                            parse_keys(self.settings.keys),
                                            history=self.settings.history,
                                            lease_seconds=self.settings.lease_seconds).start()

    def _stream(self, target: Lsn | None) -> StreamStats:
        reconnects = Reconnects(self.settings.max_backoff_seconds,
                                self.settings.slot_busy_seconds)
        while True:
            started = time.monotonic()
            try:
                session = Session(self, target)
                self._start_compactor()
                self.backfills.start()  # once this stream holds the slot, like compaction
                session.run()
                return self.stats
            except CdcError as exc:
                metrics.ERRORS.labels(type(exc).__name__).inc()
                if not exc.transient:
                    raise
                if self.stopper.requested:
                    return self.stats
                if isinstance(exc, BinaryRefused):  # at once, in text, from the checkpoint
                    self.stats.reconnects += 1
                    log.warning("reconnecting_in_text", error=str(exc))
                    continue
                delay = reconnects.next_delay(exc, time.monotonic() - started)
                self.stats.reconnects += 1
                log.warning("reconnecting", error=str(exc), retry_in_s=delay)
                self._sleep(delay)

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.stopper.requested:
            time.sleep(0.1)


def stream(settings: Settings, lake: Lake, *, until_caught_up: bool = False) -> StreamStats:
    """Entry point used by the CLI: install signal handlers and stream."""
    stopper = Stopper()
    stopper.install()
    return Streamer(settings, lake, stopper).run(until_caught_up=until_caught_up)
