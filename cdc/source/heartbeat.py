"""The idle heartbeat: a logical decoding message that keeps a quiet slot advancing."""

from __future__ import annotations

import time

import psycopg
import structlog

from cdc.errors import CdcError, first_line
from cdc.source.catalog import SideConnection

log = structlog.get_logger("cdc.stream.session")


#: how long the heartbeat's statement may take before its connection is given up (as long as
#: cdc's default ``connect_timeout``): it runs inside the stream loop, which waits for it
STATEMENT_SECONDS = 10.0


class Heartbeat:
    """Writes a logical decoding message to the source when the stream is idle.

    On a quiet database whose server keeps writing elsewhere, the message gives
    the slot something of its own to decode, so it keeps advancing (invariant 5).
    Failures only log: a heartbeat must never stop the stream, nor hang it — over a
    stalled path its statement is given up after ``timeout`` seconds.
    """

    def __init__(self, side: SideConnection, interval: float,
                 timeout: float = STATEMENT_SECONDS) -> None:
        self.side = side
        self.interval = interval
        self.timeout = timeout
        self.next = time.monotonic() + interval

    def maybe_beat(self) -> None:
        if self.interval <= 0 or time.monotonic() < self.next:
            return
        try:
            with self.side.bounded(self.timeout) as conn:
                conn.execute("SELECT pg_logical_emit_message(false, 'cdc_heartbeat', "
                             "now()::text)")
        except (CdcError, psycopg.Error) as exc:
            error = first_line(exc)
            if self.side.expired:
                log.warning("heartbeat_timed_out", seconds=self.timeout, error=error,
                            fix="check the network path to PostgreSQL; the stream reconnects "
                            "by itself when its own connection stalls")
            else:
                log.warning("heartbeat_failed", error=error,
                            fix="grant EXECUTE on pg_logical_emit_message or set "
                            "--heartbeat-seconds 0")
            self.side.close()
        self.next = time.monotonic() + self.interval
