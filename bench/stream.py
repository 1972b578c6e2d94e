"""Streaming benchmark: ``cdc stream`` against ``pg_recvlogical`` on the same changes.

Both read a pgoutput slot created before the workload, so both slots hold the
same changes; ``pg_recvlogical`` (writing to /dev/null) is the ceiling for one
slot (DESIGN.md section 6) and the report gives cdc's rate as a ratio of it,
measured in the same run on the same machine.

    python bench/stream.py        # both shapes: narrow, then wide (the defaults below)
    python bench/stream.py --shape narrow     # 1M inserts, 250k updates, 67k deletes
    python bench/stream.py --shape wide       # 1M inserts, 250k updates, 5k small tx, 50k
    python bench/stream.py --rows 200000 --updates 50000 --small-tx 2000 --deletes 10000
    python bench/stream.py --rounds 3        # three slot sets, medians (less noise)
    python bench/stream.py --binary off      # cdc in text only (default: text and binary)
    python bench/stream.py --dsn postgresql://postgres@127.0.0.1:5432/postgres

Shapes (bench/workload.py): ``narrow`` is ``bench(id bigserial, customer_id int,
store_id int, amount numeric(10,2), qty int, status text, created_at timestamptz)``,
where the consumer's decoding is the bottleneck; ``wide`` has ``name text, price
numeric(10,2), qty int, created_at timestamptz, active boolean, payload jsonb``, where
the walsender's output functions are.

Workload (in this order, each its own transaction unless said otherwise):
one INSERT of ``--rows`` rows, one UPDATE of ``--updates`` rows, ``--small-tx``
transactions of one change each (alternating insert / update), one DELETE of
``--deletes`` rows. Every change is one raw row, so the lake must hold exactly
rows + updates + small-tx + deletes rows.

Both consumers need a core each next to the walsender's; on a small machine
other load moves the numbers by tens of percent: use ``--rounds`` and compare
the CPU seconds too.

Targets: cdc rate ≥ 0.9 x pg_recvlogical's, cdc peak RSS ≤ 512 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pyarrow.parquet as pq
from measure import SATURATED, Measured, busy_note, run_measured, server_stat
from workload import SHAPES, Shape, rate, server, shape

SLOT_CDC = "bench_cdc"
SLOT_BINARY = "bench_bin"
SLOT_RECV = "bench_recv"
SLOT_PATTERN = "^bench_(cdc|bin|recv)(_[0-9]+)?$"
#: --binary → the cdc runs of each round: text (--binary off) and/or binary (--binary on)
MODES = {"off": ("text",), "on": ("binary",), "both": ("text", "binary")}
PUBLICATION = "bench_pub"
TABLE = "bench"
TARGET_RATIO = 0.9
TARGET_RSS_MB = 512.0

# A DO block run outside a transaction block may COMMIT: one transaction per loop pass.
SMALL_TX_SQL = """
DO $$
DECLARE
    n bigint := {n};
    base bigint := {base};
    nrows bigint := {nrows};
BEGIN
    FOR i IN 1..n LOOP
        IF i % 2 = 1 THEN
            {insert_one};
        ELSE
            {update_one};
        END IF;
        COMMIT;
    END LOOP;
END
$$
"""

DELETE_SQL = f"DELETE FROM {TABLE} WHERE id > %(low)s AND id <= %(high)s"

Conn = psycopg.Connection[tuple[object, ...]]


@dataclass(frozen=True)
class Expected:
    inserts: int
    updates: int
    deletes: int

    @property
    def total(self) -> int:
        return self.inserts + self.updates + self.deletes

    @property
    def by_op(self) -> dict[str, int]:
        ops = {"c": self.inserts, "u": self.updates, "d": self.deletes}
        return {op: n for op, n in ops.items() if n}


@dataclass
class Round:
    recv: Measured
    cdc: dict[str, Measured]  # by mode: text, binary
    lake_rows: int
    lake_files: int


def slot_pairs(rounds: int, modes: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """(pg_recvlogical slot, cdc slot by mode) of each round."""
    names = {"text": SLOT_CDC, "binary": SLOT_BINARY}

    def suffix(i: int) -> str:
        return "" if i == 1 else f"_{i}"

    return [(SLOT_RECV + suffix(i), {m: names[m] + suffix(i) for m in modes})
            for i in range(1, rounds + 1)]


def drop_slots(conn: Conn) -> None:
    conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                 "WHERE slot_name ~ %s", (SLOT_PATTERN,))


def prepare(conn: Conn, rounds: int, table: Shape, modes: Sequence[str]) -> int:
    """Table, publication and every round's slots; the LSN at which the slots start."""
    drop_slots(conn)
    conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
    conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
    conn.execute(table.schema)
    conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR ALL TABLES")
    for recv, cdc in slot_pairs(rounds, modes):
        for slot in (recv, *cdc.values()):
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
    row = conn.execute("SELECT max(confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots "
                       "WHERE slot_name ~ %s", (SLOT_PATTERN,)).fetchone()
    assert row is not None
    assert isinstance(row[0], int)
    return row[0]


def workload(conn: Conn, args: argparse.Namespace, table: Shape) -> Expected:
    """Run the workload; the changes it produced, by kind."""
    steps: list[str] = []

    def step(name: str, query: str, params: dict[str, int] | None = None) -> None:
        started = time.perf_counter()
        conn.execute(query, params)
        steps.append(f"{name} {time.perf_counter() - started:.1f}s")

    step("insert", table.insert, {"rows": args.rows})
    step("update", table.update, {"updates": args.updates})
    if args.small_tx:
        one = {"id": "base + i", "i": "i"}
        step("small-tx", SMALL_TX_SQL.format(
            n=int(args.small_tx), base=int(args.rows), nrows=int(args.rows),
            insert_one=table.insert_one.format(**one),
            update_one=table.update_one.format(id="((i - 1) % nrows) + 1", i="i")))
    step("delete", DELETE_SQL, {"low": args.rows - args.deletes, "high": args.rows})
    print("workload: " + ", ".join(steps), flush=True)
    small_inserts = (args.small_tx + 1) // 2
    return Expected(inserts=args.rows + small_inserts,
                    updates=args.updates + args.small_tx - small_inserts,
                    deletes=args.deletes)


def current_lsn(conn: Conn) -> tuple[int, str]:
    row = conn.execute("SELECT (pg_current_wal_lsn() - '0/0')::bigint, "
                       "pg_current_wal_lsn()::text").fetchone()
    assert row is not None
    assert isinstance(row[0], int)
    return row[0], str(row[1])


def lake_rows(lake: Path) -> tuple[int, Counter[str], int]:
    """Rows in the raw layer, rows by ``_op``, and the number of parquet files."""
    files = sorted((lake / "raw").rglob("*.parquet"))
    ops: Counter[str] = Counter()
    total = 0
    for path in files:
        total += pq.read_metadata(path).num_rows
        ops.update(pq.read_table(path, columns=["_op"]).column("_op").to_pylist())
    return total, ops, len(files)



def recv_command(dsn: str, slot: str, end_lsn: str) -> list[str]:
    pg_recvlogical = shutil.which("pg_recvlogical") or "/usr/bin/pg_recvlogical"
    return [pg_recvlogical, "-d", dsn, "--slot", slot, "--start",
            "-o", "proto_version=1", "-o", f"publication_names={PUBLICATION}",
            "--endpos", end_lsn, "-f", "/dev/null", "--no-loop"]


def cdc_command(dsn: str, slot: str, lake: Path, args: argparse.Namespace,
                mode: str) -> list[str]:
    cmd = [sys.executable, "-m", "cdc", "stream", "--dsn", dsn, "--lake", str(lake),
           "--slot", slot, "--publication", PUBLICATION, "--until-caught-up",
           "--log-level", "warning"]
    if args.flush_rows is not None:
        cmd += ["--flush-rows", str(args.flush_rows)]
    cmd += ["--binary", "on" if mode == "binary" else "off"]
    if args.cdc_wrapper:
        cmd = [*shlex.split(args.cdc_wrapper), *cmd]
    return cmd


def busy_runs(rounds: Sequence[Round]) -> list[str]:
    """Runs during which the machine's CPUs were (nearly) saturated."""
    return [f"round {i} {name} ({m.machine_busy:.0%})"
            for i, r in enumerate(rounds, start=1)
            for name, m in (("pg_recvlogical", r.recv),
                            *((f"cdc {k}", v) for k, v in r.cdc.items()))
            if m.machine_busy is not None and m.machine_busy >= SATURATED]


def run_round(dsn: str, slots: tuple[str, dict[str, str]], end_lsn: str, lake: Path,  # noqa: PLR0913, PLR0917  one round's server, lake, workload and tallies
              args: argparse.Namespace, expected: Expected, failures: list[str]) -> Round:
    """Drain one round's slots: pg_recvlogical first, then cdc in each mode (text and binary
    alternate which goes first, round by round) into ``lake/<mode>``; check each lake."""
    recv_slot, cdc_slots = slots
    stat = server_stat(dsn)
    recv = run_measured(recv_command(dsn, recv_slot, end_lsn), stat)
    if recv.returncode != 0:
        failures.append(f"pg_recvlogical exited {recv.returncode}: {recv.stderr.strip()[-500:]}")
    print(f"  pg_recvlogical ({recv_slot}): {recv.seconds:.2f}s{busy_note(recv)}", flush=True)
    cdc: dict[str, Measured] = {}
    order = list(cdc_slots) if args.round % 2 else list(reversed(cdc_slots))
    written, nfiles = 0, 0
    for mode in order:
        slot = cdc_slots[mode]
        run = run_measured(cdc_command(dsn, slot, lake / mode, args, mode), stat)
        if run.returncode != 0:
            failures.append(f"cdc stream exited {run.returncode}: {run.stderr.strip()[-2000:]}")
        print(f"  cdc stream {mode} ({slot}): {run.seconds:.2f}s{busy_note(run)}  "
              f"[{run.stderr.strip()[-120:]}]", flush=True)
        written, ops, nfiles = lake_rows(lake / mode)
        if written != expected.total or dict(ops) != expected.by_op:
            failures.append(f"MISMATCH ({slot}): the lake holds {written} rows {dict(ops)}, "
                            f"expected {expected.total} {expected.by_op}")
        cdc[mode] = run
    return Round(recv, {m: cdc[m] for m in cdc_slots}, written, nfiles)


def stream_all(dsn: str, args: argparse.Namespace, lake_root: Path, table: Shape,
               failures: list[str]) -> tuple[Expected, float, list[Round]]:
    """Prepare, run the workload, then drain every slot pair."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        start_lsn = prepare(conn, args.rounds, table, MODES[args.binary])
        try:
            expected = workload(conn, args, table)
            end_lsn, end_lsn_text = current_lsn(conn)
            wal_mb = (end_lsn - start_lsn) / 2**20
            print(f"changes expected: {expected.total} ({expected.inserts} inserts, "
                  f"{expected.updates} updates, {expected.deletes} deletes); "
                  f"WAL {wal_mb:.0f} MB up to {end_lsn_text}", flush=True)
            rounds = []
            for i, slots in enumerate(slot_pairs(args.rounds, MODES[args.binary]), start=1):
                print(f"round {i}/{args.rounds}", flush=True)
                args.round = i
                lake = lake_root / f"round{i}"
                rounds.append(run_round(dsn, slots, end_lsn_text, lake, args, expected,
                                        failures))
                if not args.keep_lake:
                    shutil.rmtree(lake, ignore_errors=True)
        finally:
            if args.dsn:  # do not leave slots pinning WAL on a real server
                with contextlib.suppress(psycopg.Error):
                    drop_slots(conn)
    return expected, wal_mb, rounds


def server_note(rounds: list[Round], pick: Callable[[Round], Measured], n: int) -> str:
    """The server's CPU for this consumer (median of the rounds), when it was measured."""
    values = [v for r in rounds if (v := pick(r).server_cpu_seconds) is not None]
    if not values:
        return ""
    cpu = statistics.median(values)
    return f"; server CPU {cpu:.2f} s ({cpu / n * 1e6:.1f} µs/change)"


def report(args: argparse.Namespace, expected: Expected, wal_mb: float, rounds: list[Round],
           failures: list[str], *, table: Shape) -> dict[str, object]:
    """Print the human report; the machine-readable summary."""
    n = expected.total
    recv_s = statistics.median(r.recv.seconds for r in rounds)
    recv_rate = rate(n, recv_s)
    recv_cpu = statistics.median(r.recv.cpu_seconds for r in rounds)
    med = " (median)" if len(rounds) > 1 else ""
    modes = list(rounds[0].cdc)

    print()
    mode_note = " (cdc in pure Python)" if args.pure_python else ""
    print(f"streaming benchmark, {table.name} rows{mode_note}: {len(rounds)} round(s), each "
          f"pg_recvlogical (text) then cdc {' and '.join(modes)} on their own slots of the "
          "same changes")
    print(f"  changes                {n:>12,}   (lake rows {rounds[-1].lake_rows:,} in "
          f"{rounds[-1].lake_files} files)")
    print(f"  WAL decoded            {wal_mb:>12.0f} MB")
    if len(rounds) > 1:
        for i, r in enumerate(rounds, start=1):
            runs = ", ".join(f"cdc {m} {r.cdc[m].seconds:6.2f} s (CPU {r.cdc[m].cpu_seconds:5.2f}"
                             f" s, ratio {r.recv.seconds / r.cdc[m].seconds:.2f})" for m in modes)
            print(f"  round {i}: pg_recvlogical {r.recv.seconds:6.2f} s, {runs}")
    print(f"  pg_recvlogical{med:9s} {recv_s:>12.2f} s   {recv_rate:>10,.0f} changes/s   "
          f"CPU {recv_cpu:.2f} s ({recv_cpu / n * 1e6:.1f} µs/change)"
          f"{server_note(rounds, lambda r: r.recv, n)}")
    summary: dict[str, object] = {
        "bench": "stream", "shape": table.name, "pure_python": args.pure_python,
        "modes": modes, "rows": args.rows, "updates": args.updates,
        "small_tx": args.small_tx, "deletes": args.deletes, "flush_rows": args.flush_rows,
        "rounds": len(rounds), "changes": n, "lake_rows": [r.lake_rows for r in rounds],
        "lake_files": [r.lake_files for r in rounds], "wal_mb": round(wal_mb, 1),
        "recv_seconds": round(recv_s, 3), "recv_changes_per_s": round(recv_rate),
        "recv_cpu_seconds": round(recv_cpu, 2),
        "recv_seconds_all": [round(r.recv.seconds, 3) for r in rounds],
        "target_ratio": TARGET_RATIO, "target_rss_mb": TARGET_RSS_MB, "counts_ok": not failures,
    }
    for m in modes:
        cdc_s = statistics.median(r.cdc[m].seconds for r in rounds)
        cdc_rate = rate(n, cdc_s)
        ratio = cdc_rate / recv_rate if recv_rate else 0.0
        rss_mb = max(r.cdc[m].rss_mb for r in rounds)
        cdc_cpu = statistics.median(r.cdc[m].cpu_seconds for r in rounds)
        ok_ratio, ok_rss = ratio >= TARGET_RATIO, rss_mb <= TARGET_RSS_MB
        label = f"cdc {m}{med}"
        print(f"  {label:22s} {cdc_s:>12.2f} s   {cdc_rate:>10,.0f} changes/s   "
              f"CPU {cdc_cpu:.2f} s ({cdc_cpu / n * 1e6:.1f} µs/change)"
              f"{server_note(rounds, lambda r, m=m: r.cdc[m], n)}")
        print(f"    ratio (cdc {m} / recv) {ratio:>8.2f}     target ≥ {TARGET_RATIO}  "
              f"{'OK' if ok_ratio else 'MISSED'}")
        print(f"    peak RSS           {rss_mb:>12.0f} MB    target ≤ {TARGET_RSS_MB:.0f} MB  "
              f"{'OK' if ok_rss else 'MISSED'}")
        summary[m] = {
            "cdc_seconds": round(cdc_s, 3), "cdc_changes_per_s": round(cdc_rate),
            "cdc_cpu_seconds": round(cdc_cpu, 2), "cdc_rss_mb": round(rss_mb, 1),
            "cdc_seconds_all": [round(r.cdc[m].seconds, 3) for r in rounds],
            "cdc_cpu_seconds_all": [round(r.cdc[m].cpu_seconds, 2) for r in rounds],
            "server_cpu_seconds_all": [r.cdc[m].server_cpu_seconds for r in rounds],
            "ratio": round(ratio, 3), "ratio_ok": ok_ratio, "rss_ok": ok_rss}
    busy = busy_runs(rounds)
    if busy:
        print(f"  WARNING: the machine's CPUs were saturated during {', '.join(busy)}: other "
              "processes competed with the consumer and the walsender, so those times are "
              "not comparable; run again on a quiet machine")
    for failure in failures:
        print(f"\n!!!!!!!! {failure}", file=sys.stderr)
    summary["machine_busy_all"] = [
        [round(m.machine_busy, 2) if m.machine_busy is not None else None
         for m in (r.recv, *r.cdc.values())] for r in rounds]
    summary["busy_machine"] = bool(busy)
    return summary


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="cdc stream vs pg_recvlogical on the same pgoutput changes",
        epilog="The first lines of bench/stream.py explain the workload and the targets.")
    p.add_argument("--rows", type=int, default=1_000_000,
                   help="rows inserted by the one big INSERT transaction (default 1000000)")
    p.add_argument("--updates", type=int, default=250_000,
                   help="rows updated by the one big UPDATE transaction (default 250000)")
    p.add_argument("--small-tx", type=int, default=None,
                   help="small transactions of one change each (default 5000 wide, 0 narrow)")
    p.add_argument("--deletes", type=int, default=None,
                   help="rows deleted by the one big DELETE transaction (default 50000 wide, "
                   "67000 narrow)")
    p.add_argument("--shape", choices=[*SHAPES, "both"], default="both",
                   help="the table's row shape (default both: narrow, then wide)")
    p.add_argument("--pure-python", action="store_true",
                   help="run cdc with CDC_PURE_PYTHON=1 (the pure-Python decoder)")
    p.add_argument("--binary", choices=sorted(MODES), default="both",
                   help="cdc's transfer format: off (text), on (pgoutput's binary transfer) "
                   "or both, each round draining one slot per format (default both); "
                   "pg_recvlogical always reads text")
    p.add_argument("--dsn", default=None,
                   help="use this server instead of a throwaway local cluster; its table "
                   f"{TABLE!r}, publication {PUBLICATION!r} and slots {SLOT_RECV!r}, "
                   f"{SLOT_CDC!r} (and _N) are replaced, then the slots dropped; the "
                   "server should be otherwise idle (the publication is FOR ALL TABLES)")
    p.add_argument("--flush-rows", type=int, default=None,
                   help="passed to cdc stream --flush-rows")
    p.add_argument("--rounds", type=int, default=1,
                   help="slot pairs to drain (all hold the same changes); the report gives "
                   "medians (default 1)")
    p.add_argument("--cdc-wrapper", default=None,
                   help="command prefix for the cdc run, e.g. 'py-spy record -o p.txt -f raw "
                   "--' (its time then includes the wrapper's overhead)")
    p.add_argument("--keep-lake", default=None, metavar="DIR",
                   help="write the lakes under DIR/roundN and keep them (default: a temporary "
                   "folder, removed)")
    args = p.parse_args(argv)
    if args.rows < 1 or args.rounds < 1 or min(args.updates, args.small_tx or 0,
                                                args.deletes or 0) < 0:
        p.error("--rows and --rounds must be ≥ 1 and the other counts ≥ 0")
    if args.updates > args.rows or (args.deletes or 0) > args.rows:
        p.error("--updates and --deletes cannot exceed --rows")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    lake_root = Path(args.keep_lake) if args.keep_lake else Path(
        tempfile.mkdtemp(prefix="cdc-bench-lake-"))
    if args.pure_python:
        os.environ["CDC_PURE_PYTHON"] = "1"  # the cdc child inherits it
    failures: list[str] = []
    summaries = []
    try:
        with server(args.dsn) as dsn:
            for name in SHAPES if args.shape == "both" else (args.shape,):
                table = shape(name, TABLE)
                run = argparse.Namespace(**vars(args))
                run.deletes = table.deletes if args.deletes is None else args.deletes
                run.small_tx = table.small_tx if args.small_tx is None else args.small_tx
                print(f"== {name} rows", flush=True)
                expected, wal_mb, rounds = stream_all(dsn, run, lake_root / name, table,
                                                      failures)
                summaries.append(report(run, expected, wal_mb, rounds, failures, table=table))
    finally:
        if not args.keep_lake:
            shutil.rmtree(lake_root, ignore_errors=True)
    for summary in summaries:
        print(json.dumps(summary))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
