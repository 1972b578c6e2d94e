"""`cdc compact`: raw changes merged into staged Delta tables equal to the source, exactly once."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from conftest import SourceDb, with_settings
from deltalake import DeltaTable
from polling import wait_for
from rawlake import (
    prepare,
    raw_files,
    read_raw,
    run_cdc,
    stream_until_caught_up,
    streaming_in_thread,
)

from cdc import faults
from cdc.config import Settings
from cdc.errors import CompactionError
from cdc.lake.store import LocalLake
from cdc.staged.compactor import APP_ID, CompactOptions, TableResult, staged_watermark
from cdc.staged.merge import DELETED, KEEP, META, against_staged
from cdc.staged.runner import compact_lake

BIG = 100_000  # bytes: TOASTed out of line (STORAGE EXTERNAL), so updates leave it unchanged


class Crash(BaseException):
    """A simulated process death at a fault point (not an Exception: nothing catches it)."""


#: called with the step (``before_commit``, ``after_commit``, ``after_maintenance``) and the
#: table at the compactor's fault points; raising from it simulates a crash there
Fault = Callable[[str, str], None]
STEPS = ("before_commit", "after_commit", "after_maintenance")


def compact(settings: Settings, tables: tuple[str, ...] = (), fault: Fault | None = None,
            keys: dict[str, tuple[str, ...]] | None = None,
            **options: Any) -> list[TableResult]:
    with contextlib.ExitStack() as stack:
        if fault is not None:
            for step in STEPS:
                stack.enter_context(faults.armed(
                    f"staged.{step}", lambda point, at: fault(point.removeprefix("staged."),
                                                              at["table"])))
        return compact_lake(LocalLake(settings.lake), settings.slot, tables, keys or {},
                            options=CompactOptions(**options))


def staged_path(settings: Settings, table: str) -> str:
    return f"{settings.lake}/staged/{table}"


def staged_rows(settings: Settings, table: str) -> list[dict[str, Any]]:
    rows = DeltaTable(staged_path(settings, table)).to_pyarrow_table().to_pylist()
    return sorted(({k: _utc(v) for k, v in r.items() if k not in META} for r in rows), key=repr)


def source_rows(source: SourceDb, table: str) -> list[dict[str, Any]]:
    with source.connect() as conn:
        cur = conn.execute(f"SELECT * FROM {table}")
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, (_utc(v) for v in row), strict=True)) for row in cur.fetchall()]
    return sorted(rows, key=repr)


def _utc(value: Any) -> Any:
    """Naive timestamps are staged as UTC-zoned ones: compare both as UTC."""
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)
    return value


def assert_staged_equals_source(source: SourceDb, settings: Settings, *tables: str) -> None:
    for table in tables:
        staged, expected = staged_rows(settings, f"public.{table}"), source_rows(source, table)
        assert len(staged) == len(expected), table
        assert staged == expected, table


def version(settings: Settings, table: str) -> int:
    return DeltaTable(staged_path(settings, table)).version()


class Workload:
    """Seeded random inserts, updates and deletes over three tables, one round at a time."""

    TABLES = ("accounts", "lines", "docs")

    def __init__(self, source: SourceDb, seed: int) -> None:
        self.source, self.rng, self.next_id = source, random.Random(seed), 1
        source.execute("CREATE TABLE accounts (id bigint PRIMARY KEY, name text, "
                       "balance numeric(12,2), born date, seen timestamp, at timestamptz, "
                       "active boolean, blob bytea)")
        source.execute("CREATE TABLE lines (order_id int, n smallint, sku text, qty int, "
                       "PRIMARY KEY (order_id, n))")
        source.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
        source.execute("ALTER TABLE docs ALTER body SET STORAGE EXTERNAL")

    def maybe(self, value: Any) -> Any:
        return None if self.rng.random() < 0.2 else value

    def ids(self, table: str, column: str = "id") -> list[Any]:
        return [r[0] for r in self.source.execute(f"SELECT {column} FROM {table} ORDER BY 1")]

    def round(self, changes: int, *, truncate: bool = False, add_column: bool = False) -> None:
        rng = self.rng
        with self.source.connect() as conn:
            for _ in range(changes // 5):
                with conn.transaction():
                    for _ in range(5):
                        self._change(conn, rng.choice(self.TABLES))
            if truncate:
                conn.execute("TRUNCATE lines")
                conn.execute("INSERT INTO lines VALUES (1, 1, 'after-truncate', 1)")
            if add_column:
                conn.execute("ALTER TABLE accounts ADD COLUMN tier text")
                conn.execute("UPDATE accounts SET tier = 'gold' WHERE id % 3 = 0")

    def _change(self, conn: Any, table: str) -> None:
        op = self.rng.choices(("insert", "update", "delete"), (5, 4, 1))[0]
        {"accounts": self._change_accounts, "lines": self._change_lines,
         "docs": self._change_docs}[table](conn, op)

    def _change_accounts(self, conn: Any, op: str) -> None:
        rng = self.rng
        existing = self.ids("accounts")
        if op == "insert" or not existing:
            self.next_id += 1
            conn.execute(
                "INSERT INTO accounts VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                (self.next_id, self.maybe(f"name {rng.random()}"),
                 self.maybe(round(rng.uniform(-1e6, 1e6), 2)),
                 self.maybe(dt.date(2000, 1, 1) + dt.timedelta(days=rng.randrange(9000))),
                 self.maybe(dt.datetime(2024, 1, 1, 12, 0, 0, rng.randrange(10**6))),
                 self.maybe(dt.datetime(2024, 1, 1, tzinfo=dt.UTC)
                            + dt.timedelta(seconds=rng.randrange(10**7))),
                 self.maybe(rng.random() < 0.5), self.maybe(rng.randbytes(8))))
        elif op == "update":
            conn.execute("UPDATE accounts SET name = %s, balance = balance + 1 WHERE id = %s",
                         (self.maybe(f"renamed {rng.random()}"), rng.choice(existing)))
        else:
            conn.execute("DELETE FROM accounts WHERE id = %s", (rng.choice(existing),))

    def _change_lines(self, conn: Any, op: str) -> None:
        rng = self.rng
        existing = self.source.execute("SELECT order_id, n FROM lines")
        if op == "insert" or not existing:
            conn.execute("INSERT INTO lines VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                         (rng.randrange(1, 30), rng.randrange(1, 5), self.maybe("sku"),
                          rng.randrange(100)))
        elif op == "update":
            conn.execute("UPDATE lines SET qty = qty + 1, sku = %s WHERE order_id = %s "
                         "AND n = %s", (self.maybe(f"sku{rng.random()}"),
                                        *rng.choice(existing)))
        else:
            conn.execute("DELETE FROM lines WHERE order_id = %s AND n = %s",
                         rng.choice(existing))

    def _change_docs(self, conn: Any, op: str) -> None:
        rng = self.rng
        existing = self.ids("docs")
        if op == "insert" or not existing:
            self.next_id += 1
            body = rng.choice("abcdef") * BIG + str(self.next_id)
            conn.execute("INSERT INTO docs VALUES (%s, %s, 0)", (self.next_id, body))
        elif op == "update" and rng.random() < 0.8:  # body untouched: TOAST unchanged
            conn.execute("UPDATE docs SET n = n + 1 WHERE id = %s", (rng.choice(existing),))
        elif op == "update":
            conn.execute("UPDATE docs SET body = %s WHERE id = %s",
                         (self.maybe("z" * BIG), rng.choice(existing)))
        else:
            conn.execute("DELETE FROM docs WHERE id = %s", (rng.choice(existing),))


@pytest.fixture
def small_flushes(settings: Settings) -> Settings:
    """Small files: transactions are flushed in parts across files."""
    return with_settings(settings, flush_rows=7)


#: one file group for a whole small table (the default), or a MERGE per staged data file
FILE_BYTES = pytest.mark.parametrize("file_bytes", [16 * 2**20, 1],
                                     ids=["one-group", "group-per-file"])


class TestStagedEqualsSource:
    @FILE_BYTES
    def test_random_workload_streamed_in_rounds_compacts_to_exactly_the_source(
        self, source: SourceDb, small_flushes: Settings, file_bytes: int
    ) -> None:
        """Inserts, updates, deletes, a truncate, an added column and TOAST: staged == source
        (merged in one MERGE, or file group by file group)."""
        seed = int(os.environ.get("CDC_TEST_SEED", random.randrange(1 << 30)))
        print(f"workload seed {seed}")
        settings = small_flushes
        work = Workload(source, seed)
        prepare(settings)
        work.round(60)
        stream_until_caught_up(settings)
        compact(settings, file_bytes=file_bytes)
        assert_staged_equals_source(source, settings, *work.TABLES)

        work.round(60, truncate=True)
        stream_until_caught_up(settings)
        work.round(40, add_column=True)
        stream_until_caught_up(settings)
        # many small chunks, cut inside transactions too
        compact(settings, chunk_rows=10, file_bytes=file_bytes)
        work.round(60)
        stream_until_caught_up(settings)
        results = compact(settings, file_bytes=file_bytes)

        assert {r.table for r in results} == {f"public.{t}" for t in work.TABLES}
        assert_staged_equals_source(source, settings, *work.TABLES)
        docs = staged_rows(settings, "public.docs")
        assert all(d["body"] is None or len(d["body"]) >= BIG for d in docs)
        unchanged = [r for r in read_raw(Path(settings.lake), "public.docs") if r["_unchanged"]]
        assert unchanged  # the TOAST path was taken

    def test_a_second_compaction_changes_nothing(
        self, source: SourceDb, small_flushes: Settings
    ) -> None:
        """Running it twice leaves the same Delta version and the same rows."""
        work = Workload(source, 7)
        prepare(small_flushes)
        work.round(50)
        stream_until_caught_up(small_flushes)
        first = compact(small_flushes)
        before = {t: (version(small_flushes, f"public.{t}"),
                      staged_rows(small_flushes, f"public.{t}")) for t in work.TABLES}

        second = compact(small_flushes)

        assert [r.changes for r in second] == [0, 0, 0]
        assert [r.watermark for r in second] == [r.watermark for r in first]
        after = {t: (version(small_flushes, f"public.{t}"),
                     staged_rows(small_flushes, f"public.{t}")) for t in work.TABLES}
        assert after == before

    @FILE_BYTES
    @pytest.mark.parametrize("step", ["before_commit", "after_commit", "after_maintenance"])
    def test_a_crash_at_any_step_then_a_rerun_gives_the_same_table(
        self, source: SourceDb, small_flushes: Settings, step: str, file_bytes: int
    ) -> None:
        """Dying before or after a Delta commit (second chunk, or between two file groups'
        MERGEs) and re-running loses nothing."""
        work = Workload(source, 11)
        prepare(small_flushes)
        work.round(60)
        stream_until_caught_up(small_flushes)
        compact(small_flushes, file_bytes=file_bytes)
        work.round(60, truncate=True)
        stream_until_caught_up(small_flushes)
        seen: list[str] = []

        def crash_on_second(name: str, table: str) -> None:
            seen.append(f"{name}:{table}")
            if name == step and seen.count(f"{name}:{table}") == (1 if
                                                                 step == "after_maintenance"
                                                                 else 2):
                raise Crash(f"{name} {table}")

        for table in work.TABLES:
            with pytest.raises(Crash):
                compact(small_flushes, (f"public.{table}",), fault=crash_on_second, chunk_rows=5,
                        optimize_every=2, file_bytes=file_bytes)
        compact(small_flushes, chunk_rows=5, optimize_every=2, file_bytes=file_bytes)

        assert_staged_equals_source(source, small_flushes, *work.TABLES)


class TestTablesAndKeys:
    def test_a_table_without_primary_key_is_an_append_of_inserts_and_says_so(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """No key: staged holds every inserted row, duplicates included; the description says so."""
        settings = with_settings(settings, keyless_tables="insert-only")  # append-only
        source.execute("CREATE TABLE events (kind text, at timestamptz)")
        prepare(settings)
        source.execute("INSERT INTO events VALUES ('a', now()), ('a', NULL), ('a', NULL)")
        stream_until_caught_up(settings)
        compact(settings)
        source.execute("INSERT INTO events VALUES ('b', NULL)")
        stream_until_caught_up(settings)
        compact(settings)

        assert_staged_equals_source(source, settings, "events")
        description = DeltaTable(staged_path(settings, "public.events")).metadata().description
        assert "no primary key" in description
        assert "--key public.events=" in description

    def test_a_table_without_key_compacted_in_chunks_through_a_crash_holds_each_row_once(
        self, source: SourceDb, small_flushes: Settings
    ) -> None:
        """Appends are not idempotent: chunks end only between transactions, so a re-run after a
        crash appends nothing twice."""
        small_flushes = with_settings(small_flushes, keyless_tables="insert-only")  # append-only
        source.execute("CREATE TABLE events (n int)")
        prepare(small_flushes)
        for start in range(0, 100, 20):
            source.execute("INSERT INTO events SELECT generate_series(%s::int, %s::int)",
                           (start, start + 19))
        stream_until_caught_up(small_flushes)
        commits: list[str] = []

        def crash_after_second_commit(step: str, table: str) -> None:
            commits.append(step)
            if commits.count("after_commit") == 2:
                raise Crash(step)

        with pytest.raises(Crash):
            compact(small_flushes, fault=crash_after_second_commit, chunk_rows=5)
        compact(small_flushes, chunk_rows=5)

        assert_staged_equals_source(source, small_flushes, "events")

    def test_a_named_key_merges_a_table_without_primary_key(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """--key public.t=code makes updates and deletes land on the row with that code."""
        source.execute("CREATE TABLE t (code text NOT NULL, v int)")
        source.execute("ALTER TABLE t REPLICA IDENTITY FULL")
        prepare(settings)
        source.execute("INSERT INTO t VALUES ('a', 1), ('b', 2), ('c', 3)")
        source.execute("UPDATE t SET v = 20 WHERE code = 'b'")
        source.execute("DELETE FROM t WHERE code = 'c'")
        stream_until_caught_up(settings)

        compact(settings, keys={"public.t": ("code",)})
        source.execute("UPDATE t SET v = 21 WHERE code = 'b'")
        source.execute("DELETE FROM t WHERE code = 'a'")
        source.execute("INSERT INTO t VALUES ('d', 4)")
        stream_until_caught_up(settings)
        compact(settings, keys={"public.t": ("code",)})

        assert_staged_equals_source(source, settings, "t")
        assert staged_rows(settings, "public.t") == [{"code": "b", "v": 21}, {"code": "d", "v": 4}]

    def test_a_dropped_column_stays_null_from_then_on(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """DROP COLUMN: staged keeps the column; rows changed afterwards hold NULL there."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, old text, v int)")
        prepare(settings)
        source.execute("INSERT INTO t VALUES (1, 'x', 1), (2, 'y', 2)")
        stream_until_caught_up(settings)
        compact(settings)
        source.execute("ALTER TABLE t DROP COLUMN old")
        source.execute("UPDATE t SET v = 10 WHERE id = 1")
        source.execute("INSERT INTO t VALUES (3, 3)")
        stream_until_caught_up(settings)
        compact(settings)

        assert staged_rows(settings, "public.t") == [
            {"id": 1, "old": None, "v": 10}, {"id": 2, "old": "y", "v": 2},
            {"id": 3, "old": None, "v": 3}]

    def test_a_type_change_staged_cannot_hold_names_table_and_column(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """ALTER COLUMN TYPE text → int stops compaction with the table, the column and a fix."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        prepare(settings)
        source.execute("INSERT INTO t VALUES (1, '5')")
        stream_until_caught_up(settings)
        compact(settings)
        source.execute("ALTER TABLE t ALTER COLUMN v TYPE int USING v::int")
        source.execute("INSERT INTO t VALUES (2, 6)")
        stream_until_caught_up(settings)

        [result] = compact(settings)  # reported, not raised: other tables go on
        assert re.search(r"column 'v' of public\.t changed type", result.error)
        assert result.exit_code == CompactionError.exit_code
        assert "cdc resync --tables public.t" in result.error  # the way out: test_resync.py

    def test_a_snapshot_then_stream_compacts_to_the_source(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Snapshot rows (labelled files, negative _seq at the slot's start) apply first."""
        from cdc.snapshot.consistent import ConsistentSnapshot

        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        source.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 3000) g")
        ConsistentSnapshot(settings, LocalLake(settings.lake), chunk_rows=500).run()
        compact(settings, chunk_rows=700)  # cuts between snapshot chunks
        assert_staged_equals_source(source, settings, "t")
        source.execute("UPDATE t SET v = 'new' WHERE id % 7 = 0")
        source.execute("DELETE FROM t WHERE id % 11 = 0")
        stream_until_caught_up(settings)
        compact(settings)

        assert_staged_equals_source(source, settings, "t")


class TestMaintenanceAndConcurrency:
    def test_every_n_merges_the_table_is_optimized_vacuumed_and_checkpointed(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """optimize_every=2: OPTIMIZE and VACUUM run; the log gets checkpoints; rows stay."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        prepare(settings)
        for n in range(5):  # inserts only: each compaction appends one small file
            source.execute("INSERT INTO t VALUES (%s, %s)", (n, n))
            stream_until_caught_up(settings)
            compact(settings, optimize_every=2, vacuum_retention_hours=0, checkpoint_interval=3)

        table = DeltaTable(staged_path(settings, "public.t"))
        operations = [h["operation"] for h in table.history()]
        assert "OPTIMIZE" in operations
        assert "VACUUM END" in operations
        assert list(Path(staged_path(settings, "public.t"), "_delta_log").glob("*.checkpoint*"))
        assert_staged_equals_source(source, settings, "t")

    def test_compacting_beside_a_running_stream_converges_to_the_source(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """compact_lake in one thread while the stream writes raw in another."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        work = random.Random(5)
        with streaming_in_thread(with_settings(settings, flush_rows=50)):
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            for round_ in range(20):
                source.execute("INSERT INTO t SELECT g, 0 FROM generate_series(%s::int, %s::int) g",
                               (round_ * 50, round_ * 50 + 49))
                source.execute("UPDATE t SET v = v + 1 WHERE id %% 7 = %s", (work.randrange(7),))
                source.execute("DELETE FROM t WHERE id = %s", (work.randrange(round_ * 50 + 1),))
                compact(settings)
        stream_until_caught_up(settings)  # a stopped stream leaves the rest in the slot
        compact(settings)

        assert_staged_equals_source(source, settings, "t")


    def test_cdc_stream_compacts_in_the_background_while_it_streams(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """--compact-every: staged catches up with the source without a separate command."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        every = with_settings(settings, compact_every=0.5, flush_seconds=0.2, status_seconds=0.2)
        with streaming_in_thread(every):
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            source.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 100) g")
            source.execute("DELETE FROM t WHERE id <= 10")
            staged = str(lake_dir / "staged" / "public.t")

            def staged_rows() -> int:
                try:
                    return int(DeltaTable(staged).to_pyarrow_table().num_rows == 90)
                except Exception:  # not created yet
                    return 0

            wait_for(staged_rows, timeout=60, what="staged table with 90 rows")
        assert_staged_equals_source(source, settings, "t")


class TestReadersAndCommand:
    def test_duckdb_reads_a_staged_table_offline(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """DuckDB queries the staged table through a pyarrow dataset, no extension needed."""
        import duckdb

        source.execute("CREATE TABLE t (id int PRIMARY KEY, seen timestamp, amount numeric(8,2))")
        prepare(settings)
        source.execute("INSERT INTO t VALUES (1, '2024-05-06 07:08:09', 1.25), (2, NULL, 2.5)")
        stream_until_caught_up(settings)
        compact(settings)

        table = DeltaTable(staged_path(settings, "public.t"))
        assert table.protocol().min_reader_version == 1  # no timestampNtz, no features
        ds = table.to_pyarrow_dataset()  # noqa: F841  (read by name from DuckDB)
        relation = duckdb.sql("select id, seen, amount from ds order by id")
        assert relation is not None
        rows = relation.fetchall()
        assert rows[0][0] == 1
        assert rows[0][1].replace(tzinfo=None) == dt.datetime(2024, 5, 6, 7, 8, 9)
        assert [str(r[2]) for r in rows] == ["1.25", "2.50"]

    def test_cdc_compact_command_merges_and_reports_each_table(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """`cdc compact --tables` compacts the named table and prints its result."""
        source.execute("CREATE TABLE a (id int PRIMARY KEY)")
        source.execute("CREATE TABLE b (id int PRIMARY KEY)")
        prepare(settings)
        source.execute("INSERT INTO a VALUES (1), (2)")
        source.execute("INSERT INTO b VALUES (1)")
        stream_until_caught_up(settings)

        result = run_cdc(["compact", "--lake", settings.lake, "--slot", settings.slot,
                          "--tables", "public.a", "--key", "public.a=id"])

        assert result.returncode == 0, result.stderr
        assert "public.a: 2 changes in 1 commits" in result.stderr
        assert DeltaTable(staged_path(settings, "public.a")).transaction_version(APP_ID)
        assert not Path(staged_path(settings, "public.b")).exists()

    def test_without_a_checkpoint_there_is_nothing_to_compact(self, tmp_path: Path) -> None:
        """A lake the stream never checkpointed gives no results, and the command says so."""
        assert compact_lake(LocalLake(tmp_path), "cdc") == []
        result = run_cdc(["compact", "--lake", str(tmp_path), "--slot", "cdc"])
        assert result.returncode == 0
        assert "nothing to compact" in result.stderr

    def test_raw_files_replayed_with_other_splits_are_applied_once(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A copy of a raw file under another name (a replay) does not double anything."""
        settings = with_settings(settings, keyless_tables="insert-only")  # append-only
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        source.execute("CREATE TABLE e (v int)")
        prepare(settings)
        source.execute("INSERT INTO t SELECT g, g FROM generate_series(1, 50) g")
        source.execute("INSERT INTO e SELECT g FROM generate_series(1, 50) g")
        source.execute("UPDATE t SET v = v + 1")
        stream_until_caught_up(settings)
        for table in ("public.t", "public.e"):
            for f in raw_files(Path(settings.lake), table):
                first, last, seq = f.stem.split("-")
                f.with_name(f"{first}-{last}-{int(seq) + 1}.parquet").write_bytes(f.read_bytes())

        compact(settings, chunk_rows=30)

        assert_staged_equals_source(source, settings, "t", "e")


class TestLargeTables:
    def test_updates_spread_over_a_staged_file_of_many_batches_merge_exactly(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Thousands of updates and deletes into a 30k-row file (delta-rs 1.6.0's MERGE
        rejects matched updates there with a false "multiple source rows" error)."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int, note text)")
        prepare(settings)
        source.execute("INSERT INTO t SELECT g, g, 'n' || g FROM generate_series(1, 30000) g")
        stream_until_caught_up(settings)
        compact(settings)
        source.execute("UPDATE t SET v = -v WHERE id % 3 = 0")
        source.execute("DELETE FROM t WHERE id % 7 = 0")
        source.execute("INSERT INTO t SELECT g, g, NULL FROM generate_series(30001, 31000) g")
        stream_until_caught_up(settings)

        [result] = compact(settings)

        assert result.changes == 10000 + 30000 // 7 + 1000
        assert_staged_equals_source(source, settings, "t")
        lsn, newest = staged_watermark(LocalLake(settings.lake), "public.t")
        assert lsn == result.watermark
        assert newest is not None


class TestResolvingAgainstStaged:
    """The pure step before a commit: the guard and unchanged TOAST values (no database)."""

    @staticmethod
    def changes(*rows: tuple[int, str | None, int, int, bool, bool]) -> pa.Table:
        ids, bodies, lsns, seqs, deleted, keep = zip(*rows, strict=True)
        return pa.table({"id": pa.array(ids, pa.int32()), "body": pa.array(bodies),
                         "_commit_lsn": pa.array(lsns, pa.int64()),
                         "_seq": pa.array(seqs, pa.int64()), DELETED: pa.array(deleted),
                         KEEP + "body": pa.array(keep)})

    @staticmethod
    def staged(*rows: tuple[int, str, int, int]) -> pa.Table:
        ids, bodies, lsns, seqs = zip(*rows, strict=True)
        return pa.table({"id": pa.array(ids, pa.int32()), "_commit_lsn": pa.array(lsns, pa.int64()),
                         "_seq": pa.array(seqs, pa.int64()), "body": pa.array(bodies)})

    def test_an_older_change_never_overwrites_a_newer_staged_row(self) -> None:
        """A change at or below the staged row's position is dropped: no removal, no insert."""
        state = self.changes((1, "old", 10, 0, False, False), (2, "new", 30, 0, False, False),
                             (3, "gone", 10, 5, True, False))
        staged = self.staged((1, "newer", 20, 0), (2, "older", 20, 0), (3, "kept", 10, 5))

        removals, inserts = against_staged(state, staged, ("id",), [KEEP + "body"])

        assert removals.to_pylist() == [{"id": 2}]
        assert inserts.select(["id", "body"]).to_pylist() == [{"id": 2, "body": "new"}]

    def test_an_unchanged_toast_value_keeps_the_staged_one_and_never_becomes_null(self) -> None:
        """Where the change kept the value, the staged value is inserted again."""
        state = self.changes((1, None, 30, 0, False, True), (2, None, 30, 1, False, True),
                             (3, "x", 30, 2, False, False))
        staged = self.staged((1, "big", 20, 0), (3, "y", 20, 0))

        removals, inserts = against_staged(state, staged, ("id",), [KEEP + "body"])

        assert sorted(r["id"] for r in removals.to_pylist()) == [1, 3]
        assert sorted(inserts.select(["id", "body"]).to_pylist(), key=lambda r: r["id"]) == [
            {"id": 1, "body": "big"}, {"id": 2, "body": None}, {"id": 3, "body": "x"}]
        assert DELETED not in inserts.column_names
