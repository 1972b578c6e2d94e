"""FlushWriter: flushes written beside the read loop, positions safe only once durable."""

from __future__ import annotations

import threading

import pytest

from cdc.errors import LakeError
from cdc.stream.batcher import Batch
from cdc.stream.writer import FlushWriter


class FakeBuffer:
    """A detached table buffer whose cut() is the batch name (the writer only cuts)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def cut(self) -> Batch:
        return self.name  # type: ignore[return-value]


class TestFlushWriter:
    def test_position_is_safe_only_after_its_buffers_are_written(self) -> None:
        """While a flush's write is blocked, its LSN is not reported; once written, it is."""
        gate = threading.Event()
        written: list[str] = []

        def write(batch: Batch) -> None:
            gate.wait(timeout=30)
            written.append(str(batch))

        writer = FlushWriter(write)
        try:
            writer.submit([FakeBuffer("a")], 100)  # type: ignore[list-item]
            assert writer.pending
            assert writer.safe() is None
            gate.set()
            assert writer.wait() == 100
            assert written == ["a"]
            assert not writer.pending
            assert writer.safe() is None  # reported once
        finally:
            writer.close()

    def test_flushes_are_written_in_the_order_submitted(self) -> None:
        """One thread, first in first out: a later flush never overtakes an earlier one."""
        written: list[str] = []
        writer = FlushWriter(lambda batch: written.append(str(batch)))
        try:
            for i in range(20):
                writer.submit([FakeBuffer(f"{i}a"), FakeBuffer(f"{i}b")], i)  # type: ignore[list-item]
            assert writer.wait() == 19
            assert written == [f"{i}{part}" for i in range(20) for part in "ab"]
        finally:
            writer.close()

    def test_a_failed_write_is_raised_in_the_loop_and_nothing_after_it_is_safe(self) -> None:
        """The writer's error comes out of the next submit/wait; later flushes are not
        written and their positions never reported."""
        written: list[str] = []

        def write(batch: Batch) -> None:
            if str(batch) == "bad":
                raise LakeError("disk full", fix="free space")
            written.append(str(batch))

        writer = FlushWriter(write)
        try:
            writer.submit([FakeBuffer("bad")], 10)  # type: ignore[list-item]
            with pytest.raises(LakeError, match="disk full"):
                writer.wait()
            with pytest.raises(LakeError):
                writer.submit([FakeBuffer("later")], 20)  # type: ignore[list-item]
            assert written == []
        finally:
            writer.close()
