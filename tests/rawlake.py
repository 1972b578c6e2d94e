"""Reading the raw layer back in tests: every file of a table, in change order."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cdc.config import Settings
from cdc.lake.store import LocalLake
from cdc.stream.streamer import Stopper, Streamer, StreamStats


def raw_files(lake_dir: Path, table: str) -> list[Path]:
    return sorted((lake_dir / "raw" / table).glob("load_date=*/*.parquet"))


def read_raw(lake_dir: Path, table: str) -> list[dict[str, Any]]:
    """All raw rows of ``table`` ordered by (_commit_lsn, _seq), duplicates kept."""
    files = raw_files(lake_dir, table)
    if not files:
        return []
    tables = [pq.read_table(f) for f in files]
    rows = pa.concat_tables(tables, promote_options="default").to_pylist()
    return sorted(rows, key=lambda r: (r["_commit_lsn"], r["_seq"]))


def dedupe(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Drop replayed copies: (_commit_lsn, _seq) identifies a change."""
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    for row in rows:
        seen.setdefault((row["_commit_lsn"], row["_seq"]), row)
    return sorted(seen.values(), key=lambda r: (r["_commit_lsn"], r["_seq"]))


def replay(rows: list[dict[str, Any]], key: str = "id") -> dict[Any, dict[str, Any]]:
    """The table's state after applying the changes in order (last change per key wins)."""
    state: dict[Any, dict[str, Any]] = {}
    for row in dedupe(rows):
        op = row["_op"]
        if op == "t":
            state.clear()
        elif op == "d":
            state.pop(row[key], None)
        else:
            state[row[key]] = {k: v for k, v in row.items() if not k.startswith("_")}
    return state


def prepare(settings: Settings) -> None:
    """Create publication and slot now (as `cdc stream` does at start), before a workload."""
    Streamer(settings, LocalLake(settings.lake)).prepare()


def stream_until_caught_up(settings: Settings) -> StreamStats:
    return Streamer(settings, LocalLake(settings.lake)).run(until_caught_up=True)


@contextmanager
def streaming_in_thread(settings: Settings) -> Iterator[Streamer]:
    """Run a streamer in a background thread; stop it (flush + ack) on exit."""
    stopper = Stopper()
    streamer = Streamer(settings, LocalLake(settings.lake), stopper)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            streamer.run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield streamer
    finally:
        stopper.requested = True
        thread.join(timeout=60)
    assert not thread.is_alive(), "streamer did not stop"
    if errors:
        raise errors[0]


def cdc_command(settings: Settings, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cdc", "stream", "--dsn", settings.dsn, "--lake", settings.lake,
            "--slot", settings.slot, "--publication", settings.publication, *extra]


def start_cdc(settings: Settings, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(cdc_command(settings, *extra), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ})


def run_cdc(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdc", *args], capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


#: a small parent process: a child's ru_maxrss starts at its parent's RSS at fork time,
#: so measuring cdc forked from the (large) pytest process would count pytest's memory
_MEASURE = (
    "import os, sys, subprocess\n"
    "proc = subprocess.Popen(sys.argv[1:])\n"
    "_, status, usage = os.wait4(proc.pid, 0)\n"
    "sys.stderr.write(f'peak_rss_kib={usage.ru_maxrss}\\n')\n"
    "sys.exit(os.waitstatus_to_exitcode(status))\n"
)


def run_cdc_measured(settings: Settings, *extra: str) -> tuple[int, str, float]:
    """Run `cdc stream` to completion; (exit code, stderr, peak RSS in MB)."""
    result = subprocess.run([sys.executable, "-c", _MEASURE, *cdc_command(settings, *extra)],
                            capture_output=True, text=True, timeout=600,
                            stdin=subprocess.DEVNULL, check=False)
    peak = [line for line in result.stderr.splitlines() if line.startswith("peak_rss_kib=")]
    return result.returncode, result.stderr, int(peak[-1].split("=")[1]) / 1024 if peak else -1


def stop(proc: subprocess.Popen[str], sig: int = signal.SIGTERM, timeout: float = 60) -> int:
    proc.send_signal(sig)
    return proc.wait(timeout=timeout)
