"""Streaming benchmark: ``cdc stream`` against ``pg_recvlogical`` on the same changes.

Both read a pgoutput slot created before the workload, so both slots hold the
same changes; ``pg_recvlogical`` (writing to /dev/null) is the ceiling for one
slot (DESIGN.md section 6) and the report gives cdc's rate as a ratio of it,
measured in the same run on the same machine.

    python bench/stream.py        # 1M inserts, 250k updates, 5k small tx, 50k deletes
    python bench/stream.py --rows 200000 --updates 50000 --small-tx 2000 --deletes 10000
    python bench/stream.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Workload (in this order, each its own transaction unless said otherwise):
one INSERT of ``--rows`` rows, one UPDATE of ``--updates`` rows, ``--small-tx``
transactions of one change each (alternating insert / update), one DELETE of
``--deletes`` rows. Every change is one raw row, so the lake must hold exactly
rows + updates + small-tx + deletes rows.

Targets: cdc rate ≥ 0.9 x pg_recvlogical's, cdc peak RSS ≤ 512 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
from psycopg import sql

SLOT_CDC = "bench_cdc"
SLOT_RECV = "bench_recv"
PUBLICATION = "bench_pub"
TABLE = "bench"
TARGET_RATIO = 0.9
TARGET_RSS_MB = 512.0

SCHEMA_SQL = f"""
CREATE TABLE {TABLE} (
    id bigint PRIMARY KEY,
    name text,
    price numeric(10,2),
    qty integer,
    created_at timestamptz,
    active boolean,
    payload jsonb
)
"""

INSERT_SQL = f"""
INSERT INTO {TABLE}
SELECT g,
       'name-' || g,
       mod(g, 100000) / 100.0,
       mod(g, 1000)::integer,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
       mod(g, 2) = 0,
       jsonb_build_object('id', g, 'tag', 'tag-' || mod(g, 17), 'score', mod(g, 101))
FROM generate_series(1, %(rows)s) AS g
"""

UPDATE_SQL = f"""
UPDATE {TABLE}
SET price = price + 1, qty = qty + 1, active = NOT active, name = name || '-u'
WHERE id <= %(updates)s
"""

# A DO block run outside a transaction block may COMMIT: one transaction per loop pass.
SMALL_TX_SQL = f"""
DO $$
DECLARE
    n bigint := {{n}};
    base bigint := {{base}};
    nrows bigint := {{nrows}};
BEGIN
    FOR i IN 1..n LOOP
        IF i % 2 = 1 THEN
            INSERT INTO {TABLE}
            VALUES (base + i, 'small-' || i, 1.50, i, now(), true,
                    jsonb_build_object('small', i));
        ELSE
            UPDATE {TABLE} SET qty = qty + 1, name = 'small-upd-' || i
            WHERE id = ((i - 1) % nrows) + 1;
        END IF;
        COMMIT;
    END LOOP;
END
$$
"""

DELETE_SQL = f"DELETE FROM {TABLE} WHERE id > %(low)s AND id <= %(high)s"


@dataclass
class Measured:
    """One child process: wall seconds, its own peak RSS, exit code and stderr."""

    seconds: float
    max_rss_kib: int
    returncode: int
    stderr: str


@dataclass(frozen=True)
class Expected:
    inserts: int
    updates: int
    deletes: int

    @property
    def total(self) -> int:
        return self.inserts + self.updates + self.deletes


def run_measured(cmd: Sequence[str]) -> Measured:
    """Run ``cmd``; its wall time and its own peak RSS.

    ``wait4``'s ``ru_maxrss`` of a child forked from this process never reads below
    this process' RSS (Linux keeps the pre-exec high-water mark: ``/bin/true`` reads
    ~65 MB here), so the peak comes from GNU time, a small process that forks the
    command itself; ``wait4`` is the fallback where it is missing.
    """
    gnu_time = Path("/usr/bin/time")
    with tempfile.TemporaryFile() as err, tempfile.NamedTemporaryFile("r") as rss:
        full = list(cmd)
        if gnu_time.exists():
            full = [str(gnu_time), "-f", "%M", "-o", rss.name, *full]
        started = time.perf_counter()
        proc = subprocess.Popen(full, stdout=subprocess.DEVNULL, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        err.seek(0)
        text = err.read().decode(errors="replace")
        max_rss_kib = usage.ru_maxrss
        lines = rss.read().split()
        if gnu_time.exists() and lines and lines[-1].isdigit():
            max_rss_kib = int(lines[-1])
    return Measured(seconds, max_rss_kib, proc.returncode, text)


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[str]:
    """The DSN of the server to use: ``dsn`` as given, or a throwaway LocalCluster."""
    if dsn:
        yield dsn
        return
    from cdc.sandbox import LocalCluster

    with LocalCluster() as cluster:
        yield cluster.dsn()


def drop_slots(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    conn.execute(
        "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
        "WHERE slot_name = ANY(%s)",
        ([SLOT_CDC, SLOT_RECV],),
    )


def prepare(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """Table, publication and both slots; the LSN at which the slots start."""
    drop_slots(conn)
    conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(SCHEMA_SQL)
    conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES")
    for slot in (SLOT_CDC, SLOT_RECV):
        conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    row = conn.execute(
        "SELECT max(confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots "
        "WHERE slot_name = ANY(%s)", ([SLOT_CDC, SLOT_RECV],)).fetchone()
    assert row is not None
    return int(row[0])  # type: ignore[call-overload]


def workload(conn: psycopg.Connection[tuple[object, ...]], args: argparse.Namespace) -> Expected:
    """Run the workload; the changes it produced, by kind."""
    steps: list[tuple[str, float]] = []

    def step(name: str, query: str | sql.Composable, params: dict[str, int] | None = None) -> None:
        started = time.perf_counter()
        conn.execute(query, params)  # type: ignore[arg-type]
        steps.append((name, time.perf_counter() - started))

    step("insert", INSERT_SQL, {"rows": args.rows})
    step("update", UPDATE_SQL, {"updates": args.updates})
    if args.small_tx:
        step("small-tx", SMALL_TX_SQL.format(n=int(args.small_tx), base=int(args.rows),
                                             nrows=int(args.rows)))
    step("delete", DELETE_SQL, {"low": args.rows - args.deletes, "high": args.rows})
    print("workload: " + ", ".join(f"{name} {secs:.1f}s" for name, secs in steps), flush=True)
    small_inserts = (args.small_tx + 1) // 2
    return Expected(inserts=args.rows + small_inserts,
                    updates=args.updates + args.small_tx - small_inserts,
                    deletes=args.deletes)


def current_lsn(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[int, str]:
    row = conn.execute("SELECT pg_current_wal_lsn() - '0/0', pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    return int(row[0]), str(row[1])  # type: ignore[call-overload]


def lake_rows(lake: Path) -> tuple[int, Counter[str], int]:
    """Rows in the raw layer, rows by ``_op``, and the number of parquet files."""
    files = sorted((lake / "raw").rglob("*.parquet"))
    ops: Counter[str] = Counter()
    total = 0
    for path in files:
        total += pq.read_metadata(path).num_rows
        ops.update(pq.read_table(path, columns=["_op"]).column("_op").to_pylist())
    return total, ops, len(files)


def rate(changes: int, seconds: float) -> float:
    return changes / seconds if seconds > 0 else 0.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--rows", type=int, default=1_000_000,
                   help="rows inserted by the one big INSERT transaction (default 1000000)")
    p.add_argument("--updates", type=int, default=250_000,
                   help="rows updated by the one big UPDATE transaction (default 250000)")
    p.add_argument("--small-tx", type=int, default=5_000,
                   help="small transactions of one change each (default 5000)")
    p.add_argument("--deletes", type=int, default=50_000,
                   help="rows deleted by the one big DELETE transaction (default 50000)")
    p.add_argument("--dsn", default=None,
                   help="use this server instead of a throwaway local cluster; its table "
                   f"{TABLE!r}, publication {PUBLICATION!r} and slots {SLOT_CDC!r}, "
                   f"{SLOT_RECV!r} are replaced (the server should be otherwise idle)")
    p.add_argument("--flush-rows", type=int, default=None,
                   help="passed to cdc stream --flush-rows")
    p.add_argument("--cdc-wrapper", default=None,
                   help="command prefix for the cdc run, e.g. 'py-spy record -o p.txt -f raw "
                   "--' (its time and RSS then include the wrapper)")
    p.add_argument("--keep-lake", default=None, metavar="DIR",
                   help="write the lake here and keep it (default: a temporary folder)")
    args = p.parse_args(argv)
    if args.rows < 1 or min(args.updates, args.small_tx, args.deletes) < 0:
        p.error("--rows must be ≥ 1 and the other counts ≥ 0")
    if args.updates > args.rows or args.deletes > args.rows:
        p.error("--updates and --deletes cannot exceed --rows")
    return args


def stream_both(dsn: str, args: argparse.Namespace, lake_dir: Path,
                failures: list[str]) -> tuple[Expected, float, Measured, Measured]:
    """Prepare, run the workload, then drain both slots: pg_recvlogical first, then cdc."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        start_lsn = prepare(conn)
        try:
            expected = workload(conn, args)
            end_lsn, end_lsn_text = current_lsn(conn)
            wal_mb = (end_lsn - start_lsn) / 2**20
            print(f"changes expected: {expected.total} ({expected.inserts} inserts, "
                  f"{expected.updates} updates, {expected.deletes} deletes); "
                  f"WAL {wal_mb:.0f} MB up to {end_lsn_text}", flush=True)

            pg_recvlogical = shutil.which("pg_recvlogical") or "/usr/bin/pg_recvlogical"
            recv = run_measured([
                pg_recvlogical, "-d", dsn, "--slot", SLOT_RECV, "--start",
                "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}",
                "--endpos", end_lsn_text, "-f", "/dev/null", "--no-loop",
            ])
            if recv.returncode != 0:
                failures.append(f"pg_recvlogical exited {recv.returncode}: "
                                f"{recv.stderr.strip()[-500:]}")
            print(f"pg_recvlogical: {recv.seconds:.2f}s", flush=True)

            cdc_cmd = [
                sys.executable, "-m", "cdc", "stream", "--dsn", dsn, "--lake", str(lake_dir),
                "--slot", SLOT_CDC, "--publication", PUBLICATION, "--until-caught-up",
                "--log-level", "warning",
            ]
            if args.flush_rows is not None:
                cdc_cmd += ["--flush-rows", str(args.flush_rows)]
            if args.cdc_wrapper:
                cdc_cmd = [*shlex.split(args.cdc_wrapper), *cdc_cmd]
            cdc = run_measured(cdc_cmd)
            if cdc.returncode != 0:
                failures.append(f"cdc stream exited {cdc.returncode}: "
                                f"{cdc.stderr.strip()[-2000:]}")
            print(f"cdc stream: {cdc.seconds:.2f}s ({cdc.stderr.strip()[-200:]})", flush=True)
        finally:
            if args.dsn:  # do not leave slots pinning WAL on a real server
                with contextlib.suppress(psycopg.Error):
                    drop_slots(conn)
    return expected, wal_mb, recv, cdc


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lake_dir = Path(args.keep_lake) if args.keep_lake else Path(
        tempfile.mkdtemp(prefix="cdc-bench-lake-"))
    failures: list[str] = []
    try:
        with server(args.dsn) as dsn:
            expected, wal_mb, recv, cdc = stream_both(dsn, args, lake_dir, failures)
        written, ops, nfiles = lake_rows(lake_dir)
        want_ops = {"c": expected.inserts, "u": expected.updates, "d": expected.deletes}
        want_ops = {op: n for op, n in want_ops.items() if n}
        if written != expected.total or dict(ops) != want_ops:
            failures.append(f"MISMATCH: the lake holds {written} rows {dict(ops)}, expected "
                            f"{expected.total} {want_ops}")
    finally:
        if not args.keep_lake:
            shutil.rmtree(lake_dir, ignore_errors=True)
    recv_rate = rate(expected.total, recv.seconds)
    cdc_rate = rate(expected.total, cdc.seconds)
    ratio = cdc_rate / recv_rate if recv_rate else 0.0
    rss_mb = cdc.max_rss_kib / 1024
    ok_ratio = ratio >= TARGET_RATIO
    ok_rss = rss_mb <= TARGET_RSS_MB

    print()
    print("streaming benchmark (same changes in both slots; pg_recvlogical first)")
    print(f"  changes                {expected.total:>12,}   (lake rows {written:,} in "
          f"{nfiles} files)")
    print(f"  WAL decoded            {wal_mb:>12.0f} MB")
    print(f"  pg_recvlogical         {recv.seconds:>12.2f} s   {recv_rate:>10,.0f} changes/s   "
          f"peak RSS {recv.max_rss_kib / 1024:.0f} MB")
    print(f"  cdc stream             {cdc.seconds:>12.2f} s   {cdc_rate:>10,.0f} changes/s   "
          f"peak RSS {rss_mb:.0f} MB")
    print(f"  ratio (cdc / recv)     {ratio:>12.2f}     target ≥ {TARGET_RATIO}  "
          f"{'OK' if ok_ratio else 'MISSED'}")
    print(f"  cdc peak RSS           {rss_mb:>12.0f} MB    target ≤ {TARGET_RSS_MB:.0f} MB  "
          f"{'OK' if ok_rss else 'MISSED'}")
    for failure in failures:
        print(f"\n!!!!!!!! {failure}", file=sys.stderr)
    print(json.dumps({
        "bench": "stream",
        "rows": args.rows, "updates": args.updates, "small_tx": args.small_tx,
        "deletes": args.deletes, "flush_rows": args.flush_rows,
        "changes": expected.total, "lake_rows": written, "lake_files": nfiles,
        "wal_mb": round(wal_mb, 1),
        "recv_seconds": round(recv.seconds, 3), "recv_changes_per_s": round(recv_rate),
        "recv_rss_mb": round(recv.max_rss_kib / 1024, 1),
        "cdc_seconds": round(cdc.seconds, 3), "cdc_changes_per_s": round(cdc_rate),
        "cdc_rss_mb": round(rss_mb, 1), "ratio": round(ratio, 3),
        "target_ratio": TARGET_RATIO, "target_rss_mb": TARGET_RSS_MB,
        "ratio_ok": ok_ratio, "rss_ok": ok_rss, "counts_ok": not failures,
    }))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
