"""Compaction benchmark: MERGE 100k raw changes into staged tables of 1M and 10M rows.

No PostgreSQL: the lake is built directly, with the raw layout and schema the stream
writes (plus a checkpoint), in a temporary folder. Per table size:

1. load: N snapshot-style rows (``_op = 'r'``, negative ``_seq``, labelled files of
   ``--file-rows``) compacted into a new staged table (reported, not the target);
2. merge: ``--changes`` changes in transactions of 1000 (80% updates, 15% inserts of new
   keys, 5% deletes), raw files of ``--file-rows``, compacted into that table. This is
   what is measured: seconds, changes/s and the process' peak RSS during the merge.

``--pattern random`` spreads the updated and deleted keys uniformly over the table (the
worst case for copy-on-write: every data file holds some of them); ``recent`` draws them
from the newest 2 x ``--changes`` keys (orders, sessions: recent rows change), the same
hot set at every table size. Raw input is written by one process and compacted by
another, so the peak RSS reported is the compaction's own (VmHWM, reset before it starts).
Target: the 10M merge takes ≤ 2x the 1M merge.

After the staged merge, the same raw input is compacted into the table's history
(``history/``, SCD2) and measured apart: the load opens one version per row, the merge
closes the current versions of the updated and deleted keys and appends the new ones
(``--no-history`` skips it).

``--raw-history N`` measures instead what the raw layer's age costs: a lake with N old
raw files over a year of ``load_date`` partitions, compacted, then one new file; the run
that applies it is timed with listing calls and keys listed, once listing all of raw (no
floor recorded, as before the floor existed) and once from the recorded floor.

    python bench/compact.py                                   # 1M and 10M, both patterns
    python bench/compact.py --sizes 1000000 --pattern random --keep /tmp/lake
    python bench/compact.py --raw-history 50000 [--keyless]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from cdc.history.writer import compact_history
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.layout import compaction_floor_key
from cdc.lake.maintain import consolidate
from cdc.lake.raw import encode
from cdc.lake.store import LocalLake
from cdc.staged.compactor import CompactOptions, staged_watermark
from cdc.staged.files import list_raw
from cdc.staged.runner import compact_lake
from cdc.stream.batcher import META_SCHEMA

TABLE = "public.bench"
SLOT = "bench"
LOAD_LSN = 0x1_0000_0000
TX_CHANGES = 1000
TARGET_RATIO = 2.0
SCHEMA = pa.schema(
    [pa.field("id", pa.int64(), metadata={"pg_type": "bigint", "pg_key": "1"}),
     pa.field("name", pa.string(), metadata={"pg_type": "text", "pg_key": "0"}),
     pa.field("amount", pa.decimal128(12, 2), metadata={"pg_type": "numeric(12,2)",
                                                        "pg_key": "0"}),
     pa.field("qty", pa.int32(), metadata={"pg_type": "integer", "pg_key": "0"}),
     pa.field("updated_at", pa.timestamp("us", tz="UTC"),
              metadata={"pg_type": "timestamp with time zone", "pg_key": "0"}),
     *META_SCHEMA],
    metadata={"cdc_table": TABLE, "cdc_key": "id"})


def raw_rows(ids: pa.Array, ops: pa.Array, commit_lsns: pa.Array, seqs: pa.Array) -> pa.Table:
    """Raw rows with values derived from the key (deletes carry only the key)."""
    n = len(ids)
    deleted = pc.equal(ops, "d")
    blank = pa.nulls(n)
    stamp = pc.cast(pc.add(pc.multiply(ids, 1_000_000), 1_700_000_000_000_000),
                    pa.timestamp("us", tz="UTC"))
    columns = [
        ids,
        pc.if_else(deleted, blank.cast(pa.string()),
                   pc.binary_join_element_wise("name-", pc.cast(ids, pa.string()), "")),
        pc.if_else(deleted, blank.cast(pa.decimal128(12, 2)),
                   pc.cast(pc.cast(pc.divide(pc.cast(pc.remainder(ids, 10_000_000), pa.float64()),
                                             100.0), pa.float64()), pa.decimal128(12, 2))),
        pc.if_else(deleted, blank.cast(pa.int32()), pc.cast(pc.remainder(ids, 1000), pa.int32())),
        pc.if_else(deleted, blank.cast(stamp.type), stamp),
        ops, commit_lsns, commit_lsns, seqs, pa.array([1] * n, pa.int64()),
        pc.cast(commit_lsns, pa.timestamp("us", tz="UTC")), pa.nulls(n, pa.list_(pa.string())),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def write_raw(lake: LocalLake, table: pa.Table, name: str) -> None:
    """Into today's partition, as the stream writes (compaction trusts writers' clocks to
    within a day: a file dated older than the day before its run is not listed)."""
    today = datetime.now(UTC).date()
    lake.write_bytes(f"raw/{TABLE}/load_date={today}/{name}.parquet", encode(table))


def build_load(lake: LocalLake, rows: int, file_rows: int) -> None:
    """``rows`` snapshot rows at LOAD_LSN in labelled files, and the checkpoint at it."""
    for index, start in enumerate(range(0, rows, file_rows)):
        n = min(file_rows, rows - start)
        ids = pc.add(pc.cumulative_sum(pa.nulls(n, pa.int64()).fill_null(1)), start)
        seqs = pc.add(ids, -(2**62))
        table = raw_rows(ids, pa.array(["r"] * n), pa.array([LOAD_LSN] * n, pa.int64()), seqs)
        write_raw(lake, table, f"{LOAD_LSN:016X}-{LOAD_LSN:016X}-r{index:06d}")
    CheckpointStore(lake, SLOT).save(LOAD_LSN + 1)  # the stream has moved past the snapshot


def build_changes(lake: LocalLake, rows: int, changes: int, file_rows: int, *, pattern: str,
                  seed: int) -> None:
    """``changes`` changes after the load in transactions of TX_CHANGES; checkpoint after."""
    rng = random.Random(seed)
    inserts, deletes = changes * 15 // 100, changes * 5 // 100
    updates = changes - inserts - deletes
    low = 1 if pattern == "random" else max(1, rows - 2 * changes + 1)
    touched = rng.sample(range(low, rows + 1), min(updates + deletes, rows - low + 1))
    plan = ([("u", k) for k in touched[:updates]] + [("d", k) for k in touched[updates:]]
            + [("c", rows + 1 + i) for i in range(inserts)])
    rng.shuffle(plan)
    lsns = [LOAD_LSN + 0x100 * (1 + i // TX_CHANGES) for i in range(len(plan))]
    seqs = [i % TX_CHANGES for i in range(len(plan))]
    for start in range(0, len(plan), file_rows):
        part = slice(start, start + file_rows)
        table = raw_rows(pa.array([k for _, k in plan[part]], pa.int64()),
                         pa.array([op for op, _ in plan[part]]),
                         pa.array(lsns[part], pa.int64()), pa.array(seqs[part], pa.int64()))
        write_raw(lake, table, f"{lsns[part][0]:016X}-{lsns[part][-1]:016X}-{seqs[part][0]}")
    CheckpointStore(lake, SLOT).save(lsns[-1] + 1)


class CountingLake(LocalLake):
    """A local lake that counts listings: file listings (keys returned) and folder ones."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.lists = self.keys = self.folder_lists = 0

    def list(self, prefix: str) -> list[str]:
        keys = super().list(prefix)
        self.lists, self.keys = self.lists + 1, self.keys + len(keys)
        return keys

    def arrow_filesystem(self) -> pafs.SubTreeFileSystem:
        self.folder_lists += 1  # compaction lists one folder per filesystem it asks for
        return super().arrow_filesystem()


def raw_history(root: Path, old_files: int, seed: int, *, keyless: bool = False) -> None:
    """Compaction of one new raw file beside ``old_files`` compacted ones over a year, then
    ``cdc maintain raw`` twice (the second run lists only the days closed since the first).
    ``keyless``: the table has no key (staged is an append, no history table)."""
    lake = CountingLake(root)
    metadata = {**(SCHEMA.metadata or {}), b"cdc_key": b"" if keyless else b"id"}
    rng = random.Random(seed)
    days = [date(2025, 1, 1) + timedelta(days=d) for d in range(365)]
    lsn = LOAD_LSN
    for i in range(old_files):  # written directly (no fsync per file): the build, not the test
        ids = pa.array([rng.randrange(1, 100_000), rng.randrange(1, 100_000)], pa.int64())
        table = raw_rows(ids, pa.array(["c", "c"]), pa.array([lsn, lsn], pa.int64()),
                         pa.array([0, 1], pa.int64())).replace_schema_metadata(metadata)
        path = lake.path(f"raw/{TABLE}/load_date={days[i * 365 // old_files]}/"
                         f"{lsn:016X}-{lsn:016X}-0.parquet")
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, path)
        lsn += 0x100
    CheckpointStore(lake, SLOT).save(lsn)
    today = days[-1]
    started = time.perf_counter()
    compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0, today=lambda: today))
    print(f"{old_files:,} old raw files in {len(days)} partitions, first compaction "
          f"{time.perf_counter() - started:.1f} s")
    for label in ("all of raw (no floor recorded)", "from the recorded floor"):
        if label.startswith("all"):  # staged's and history's floors
            for consumer in ("staged", "history"):
                lake.path(compaction_floor_key(TABLE, consumer)).unlink(missing_ok=True)
        ids = pa.array([1, 2], pa.int64())
        table = raw_rows(ids, pa.array(["c" if keyless else "u"] * 2),
                         pa.array([lsn, lsn], pa.int64()),
                         pa.array([0, 1], pa.int64())).replace_schema_metadata(metadata)
        lake.write_bytes(f"raw/{TABLE}/load_date={today}/{lsn:016X}-{lsn:016X}-0.parquet",
                         encode(table))
        lsn += 0x100
        CheckpointStore(lake, SLOT).save(lsn)
        lake.lists = lake.keys = lake.folder_lists = 0
        started = time.perf_counter()
        [result] = compact_lake(lake, SLOT,
                                options=CompactOptions(optimize_every=0, today=lambda: today))
        seconds = time.perf_counter() - started
        print(f"one new file, listing {label}: {seconds:.3f} s, {result.changes} changes, "
              f"{lake.lists} file listings returning {lake.keys:,} keys, "
              f"{lake.folder_lists} folder listings", flush=True)
    applied = {TABLE: staged_watermark(lake, TABLE)[0]}
    for run in ("first", "second"):  # every day but the newest is closed
        lake.lists = lake.keys = lake.folder_lists = 0
        started = time.perf_counter()
        days = consolidate(lake, today, applied, today=today + timedelta(days=1))
        print(f"cdc maintain raw --before {today}, {run} run: "
              f"{time.perf_counter() - started:.3f} s, {len(days)} days consolidated, "
              f"{lake.lists} file listings returning {lake.keys:,} keys", flush=True)


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Start the high-water mark afresh (Linux: writing 5 to clear_refs resets VmHWM)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """One phase in this process: build raw input (``build-*``), or compact and measure."""
    lake = LocalLake(args.lake)
    if args.phase == "build-load":
        build_load(lake, args.rows, args.file_rows)
        return {}
    if args.phase == "build-merge":
        build_changes(lake, args.rows, args.changes, args.file_rows, pattern=args.pattern,
                      seed=args.seed)
        return {}
    options = CompactOptions(optimize_every=0)
    staged = lake.path(f"staged/{TABLE}")
    before = data_files(staged)
    reset_peak_rss()
    started = time.perf_counter()
    [result] = compact_lake(lake, SLOT, options=options, history=False)
    seconds = time.perf_counter() - started
    rss = peak_rss_mb()
    touched = sorted(before - data_files(staged))
    measured = {"seconds": seconds, "changes": result.changes, "commits": result.commits,
                "rss_mb": rss, "version": result.version, "files": len(before),
                "touched": len(touched), "floor": rewrite_seconds(staged, touched)}
    if args.no_history:
        return measured
    bound = CheckpointStore(lake, SLOT).load()
    assert bound is not None
    reset_peak_rss()
    started = time.perf_counter()
    history = compact_history(lake, TABLE, list_raw(lake, TABLE, None).files, bound,
                              options=options)
    assert history is not None
    return {**measured, "history_seconds": time.perf_counter() - started,
            "history_opened": history.opened, "history_closed": history.closed,
            "history_commits": history.commits, "history_rss_mb": peak_rss_mb()}


def data_files(staged: Path) -> set[str]:
    """The staged table's current data files (none before it exists)."""
    if not staged.exists():
        return set()
    return set(pa.table(DeltaTable(str(staged)).get_add_actions(flatten=True))["path"]
               .to_pylist())


def rewrite_seconds(staged: Path, files: list[str]) -> float:
    """The floor under copy-on-write: read the touched files and write them again (parquet,
    snappy as delta-rs writes) — a merge cannot rewrite less."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for name in files:
            pq.write_table(pq.read_table(staged / name), Path(tmp) / "copy.parquet",
                           compression="snappy")
    return time.perf_counter() - started


def run_phase(lake: Path, name: str, rows: int, args: argparse.Namespace,
              pattern: str) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--phase", name, "--lake", str(lake), "--rows", str(rows),
           "--changes", str(args.changes), "--file-rows", str(args.file_rows),
           "--pattern", pattern, "--seed", str(args.seed),
           *(["--no-history"] if args.no_history else [])]
    subprocess.run([*cmd[:3], f"build-{name}", *cmd[4:]], check=True, capture_output=True)
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(out.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000000,10000000",
                        help="staged table sizes in rows (comma-separated)")
    parser.add_argument("--changes", type=int, default=100_000)
    parser.add_argument("--file-rows", type=int, default=200_000,
                        help="rows per raw file (the stream's --flush-rows default)")
    parser.add_argument("--pattern", choices=("random", "recent", "both"), default="both")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", help="build the lakes under this folder and keep them")
    parser.add_argument("--no-history", action="store_true",
                        help="measure the staged merge only, not history maintenance")
    parser.add_argument("--raw-history", type=int, metavar="N",
                        help="measure one new raw file beside N old ones instead")
    parser.add_argument("--keyless", action="store_true",
                        help="--raw-history: a table without a key (no history table)")
    parser.add_argument("--phase", choices=("load", "merge", "build-load", "build-merge"),
                        help=argparse.SUPPRESS)
    parser.add_argument("--lake", help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args)))
        return
    if args.raw_history:
        root = Path(args.keep or tempfile.mkdtemp(prefix="cdc-bench-history-"))
        raw_history(root, args.raw_history, args.seed, keyless=args.keyless)
        if not args.keep:
            subprocess.run(["rm", "-rf", str(root)], check=False)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    patterns = ["random", "recent"] if args.pattern == "both" else [args.pattern]
    print(f"{args.changes} changes (80% updates, 15% inserts, 5% deletes) in transactions of "
          f"{TX_CHANGES}, raw files of {args.file_rows} rows, seed {args.seed}")
    root = Path(args.keep or tempfile.mkdtemp(prefix="cdc-bench-compact-"))
    for pattern in patterns:
        merges: dict[int, float] = {}
        for rows in sizes:
            lake = root / f"{pattern}-{rows}"
            load = run_phase(lake, "load", rows, args, pattern)
            merge = run_phase(lake, "merge", rows, args, pattern)
            merges[rows] = merge["seconds"]
            print(f"{pattern:>6} {rows:>10,} rows: load {load['seconds']:6.1f} s "
                  f"({rows / load['seconds']:,.0f} rows/s, peak RSS {load['rss_mb']:.0f} MB); "
                  f"merge {merge['changes']:,} changes {merge['seconds']:6.2f} s "
                  f"({merge['changes'] / merge['seconds']:,.0f} changes/s, {merge['commits']} "
                  f"commits, peak RSS {merge['rss_mb']:.0f} MB); {merge['touched']} of "
                  f"{merge['files']} files rewritten, floor {merge['floor']:.2f} s "
                  f"(merge / floor {merge['seconds'] / max(merge['floor'], 1e-9):.2f})",
                  flush=True)
            if not args.no_history:
                print(f"{'':>6} {'':>10}  history: load {load['history_seconds']:6.1f} s "
                      f"({load['history_opened']:,} versions, peak RSS "
                      f"{load['history_rss_mb']:.0f} MB); merge {merge['history_seconds']:6.2f} s "
                      f"({merge['changes'] / merge['history_seconds']:,.0f} changes/s: "
                      f"{merge['history_closed']:,} closed, {merge['history_opened']:,} opened, "
                      f"{merge['history_commits']} commits, peak RSS "
                      f"{merge['history_rss_mb']:.0f} MB)", flush=True)
        if len(sizes) == 2:
            ratio = merges[sizes[1]] / merges[sizes[0]]
            verdict = "meets" if ratio <= TARGET_RATIO else "misses"
            print(f"{pattern:>6} merge time {sizes[1]:,} / {sizes[0]:,} rows: {ratio:.2f}x "
                  f"({verdict} the target of ≤ {TARGET_RATIO:.0f}x)")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(root)], check=False)


if __name__ == "__main__":
    main()
