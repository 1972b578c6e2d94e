"""`cdc snapshot`: consistent backfill tied to the slot, resumable; and the updated_at export."""

from __future__ import annotations

import random
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import SourceDb, with_settings
from rawlake import raw_files, read_raw, replay, run_cdc, stream_until_caught_up

from cdc import faults
from cdc.config import Settings
from cdc.errors import SlotError
from cdc.lake.store import LocalLake
from cdc.snapshot.consistent import ConsistentSnapshot
from cdc.snapshot.readers import AdbcReader, CsvReader
from cdc.snapshot.updated_at import UpdatedAtExport


def snapshot(settings: Settings, **kwargs: Any) -> Any:
    return ConsistentSnapshot(settings, LocalLake(settings.lake), **kwargs).run()


def source_rows(source: SourceDb, table: str, key: str = "id") -> dict[Any, dict[str, Any]]:
    with source.connect() as conn:
        cur = conn.execute(f"SELECT * FROM {table}")
        names = [d.name for d in cur.description or []]
        return {row[names.index(key)]: dict(zip(names, row, strict=True))
                for row in cur.fetchall()}


class Writer(threading.Thread):
    """Keeps inserting, updating and deleting rows of `accounts` until stopped."""

    def __init__(self, source: SourceDb, seed: int) -> None:
        super().__init__(daemon=True)
        self.source = source
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.transactions = 0

    def run(self) -> None:
        with self.source.connect() as conn:
            next_id = 100_001
            while not self.stop.is_set():
                with conn.transaction():
                    k = self.rng.randint(1, 100_000)
                    conn.execute("UPDATE accounts SET balance = balance + 1, note = %s "
                                 "WHERE id = %s", (f"w{self.transactions}", k))
                    conn.execute("DELETE FROM accounts WHERE id = %s",
                                 (self.rng.randint(1, 100_000),))
                    conn.execute("INSERT INTO accounts VALUES (%s, 0, 'new')", (next_id,))
                    conn.execute("UPDATE pairs SET v = v + 1 WHERE a = %s",
                                 (self.rng.randint(1, 100),))
                next_id += 1
                self.transactions += 1


READERS = [pytest.param(AdbcReader, id="adbc"), pytest.param(CsvReader, id="csv")]


class TestConsistentSnapshot:
    @pytest.mark.parametrize("reader", READERS)
    def test_snapshot_under_writes_then_stream_replays_to_the_source_exactly(
        self, source: SourceDb, settings: Settings, lake_dir: Path, reader: Any
    ) -> None:
        """No gap and no duplicate at the hand-over, while another connection writes."""
        seed = random.randrange(1 << 30)
        print(f"writer seed {seed}")
        source.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint, note text)")
        source.execute("INSERT INTO accounts SELECT g, g * 10, 'n' || g "
                       "FROM generate_series(1, 100000) g")
        source.execute("CREATE TABLE pairs (a int, b text, v int, PRIMARY KEY (a, b))")
        source.execute("INSERT INTO pairs SELECT g % 100 + 1, 'b' || (g / 100), 0 "
                       "FROM generate_series(0, 4999) g")
        source.execute("ANALYZE")
        writer = Writer(source, seed)
        writer.start()
        try:
            result = snapshot(settings, workers=2, chunk_rows=10_000, reader=reader)
        finally:
            writer.stop.set()
            writer.join()
        assert writer.transactions > 0
        assert len(raw_files(lake_dir, "public.accounts")) >= 10  # chunked
        stream_until_caught_up(settings)

        raw = read_raw(lake_dir, "public.accounts")
        snapshot_rows = [r for r in raw if r["_op"] == "r"]
        assert {r["_commit_lsn"] for r in snapshot_rows} == {result.consistent_point}
        assert len({r["id"] for r in snapshot_rows}) == len(snapshot_rows)  # each key once
        assert all(r["_commit_lsn"] >= result.consistent_point for r in raw if r["_op"] != "r")
        assert replay(raw) == source_rows(source, "accounts")
        pairs = replay([{**r, "id": (r["a"], r["b"])} for r in read_raw(lake_dir, "public.pairs")])
        expected = {(a, b): v for a, b, v in source.execute("SELECT a, b, v FROM pairs")}
        assert {k: row["v"] for k, row in pairs.items()} == expected

    @pytest.mark.parametrize("reader", READERS)
    def test_table_without_primary_key_is_copied_whole_in_ctid_chunks(
        self, source: SourceDb, settings: Settings, lake_dir: Path, reader: Any
    ) -> None:
        """CTID block ranges cover every row exactly once, NULL and '' kept apart."""
        settings = with_settings(settings, keyless_tables="insert-only")  # append-only
        source.execute("CREATE TABLE events (kind text, n int)")
        source.execute("INSERT INTO events SELECT 'k' || (g % 7), g "
                       "FROM generate_series(1, 20000) g")
        source.execute("INSERT INTO events VALUES ('', NULL), (NULL, -1), "
                       "(E'multi\\nline,\"q\"', -2)")
        source.execute("ANALYZE events")
        snapshot(settings, chunk_rows=3000, reader=reader)

        assert len(raw_files(lake_dir, "public.events")) > 3
        rows = read_raw(lake_dir, "public.events")
        got = Counter((r["kind"], r["n"]) for r in rows)
        expected = Counter(tuple(r) for r in source.execute("SELECT kind, n FROM events"))
        assert got == expected

    def test_empty_table_completes_without_files(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """An empty table is part of the snapshot and writes nothing."""
        source.execute("CREATE TABLE empty (id int PRIMARY KEY)")
        source.execute("CREATE TABLE one (id int PRIMARY KEY)")
        source.execute("INSERT INTO one VALUES (1)")
        result = snapshot(settings)
        assert result.rows == {"public.empty": 0, "public.one": 1}
        assert raw_files(lake_dir, "public.empty") == []

    @pytest.mark.slow
    def test_a_million_row_table_with_two_workers(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """1M rows in parallel chunks: every id exactly once."""
        source.execute("CREATE TABLE big (id bigint PRIMARY KEY, name text, amount numeric(12,2))")
        source.execute("INSERT INTO big SELECT g, 'name ' || g, g / 100.0 "
                       "FROM generate_series(1, 1000000) g")
        source.execute("ANALYZE big")
        result = snapshot(settings, workers=2, chunk_rows=200_000)

        assert result.rows == {"public.big": 1_000_000}
        ids = []
        for f in raw_files(lake_dir, "public.big"):
            ids.extend(pq.read_table(f, columns=["id"]).column("id").to_pylist())
        assert len(ids) == 1_000_000
        assert len(set(ids)) == 1_000_000

    def test_snapshot_stopped_half_way_resumes_and_stream_still_adds_up(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """A crash after some chunks: the rerun reads the unfinished table again (whole, in
        its own snapshot: tests/test_snapshot_resume.py says why), and stream still adds up."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        source.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 50000) g")
        source.execute("ANALYZE t")
        copied: list[int] = []

        def crash_after_three(table: str, index: int) -> None:
            copied.append(index)
            if len(copied) == 3:
                raise RuntimeError("injected crash")

        with (faults.armed("snapshot.after_chunk",
                           lambda point, at: crash_after_three(at["table"], at["index"])),
              pytest.raises(RuntimeError, match="injected crash")):
            snapshot(settings, workers=1, chunk_rows=5000)
        with pytest.raises(SlotError, match="has not finished"):
            stream_until_caught_up(settings)  # the stream will not start on half a snapshot
        source.execute("UPDATE t SET v = 1 WHERE id % 1000 = 0")  # between crash and resume
        first_run = list(copied)
        copied.clear()
        with faults.armed("snapshot.after_chunk", lambda point, at: copied.append(at["index"])):
            result = snapshot(settings, workers=2, chunk_rows=5000)
        assert result.resumed
        assert len(first_run) == 3
        assert sorted(copied) == list(range(10))
        stream_until_caught_up(settings)
        assert replay(read_raw(lake_dir, "public.t")) == source_rows(source, "t")

    def test_existing_slot_is_refused_with_the_choice_explained(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A consistent snapshot must create its slot; the message says what to do."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        stream_until_caught_up(settings)  # creates the slot
        result = run_cdc(["snapshot", "--dsn", settings.dsn, "--lake", settings.lake,
                          "--slot", settings.slot, "--publication", settings.publication])
        assert result.returncode == 4
        assert "already exists" in result.stderr
        assert "--slot another_name" in result.stderr
        assert "cdc slot drop" in result.stderr

    def test_cli_snapshot_then_stream_reports_rows(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """`cdc snapshot` prints its totals and leaves the slot for `cdc stream`."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        source.execute("INSERT INTO t SELECT generate_series(1, 10)")
        result = run_cdc(["snapshot", "--dsn", settings.dsn, "--lake", settings.lake,
                          "--slot", settings.slot, "--publication", settings.publication])
        assert result.returncode == 0, result.stderr
        assert "snapshot done: 10 rows from 1 tables" in result.stderr
        source.execute("INSERT INTO t VALUES (11)")
        stream_until_caught_up(settings)
        assert [r["_op"] for r in read_raw(lake_dir, "public.t")] == ["r"] * 10 + ["c"]


class TestUpdatedAtExport:
    TABLE = ("CREATE TABLE items (id int PRIMARY KEY, name text, "
             "updated_at timestamptz NOT NULL DEFAULT now())")

    def export(self, settings: Settings, **kwargs: Any) -> dict[str, int]:
        narrowed = with_settings(settings, tables=("public.items",))
        kwargs.setdefault("lookback_seconds", 0)  # the lookback: tests/test_updated_at.py
        return UpdatedAtExport(narrowed, LocalLake(settings.lake), **kwargs).run()

    def test_two_runs_pick_up_exactly_the_changed_rows(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """The second run exports the updated and inserted rows, nothing else."""
        source.execute(self.TABLE)
        source.execute("INSERT INTO items SELECT g, 'n' || g, now() - interval '1 hour' "
                       "FROM generate_series(1, 100) g")
        assert self.export(settings) == {"public.items": 100}
        source.execute("UPDATE items SET name = 'changed', updated_at = now() WHERE id <= 5")
        source.execute("INSERT INTO items (id, name) VALUES (101, 'new')")
        assert self.export(settings) == {"public.items": 6}
        assert self.export(settings) == {"public.items": 0}  # nothing new: nothing written

        rows = read_raw(lake_dir, "public.items")
        assert len(rows) == 106
        assert {r["_op"] for r in rows} == {"r"}
        assert replay(rows) == source_rows(source, "items")

    def test_rows_sharing_a_timestamp_across_pages_are_neither_lost_nor_repeated(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Keyset paging on (updated_at, key): ten rows with one timestamp, pages of three."""
        source.execute(self.TABLE)
        source.execute("INSERT INTO items SELECT g, 'n', '2026-01-01 00:00:00+00' "
                       "FROM generate_series(1, 10) g")
        assert self.export(settings, page_rows=3) == {"public.items": 10}
        source.execute("INSERT INTO items VALUES (11, 'same instant', '2026-01-01 00:00:00+00')")
        assert self.export(settings, page_rows=3) == {"public.items": 1}
        ids = [r["id"] for r in read_raw(lake_dir, "public.items")]
        assert sorted(ids) == list(range(1, 12))


class TestReaders:
    @pytest.mark.parametrize("reader", READERS)
    def test_each_reader_reads_inside_the_exported_snapshot(
        self, source: SourceDb, reader: Any
    ) -> None:
        """Rows committed after the slot's snapshot was exported are not read."""
        from psycopg import sql

        from cdc.source.admin import Admin
        from cdc.source.connection import connect

        source.execute("CREATE TABLE t (id int PRIMARY KEY, ok boolean, note char(4))")
        source.execute("INSERT INTO t SELECT g, g % 2 = 0, 'x' FROM generate_series(1, 10) g")
        with connect(source.dsn, replication=True) as repl:
            row = repl.execute("CREATE_REPLICATION_SLOT "
                               f"{source.slot} LOGICAL pgoutput (SNAPSHOT 'export')").fetchone()
            assert row is not None
            source.execute("INSERT INTO t SELECT g, true, 'y' FROM generate_series(11, 20) g")
            with connect(source.dsn) as conn:
                relation, _ = Admin(conn, source.dsn).describe_table("public", "t")
            text_reader = reader(source.dsn, str(row[2]))
            try:
                ids, ok, note = text_reader.read(relation, sql.SQL("true"))
            finally:
                text_reader.close()
        assert sorted(int(v) for v in ids.to_pylist()) == list(range(1, 11))
        assert len(ok) == 10
        assert set(note.to_pylist()) == {"x   "}  # char(4) keeps its padding, as pgoutput does
