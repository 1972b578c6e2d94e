"""The replication connection: START_REPLICATION, keepalives, feedback, stall detection.

psycopg 3 has no replication API, but a connection opened with
``replication="database"`` can run ``START_REPLICATION``; the COPY BOTH
stream is then read with libpq's ``get_copy_data`` and answered with
``put_copy_data`` + ``flush`` (what pg_recvlogical does). Every psycopg error of these
calls is translated into the cdc exception tree (``ConnectionLost`` for a broken
connection, which the stream's reconnect loop retries).

A network path that stalls without closing (packets dropped, no RST) delivers nothing,
not even an error: the server's ``wal_sender_timeout`` ends its side, ours would wait
forever. So the stream counts the time it waited without hearing anything; after half the
*silence timeout* it asks the server for a reply (a status update with the reply flag:
a live walsender answers at once with a keepalive), and after the whole timeout it gives
the connection up (``ConnectionLost``). The timeout is the server's ``wal_sender_timeout``
(60 s when that is off) unless set (``silence_seconds``). TCP keepalives on the connection
(``connection.connect``) cover a peer that vanished while we were not waiting.
"""

from __future__ import annotations

import contextlib
import re
import select
import struct
import threading
import time
from collections.abc import Iterator, Sequence

import psycopg
from psycopg import sql
from psycopg.pq import ConnStatus, ExecStatus
from psycopg.pq.abc import PGresult

from cdc import faults
from cdc.decoding.pgoutput import PG_EPOCH_OFFSET_US
from cdc.errors import (
    CdcError,
    ConnectionLost,
    PublicationError,
    SlotBusy,
    SlotError,
    SourceError,
    first_line,
    new_generation_fix,
)
from cdc.events import Lsn, format_lsn, parse_lsn
from cdc.source.connection import connect, translated

_status_update = struct.Struct("!cQQQqB")
#: most CopyData payloads one read_frames call returns (a bound on the list it keeps)
FRAMES_PER_READ = 256
#: silence timeout when the server's wal_sender_timeout is 0 (off)
DEFAULT_SILENCE = 60.0
_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0, "d": 86400.0}


@contextlib.contextmanager
def exported_snapshot(dsn: str, slot: str, plugin: str, *,
                      temporary: bool = False) -> Iterator[tuple[Lsn, str]]:
    """Create logical slot ``slot`` exporting a snapshot: (its consistent point, the
    snapshot's name), importable while the block runs (the replication connection stays
    open; a temporary slot goes with it). Creating it waits for the transactions running
    at that moment; the application waits for nothing."""
    with connect(dsn, replication=True) as repl, translated(dsn):
        row = repl.execute(sql.SQL("CREATE_REPLICATION_SLOT {} {}LOGICAL {} (SNAPSHOT 'export')")
                           .format(sql.Identifier(slot),
                                   sql.SQL("TEMPORARY " if temporary else ""),
                                   sql.Identifier(plugin))).fetchone()
        assert row is not None
        yield parse_lsn(str(row[1])), str(row[2])


def parse_pg_duration(text: str) -> float:
    """A GUC duration as PostgreSQL shows it (``60s``, ``1min``, ``500ms``, ``0``) in s."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*", text)
    if not match:
        raise ValueError(f"not a PostgreSQL duration: {text!r}")
    return float(match.group(1)) * _UNITS.get(match.group(2) or "ms", 1e-3)


class ReplicationStream:
    """One START_REPLICATION session: read CopyData frames, send standby status updates."""

    def __init__(self, dsn: str, slot: str, publication: str, start_lsn: Lsn,  # noqa: PLR0913
                 plugin: str = "pgoutput", *, silence_seconds: float = 0.0,
                 binary: bool = False) -> None:
        self.dsn = dsn
        self.flushed: Lsn = start_lsn
        self.silent_for = 0.0  # seconds waited since the last message
        self.probed = False
        self.lock = threading.Lock()  # status updates come from the loop and `answering`
        self.conn = connect(dsn, replication=True)
        try:  # a failed start must not leave the slot held by a half-open session
            with translated(dsn):
                self.silence = silence_seconds or self._server_silence()
                self._start(slot, publication, start_lsn, plugin, binary)
        except BaseException:
            self.close()
            raise
        self.pgconn = self.conn.pgconn
        self.socket = self.pgconn.socket

    def _server_silence(self) -> float:
        # libpq's simple-query protocol, as for START_REPLICATION
        result = self._query(b"SHOW wal_sender_timeout", DEFAULT_SILENCE)
        value = (result.get_value(0, 0)
                 if result is not None and result.status == ExecStatus.TUPLES_OK else None)
        if result is not None:
            while self.conn.pgconn.get_result() is not None:  # the end of the query
                pass
        timeout = parse_pg_duration(value.decode()) if value else 0.0
        return timeout or DEFAULT_SILENCE

    def _start(self, slot: str, publication: str, start_lsn: Lsn, plugin: str,
               binary: bool) -> None:
        if plugin == "wal2json":  # tables are filtered by the decoder (the publication's)
            from cdc.decoding.wal2json import OPTIONS
            options = sql.SQL(", ").join(sql.SQL("{} {}").format(
                sql.Identifier(k), sql.Literal(v)) for k, v in OPTIONS)
        else:
            options = sql.SQL("proto_version '1', publication_names {}{}").format(
                sql.Literal(publication), sql.SQL(", binary 'true'" if binary else ""))
        command = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(slot), sql.SQL(format_lsn(start_lsn)), options)
        pgconn = self.conn.pgconn
        result = self._query(command.as_bytes(self.conn), self.silence)
        if result is not None and result.status == ExecStatus.COPY_BOTH:
            return
        if result is None or pgconn.status != ConnStatus.OK:
            raise ConnectionLost("the connection broke while START_REPLICATION ran: "
                                 f"{pgconn.error_message.decode(errors='replace').strip()}",
                                 fix="cdc reconnects by itself")
        message = result.error_message.decode(errors="replace").strip()
        lowered = message.lower()
        if "invalidated" in lowered or "can no longer get changes" in lowered:
            raise SlotError(f"slot {slot!r} has been invalidated: {message}",
                            fix="the server removed WAL it needed (max_slot_wal_keep_size); "
                            f"run {new_generation_fix(slot)}")
        if "is active for pid" in lowered:
            raise SlotBusy(f"slot {slot!r}: {message}",
                           fix="another consumer is reading this slot; stop it or use "
                           "another --slot")
        if "publication" in lowered and "does not exist" in lowered:
            raise PublicationError(message, fix="create the publication or check --publication")
        raise SourceError(f"START_REPLICATION failed: {message}", fix="see the server's message")

    def _query(self, query: bytes, timeout: float) -> PGresult | None:
        """Send ``query`` and wait for its first result, at most ``timeout`` seconds of
        silence: libpq's blocking get_result would wait forever on a stalled path (and
        holds the GIL meanwhile)."""
        pgconn = self.conn.pgconn
        pgconn.send_query(query)
        sock = pgconn.socket
        deadline = time.monotonic() + timeout
        while pgconn.flush():
            _wait(select.select([], [sock], [], max(deadline - time.monotonic(), 0))[1])
        pgconn.consume_input()
        while pgconn.is_busy():
            _wait(select.select([sock], [], [], max(deadline - time.monotonic(), 0))[0])
            pgconn.consume_input()
        return pgconn.get_result()

    def read(self, timeout: float) -> memoryview | bytes | None:
        """The next CopyData payload, or None when nothing arrives within ``timeout`` seconds.

        Raises ConnectionLost when the server ended the stream, the connection broke, or
        nothing at all arrived for the silence timeout.
        """
        pgconn = self.pgconn
        try:
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                return data
            if nbytes == 0:
                ready, _, _ = select.select([self.socket], [], [], timeout)
                if not ready:
                    self._waited(timeout)
                    return None
                pgconn.consume_input()
                nbytes, data = pgconn.get_copy_data(1)
                if nbytes > 0:
                    self.silent_for, self.probed = 0.0, False
                    return data
                if nbytes == 0:  # part of a message, or only a TCP segment so far
                    return None
        except (psycopg.OperationalError, OSError, ValueError) as exc:
            raise ConnectionLost(f"replication connection broke: {first_line(exc)}",
                                 fix="cdc reconnects by itself; check the network and the "
                                 "server log if this repeats") from exc
        # -1: the server ended the COPY (get_copy_data raises for -2)
        error = pgconn.error_message.decode(errors="replace").strip()
        raise ConnectionLost(f"replication stream ended by the server: {error or 'no message'}",
                             fix="cdc reconnects by itself; check the server log if this repeats")

    def read_frames(self, timeout: float) -> list[memoryview | bytes]:
        """:meth:`read`, then every further payload libpq already holds (at most
        :data:`FRAMES_PER_READ`), without waiting: one call per batch of messages."""
        first = self.read(timeout)
        if first is None:
            return []
        frames = [first]
        get = self.pgconn.get_copy_data
        try:
            while len(frames) < FRAMES_PER_READ:
                nbytes, data = get(1)
                if nbytes <= 0:  # nothing complete yet, or the end (the next read says)
                    break
                frames.append(data)
        except (psycopg.OperationalError, OSError, ValueError) as exc:
            raise ConnectionLost(f"replication connection broke: {first_line(exc)}",
                                 fix="cdc reconnects by itself; check the network and the "
                                 "server log if this repeats") from exc
        return frames

    def _waited(self, seconds: float) -> None:
        self.silent_for += seconds
        if self.silent_for >= self.silence:
            raise ConnectionLost(
                f"no message from the server for {self.silent_for:.0f} s, not even a "
                f"keepalive after asking for one (silence timeout {self.silence:.0f} s): "
                "the connection stalled",
                fix="cdc reconnects by itself; if this repeats, check the network path to "
                "the server (or raise CDC_SILENCE_SECONDS)")
        if not self.probed and self.silent_for >= self.silence / 2:
            self.probed = True
            self.send_status(self.flushed, reply=True)

    def send_status(self, flush_lsn: Lsn, *, reply: bool = False) -> None:
        """Report ``flush_lsn`` as written, flushed and applied (the slot may advance to it)."""
        now = int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US
        message = _status_update.pack(b"r", flush_lsn, flush_lsn, flush_lsn, now, int(reply))
        faults.hit("status.before_send", lsn=flush_lsn)
        with self.lock:
            try:
                self.pgconn.put_copy_data(message)
                self.pgconn.flush()
            except (psycopg.OperationalError, OSError) as exc:
                raise ConnectionLost(f"cannot answer the server: {first_line(exc)}",
                                     fix="cdc reconnects by itself") from exc
            self.flushed = max(self.flushed, flush_lsn)
        faults.hit("status.after_send", lsn=flush_lsn)

    @contextlib.contextmanager
    def answering(self) -> Iterator[None]:
        """While the caller is busy (a long flush): answer the server every quarter of the
        silence timeout from a thread, so ``wal_sender_timeout`` does not end the session.
        It repeats the last acknowledged position, so invariant 1 holds."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.silence / 4):
                with contextlib.suppress(CdcError):  # the loop finds a broken connection
                    self.send_status(self.flushed)

        thread = threading.Thread(target=beat, name="feedback", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):  # the connection may already be broken
            self.conn.close()


#: the published columns whose type cdc cannot read in binary (cdc.decoding.binary)
_BINARY_REFUSALS = sql.SQL(
    "SELECT DISTINCT p.schemaname, p.tablename, a.attname, format_type(a.atttypid, a.atttypmod) "
    "FROM pg_publication_tables p "
    "JOIN pg_namespace n ON n.nspname = p.schemaname "
    "JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = p.tablename "
    "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
    "AND a.attgenerated = '' "
    "WHERE p.pubname = ANY(%s) AND NOT a.atttypid = ANY(%s) ORDER BY 1, 2, 3")
#: pgoutput's binary option exists since PostgreSQL 14
BINARY_SINCE = 140000


def binary_refusals(conn: psycopg.Connection[tuple[object, ...]], publications: list[str],
                    supported: Sequence[int]) -> list[str]:
    """Why a session must not use binary transfer: each published column whose type has no
    binary decoder (``schema.table.column (type)``), or the server being older than 14.

    PostgreSQL 14/15 send *every* column in binary once asked (proto.c: no per-column text
    fallback for types that have a send function), so one such column anywhere in the
    publication means text for the whole session."""
    if conn.info.server_version < BINARY_SINCE:
        return [f"the server is PostgreSQL {conn.info.server_version // 10000} "
                "(binary transfer needs 14 or later)"]
    rows = conn.execute(_BINARY_REFUSALS, (publications, list(supported))).fetchall()
    return [f"{schema}.{table}.{column} ({pg_type})" for schema, table, column, pg_type in rows]


def _wait(ready: list[int]) -> None:
    if not ready:
        raise ConnectionLost("the server did not answer while the replication session "
                             "started: the connection stalled",
                             fix="cdc reconnects by itself; check the network path to the "
                             "server if this repeats")



class Reconnects:
    """Backoff between reconnect attempts, and when to stop trying.

    A slot that stays busy is not our own dropped session (the server ends that one within
    its ``wal_sender_timeout``) but a genuine second consumer: after ``busy_limit`` seconds
    of busy attempts it becomes a non-transient SlotError naming the way out.
    """

    def __init__(self, max_delay: float, busy_limit: float) -> None:
        self.max_delay, self.busy_limit = max_delay, busy_limit
        self.delay = 1.0
        self.busy_since: float | None = None
        self.count = 0

    def next_delay(self, exc: CdcError, ran_for: float) -> float:
        """Seconds to wait before the next attempt after ``exc`` (raises when hopeless)."""
        now = time.monotonic()
        if ran_for > 60:
            self.delay = 1.0  # it ran fine for a while: start backing off afresh
        if isinstance(exc, SlotBusy):
            self.busy_since = self.busy_since if self.busy_since is not None else now
            if now - self.busy_since > self.busy_limit:
                raise SlotError(f"{exc.message}; still busy after {now - self.busy_since:.0f} s",
                                fix="another consumer holds this slot: stop it (see "
                                "pg_stat_replication for its pid and application_name) or "
                                "stream into another --slot") from exc
        else:
            self.busy_since = None
        delay = self.delay
        self.delay = min(self.delay * 2, self.max_delay)
        self.count += 1
        return delay
