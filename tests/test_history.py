"""History tables against the real PostgreSQL: every committed version of every row, exactly
once, checked against raw replayed by a brute-force oracle at every commit LSN."""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import SourceDb, with_settings
from deltalake import DeltaTable
from polling import wait_for
from rawlake import (
    dedupe,
    prepare,
    raw_files,
    read_raw,
    run_cdc,
    stream_until_caught_up,
    streaming_in_thread,
)

from cdc import faults
from cdc.config import Settings
from cdc.history.versions import HISTORY_META
from cdc.history.writer import APP_ID
from cdc.lake.store import LocalLake
from cdc.staged.compactor import CompactOptions
from cdc.staged.runner import compact_lake

BIG = 20_000  # bytes, stored out of line (STORAGE EXTERNAL): an update leaves it unchanged
COLUMNS = ("id", "name", "email", "body")


class Crash(BaseException):
    """A simulated process death at a fault point (nothing catches a BaseException)."""


def compact(settings: Settings, **options: Any) -> None:
    compact_lake(LocalLake(settings.lake), settings.slot, options=CompactOptions(**options))


def history(settings: Settings, table: str = "public.person") -> list[dict[str, Any]]:
    rows = DeltaTable(f"{settings.lake}/history/{table}").to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: (r["id"], r["_valid_from_lsn"]))


def staged(settings: Settings, table: str = "public.person") -> list[dict[str, Any]]:
    rows = DeltaTable(f"{settings.lake}/staged/{table}").to_pyarrow_table().to_pylist()
    return sorted(({c: r[c] for c in COLUMNS} for r in rows), key=lambda r: r["id"])


def replayed(changes: list[dict[str, Any]], upto: int) -> list[dict[str, Any]]:
    """The table right after commit ``upto``: raw applied change by change (TOAST kept)."""
    state: dict[int, dict[str, Any]] = {}
    moved: tuple[int, dict[str, Any]] | None = None  # a key change: (its _lsn, the old row)
    for row in changes:
        if row["_commit_lsn"] > upto:
            break
        if row["_op"] == "t":
            state.clear()
        elif row["_op"] == "d":
            moved = (row["_lsn"], state.pop(row["id"], {}))
        else:  # a key change's update keeps the old key's unchanged TOAST values
            before = moved[1] if moved and moved[0] == row["_lsn"] else state.get(row["id"], {})
            state[row["id"]] = {c: before.get(c) if c in (row["_unchanged"] or ()) else row[c]
                                for c in COLUMNS}
    return sorted(state.values(), key=lambda r: r["id"])


def valid_at(versions: list[dict[str, Any]], lsn: int) -> list[dict[str, Any]]:
    return [{c: v[c] for c in COLUMNS} for v in versions if v["_valid_from_lsn"] <= lsn
            and (v["_valid_to_lsn"] is None or lsn < v["_valid_to_lsn"])]


def assert_history_invariants(settings: Settings) -> list[dict[str, Any]]:
    versions = history(settings)
    changes = dedupe(read_raw(Path(settings.lake), "public.person"))
    current = [{c: v[c] for c in COLUMNS} for v in versions if v["_is_current"]]
    assert current == staged(settings)
    for lsn in sorted({r["_commit_lsn"] for r in changes}):
        assert valid_at(versions, lsn) == replayed(changes, lsn), f"at commit {lsn:X}"
    by_key: dict[int, list[dict[str, Any]]] = {}
    for v in versions:
        by_key.setdefault(v["id"], []).append(v)
    for key_versions in by_key.values():
        for older, newer in itertools.pairwise(key_versions):
            assert older["_valid_to_lsn"] is not None
            assert older["_valid_to_lsn"] <= newer["_valid_from_lsn"], "versions overlap"
            assert older["_valid_to"] <= newer["_valid_from"]
        assert [v["_is_current"] for v in key_versions[:-1]] == [False] * (len(key_versions) - 1)
    for v in versions:
        assert (v["_valid_to"] is None) == (v["_valid_to_lsn"] is None) == v["_is_current"]
        assert (v["_ended_by"] is None) == v["_is_current"]
        assert v["_valid_from"].tzinfo is not None
    return versions


def assert_generic_invariants(settings: Settings, table: str) -> None:
    """The history invariants for any table: key from the raw schema, values compared as
    Delta holds them (naive timestamps as UTC), columns missing from a change NULL."""
    from test_compact import _utc

    lake = Path(settings.lake)
    key = pq.read_schema(raw_files(lake, table)[-1]).metadata[b"cdc_key"].decode().split(",")
    versions = DeltaTable(f"{lake}/history/{table}").to_pyarrow_table().to_pylist()
    columns = [c for c in versions[0] if c not in HISTORY_META]

    def normal(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(({c: _utc(r.get(c)) for c in columns} for r in rows), key=repr)

    staged_rows = DeltaTable(f"{lake}/staged/{table}").to_pyarrow_table().to_pylist()
    assert normal([v for v in versions if v["_is_current"]]) == normal(staged_rows), table
    changes = dedupe(read_raw(lake, table))
    state: dict[tuple[Any, ...], dict[str, Any]] = {}
    for i, row in enumerate(changes):
        k = tuple(row[c] for c in key)
        if row["_op"] == "t":
            state.clear()
        elif row["_op"] == "d":
            state.pop(k, None)
        else:
            before = state.get(k, {})
            state[k] = {c: before.get(c) if c in (row["_unchanged"] or ()) else row.get(c)
                        for c in columns}
        if i + 1 == len(changes) or changes[i + 1]["_commit_lsn"] != row["_commit_lsn"]:
            lsn = row["_commit_lsn"]
            valid = [v for v in versions if v["_valid_from_lsn"] <= lsn
                     and (v["_valid_to_lsn"] is None or lsn < v["_valid_to_lsn"])]
            assert normal(valid) == normal(list(state.values())), f"{table} at {lsn:X}"


def stream_phases(work: Workload, settings: Settings, *phases: Callable[[], None]) -> None:
    """Run the workload's phases and stream them into raw (publication and slot first)."""
    prepare(settings)
    for phase in phases:
        phase()
    stream_until_caught_up(settings)


def crash_at(n: int) -> Callable[[str, dict[str, Any]], None]:
    """A fault action that simulates the process dying at its ``n``-th hit."""
    hits: list[str] = []

    def action(name: str, context: dict[str, Any]) -> None:
        hits.append(name)
        if len(hits) == n:
            raise Crash(name)

    return action


def big(tag: str) -> str:
    return (tag * (BIG // len(tag) + 1))[:BIG]


class Workload:
    """Every kind of change a version can come from or end by, in separate transactions."""

    def __init__(self, source: SourceDb) -> None:
        self.source = source
        source.execute("CREATE TABLE person (id int PRIMARY KEY, name text, email text, "
                       "body text)")
        source.execute("ALTER TABLE person ALTER body SET STORAGE EXTERNAL")

    def first(self) -> None:
        s = self.source
        s.execute("INSERT INTO person SELECT g, 'p' || g, g || '@a.example', %s "
                  "FROM generate_series(1, 8) g", (big("b"),))
        s.execute("UPDATE person SET email = 'one@b.example' WHERE id = 1")
        s.execute("UPDATE person SET name = 'toast kept' WHERE id = 2")  # body unchanged
        s.execute("DELETE FROM person WHERE id = 3")
        s.execute("INSERT INTO person VALUES (3, 'back', 'back@a.example', 'short')")
        s.execute("UPDATE person SET id = 40 WHERE id = 4")  # a key change

    def second(self) -> None:
        with self.source.connect() as conn, conn.transaction():  # many changes, one commit
            conn.execute("UPDATE person SET name = 'x1' WHERE id = 5")
            conn.execute("UPDATE person SET name = 'x2' WHERE id = 5")
            conn.execute("UPDATE person SET email = 'x@c.example' WHERE id = 5")
            conn.execute("INSERT INTO person VALUES (9, 'brief', NULL, NULL)")
            conn.execute("DELETE FROM person WHERE id = 9")  # never committed as a version
            conn.execute("DELETE FROM person WHERE id = 6")
            conn.execute("INSERT INTO person VALUES (6, 'reborn', NULL, 'r')")
        self.source.execute("UPDATE person SET email = 'two@b.example' WHERE id = 2")

    def third(self) -> None:
        with self.source.connect() as conn, conn.transaction():
            conn.execute("UPDATE person SET name = 'before truncate' WHERE id = 7")
            conn.execute("TRUNCATE person")
            conn.execute("INSERT INTO person VALUES (7, 'after truncate', NULL, NULL)")
        self.source.execute("INSERT INTO person VALUES (8, 'new 8', '8@d.example', NULL)")
        self.source.execute("UPDATE person SET name = 'renamed 8' WHERE id = 8")


@pytest.fixture
def small(settings: Settings) -> Settings:
    return with_settings(settings, flush_rows=3)


class TestHistoryEqualsReplayedRaw:
    def test_every_kind_of_change_compacted_incrementally_keeps_the_invariants(
        self, source: SourceDb, small: Settings
    ) -> None:
        """Updates, deletes, re-inserts, a key change, TOAST-unchanged updates, several
        changes to a key in one transaction, a truncate: history == raw at every commit."""
        work = Workload(source)
        stream_phases(work, small, work.first)
        compact(small, chunk_rows=4)
        stream_phases(work, small, work.second)
        compact(small, chunk_rows=4)
        stream_phases(work, small, work.third)
        compact(small)

        versions = assert_history_invariants(small)
        two = [v for v in versions if v["id"] == 2]
        assert [v["body"] for v in two] == [big("b")] * 3  # TOAST filled from the previous
        assert [v["_ended_by"] for v in two] == ["u", "u", "t"]
        assert [(v["name"], v["_op"]) for v in versions if v["id"] == 5] == [("p5", "c"),
                                                                             ("x2", "u")]
        assert [v["email"] for v in versions if v["id"] == 5] == ["5@a.example", "x@c.example"]
        assert not [v for v in versions if v["id"] == 9]
        assert [(v["_op"], v["_ended_by"]) for v in versions if v["id"] == 3] == [
            ("c", "d"), ("c", "t")]
        assert [v["_ended_by"] for v in versions if v["id"] == 4] == ["d"]
        assert next((v["_op"], v["name"]) for v in versions if v["id"] == 40) == ("u", "p4")
        assert [v["name"] for v in versions if v["_is_current"]] == ["after truncate",
                                                                      "renamed 8"]

    def test_a_second_run_adds_nothing(self, source: SourceDb, small: Settings) -> None:
        """Compacting again leaves the same Delta version and the same versions."""
        work = Workload(source)
        stream_phases(work, small, work.first, work.second)
        compact(small)
        path = f"{small.lake}/history/public.person"
        before = (DeltaTable(path).version(), history(small))

        compact(small)

        assert (DeltaTable(path).version(), history(small)) == before

    @pytest.mark.parametrize("point", ["history.before_commit", "history.after_commit"])
    def test_a_crash_around_a_history_commit_then_a_rerun_loses_and_adds_nothing(
        self, source: SourceDb, small: Settings, point: str
    ) -> None:
        """Dying just before or after the second history commit, then re-running."""
        work = Workload(source)
        stream_phases(work, small, work.first)
        compact(small)
        stream_phases(work, small, work.second, work.third)
        with faults.armed(point, crash_at(2)), pytest.raises(Crash):
            compact(small, chunk_rows=3)
        compact(small, chunk_rows=3)

        assert_history_invariants(small)

    @pytest.mark.slow
    @pytest.mark.parametrize("point", ["history.before_commit", "history.after_commit"])
    def test_kill_9_during_history_compaction_then_a_rerun_keeps_the_invariants(
        self, source: SourceDb, small: Settings, point: str
    ) -> None:
        """``cdc compact`` killed with SIGKILL at its first history commit of new changes
        (its staged commit is done), then run again."""
        work = Workload(source)
        stream_phases(work, small, work.first)
        compact(small)
        stream_phases(work, small, work.second, work.third)
        args = ["compact", "--lake", small.lake, "--slot", small.slot]
        killed = subprocess.run([sys.executable, "-m", "cdc", *args], check=False,
                                env={**os.environ, "CDC_FAULTS": f"{point}=kill@1"},
                                capture_output=True, text=True, timeout=120)
        assert killed.returncode == -9
        watermark = DeltaTable(f"{small.lake}/history/public.person").transaction_version(APP_ID)
        assert watermark is not None
        rerun = run_cdc(args)
        assert rerun.returncode == 0, rerun.stderr
        assert_history_invariants(small)


class TestRandomWorkload:
    def test_many_types_composite_keys_an_added_column_and_a_truncate_at_every_commit(
        self, source: SourceDb, small: Settings
    ) -> None:
        """test_compact's seeded workload (numeric, dates, naive and zoned timestamps, bytea,
        a composite key, TOAST, TRUNCATE, ADD COLUMN) compacted in small chunks: for every
        table, current == staged and the versions valid at each commit == raw replayed."""
        from test_compact import Workload as Mixed

        seed = int(os.environ.get("CDC_TEST_SEED", random.randrange(1 << 30)))
        print(f"workload seed {seed}")
        work = Mixed(source, seed)
        prepare(small)
        for changes, options in ((60, {}), (60, {"truncate": True}), (40, {"add_column": True}),
                                 (40, {})):
            work.round(changes, **options)
            stream_until_caught_up(small)
            compact(small, chunk_rows=10)
        for table in work.TABLES:
            assert_generic_invariants(small, f"public.{table}")


class TestSnapshotThenStream:
    def test_snapshot_rows_open_versions_that_streamed_changes_then_close(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A backfill (one LSN, labelled files, cut by the chunk limit) opens ``r`` versions."""
        from cdc.snapshot.consistent import ConsistentSnapshot

        work = Workload(source)
        source.execute("INSERT INTO person SELECT g, 'p' || g, NULL, NULL "
                       "FROM generate_series(101, 3100) g")
        ConsistentSnapshot(settings, LocalLake(settings.lake), chunk_rows=500).run()
        compact(settings, chunk_rows=700)
        assert {v["_op"] for v in history(settings)} == {"r"}
        source.execute("DELETE FROM person WHERE id > 110")
        source.execute("UPDATE person SET name = 'changed' WHERE id = 101")
        work.first()
        work.second()
        stream_until_caught_up(settings)
        compact(settings)

        versions = assert_history_invariants(settings)
        assert [(v["_op"], v["_ended_by"]) for v in versions if v["id"] == 101] == [
            ("r", "u"), ("u", None)]


    def test_a_crash_between_the_commits_of_a_backfill_then_a_rerun_adds_each_row_once(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Backfill files cut into several commits (no watermark yet); dying after the
        second, the rerun redoes the backfill and skips the keys already in."""
        from cdc.snapshot.consistent import ConsistentSnapshot

        Workload(source)
        source.execute("INSERT INTO person SELECT g, 'p' || g, NULL, NULL "
                       "FROM generate_series(1, 3000) g")
        ConsistentSnapshot(settings, LocalLake(settings.lake), chunk_rows=500).run()
        with faults.armed("history.after_commit", crash_at(2)), pytest.raises(Crash):
            compact(settings, chunk_rows=700)
        # two commits of two snapshot files (CTID chunks: about, not exactly, 500 rows each)
        files = sorted(raw_files(Path(settings.lake), "public.person"))
        assert len(history(settings)) == sum(pq.read_metadata(f).num_rows for f in files[:4])
        compact(settings, chunk_rows=700)

        versions = assert_history_invariants(settings)
        assert [v["id"] for v in versions] == list(range(1, 3001))


class TestInsideTheStream:
    def test_cdc_stream_maintains_history_in_the_background_and_history_off_stops_it(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """--compact-every builds history beside staged; CDC_HISTORY=off leaves it alone."""
        Workload(source)
        every = with_settings(settings, compact_every=0.3, flush_seconds=0.2,
                              status_seconds=0.2)

        def versions(n: int) -> bool:
            try:
                table = DeltaTable(str(lake_dir / "history" / "public.person"))
                return bool(table.to_pyarrow_table().num_rows == n)
            except Exception:  # not created yet
                return False

        with streaming_in_thread(every):
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            source.execute("INSERT INTO person SELECT g, 'v' || g FROM generate_series(1, 50) g")
            source.execute("UPDATE person SET name = 'new' WHERE id <= 10")
            wait_for(lambda: versions(60), what="60 versions in history")
        off = with_settings(every, history=False)
        with streaming_in_thread(off):
            source.execute("UPDATE person SET name = 'newer' WHERE id <= 10")
            wait_for(lambda: len(staged(off, "public.person")) == 50
                     and {r["name"] for r in staged(off, "public.person")} >= {"newer"},
                     what="staged catching up")
        assert versions(60)
