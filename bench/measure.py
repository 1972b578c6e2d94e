"""Measuring a child process: wall and CPU time, its own peak RSS, the machine's load and
the PostgreSQL server's CPU meanwhile (shared by the benchmarks)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg

GNU_TIME = Path("/usr/bin/time")
#: a consumer and the walsender need two cores at most; past this share of the machine's
#: CPU, other processes were competing and the times measure the contention
SATURATED = 0.9


@dataclass
class Measured:
    """One child process: wall and CPU seconds, its own peak RSS, exit code, stderr."""

    seconds: float
    cpu_seconds: float
    max_rss_kib: int
    returncode: int
    stderr: str
    machine_busy_seconds: float | None = None  # CPU seconds of every process meanwhile
    #: CPU seconds of the server's processes that ended meanwhile: the walsender (and the
    #: consumer's other connections), read from the postmaster's reaped children
    server_cpu_seconds: float | None = None

    @property
    def rss_mb(self) -> float:
        return self.max_rss_kib / 1024

    @property
    def machine_busy(self) -> float | None:
        """Share of all the machine's cores busy meanwhile (this child included), 0..1."""
        if self.machine_busy_seconds is None or self.seconds <= 0:
            return None
        return self.machine_busy_seconds / (self.seconds * (os.cpu_count() or 1))


def machine_busy() -> float | None:
    """CPU seconds all processes have used since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: processes' time plus steal
    user, nice, system, _idle, _iowait, _irq, _softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + steal) / os.sysconf("SC_CLK_TCK")


def server_stat(dsn: str) -> Path | None:
    """/proc/<postmaster>/stat of a server on this machine, or None."""
    with psycopg.connect(dsn) as conn:
        row = conn.execute("SHOW data_directory").fetchone()
    try:
        pid = int(Path(str(row[0] if row else ""), "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    stat = Path(f"/proc/{pid}/stat")
    return stat if stat.exists() else None


def reaped_cpu(stat: Path | None) -> float | None:
    """CPU seconds of the postmaster's ended (reaped) children so far: cutime + cstime."""
    if stat is None:
        return None
    fields = stat.read_text().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def settled_reaped_cpu(stat: Path | None) -> float | None:
    """:func:`reaped_cpu` once the consumer's walsender has ended and been reaped (the
    value holds still for 0.2 s; at most 5 s)."""
    value = reaped_cpu(stat)
    deadline = time.monotonic() + 5
    while stat is not None and time.monotonic() < deadline:
        time.sleep(0.2)
        again = reaped_cpu(stat)
        if again == value:
            break
        value = again
    return value


def run_measured(cmd: Sequence[str], stat: Path | None = None,
                 stop_when: Callable[[], bool] | None = None) -> Measured:
    """Run ``cmd``; its wall time, CPU time and its own peak RSS.

    ``wait4``'s ``ru_maxrss`` of a child forked from this process never reads below
    this process' RSS (Linux keeps the pre-exec high-water mark: ``/bin/true`` reads
    ~65 MB here), so the peak comes from GNU time, a small process that forks the
    command itself; ``wait4`` is the fallback where it is missing. ``stop_when``: a
    command that runs until stopped gets SIGTERM once it returns true (polled).
    """
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as report:
        full = list(cmd)
        if GNU_TIME.exists():
            full = [str(GNU_TIME), "-f", "%M %U %S", "-o", report.name, *full]
        busy_before = machine_busy()
        server_before = settled_reaped_cpu(stat)
        started = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err)
        if stop_when is not None:
            terminate_when(proc.pid, stop_when)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        busy_after = machine_busy()
        server_after = settled_reaped_cpu(stat)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        err.seek(0)
        text = err.read().decode(errors="replace")
        max_rss_kib = usage.ru_maxrss
        lines = report.read().strip().splitlines()
        if lines and len(fields := lines[-1].split()) == 3 and fields[0].isdigit():
            max_rss_kib = int(fields[0])
    # CPU: wait4 counts the child and its reaped descendants (GNU time's command)
    busy = None if busy_before is None or busy_after is None else busy_after - busy_before
    server = (None if server_before is None or server_after is None
              else server_after - server_before)
    return Measured(seconds, usage.ru_utime + usage.ru_stime, max_rss_kib, proc.returncode,
                    text, busy, server)


def terminate_when(pid: int, done: Callable[[], bool], poll_seconds: float = 0.5) -> None:
    """Poll ``done`` while process ``pid`` runs (not reaping it); once true, SIGTERM the
    measured command: GNU time's child, or ``pid`` itself without GNU time."""
    while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        if done():
            children = Path(f"/proc/{pid}/task/{pid}/children")
            targets = children.read_text().split() if children.exists() else []
            for target in targets or [str(pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(target), signal.SIGTERM)
            return
        time.sleep(poll_seconds)


def busy_note(m: Measured) -> str:
    busy = m.machine_busy
    return "" if busy is None else f" (machine CPU {busy:.0%} busy)"
