"""A scripted replication source: plays pgoutput frames and records the status updates sent.

It implements ``cdc.source.protocol.Source``, so a stream session runs against it without a
server. When the script is played out it asks the session to stop (the stopper's flag), so
the session flushes, acknowledges and returns, as on SIGTERM.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

from test_pgoutput import begin_msg, commit_msg, insert_msg, relation_msg, tuple_data

from cdc.events import Lsn
from cdc.stream.streamer import Stopper

INT4, TEXT = 23, 25
OID = 16384


def xlog(lsn: Lsn, payload: bytes) -> bytes:
    """An XLogData frame (``w``) carrying one pgoutput message at ``lsn``."""
    return b"w" + struct.pack("!QQq", lsn, lsn, 0) + payload


def keepalive(wal_end: Lsn, *, reply: bool = True) -> bytes:
    """A primary keepalive (``k``): the server's WAL end, and whether it wants a reply."""
    return b"k" + struct.pack("!Qq?", wal_end, 0, reply)


def relation(oid: int = OID, name: str = "t") -> bytes:
    """``public.<name>`` (id int4 key, v text), replica identity default."""
    return xlog(1, relation_msg(oid, "public", name, "d", [(1, "id", INT4, -1),
                                                          (0, "v", TEXT, -1)]))


def begin(commit_lsn: Lsn, xid: int) -> bytes:
    return xlog(commit_lsn - 0x10, begin_msg(commit_lsn, 0, xid))


def insert(lsn: Lsn, key: int, oid: int = OID) -> bytes:
    return xlog(lsn, insert_msg(oid, tuple_data(str(key), f"v{key}")))


def commit(commit_lsn: Lsn, end_lsn: Lsn) -> bytes:
    return xlog(commit_lsn, commit_msg(commit_lsn, end_lsn, 0))


def transaction(commit_lsn: Lsn, xid: int, keys: Iterable[int]) -> list[bytes]:
    """Begin, one insert per key, Commit ending at ``commit_lsn + 8``."""
    keys = list(keys)
    inserts = [insert(commit_lsn - 0x10 + 1 + i, k) for i, k in enumerate(keys)]
    return [begin(commit_lsn, xid), *inserts, commit(commit_lsn, commit_lsn + 8)]


@dataclass
class Status:
    """One standby status update: the position sent, after how many frames were played."""

    lsn: Lsn
    played: int


@dataclass
class ScriptedSource:
    """Plays ``frames`` in order, then stops the session through ``stopper``."""

    frames: list[bytes]
    stopper: Stopper
    #: called with each position before it is recorded as sent (checks the lake at that moment)
    on_status: Callable[[Lsn], None] | None = None
    sent: list[Status] = field(default_factory=list)
    played: int = 0
    closed: bool = False

    def read_frames(self, timeout: float) -> list[bytes]:
        """One frame at a time (the status updates record how many were played)."""
        if self.played == len(self.frames):
            self.stopper.requested = True
            return []
        frame = self.frames[self.played]
        self.played += 1
        return [frame]

    def send_status(self, flush_lsn: Lsn, *, reply: bool = False) -> None:
        if self.on_status is not None:
            self.on_status(flush_lsn)
        self.sent.append(Status(flush_lsn, self.played))

    def answering(self) -> AbstractContextManager[None]:
        return nullcontext()

    def close(self) -> None:
        self.closed = True

    def acknowledged(self) -> list[Lsn]:
        return [s.lsn for s in self.sent]
