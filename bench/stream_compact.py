"""Peak memory of ``cdc stream`` with background compaction, through one large transaction.

Invariant 4 bounds the stream's memory by the flush settings, not by transaction size;
compaction running inside ``cdc stream --compact-every`` shares the process, so its reads
must be bounded too. One INSERT of ``--rows`` rows (one transaction, the narrow bench
table) is streamed twice from two slots created before it:

1. the baseline: ``cdc stream --until-caught-up`` without compaction;
2. ``cdc stream --compact-every 1s`` (staged and history), stopped (SIGTERM) once both the
   staged and the history table hold every row.

Both peaks come from GNU time (the child's own RSS); the report gives the ratio of the
second to the first, and the target.

    python bench/stream_compact.py                 # 1M rows, a throwaway local cluster
    python bench/stream_compact.py --rows 200000 --compact-every 2s
    python bench/stream_compact.py --keyless       # the same table without a key
    python bench/stream_compact.py --flush-rows 100000

Target: peak RSS ≤ 512 MB with compaction on.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import psycopg
from measure import Measured, busy_note, run_measured
from stream import PUBLICATION, TABLE, TARGET_RSS_MB
from workload import server, shape

SLOTS = ("bench_plain", "bench_compacting")


def prepare(dsn: str, rows: int, keyless: bool) -> None:
    """The table, the publication, both slots, then the one big transaction."""
    table = shape("narrow", TABLE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for slot in SLOTS:
            conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                         "WHERE slot_name = %s", (slot,))
        conn.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
        conn.execute(f"DROP TABLE IF EXISTS {TABLE}")
        conn.execute(table.schema)
        if keyless:
            conn.execute(f"ALTER TABLE {TABLE} DROP CONSTRAINT {TABLE}_pkey")
            conn.execute(f"ALTER TABLE {TABLE} REPLICA IDENTITY FULL")
        conn.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE {TABLE}")
        for slot in SLOTS:
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (slot,))
        conn.execute(table.insert, {"rows": rows})


def delta_rows(folder: Path) -> int:
    """Rows in the Delta table at ``folder`` by its log (0 before it exists)."""
    from deltalake import DeltaTable
    from deltalake.exceptions import TableNotFoundError

    try:
        actions = DeltaTable(str(folder)).get_add_actions(flatten=True)
    except (TableNotFoundError, OSError):
        return 0
    import pyarrow as pa
    import pyarrow.compute as pc

    total = pc.sum(pa.table(actions)["num_records"]).as_py()
    return int(total or 0)


def stream(dsn: str, slot: str, lake: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cdc", "stream", "--dsn", dsn, "--lake", str(lake),
            "--slot", slot, "--publication", PUBLICATION, "--log-level", "warning", *extra]


def flush(args: argparse.Namespace) -> list[str]:
    return [] if args.flush_rows is None else ["--flush-rows", str(args.flush_rows)]


def run(dsn: str, args: argparse.Namespace, root: Path) -> tuple[Measured, Measured, bool]:
    prepare(dsn, args.rows, args.keyless)
    plain = run_measured(stream(dsn, SLOTS[0], root / "plain", "--until-caught-up",
                                "--compact-every", "0", *flush(args)))
    print(f"  baseline cdc stream --until-caught-up: {plain.seconds:.1f}s, "
          f"{plain.rss_mb:.0f} MB{busy_note(plain)}", flush=True)
    lake = root / "compacting"
    segment = f"public.{TABLE}"
    layers = [lake / "staged" / segment] + ([] if args.keyless else [lake / "history" / segment])

    def compacted() -> bool:
        return all(delta_rows(folder) >= args.rows for folder in layers)

    compacting = run_measured(stream(dsn, SLOTS[1], lake, "--compact-every",
                                     args.compact_every, *flush(args)), stop_when=compacted)
    print(f"  cdc stream --compact-every {args.compact_every}: {compacting.seconds:.1f}s, "
          f"{compacting.rss_mb:.0f} MB{busy_note(compacting)}", flush=True)
    if compacting.returncode != 0:
        print(compacting.stderr[-2000:], file=sys.stderr)
    return plain, compacting, compacted()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1_000_000,
                   help="rows of the one INSERT transaction (default 1000000)")
    p.add_argument("--compact-every", default="1s",
                   help="cdc stream --compact-every (default 1s)")
    p.add_argument("--flush-rows", type=int, default=None,
                   help="cdc stream --flush-rows (default: cdc's, 200000)")
    p.add_argument("--keyless", action="store_true",
                   help="the table without a primary key (REPLICA IDENTITY FULL)")
    p.add_argument("--dsn", default=None, help="use this server instead of a throwaway "
                   f"cluster (its table {TABLE!r}, publication {PUBLICATION!r} and slots "
                   f"{', '.join(SLOTS)} are replaced)")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="cdc-bench-compact-"))
    try:
        with server(args.dsn) as dsn:
            plain, compacting, complete = run(dsn, args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ok = compacting.rss_mb <= TARGET_RSS_MB
    print(f"peak RSS with compaction {compacting.rss_mb:.0f} MB = "
          f"{compacting.rss_mb / plain.rss_mb:.2f}x the stream alone ({plain.rss_mb:.0f} MB); "
          f"target ≤ {TARGET_RSS_MB:.0f} MB {'OK' if ok else 'MISSED'}"
          f"{'' if complete else '; COMPACTION INCOMPLETE'}")
    print(json.dumps({"rows": args.rows, "keyless": args.keyless,
                      "compact_every": args.compact_every,
                      "plain_rss_mb": round(plain.rss_mb, 1),
                      "compacting_rss_mb": round(compacting.rss_mb, 1),
                      "ratio": round(compacting.rss_mb / plain.rss_mb, 3),
                      "complete": complete, "rss_ok": ok}))
    return 0 if ok and complete else 1


if __name__ == "__main__":
    sys.exit(main())
