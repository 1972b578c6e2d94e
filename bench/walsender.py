"""The server's side of a pgoutput stream, text against binary: CPU of one decoding pass.

    python bench/walsender.py                  # 300,000 inserts of each shape, 3 passes each
    python bench/walsender.py --rows 1000000 --passes 5

What ``binary 'true'`` saves (or costs) the walsender, measured without a client: one
backend runs ``pg_logical_slot_peek_binary_changes`` over the same slot (the same WAL)
with pgoutput's options, alternately without and with ``binary 'true'``; the CPU of that
backend (``/proc/<pid>/stat``, so other load on the machine does not count) is the cost of
decoding the WAL and running the output (or send) functions. Prints the median per change
and the ratio binary / text.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
from workload import SHAPES, server, shape

SLOT = "bench_walsender"
PUBLICATION = "bench_walsender_pub"
TABLE = "bench_ws"


def backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_pass(conn: psycopg.Connection[tuple[object, ...]], pid: int, *,
             binary: bool) -> tuple[float, int]:
    """CPU seconds of one decoding pass over the slot, and the messages it gave."""
    options = ["proto_version", "1", "publication_names", PUBLICATION]
    options += ["binary", "true"] if binary else []
    before = backend_cpu(pid)
    row = conn.execute("SELECT count(*) FROM pg_logical_slot_peek_binary_changes(%s, NULL, "
                       "NULL, VARIADIC %s)", (SLOT, options)).fetchone()
    return backend_cpu(pid) - before, int(str(row[0])) if row else 0


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="walsender CPU of pgoutput text vs binary")
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--passes", type=int, default=3)
    p.add_argument("--dsn", default=None, help="a server on this machine (default: a "
                   "throwaway local cluster)")
    args = p.parse_args(argv)
    with server(args.dsn) as dsn, psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_backend_pid()").fetchone()
        assert row is not None
        pid = int(str(row[0]))
        for name in SHAPES:
            table = shape(name, TABLE)
            conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
            conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
            conn.execute(table.schema)
            conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}")
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (SLOT,))
            try:
                conn.execute(table.insert, {"rows": args.rows})
                cpu: dict[bool, list[float]] = {False: [], True: []}
                # a slot reaches its consistent point at a running-xacts record (CHECKPOINT
                # logs one): until then a peek skips the workload's transaction
                deadline = time.monotonic() + 60
                while one_pass(conn, pid, binary=False)[1] < args.rows:  # also warms caches
                    if time.monotonic() > deadline:
                        raise SystemExit("the slot never decoded the workload")
                    conn.execute("CHECKPOINT")
                for _ in range(args.passes):
                    for binary in (False, True):
                        seconds, messages = one_pass(conn, pid, binary=binary)
                        if messages < args.rows:
                            raise SystemExit(f"the slot gave {messages} messages")
                        cpu[binary].append(round(seconds, 2))
            finally:
                conn.execute("SELECT pg_drop_replication_slot(%s)", (SLOT,))
            text, binary_cpu = statistics.median(cpu[False]), statistics.median(cpu[True])
            print(f"{name}: {args.rows:,} inserts, {args.passes} passes each: text "
                  f"{text / args.rows * 1e6:.2f} µs/change ({cpu[False]}), binary "
                  f"{binary_cpu / args.rows * 1e6:.2f} µs/change ({cpu[True]}): "
                  f"binary / text {binary_cpu / text:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
