"""The idle heartbeat: a logical decoding message that keeps a quiet slot advancing."""

from __future__ import annotations

import time

import psycopg
import structlog

from cdc.errors import CdcError
from cdc.source.catalog import SideConnection

log = structlog.get_logger("cdc.stream.session")


class Heartbeat:
    """Writes a logical decoding message to the source when the stream is idle.

    On a quiet database whose server keeps writing elsewhere, the message gives
    the slot something of its own to decode, so it keeps advancing (invariant 5).
    Failures only log: a heartbeat must never stop the stream.
    """

    def __init__(self, side: SideConnection, interval: float) -> None:
        self.side = side
        self.interval = interval
        self.next = time.monotonic() + interval

    def maybe_beat(self) -> None:
        if self.interval <= 0 or time.monotonic() < self.next:
            return
        self.next = time.monotonic() + self.interval
        try:
            self.side.get().execute("SELECT pg_logical_emit_message(false, 'cdc_heartbeat', "
                                    "now()::text)")
        except (CdcError, psycopg.Error) as exc:
            log.warning("heartbeat_failed", error=str(exc).splitlines()[0] if str(exc) else "",
                        fix="grant EXECUTE on pg_logical_emit_message or set "
                        "--heartbeat-seconds 0")
            self.side.close()
