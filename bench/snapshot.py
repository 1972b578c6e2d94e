"""Snapshot benchmark: ``cdc snapshot`` against a plain ``psql \\copy`` of the same table.

``psql -c "\\copy bench_snap to /dev/null (format binary)"`` is the ceiling for
reading one table (one connection, binary, no parsing, nothing written) and
the report gives cdc's rate as a ratio of it, measured in the same run on the
same machine. cdc copies the table in chunks (CTID ranges on PostgreSQL 14+) over
``--workers`` connections (binary COPY parsed by the compiled core, written as zstd
parquet, fsynced).

    python bench/snapshot.py                      # 5M rows, 2 workers, 500k-row chunks,
                                                  # narrow then wide rows
    python bench/snapshot.py --shape narrow
    python bench/snapshot.py --workers 1
    python bench/snapshot.py --rows 1000000 --chunk-rows 250000 --rounds 3
    python bench/snapshot.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Table (``--shape``, bench/workload.py): ``wide`` is ``bench_snap(id bigint primary key,
name text, price numeric(10,2), qty integer, created_at timestamptz, active boolean,
payload jsonb)``; ``narrow`` is ``bench_snap(id bigserial primary key, customer_id int,
store_id int, amount numeric(10,2), qty int, status text, created_at timestamptz)``; ``--rows``
rows from generate_series, then VACUUM ANALYZE (so the planner's row estimate,
which sizes the chunks, is right). The lake must hold exactly ``--rows`` rows.

Peak RSS is ``ru_maxrss`` of ``os.wait4`` on the cdc child. Linux carries the
pre-exec high-water mark over ``exec``, so that figure never reads below this
process' own peak (printed as the floor); when cdc's peak is above the floor it
is cdc's own. Server CPU is the CPU of finished backends, read from the
postmaster's ``cutime + cstime`` (only when the server runs on this machine and
its /proc entry is readable). "Other load" is the machine's busy CPU time during
a run (/proc/stat) less the child's and the server's: when it is more than a
fraction of a second, something else competed for the CPUs and the run is noisy
(use ``--rounds`` for medians).

Target: cdc rate ≥ 0.7 x the COPY rate with 2 workers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
from workload import SHAPES, Shape, rate, server, shape

TABLE = "bench_snap"
SLOT = "bench_snap"
PUBLICATION = "bench_snap"
TARGET_RATIO = 0.7
PSQL = "/usr/bin/psql"

Conn = psycopg.Connection[tuple[object, ...]]


@dataclass
class Measured:
    """One child process: wall and CPU seconds, peak RSS (wait4), exit code, stderr."""

    seconds: float
    cpu_seconds: float
    max_rss_kib: int
    returncode: int
    stderr: str
    server_cpu_seconds: float | None = None
    machine_cpu_seconds: float | None = None  # all CPUs' busy time during the run

    @property
    def other_cpu_seconds(self) -> float | None:
        """Busy CPU time on the machine not spent by this child or the server's backends."""
        if self.machine_cpu_seconds is None or self.server_cpu_seconds is None:
            return None
        return max(self.machine_cpu_seconds - self.cpu_seconds - self.server_cpu_seconds, 0.0)

    @property
    def rss_mb(self) -> float:
        return self.max_rss_kib / 1024


@dataclass
class Round:
    copy: Measured
    cdc: Measured
    lake_rows: int
    lake_files: int


class ServerCpu:
    """CPU seconds of the server's finished backends (postmaster's cutime + cstime)."""

    def __init__(self, conn: Conn) -> None:
        self.stat: Path | None = None
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        with contextlib.suppress(OSError, ValueError, IndexError, TypeError):
            backend = Path(f"/proc/{row[0]}/stat")  # type: ignore[index]
            ppid = int(self._fields(backend)[1])
            stat = Path(f"/proc/{ppid}/stat")
            if "postgres" in self._fields(stat)[0] or "postmaster" in self._fields(stat)[0]:
                self.stat = stat
        self.ticks = os.sysconf("SC_CLK_TCK")

    @staticmethod
    def _fields(stat: Path) -> list[str]:
        text = stat.read_text()
        name_end = text.rindex(")")
        # [comm, ppid, ...] (state dropped): field n ≥ 4 of stat(5) is index n - 3 here
        return [text[text.index("(") + 1:name_end], *text[name_end + 2:].split()[1:]]

    def read(self) -> float | None:
        if self.stat is None:
            return None
        try:
            fields = self._fields(self.stat)
        except OSError:
            return None
        # stat(5) fields 16 (cutime) and 17 (cstime) → indices 13, 14 here
        return (int(fields[13]) + int(fields[14])) / self.ticks


def machine_busy_seconds() -> float | None:
    """Busy time of all CPUs (user, nice, system, irq, softirq) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    ticks = sum(int(v) for v in (fields[1], fields[2], fields[3], fields[6], fields[7]))
    return ticks / os.sysconf("SC_CLK_TCK")


def run_measured(cmd: Sequence[str], server_cpu: ServerCpu) -> Measured:
    """Run ``cmd``: wall time, CPU time and peak RSS from ``os.wait4``, server CPU, and the
    whole machine's busy CPU time (other load shows up as the rest)."""
    with tempfile.TemporaryFile() as err:
        cpu_before = server_cpu.read()
        busy_before = machine_busy_seconds()
        started = time.perf_counter()
        proc = subprocess.Popen(list(cmd), stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        err.seek(0)
        text = err.read().decode(errors="replace")
    # the backend exits right after the client disconnects; give the postmaster a moment
    # to reap it so its CPU lands in cutime
    time.sleep(0.3)
    cpu_after = server_cpu.read()
    busy_after = machine_busy_seconds()
    server = (cpu_after - cpu_before
              if cpu_before is not None and cpu_after is not None else None)
    busy = (busy_after - busy_before
            if busy_before is not None and busy_after is not None else None)
    return Measured(seconds, usage.ru_utime + usage.ru_stime, usage.ru_maxrss,
                    proc.returncode, text, server, busy)


def drop_slot_and_publication(conn: Conn) -> None:
    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                 "WHERE slot_name = %s", (SLOT,))
    conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")


def prepare(conn: Conn, rows: int, table: Shape) -> tuple[float, float]:
    """(Re)create and fill the table; its size in MB and the seconds it took."""
    started = time.perf_counter()
    drop_slot_and_publication(conn)
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(table.schema)
    conn.execute(table.insert, {"rows": rows})
    conn.execute(f"VACUUM ANALYZE {TABLE}")
    row = conn.execute("SELECT pg_total_relation_size(%s)", (TABLE,)).fetchone()
    assert row is not None
    assert isinstance(row[0], int)
    return row[0] / 2**20, time.perf_counter() - started


def lake_rows(lake: Path) -> tuple[int, int]:
    """Rows in the raw layer (parquet footers) and the number of parquet files."""
    files = sorted((lake / "raw").rglob("*.parquet"))
    return sum(pq.read_metadata(path).num_rows for path in files), len(files)



def copy_command(dsn: str) -> list[str]:
    return [PSQL, "-X", "-v", "ON_ERROR_STOP=1", "-d", dsn,
            "-c", f"\\copy {TABLE} to /dev/null (format binary)"]


def cdc_command(dsn: str, lake: Path, args: argparse.Namespace) -> list[str]:
    wrapper = shlex.split(args.cdc_wrapper) if args.cdc_wrapper else []
    return [*wrapper, sys.executable, "-m", "cdc", "snapshot", "--dsn", dsn, "--lake", str(lake),
            "--slot", SLOT, "--publication", PUBLICATION, "--workers", str(args.workers),
            "--chunk-rows", str(args.chunk_rows), "--log-level", "warning"]


def run_round(conn: Conn, dsn: str, lake: Path, args: argparse.Namespace,  # noqa: PLR0917  one round's server, lake, workload and tallies
              server_cpu: ServerCpu, failures: list[str]) -> Round:
    """psql \\copy, then cdc snapshot into ``lake`` on a fresh slot; check the lake."""
    copy = run_measured(copy_command(dsn), server_cpu)
    if copy.returncode != 0:
        failures.append(f"psql exited {copy.returncode}: {copy.stderr.strip()[-500:]}")
    print(f"  psql \\copy (binary): {copy.seconds:.2f}s  (other load "
          f"{fmt_cpu(copy.other_cpu_seconds)})", flush=True)
    drop_slot_and_publication(conn)
    # a publication of just this table, so the snapshot never copies anything else
    conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}")
    cdc = run_measured(cdc_command(dsn, lake, args), server_cpu)
    if cdc.returncode != 0:
        failures.append(f"cdc snapshot exited {cdc.returncode}: {cdc.stderr.strip()[-2000:]}")
    print(f"  cdc snapshot: {cdc.seconds:.2f}s  (other load {fmt_cpu(cdc.other_cpu_seconds)})  "
          f"[{cdc.stderr.strip()[-160:]}]", flush=True)
    drop_slot_and_publication(conn)
    written, nfiles = lake_rows(lake)
    if written != args.rows:
        failures.append(f"MISMATCH: the lake holds {written} rows, expected {args.rows}")
    return Round(copy, cdc, written, nfiles)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def fmt_cpu(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{seconds:.2f} s"


def report(args: argparse.Namespace, table: Shape, table_mb: float, rounds: list[Round],
           failures: list[str]) -> dict[str, object]:
    """Print the human report; the machine-readable summary."""
    n = args.rows
    copy_s = statistics.median(r.copy.seconds for r in rounds)
    cdc_s = statistics.median(r.cdc.seconds for r in rounds)
    copy_rate, cdc_rate = rate(n, copy_s), rate(n, cdc_s)
    ratio = cdc_rate / copy_rate if copy_rate else 0.0
    rss_mb = max(r.cdc.rss_mb for r in rounds)
    floor_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cdc_cpu = statistics.median(r.cdc.cpu_seconds for r in rounds)
    copy_cpu = statistics.median(r.copy.cpu_seconds for r in rounds)
    srv = [r.cdc.server_cpu_seconds for r in rounds]
    cdc_srv = statistics.median(srv) if None not in srv else None  # type: ignore[type-var]
    srv = [r.copy.server_cpu_seconds for r in rounds]
    copy_srv = statistics.median(srv) if None not in srv else None  # type: ignore[type-var]
    ok_ratio = ratio >= TARGET_RATIO
    med = " (median)" if len(rounds) > 1 else ""

    print()
    print(f"snapshot benchmark, {table.name} rows: {len(rounds)} round(s), each psql \\copy "
          "(binary) then cdc "
          f"snapshot, {args.workers} worker(s), {args.chunk_rows:,}-row chunks, "
          f"{os.cpu_count()} CPUs")
    print(f"  rows                   {n:>12,}   (table {table_mb:,.0f} MB; lake rows "
          f"{rounds[-1].lake_rows:,} in {rounds[-1].lake_files} files)")
    if len(rounds) > 1:
        for i, r in enumerate(rounds, start=1):
            print(f"  round {i}: copy {r.copy.seconds:6.2f} s, cdc {r.cdc.seconds:6.2f} s "
                  f"(CPU {r.cdc.cpu_seconds:5.2f} s), ratio {r.copy.seconds / r.cdc.seconds:.2f}")
    print(f"  psql \\copy{med:13s} {copy_s:>12.2f} s   {copy_rate:>10,.0f} rows/s   "
          f"CPU {copy_cpu:.2f} s, server CPU {fmt_cpu(copy_srv)}")
    print(f"  cdc snapshot{med:11s} {cdc_s:>12.2f} s   {cdc_rate:>10,.0f} rows/s   "
          f"CPU {cdc_cpu:.2f} s ({cdc_cpu / n * 1e6:.2f} µs/row, {cdc_cpu / cdc_s:.2f} cores), "
          f"server CPU {fmt_cpu(cdc_srv)}")
    print(f"  ratio (cdc / copy)     {ratio:>12.2f}     target ≥ {TARGET_RATIO}  "
          f"{'OK' if ok_ratio else 'MISSED'}")
    print(f"  cdc peak RSS (wait4)   {rss_mb:>12.0f} MB    (floor: this process' peak "
          f"{floor_mb:.0f} MB)")
    for failure in failures:
        print(f"\n!!!!!!!! {failure}", file=sys.stderr)
    return {
        "bench": "snapshot", "shape": table.name, "rows": n, "workers": args.workers,
        "chunk_rows": args.chunk_rows,
        "rounds": len(rounds), "cpus": os.cpu_count(), "table_mb": round(table_mb, 1),
        "lake_rows": [r.lake_rows for r in rounds], "lake_files": [r.lake_files for r in rounds],
        "copy_seconds": round(copy_s, 3), "copy_rows_per_s": round(copy_rate),
        "copy_cpu_seconds": round(copy_cpu, 2),
        "copy_server_cpu_seconds": None if copy_srv is None else round(copy_srv, 2),
        "cdc_seconds": round(cdc_s, 3), "cdc_rows_per_s": round(cdc_rate),
        "cdc_cpu_seconds": round(cdc_cpu, 2),
        "cdc_server_cpu_seconds": None if cdc_srv is None else round(cdc_srv, 2),
        "cdc_rss_mb": round(rss_mb, 1), "rss_floor_mb": round(floor_mb, 1),
        "copy_seconds_all": [round(r.copy.seconds, 3) for r in rounds],
        "cdc_seconds_all": [round(r.cdc.seconds, 3) for r in rounds],
        "cdc_cpu_seconds_all": [round(r.cdc.cpu_seconds, 2) for r in rounds],
        "copy_other_cpu_seconds_all": [_round(r.copy.other_cpu_seconds) for r in rounds],
        "cdc_other_cpu_seconds_all": [_round(r.cdc.other_cpu_seconds) for r in rounds],
        "ratio": round(ratio, 3), "target_ratio": TARGET_RATIO, "ratio_ok": ok_ratio,
        "counts_ok": not failures,
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="cdc snapshot vs psql \\copy (binary) of the same table",
        epilog="The first lines of bench/snapshot.py explain the setup and the target.")
    p.add_argument("--rows", type=int, default=5_000_000,
                   help="rows in the table (default 5000000)")
    p.add_argument("--workers", type=int, default=2,
                   help="passed to cdc snapshot --workers (default 2)")
    p.add_argument("--chunk-rows", type=int, default=500_000,
                   help="passed to cdc snapshot --chunk-rows (default 500000)")
    p.add_argument("--rounds", type=int, default=1,
                   help="copy + snapshot pairs on the same table; medians are reported")
    p.add_argument("--dsn", default=None,
                   help=f"use this server instead of a throwaway local cluster; its table "
                   f"{TABLE!r}, publication {PUBLICATION!r} and slot {SLOT!r} are replaced, "
                   "then dropped")
    p.add_argument("--shape", choices=[*SHAPES, "both"], default="both",
                   help="the table's row shape (default both: narrow, then wide)")
    p.add_argument("--cdc-wrapper", default=None,
                   help="command prefix for the cdc run, e.g. 'py-spy record -o p.txt -f raw "
                   "--' (its time then includes the wrapper's overhead)")
    p.add_argument("--keep-lake", action="store_true",
                   help="keep the lake folder (its path is printed)")
    args = p.parse_args(argv)
    if args.rows < 1 or args.workers < 1 or args.chunk_rows < 1 or args.rounds < 1:
        p.error("--rows, --workers, --chunk-rows and --rounds must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    failures: list[str] = []
    lake_root = Path(tempfile.mkdtemp(prefix="cdc-bench-snap-"))
    try:
        with server(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
            summaries = []
            try:
                for name in SHAPES if args.shape == "both" else (args.shape,):
                    table = shape(name, TABLE)
                    table_mb, setup_s = prepare(conn, args.rows, table)
                    print(f"table {TABLE} ({name}): {args.rows:,} rows, {table_mb:,.0f} MB "
                          f"(created in {setup_s:.1f}s)", flush=True)
                    server_cpu = ServerCpu(conn)
                    rounds = []
                    for i in range(1, args.rounds + 1):
                        print(f"round {i}/{args.rounds}", flush=True)
                        lake = lake_root / name / f"round{i}"
                        rounds.append(run_round(conn, dsn, lake, args, server_cpu, failures))
                        if not args.keep_lake:
                            shutil.rmtree(lake, ignore_errors=True)
                    summaries.append(report(args, table, table_mb, rounds, failures))
            finally:
                with contextlib.suppress(psycopg.Error):
                    drop_slot_and_publication(conn)
                    if args.dsn:
                        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        for summary in summaries:
            print(json.dumps(summary), flush=True)
        return 1 if failures else 0
    finally:
        if args.keep_lake:
            print(f"lake kept at {lake_root}", file=sys.stderr)
        else:
            shutil.rmtree(lake_root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
