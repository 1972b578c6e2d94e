"""The ack policy: which position the slot may be told, and when (invariant 1 in one object).

Three positions, each at or behind the one before it:

- **safe**: every change committed before it is durable in raw (written, maybe not yet
  checkpointed). It moves at a commit or keepalive when nothing is buffered, and after a
  flush to the position everything before which had been received (``received``: the
  last commit's end, or the WAL end of a keepalive that came between transactions; a
  flush inside a transaction leaves that transaction's position out: its commit has not
  arrived).
- **durable**: recorded in the lake's checkpoint. It never moves back (the checkpoint
  store keeps the higher of the stored and the saved position).
- **acknowledged**: sent to the server in a standby status update, always the durable
  position, and only after the checkpoint recording it was saved.

An idle stream (no transaction open, nothing buffered) lets the slot move to the server's
position (invariant 5). The policy does no I/O of its own: the checkpoint is a
:class:`Checkpoints` and the status update a callable, so tests drive it without a server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from cdc import faults
from cdc.events import Lsn


class Checkpoints(Protocol):
    """Durable progress (``cdc.lake.checkpoint.CheckpointStore``)."""

    def save(self, lsn: Lsn) -> Lsn:
        """Record ``lsn`` durably unless the stored position is past it; the stored one."""


class AckPolicy:
    """Tracks safe / durable / acknowledged positions of one replication session."""

    def __init__(self, checkpoints: Checkpoints, start: Lsn) -> None:
        self.checkpoints = checkpoints
        self.safe: Lsn = start
        self.durable: Lsn = start
        self.acknowledged: Lsn = 0
        #: every change committed before it has been received (buffered or written)
        self.received: Lsn = start
        self.server_wal_end: Lsn = 0
        self.in_transaction = False

    def begin(self) -> None:
        self.in_transaction = True

    def commit(self, end_lsn: Lsn, *, buffered: bool) -> None:
        """A transaction ended at ``end_lsn``; with nothing buffered it is safe at once."""
        self.in_transaction = False
        self.received = max(self.received, end_lsn)
        if not buffered:
            self.safe = max(self.safe, end_lsn)

    def keepalive(self, wal_end: Lsn, *, buffered: bool) -> None:
        """The server is at ``wal_end``; when idle, that position is safe too (invariant 5)."""
        self.server_wal_end = max(self.server_wal_end, wal_end)
        if self.in_transaction:
            return
        # between transactions, every commit before ``wal_end`` has arrived: once what is
        # buffered is written, ``wal_end`` is safe (a ``cdc stream --until-caught-up`` ends
        # there, not at its last commit, so a backfill recorded after it is applied)
        self.received = max(self.received, wal_end)
        if not buffered:
            self.safe = max(self.safe, wal_end)

    def flushed(self, lsn: Lsn | None = None) -> None:
        """Everything buffered when ``lsn`` was :attr:`received` (default: now) is durable
        in raw: ``lsn`` is safe."""
        self.safe = max(self.safe, self.received if lsn is None else lsn)

    def idle(self, *, buffered: bool) -> bool:
        return not self.in_transaction and not buffered

    def acknowledge(self, send: Callable[[Lsn], None]) -> Lsn:
        """Checkpoint the safe position, *then* send the durable one; the position sent.

        The order is the invariant: a crash (or a failed save) between the two leaves the
        slot behind the checkpoint, never ahead of it.
        """
        if self.safe > self.durable:
            self.durable = max(self.durable, self.checkpoints.save(self.safe))
        faults.hit("status.before_send", lsn=self.durable)
        send(self.durable)
        self.acknowledged = self.durable
        faults.hit("status.after_send", lsn=self.durable)
        return self.durable
