"""Keyless tables compact in bounded chunks, exactly once (``staged/appends.py``).

Hand-built raw files (no database): a keyless table's streamed transactions (a file may end
inside one), replayed copies of files (a stream that crashed before its checkpoint), a
labelled backfill in several files, a truncate. Cut into tiny chunks and killed after any
commit, then run again, staged holds what a brute-force replay of raw gives: every insert
and snapshot read after the last truncate, each change once.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
from deltalake import DeltaTable
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_history import Crash, crash_at

from cdc import faults
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.layout import raw_key
from cdc.lake.raw import encode
from cdc.lake.store import LocalLake
from cdc.staged.compactor import CompactOptions
from cdc.staged.runner import compact_lake
from cdc.stream.batcher import META_SCHEMA

TABLE = "public.events"
SCHEMA = pa.schema([("n", pa.int64()), ("v", pa.string()), *META_SCHEMA],
                   metadata={"cdc_table": TABLE})  # no cdc_key: a keyless table
T0 = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
Change = dict[str, Any]


def write(lake: LocalLake, rows: list[Change], tail: str | int) -> None:
    """One raw file of ``rows``, named as the stream (``tail`` = first seq) or a snapshot
    (``tail`` = its label) names it."""
    full = [{"_lsn": r["_commit_lsn"], "_xid": 1, "_unchanged": [],
             "_commit_ts": T0 + dt.timedelta(seconds=r["_commit_lsn"]), **r} for r in rows]
    lsns = [r["_commit_lsn"] for r in rows]
    lake.write_bytes(raw_key(TABLE, "2026-11-30", min(lsns), max(lsns), tail),
                     encode(pa.Table.from_pylist(full, schema=SCHEMA)))


def change(op: str, n: int, lsn: int, seq: int) -> Change:
    return {"_op": op, "n": n, "v": f"v{n}", "_commit_lsn": lsn, "_seq": seq}


def lay_out(root: Path, files: list[list[Change]]) -> LocalLake:
    lake = LocalLake(root)
    for i, part in enumerate(files):
        if part[0]["_seq"] < 0:  # a backfill file: labelled, in chunk order
            write(lake, part, f"r{i:06d}")
        else:  # named by its first change (a replayed copy may replace its original)
            write(lake, part, part[0]["_seq"])
    return lake


def replayed(files: list[list[Change]], bound: int) -> Counter[tuple[Any, ...]]:
    """The brute-force oracle: each change once, below (checkpoint, 0) (a backfill at the
    checkpoint is in), after the last truncate; the inserts and snapshot reads."""
    changes = {(r["_commit_lsn"], r["_seq"]): r for f in files for r in f
               if (r["_commit_lsn"], r["_seq"]) < (bound, 0)}
    ordered = [changes[p] for p in sorted(changes)]
    truncates = [i for i, r in enumerate(ordered) if r["_op"] == "t"]
    after = ordered[truncates[-1] + 1:] if truncates else ordered
    return Counter((r["n"], r["_commit_lsn"], r["_seq"]) for r in after if r["_op"] in "cr")


def staged(root: Path) -> Counter[tuple[Any, ...]]:
    rows = DeltaTable(str(root / "staged" / TABLE)).to_pyarrow_table().to_pylist()
    return Counter((r["n"], r["_commit_lsn"], r["_seq"]) for r in rows)


def run(lake: LocalLake, bound: int, chunk_rows: int) -> None:
    CheckpointStore(lake, "s").save(bound)
    compact_lake(lake, "s", options=CompactOptions(chunk_rows=chunk_rows, optimize_every=0))


@st.composite
def keyless_layouts(draw: Any) -> tuple[list[list[Change]], int]:
    """Transactions of 1-4 inserts (a delete now and then: keyless staged ignores it), a
    backfill at one LSN in several labelled files, maybe a truncate, cut into files
    anywhere; some files written twice (a replay after a crashed stream); the checkpoint."""
    files: list[list[Change]] = []
    current: list[Change] = []
    n = 0
    n_txns = draw(st.integers(1, 6))
    backfill_at = draw(st.integers(0, n_txns))
    truncate_at = draw(st.integers(0, n_txns + 3))  # past n_txns: no truncate
    lsn = 0
    for t in range(n_txns + 1):
        lsn += 10
        if t == backfill_at:
            if current:
                files.append(current)
                current = []
            reads = [change("r", n + i, lsn, -1000 + i) for i in range(draw(st.integers(1, 7)))]
            n += len(reads)
            size = draw(st.integers(1, 3))
            files += [reads[i:i + size] for i in range(0, len(reads), size)]
            continue
        ops = ["t"] if t == truncate_at else draw(st.lists(
            st.sampled_from("cccd"), min_size=1, max_size=4))
        for seq, op in enumerate(ops):
            current.append(change(op, n, lsn, seq))
            n += 1
            if draw(st.booleans()):
                files.append(current)
                current = []
    if current:
        files.append(current)
    for i in draw(st.lists(st.integers(0, len(files) - 1), max_size=2, unique=True)):
        if files[i][0]["_seq"] >= 0:  # a replay re-streams from the checkpoint on
            files.append([dict(r) for r in files[i]] + [dict(r) for f in files[i + 1:i + 2]
                                                         for r in f if r["_seq"] >= 0])
    return files, lsn + draw(st.integers(-9, 1))


class TestKeylessChunks:
    def test_a_backfill_larger_than_a_chunk_is_appended_in_several_commits(
        self, tmp_path: Path
    ) -> None:
        """Nine snapshot reads at one LSN in three files and a transaction of six inserts
        in two files, chunks of two rows: more than one commit per LSN, staged = replay."""
        files = [[change("r", i, 10, -1000 + i) for i in range(j, j + 3)] for j in (0, 3, 6)]
        files += [[change("c", 9 + i, 20, i) for i in range(3)],
                  [change("c", 12 + i, 20, 3 + i) for i in range(3)]]
        lake = lay_out(tmp_path, files)
        run(lake, 21, chunk_rows=2)
        assert DeltaTable(str(tmp_path / "staged" / TABLE)).version() >= 4  # bounded chunks
        assert staged(tmp_path) == replayed(files, 21)

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(keyless_layouts(), st.integers(1, 4), st.integers(1, 8))
    def test_any_chunking_and_any_crash_then_a_rerun_equal_the_replay(
        self, layout: tuple[list[list[Change]], int], chunk_rows: int, crash: int
    ) -> None:
        """Tiny chunks, killed after any commit (or in none), run again: staged holds every
        insert and snapshot read after the last truncate exactly once."""
        files, bound = layout
        root = Path(tempfile.mkdtemp(prefix="cdc-keyless-chunks-"))
        try:
            lake = lay_out(root, files)
            with faults.armed("staged.after_commit", crash_at(crash)), \
                    contextlib.suppress(Crash):
                run(lake, bound, chunk_rows)
            run(lake, bound, chunk_rows)
            expected = replayed(files, bound)
            if (root / "staged" / TABLE).exists():
                assert staged(root) == expected
            else:
                assert not expected
        finally:
            shutil.rmtree(root)
