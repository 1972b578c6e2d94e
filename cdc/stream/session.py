"""The streaming loop: source → decoding → batcher → raw sink → checkpoint → ack.

The loop itself only routes; the stages do the work. It reads frames from a
:class:`~cdc.source.protocol.Source` (the replication stream, or a scripted one in
tests) and asks the :class:`~cdc.stream.ack.AckPolicy` what it may acknowledge:
invariant 1 of DESIGN.md (a position is acknowledged to the slot only after every
change at or before it is durable in raw *and* recorded in the checkpoint) lives
there. Commits are delivered in commit order, so once a batch cut has written
everything buffered, everything up to the last commit received is durable.
"""

from __future__ import annotations

import struct
import time
from typing import TYPE_CHECKING

import pyarrow.compute as pc
import structlog

from cdc.decoding.binary import CODECS
from cdc.decoding.pgtypes import column_type, is_builtin
from cdc.decoding.wal2json import Wal2JsonDecoder
from cdc.errors import BinaryRefused
from cdc.events import (
    Begin,
    Commit,
    Delete,
    Insert,
    Lsn,
    Relation,
    Truncate,
    TypeInfo,
    Update,
    format_lsn,
    update_rows,
    with_key,
)
from cdc.ops import metrics
from cdc.source import publication
from cdc.source.admin import Admin
from cdc.source.catalog import Catalog, PublishedTables, SideConnection
from cdc.source.heartbeat import Heartbeat
from cdc.stream.ack import AckPolicy
from cdc.stream.batcher import Batch, Batcher, decoder_for
from cdc.stream.writer import FlushWriter

if TYPE_CHECKING:
    from cdc.stream.streamer import Streamer

log = structlog.get_logger("cdc.stream.session")

_xlogdata = struct.Struct("!QQq")
_keepalive = struct.Struct("!Qq?")
XLOGDATA = 0x77  # 'w'
KEEPALIVE = 0x6B  # 'k'
READ_TIMEOUT = 0.5


class Session:
    """One replication connection's worth of streaming, from the durable checkpoint on."""

    def __init__(self, streamer: Streamer, target: Lsn | None) -> None:
        self.streamer = streamer
        self.settings = streamer.settings
        self.target = target
        start = streamer.checkpoint.load()
        assert start is not None
        self.ack = AckPolicy(streamer.checkpoint, start)
        self.batcher = Batcher(streamer.limits,
                               quarantine=self.settings.unconvertible == "quarantine")
        self.relations: dict[int, Relation] = {}
        # row changes go from the decoder straight into the batcher's column buffers
        self.decoder = decoder_for(self.batcher, self.relations, streamer.stats)
        self.writer = FlushWriter(self._write)  # flushes are written beside the read loop
        self.batcher.writing = lambda: self.writer.pending
        self.commit_lsn: Lsn = 0
        self.xid = 0
        self.commit_ts = 0
        self.next_status = 0.0
        self.side = SideConnection(self.settings.dsn)
        self.heartbeat = Heartbeat(self.side, self.settings.heartbeat_seconds)
        self.table_keeper = publication.TableKeeper(self.side, self.settings, streamer.backfills)
        self.catalog = Catalog(self.side)
        self.wal2json: Wal2JsonDecoder | None = None
        try:
            if self.settings.plugin == "wal2json":
                admin = Admin(self.side.get(), self.settings.dsn)
                self.wal2json = Wal2JsonDecoder(
                    PublishedTables(lambda: Admin(self.side.get(), self.settings.dsn)
                                    .published_tables(self.settings.publication)),
                    lambda schema, table: Admin(self.side.get(),
                                                self.settings.dsn).describe_table(
                        schema, table)[0],
                    insert_only=set(admin.insert_only_tables(self.settings.publication)),
                    generated=lambda schema, table: Admin(self.side.get(), self.settings.dsn)
                    .generated_columns(schema, table))
            self.binary = streamer.binary = streamer.choose_binary(self.side.get)
            # last: nothing after it can fail and leave the slot held (ReplicationStream
            # closes its own connection when START_REPLICATION fails)
            self.source = streamer.open_source(start)
            streamer.stats.binary_sessions += self.binary
        except BaseException:
            self.side.close()
            raise
        self.next_progress = time.monotonic() + self.settings.progress_seconds

    def run(self) -> None:
        try:
            self._loop()
        finally:
            self.writer.close()
            self.source.close()
            self.side.close()

    def _loop(self) -> None:  # noqa: PLR0912  the loop's one place for each event kind
        source = self.source
        batcher = self.batcher
        limits = self.streamer.limits
        stopper = self.streamer.stopper
        handle = self.handle
        unpack_xlog = _xlogdata.unpack_from
        feed = self.decoder.feed_frame
        wal2json = self.wal2json
        checked = 0
        while True:
            # the frames libpq holds, in one call: less Python work per message
            frames = source.read_frames(READ_TIMEOUT)
            housekeeping = not frames
            for data in frames:
                kind = data[0]
                if kind == XLOGDATA:
                    if wal2json is None:
                        event = feed(data)  # row changes: buffered, None
                        if event is not None:
                            handle(event, unpack_xlog(data, 1)[0], len(data) - 25)
                    else:
                        lsn, _, _ = unpack_xlog(data, 1)
                        payload = bytes(data[25:])
                        for event in wal2json.decode(payload):
                            handle(event, lsn, len(payload))
                    if batcher.rows >= limits.rows or batcher.bytes >= limits.bytes:
                        self.flush()
                else:
                    housekeeping = True
                    if kind == KEEPALIVE:
                        wal_end, _, reply = _keepalive.unpack_from(data, 1)
                        self.on_keepalive(wal_end, reply)
            checked += len(frames)
            if not housekeeping and checked < 1000:
                continue
            checked = 0
            self._collect_written()
            if self.done():
                self.flush(wait=True)
                log.info("caught_up", lsn=format_lsn(self.ack.durable))
                return
            if stopper.requested:
                self.flush(wait=True)
                log.info("stopped", lsn=format_lsn(self.ack.durable))
                return
            if batcher.due():
                self.flush()
            self.send_status()
            self.progress()

    # -- events ---------------------------------------------------------------------------------

    def handle(self, event: object, lsn: Lsn, nbytes: int) -> None:  # noqa: PLR0912  dispatch on the replication message kind
        batcher = self.batcher
        t = type(event)
        if t is Insert:
            ins: Insert = event  # type: ignore[assignment]
            self._add(ins.relation_oid, "c", ins.new, lsn, nbytes)
        elif t is Update:
            upd: Update = event  # type: ignore[assignment]
            for op, row in update_rows(self.relations[upd.relation_oid], upd):
                self._add(upd.relation_oid, op, row, lsn, nbytes)
        elif t is Delete:
            dele: Delete = event  # type: ignore[assignment]
            self._add(dele.relation_oid, "d", dele.old, lsn, nbytes)
        elif t is Begin:
            begin: Begin = event  # type: ignore[assignment]
            self.ack.begin()
            self.commit_lsn = begin.final_lsn
            self.xid = begin.xid
            self.commit_ts = begin.commit_ts
            self.decoder.begin(begin.final_lsn, begin.xid, begin.commit_ts)
        elif t is Commit:
            commit: Commit = event  # type: ignore[assignment]
            # with nothing buffered the commit is safe now; its checkpoint and acknowledgement
            # wait for the regular status interval (one checkpoint per interval when idle)
            self.ack.commit(commit.end_lsn, buffered=not batcher.empty)
            self.streamer.stats.transactions += 1
            metrics.TRANSACTIONS.inc()
        elif t is Relation:
            rel: Relation = event  # type: ignore[assignment]
            if self.binary:
                self._check_binary(rel)
            if rel.replica_identity == "f":
                # under REPLICA IDENTITY FULL pgoutput flags every column as key
                rel = with_key(rel, self.catalog.primary_key(rel.oid))
            if any(not is_builtin(c.type_oid) and c.type_oid not in batcher.type_facts
                   for c in rel.columns):
                batcher.type_facts.update(self.catalog.type_facts(
                    [c.type_oid for c in rel.columns], batcher.type_facts))
            if self.streamer.contracts.covers(rel.qualified_name):  # ContractError under fail
                self.streamer.contracts.check_schema(rel, [
                    column_type(c.type_oid, c.type_modifier, batcher.type_names.get(c.type_oid),
                                batcher.type_facts) for c in rel.columns])
            known = self.relations.get(rel.oid)
            if known is not None and known != rel:
                # its schema changes: close its file (written in order with the flushes)
                self.writer.submit(batcher.detach(rel.oid), None)
                log.info("schema_changed", table=rel.qualified_name)
            if known != rel:  # attnums tell a rename from drop + add; ADD COLUMN defaults
                batcher.column_facts[rel.oid] = self.catalog.column_facts(rel.schema, rel.name)
            self.relations[rel.oid] = rel
        elif t is Truncate:
            trunc: Truncate = event  # type: ignore[assignment]
            for oid in trunc.relation_oids:
                self._add(oid, "t", None, lsn, nbytes)
        elif t is TypeInfo:
            info: TypeInfo = event  # type: ignore[assignment]
            batcher.type_names[info.oid] = f"{info.schema}.{info.name}"
        # Origin and Message carry nothing for the raw layer

    def _check_binary(self, rel: Relation) -> None:
        """A table (or a new version of it) with a column cdc cannot decode in binary, in a
        binary session: its rows would arrive in binary. Nothing of it is buffered yet and
        nothing past the checkpoint is acknowledged, so end the session; the streamer
        reconnects in text from the checkpoint (at-least-once: what the dropped buffers held
        is read again, with the same ``_commit_lsn`` and ``_seq``)."""
        names = self.batcher.type_names
        text = [f"{rel.qualified_name}.{c.name} "
                f"({column_type(c.type_oid, c.type_modifier, names.get(c.type_oid)).pg_type})"
                for c in rel.columns if c.type_oid not in CODECS]
        if text:
            self.streamer.binary_refused = ", ".join(text)
            raise BinaryRefused(
                f"the stream (binary transfer) reached a version of {rel.qualified_name} with "
                f"columns cdc decodes only in text: {', '.join(text)}",
                fix="none needed: cdc reconnects in text from its checkpoint and stays in text "
                "until restarted")

    def _add(self, oid: int, op: str, row: tuple[object, ...] | None, lsn: Lsn,
             nbytes: int) -> None:
        self.decoder.append(oid, op, row, lsn, nbytes)  # type: ignore[arg-type]

    def on_keepalive(self, wal_end: Lsn, reply: bool) -> None:
        if reply:  # the reply carries all that is durable: wait for the flush in flight
            self._collect_written(wait=True)
        self.ack.keepalive(wal_end, buffered=not self.batcher.empty)
        if reply:
            self.send_status(force=True)

    def done(self) -> bool:
        ack = self.ack
        if self.target is None or ack.in_transaction or self.streamer.backfills.busy():
            return False
        return max(ack.received, ack.server_wal_end) >= self.target

    # -- durability -----------------------------------------------------------------------------

    def flush(self, *, wait: bool = False) -> None:
        """Write every buffered change (on the writer thread); once written, everything up
        to :attr:`AckPolicy.received` then is durable (the loop learns it from the writer, or
        here with ``wait``)."""
        self.writer.submit(self.batcher.detach_all(), self.ack.received)
        if wait:
            with self.source.answering():  # a slow lake must not let wal_sender_timeout strike
                self.writer.wait()
            self.ack.flushed()
            self.send_status(force=True)

    def _collect_written(self, *, wait: bool = False) -> None:
        """A flush written beside the loop is durable now: its position is safe."""
        written = self.writer.wait() if wait else self.writer.safe()
        if written is not None:
            self.ack.flushed(written)
            self.send_status(force=True)

    def _write(self, batch: Batch) -> None:
        started = time.monotonic()
        written = self.streamer.contracts.write(self.streamer.sink, batch)
        if written is None:
            return  # every row went to raw/_rejected
        batch, key, nbytes = written
        seconds = time.monotonic() - started
        stats = self.streamer.stats
        stats.files += 1
        stats.rows_written += batch.table.num_rows
        table = batch.qualified_name
        for item in pc.value_counts(batch.table["_op"]).to_pylist():
            metrics.CHANGES.labels(table, item["values"]).inc(item["counts"])
        metrics.RAW_BYTES.labels(table).inc(nbytes)
        metrics.BATCHES.labels(table).inc()
        metrics.FLUSH_SECONDS.observe(seconds)
        log.debug("file_written", table=table, rows=batch.table.num_rows, key=key,
                  bytes=nbytes, seconds=round(seconds, 3))

    def send_status(self, *, force: bool = False) -> None:
        """Acknowledge what the ack policy allows (checkpoint first), at most once per interval."""
        now = time.monotonic()
        if not force and now < self.next_status:
            return
        ack = self.ack
        durable = ack.acknowledge(self.source.send_status)
        self.next_status = now + self.settings.status_seconds
        metrics.ACKED_LSN.set(durable)
        if ack.server_wal_end:
            metrics.SERVER_LSN.set(ack.server_wal_end)
            metrics.LAG_BYTES.set(max(ack.server_wal_end - durable, 0))
        idle = ack.idle(buffered=not self.batcher.empty)
        metrics.LAG_SECONDS.set(0 if idle or not self.commit_ts
                                else max(time.time() - self.commit_ts / 1e6, 0))
        if idle:
            self.heartbeat.maybe_beat()
        added, inserts = self.table_keeper.maybe_sync()
        if self.wal2json is not None:  # wal2json ignores publications: its decoder filters
            self.wal2json.publish((t.schema, t.table) for t in added)
            self.wal2json.publish(((t.schema, t.table) for t in inserts), insert_only=True)

    def progress(self) -> None:
        now = time.monotonic()
        if now < self.next_progress:
            return
        self.next_progress = now + self.settings.progress_seconds
        stats = self.streamer.stats
        elapsed = max(now - stats.started, 1e-9)
        log.info("progress", changes=stats.changes, transactions=stats.transactions,
                 files=stats.files, changes_per_s=round(stats.changes / elapsed),
                 acked_lsn=format_lsn(self.ack.acknowledged),
                 server_lsn=(format_lsn(self.ack.server_wal_end) if self.ack.server_wal_end
                             else None))
