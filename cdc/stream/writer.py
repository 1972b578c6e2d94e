"""Flushes on a thread of their own, so the stream is read while a flush is written.

A flush converts each table's buffered columns to Arrow, encodes parquet and makes it
durable; done in the read loop, the walsender stalls meanwhile (its socket fills) and
the consumer's time adds to the server's instead of overlapping it. Arrow and parquet
release the GIL, so one writer thread next to the read loop keeps both busy.

Invariant 1 holds because a flush's position is reported as safe only after every
buffer of that flush (and of every earlier one: one thread, first in first out) is
durable. At most one flush waits behind the one being written: memory stays bounded
by the flush settings (twice them at most), and a slow lake slows the reader down.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence

from cdc.events import Lsn
from cdc.stream.batcher import Batch, TableBuffer

Flush = tuple[Sequence[TableBuffer], Lsn | None]


class FlushWriter:
    """One thread that cuts and writes detached table buffers in the order submitted."""

    def __init__(self, write: Callable[[Batch], None]) -> None:
        self._write = write
        self._queue: queue.Queue[Flush | None] = queue.Queue(maxsize=1)
        self._lock = threading.Lock()
        self._pending = 0
        self._safe: Lsn | None = None
        self._error: BaseException | None = None
        self._idle = threading.Condition(self._lock)
        self._thread = threading.Thread(target=self._run, name="cdc-flush", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> bool:
        """True while some submitted buffers are not yet durable."""
        return self._pending > 0

    def submit(self, buffers: Sequence[TableBuffer], lsn: Lsn | None) -> None:
        """Write ``buffers``; then ``lsn`` (if any) is safe. Blocks while one flush waits."""
        self.check()
        with self._lock:
            self._pending += 1
        self._queue.put((buffers, lsn))

    def safe(self) -> Lsn | None:
        """The highest position whose flush is durable (once; None if none since); raises
        the writer's error, if it failed."""
        self.check()
        with self._lock:
            lsn, self._safe = self._safe, None
        return lsn

    def wait(self) -> Lsn | None:
        """Wait until everything submitted is durable; then :meth:`safe`."""
        with self._idle:
            while self._pending and self._error is None:
                self._idle.wait()
        return self.safe()

    def check(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Stop the thread after what was submitted (errors are left to :meth:`check`)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            buffers, lsn = item
            try:
                if self._error is None:
                    for buffer in buffers:
                        self._write(buffer.cut())
            except BaseException as exc:  # handed to the read loop, which raises it
                self._error = exc
            with self._idle:
                self._pending -= 1
                if lsn is not None and self._error is None:
                    self._safe = lsn if self._safe is None else max(self._safe, lsn)
                self._idle.notify_all()
