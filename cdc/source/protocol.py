"""The ``Source`` seam: what the stream session reads replication frames from.

The real one is :class:`cdc.source.replication.ReplicationStream` (a START_REPLICATION
session over libpq's COPY BOTH); tests substitute a scripted one (``tests/scripted_source``)
that plays frames and records the status updates it is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

from cdc.events import Lsn


class Source(Protocol):
    """A stream of CopyData payloads (XLogData ``w`` and keepalive ``k`` frames)."""

    def read_frames(self, timeout: float) -> Sequence[memoryview | bytes]:
        """The next CopyData payloads, in order: at least one, or none when nothing arrives
        within ``timeout`` seconds."""

    def send_status(self, flush_lsn: Lsn, *, reply: bool = False) -> None:
        """Report ``flush_lsn`` as written, flushed and applied (the slot may advance to it)."""

    def answering(self) -> AbstractContextManager[None]:
        """While the caller is busy (a long flush), keep answering the server."""

    def close(self) -> None:
        """Release the connection (idempotent; the connection may already be broken)."""


class SourceFactory(Protocol):
    """Opens a source that streams from ``start_lsn`` (called once per session)."""

    def __call__(self, start_lsn: Lsn) -> Source: ...
