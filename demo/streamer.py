"""Run ``cdc stream`` as a subprocess and watch it through the server's slot views."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg.rows import TupleRow

from demo import DemoFailure, lake_args

Connection = psycopg.Connection[TupleRow]
POLL = 0.2


def lsn_int(lsn: str) -> int:
    """``'16/B374D848'`` → its 64-bit position."""
    high, low = lsn.split("/")
    return (int(high, 16) << 32) | int(low, 16)


@dataclass
class Streamer:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def failure(self, what: str) -> DemoFailure:
        return DemoFailure(f"{what}; last lines of {self.log_path}:\n{self.tail()}")


@contextlib.contextmanager
def running(dsn: str, lake: str | Path, slot: str, publication: str,
            log_path: Path) -> Iterator[Streamer]:
    """Start ``cdc stream``; whatever happens, it is not left running."""
    cmd = [sys.executable, "-m", "cdc", "stream", "--dsn", dsn, *lake_args(lake),
           "--slot", slot, "--publication", publication]
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        yield Streamer(proc, log_path)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def snapshot(dsn: str, lake: str | Path, slot: str, publication: str) -> str:
    """Run ``cdc snapshot`` (it creates the slot); return its summary line."""
    cmd = [sys.executable, "-m", "cdc", "snapshot", "--dsn", dsn, *lake_args(lake),
           "--slot", slot, "--publication", publication, "--log-level", "warning"]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise DemoFailure(f"cdc snapshot exited {result.returncode}:\n{result.stderr[-2000:]}")
    return result.stderr.strip().splitlines()[-1]


def _one(conn: Connection, query: str, params: tuple[object, ...]) -> tuple[object, ...] | None:
    return conn.execute(query, params).fetchone()


def wait_for_slot(conn: Connection, streamer: Streamer, slot: str, publication: str,
                  timeout: float = 60.0) -> None:
    """Wait until the streamer has created its publication and slot."""
    deadline = time.monotonic() + timeout
    query = ("SELECT EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = %s)"
             " AND EXISTS (SELECT FROM pg_publication WHERE pubname = %s)")
    while _one(conn, query, (slot, publication)) != (True,):
        if (rc := streamer.proc.poll()) is not None:
            raise streamer.failure(f"the streamer exited with {rc} before creating slot {slot!r}")
        if time.monotonic() > deadline:
            raise streamer.failure(
                f"slot {slot!r} and publication {publication!r} did not appear in {timeout:.0f}s")
        time.sleep(POLL)


def wait_until_acknowledged(conn: Connection, slot: str, lsn: str,
                            timeout: float = 60.0) -> float | None:
    """Wait until the slot's confirmed_flush_lsn reaches ``lsn``; return seconds it took.

    The streamer acknowledges a position only once it is durable in the lake, so
    this waits for its next flush (``--flush-seconds``). None on timeout.
    """
    start = time.monotonic()
    query = ("SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_replication_slots"
             " WHERE slot_name = %s")
    while _one(conn, query, (lsn, slot)) != (True,):
        if time.monotonic() - start > timeout:
            return None
        time.sleep(POLL)
    return time.monotonic() - start


def stop(streamer: Streamer, timeout: float = 60.0) -> float:
    """SIGTERM the streamer and wait for a clean exit; return seconds it took."""
    start = time.monotonic()
    streamer.proc.send_signal(signal.SIGTERM)
    try:
        rc = streamer.proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        streamer.proc.kill()
        streamer.proc.wait()
        raise streamer.failure(f"the streamer did not exit within {timeout:.0f}s of SIGTERM "
                               "(killed)") from None
    if rc != 0:
        raise streamer.failure(f"the streamer exited with {rc} after SIGTERM (expected 0)")
    return time.monotonic() - start


def confirmed_flush(conn: Connection, slot: str, timeout: float = 10.0) -> str:
    """The slot's confirmed_flush_lsn once its walsender has gone (has read our last ack)."""
    deadline = time.monotonic() + timeout
    query = ("SELECT active, confirmed_flush_lsn::text FROM pg_replication_slots"
             " WHERE slot_name = %s")
    while True:
        row = _one(conn, query, (slot,))
        if row is None:
            raise DemoFailure(f"slot {slot!r} is gone after the streamer stopped")
        active, lsn = row
        if not active or time.monotonic() > deadline:
            if not isinstance(lsn, str):
                raise DemoFailure(f"slot {slot!r} has no confirmed_flush_lsn")
            return lsn
        time.sleep(POLL)
