"""Staged chunks applied by cdc's own copy-on-write (``staged/rewrite.py``): the touched file
groups read, changed and written again, one commit of removes, adds and the watermark.
Checked against raw replayed by brute force, with a crash at either side of any commit,
and the files' statistics against their data (readers skip files by them)."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_history import Crash, crash_at
from test_history_chunks import T0, TABLE, change, write

from cdc import faults
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.store import LocalLake
from cdc.staged.compactor import APP_ID, CompactOptions
from cdc.staged.runner import compact_lake

Layout = tuple[list[list[dict[str, Any]]], int]


@st.composite
def layouts(draw: Any) -> Layout:
    """A backfill of keys 1..n in labelled files, then streamed transactions over keys
    1..n+4 (consistent with a table: inserts of absent keys, updates and deletes of present
    ones), cut into files anywhere; the checkpoint."""
    n = draw(st.integers(1, 12))
    size = draw(st.integers(1, 4))
    files = [[change("r", k, 10, -1000 + k, "r") for k in range(start, min(start + size, n + 1))]
             for start in range(1, n + 1, size)]
    alive, lsn, current = set(range(1, n + 1)), 10, []
    for _ in range(draw(st.integers(1, 10))):
        lsn += 10
        for seq in range(draw(st.integers(1, 4))):
            k = draw(st.integers(1, n + 4))
            op = "c" if k not in alive else draw(st.sampled_from(["u", "u", "d"]))
            alive.symmetric_difference_update({k} if op in "cd" else set())
            current.append(change(op, k, lsn, seq, f"v{lsn}.{seq}"))
            if draw(st.booleans()):
                files.append(current)
                current = []
    if current:
        files.append(current)
    return files, lsn + 1


def replayed(files: list[list[dict[str, Any]]]) -> list[tuple[int, str | None, int, int]]:
    """The table brute force gives: every change in (commit LSN, seq) order, last one wins."""
    table: dict[int, tuple[int, str | None, int, int]] = {}
    for c in sorted((c for f in files for c in f), key=lambda c: (c["_commit_lsn"], c["_seq"])):
        if c["_op"] == "d":
            table.pop(c["id"], None)
        else:
            table[c["id"]] = (c["id"], c["v"], c["_commit_lsn"], c["_seq"])
    return sorted(table.values())


def run(lake: LocalLake, bound: int, chunk_rows: int, file_bytes: int, **options: Any) -> None:
    CheckpointStore(lake, "s").save(bound)
    compact_lake(lake, "s", history=False, options=CompactOptions(**{
        "chunk_rows": chunk_rows, "optimize_every": 0, "file_bytes": file_bytes,
        "today": T0.date, **options}))  # the raw files' load date: a later run lists them too


def staged(root: Path) -> list[tuple[int, str | None, int, int]]:
    rows = DeltaTable(str(root / "staged" / TABLE)).to_pyarrow_table().to_pylist()
    return sorted((r["id"], r["v"], r["_commit_lsn"], r["_seq"]) for r in rows)


def assert_stats_match_data(root: Path) -> None:
    """Every data file's recorded row count, key and position ranges are its data's."""
    dt = DeltaTable(str(root / "staged" / TABLE))
    for add in pa.table(dt.get_add_actions(flatten=True)).to_pylist():
        data = pq.read_table(root / "staged" / TABLE / add["path"])
        assert add["num_records"] == data.num_rows
        for column in ("id", "_commit_lsn", "_seq"):
            values = data[column].to_pylist()
            assert (add[f"min.{column}"], add[f"max.{column}"]) == (min(values), max(values))
        assert add["max._commit_ts"] == max(data["_commit_ts"].to_pylist())


def lay_out(root: Path, files: list[list[dict[str, Any]]]) -> LocalLake:
    lake = LocalLake(root)
    for part in files:
        labelled = part[0]["_seq"] < 0
        write(lake, part, f"r{part[0]['id']}" if labelled else part[0]["_seq"])
    return lake


class TestRewriteAgainstReplay:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(layouts(), st.integers(1, 6), st.integers(1, 6), st.sampled_from([1, 16 * 2**20]),
           st.sampled_from(["staged.before_commit", "staged.after_commit"]))
    @example(layout=([[change("r", 1, 10, -999, "r")], [change("r", 2, 10, -998, "r")],
                      [change("u", 1, 20, 0, "a"), change("d", 2, 20, 1),
                       change("c", 3, 20, 2, "b")]], 21),
             chunk_rows=2, crash=2, file_bytes=1, point="staged.before_commit")
    def test_any_chunking_and_any_crash_then_a_rerun_equal_the_replayed_table(
        self, layout: Layout, chunk_rows: int, crash: int, file_bytes: int, point: str
    ) -> None:
        """Chunked anywhere, one file group per data file or one for all, killed before or
        after any commit and run again: the staged table is raw replayed by brute force, its
        watermark the checkpoint's, its statistics its data's."""
        files, bound = layout
        root = Path(tempfile.mkdtemp(prefix="cdc-staged-rewrite-"))
        try:
            lake = lay_out(root, files)
            with faults.armed(point, crash_at(crash)), contextlib.suppress(Crash):
                run(lake, bound, chunk_rows, file_bytes)
            run(lake, bound, chunk_rows, file_bytes)
            assert staged(root) == replayed(files)
            dt = DeltaTable(str(root / "staged" / TABLE))
            assert dt.transaction_version(APP_ID) == bound - 1
            assert_stats_match_data(root)
        finally:
            shutil.rmtree(root)


class TestRewrittenTable:
    def test_a_chunk_over_existing_rows_is_one_commit_that_replaces_only_touched_files(
            self, tmp_path: Path) -> None:
        """An update and a delete in two one-row files (a file group each), an insert past
        every file: one commit, not a MERGE, removes those two files and adds the update's
        rewrite and the insert; the other files stay."""
        files = [[change("r", k, 10, -1000 + k, "r") for k in range(s, s + 3)] for s in (1, 4, 7)]
        lake = lay_out(tmp_path, files)
        run(lake, 11, 3, 1)  # delta-rs writes a row per file at a target size of one byte
        dt = DeltaTable(str(tmp_path / "staged" / TABLE))
        before, version = set(dt.file_uris()), dt.version()
        changes = [change("u", 5, 20, 0, "new"), change("d", 6, 20, 1), change("c", 20, 20, 2, "x")]
        write(lake, changes, 0)
        run(lake, 21, 10**6, 1)

        dt = DeltaTable(str(tmp_path / "staged" / TABLE))
        after = set(dt.file_uris())
        assert dt.version() == version + 1
        assert dt.history(1)[0]["operation"] == "WRITE"  # not a MERGE
        assert len(before - after) == 2  # the files of keys 5 and 6
        assert len(after - before) == 2  # key 5 written again; key 20
        assert len(before & after) == len(before) - 2
        assert staged(tmp_path) == replayed([*files, changes])
        assert_stats_match_data(tmp_path)

    def test_files_a_crash_left_unreferenced_are_vacuumed_past_the_retention(
            self, tmp_path: Path) -> None:
        """Killed before its commit, a chunk's rewritten files are in the table's folder
        but in no Delta version; the next run's VACUUM (full) deletes them once they are
        older than the retention, and never a file a version uses."""
        files = [[change("r", k, 10, -1000 + k, "r") for k in range(1, 7)]]
        lake = lay_out(tmp_path, files)
        run(lake, 11, 10**6, 1)
        folder = tmp_path / "staged" / TABLE
        write(lake, [change("u", 2, 20, 0, "new")], 0)
        with faults.armed("staged.before_commit", crash_at(1)), contextlib.suppress(Crash):
            run(lake, 21, 10**6, 1)
        used = {Path(u.removeprefix("file://")) for u in DeltaTable(str(folder)).file_uris()}
        orphans = set(folder.glob("*.parquet")) - used
        assert orphans  # the crashed chunk's rewrite
        write(lake, [change("u", 3, 30, 0, "newer")], 1)
        run(lake, 31, 10**6, 1, optimize_every=1, vacuum_retention_hours=0)
        assert not orphans & set(folder.glob("*.parquet"))
        assert {Path(u.removeprefix("file://"))
                for u in DeltaTable(str(folder)).file_uris()} <= set(folder.glob("*.parquet"))
        assert staged(tmp_path) == replayed([*files, [change("u", 2, 20, 0, "new")],
                                             [change("u", 3, 30, 0, "newer")]])

    def test_duckdb_and_pyarrow_read_the_rewritten_table_as_delta_rs_does(
            self, tmp_path: Path) -> None:
        files = [[change("r", k, 10, -1000 + k, "r") for k in range(1, 50)],
                 [change("u", k, 20, k, "u") for k in range(1, 50, 3)]]
        lake = lay_out(tmp_path, files[:1])
        run(lake, 11, 10**6, 16 * 2**20)
        write(lake, files[1], 1)
        run(lake, 21, 10**6, 16 * 2**20)
        rewritten = DeltaTable(str(tmp_path / "staged" / TABLE)).to_pyarrow_dataset()
        counted = duckdb.connect().execute("SELECT count(*), count(*) FILTER (WHERE v = 'u') FROM "
                             "rewritten WHERE id BETWEEN ? AND ?", [10, 40]).fetchall()
        del rewritten
        assert counted == [(31, sum(1 for k in range(10, 41) if k % 3 == 1))]
        assert staged(tmp_path) == replayed(files)
