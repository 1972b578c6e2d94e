"""The replication connection, slot and publication admin, keepalives and feedback.

psycopg 3 has no replication API, but a connection opened with
``replication="database"`` can run ``START_REPLICATION``; the COPY BOTH
stream is then read with libpq's ``get_copy_data`` and answered with
``put_copy_data`` + ``flush`` (what pg_recvlogical does). Every psycopg
error is translated into the cdc exception tree here and nowhere else.
"""

from __future__ import annotations

import contextlib
import select
import struct
import time

import psycopg
from psycopg import sql
from psycopg.pq import ExecStatus

from cdc.decoding.pgoutput import PG_EPOCH_OFFSET_US
from cdc.errors import (
    ConnectionLost,
    PublicationError,
    SlotBusy,
    SlotError,
    SourceError,
)
from cdc.events import Lsn, format_lsn
from cdc.source.connection import connect, translate

_status_update = struct.Struct("!cQQQqB")


class ReplicationStream:
    """One START_REPLICATION session: read CopyData frames, send standby status updates."""

    def __init__(self, dsn: str, slot: str, publication: str, start_lsn: Lsn,
                 plugin: str = "pgoutput") -> None:
        self.dsn = dsn
        self.conn = connect(dsn, replication=True)
        self.pgconn = self.conn.pgconn
        if plugin == "wal2json":  # tables are filtered by the decoder (the publication's)
            from cdc.decoding.wal2json import OPTIONS
            options = sql.SQL(", ").join(sql.SQL("{} {}").format(
                sql.Identifier(k), sql.Literal(v)) for k, v in OPTIONS)
        else:
            options = sql.SQL("proto_version '1', publication_names {}").format(
                sql.Literal(publication))
        command = sql.SQL("START_REPLICATION SLOT {} LOGICAL {} ({})").format(
            sql.Identifier(slot), sql.SQL(format_lsn(start_lsn)), options)
        query = command.as_bytes(self.conn)
        self.pgconn.send_query(query)
        result = self.pgconn.get_result()
        if result is None or result.status != ExecStatus.COPY_BOTH:
            message = (result.error_message.decode(errors="replace").strip()
                       if result is not None else "no result")
            self.close()
            lowered = message.lower()
            if "invalidated" in lowered or "can no longer get changes" in lowered:
                raise SlotError(f"slot {slot!r} has been invalidated: {message}",
                                fix="the server removed WAL it needed (max_slot_wal_keep_size); "
                                "drop the slot (cdc slot drop) and take a new snapshot")
            if "is active for pid" in lowered:
                raise SlotBusy(f"slot {slot!r}: {message}",
                                fix="another consumer is reading this slot; stop it or use "
                                "another --slot")
            if "publication" in lowered and "does not exist" in lowered:
                raise PublicationError(message,
                                       fix="create the publication or check --publication")
            raise SourceError(f"START_REPLICATION failed: {message}",
                              fix="see the server's message")
        self.socket = self.pgconn.socket

    def read(self, timeout: float) -> memoryview | bytes | None:
        """The next CopyData payload, or None when nothing arrives within ``timeout`` seconds."""
        pgconn = self.pgconn
        nbytes, data = pgconn.get_copy_data(1)
        if nbytes > 0:
            return data
        if nbytes == 0:
            ready, _, _ = select.select([self.socket], [], [], timeout)
            if not ready:
                return None
            try:
                pgconn.consume_input()
            except psycopg.OperationalError as exc:
                raise translate(exc, self.dsn) from exc
            nbytes, data = pgconn.get_copy_data(1)
            if nbytes > 0:
                return data
            if nbytes == 0:
                return None
        # -1: the server ended the COPY; -2: an error
        error = pgconn.error_message.decode(errors="replace").strip()
        raise ConnectionLost(f"replication stream ended by the server: {error or 'no message'}",
                             fix="cdc reconnects by itself; check the server log if this repeats")

    def send_status(self, flush_lsn: Lsn, *, reply: bool = False) -> None:
        """Report ``flush_lsn`` as written, flushed and applied (the slot may advance to it)."""
        now = int(time.time() * 1_000_000) - PG_EPOCH_OFFSET_US
        message = _status_update.pack(b"r", flush_lsn, flush_lsn, flush_lsn, now, int(reply))
        try:
            self.pgconn.put_copy_data(message)
            self.pgconn.flush()
        except psycopg.OperationalError as exc:
            raise translate(exc, self.dsn) from exc

    def close(self) -> None:
        with contextlib.suppress(psycopg.Error):  # the connection may already be broken
            self.conn.close()
