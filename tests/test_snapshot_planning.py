"""Snapshot planning and failure: chunks near --chunk-rows, a failing worker stops the rest;
new raw folders are made durable in their parent."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import SourceDb

from cdc import faults
from cdc.config import Settings
from cdc.events import Relation
from cdc.lake import store
from cdc.lake.store import LocalLake
from cdc.snapshot.consistent import ConsistentSnapshot, chunk_filter
from cdc.snapshot.planning import plan_table
from cdc.snapshot.readers import TextReader, open_reader
from cdc.source.admin import Admin


def chunk_sizes(source: SourceDb, table: str, chunk_rows: int) -> list[int]:
    with psycopg.connect(source.dsn, autocommit=True) as conn:
        relation = Admin(conn, source.dsn).describe_table("public", table)[0]
        plan = plan_table(conn, relation, chunk_rows)
        return [int(conn.execute(psycopg.sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
                    psycopg.sql.Identifier(table), chunk_filter(relation, c))).fetchone()[0])
                for c in plan.chunks]


class TestChunkPlanning:
    def test_a_partitioned_parent_is_split_into_chunks_near_chunk_rows(
        self, source: SourceDb
    ) -> None:
        """relpages of a partitioned parent is 0: the leaves' sizes plan the CTID ranges."""
        source.execute("CREATE TABLE p (k text, part int, pad text, PRIMARY KEY (k, part)) "
                       "PARTITION BY LIST (part)")
        source.execute("CREATE TABLE p1 PARTITION OF p FOR VALUES IN (1)")
        source.execute("CREATE TABLE p2 PARTITION OF p FOR VALUES IN (2)")
        source.execute("INSERT INTO p SELECT 'k' || g, 1 + g % 2, repeat('x', 50) "
                       "FROM generate_series(1, 20000) g")
        source.execute("ANALYZE p")
        sizes = chunk_sizes(source, "p", 2000)
        assert sum(sizes) == 20000
        assert len(sizes) >= 8
        assert max(sizes) <= 2 * 2000

    def test_stale_reltuples_of_a_grown_table_still_give_chunks_near_chunk_rows(
        self, source: SourceDb
    ) -> None:
        """Analyzed at 100 rows, now 30,100: the estimate scales with the current size."""
        source.execute("CREATE TABLE g (k text PRIMARY KEY, pad text) "
                       "WITH (autovacuum_enabled = false)")
        source.execute("INSERT INTO g SELECT 'k' || g, repeat('y', 40) "
                       "FROM generate_series(1, 100) g")
        source.execute("ANALYZE g")
        source.execute("INSERT INTO g SELECT 'm' || g, repeat('y', 40) "
                       "FROM generate_series(1, 30000) g")
        sizes = chunk_sizes(source, "g", 3000)
        assert sum(sizes) == 30100
        assert max(sizes) <= 2 * 3000


class TestFailingWorker:
    def test_a_failing_worker_stops_the_others_at_their_next_chunk(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """The error shows after a few chunks, not after the whole queue was drained."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        source.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 40000) g")
        source.execute("ANALYZE t")
        readers: list[Any] = []
        lock = threading.Lock()
        read = []
        broke = threading.Event()

        class Failing:
            def __init__(self, inner: TextReader, fail: bool) -> None:
                self.inner, self.fail = inner, fail

            def read(self, relation: Relation, where: Any) -> Any:
                if self.fail:
                    broke.set()
                    raise RuntimeError("this worker's connection broke")
                broke.wait(timeout=60)  # the other worker's error comes first
                with lock:
                    read.append(1)
                return self.inner.read(relation, where)

            def close(self) -> None:
                self.inner.close()

        def reader(dsn: str, snapshot: str | None) -> TextReader:
            with lock:
                readers.append(None)
                first = len(readers) == 1
            return Failing(open_reader(dsn, snapshot), fail=first)

        snap = ConsistentSnapshot(settings, LocalLake(settings.lake), workers=2,
                                  chunk_rows=1000, reader=reader)
        with pytest.raises(RuntimeError, match="connection broke"):
            snap.run()
        assert len(read) <= 2  # of 40 chunks: the other worker stopped at its next one


class TestDurableFolders:
    def test_a_new_load_date_folder_is_fsynced_into_its_parent(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A power loss cannot drop a new day's first file while the checkpoint says it is
        durable: every folder created for it is fsynced into its parent."""
        synced: list[Path] = []
        real = store._fsync_dir

        def record(path: Path) -> None:
            synced.append(path)
            real(path)

        monkeypatch.setattr(store, "_fsync_dir", record)
        lake = LocalLake(tmp_path / "lake")
        lake.write_bytes("raw/public.t/load_date=2026-12-01/a.parquet", b"x")
        root = tmp_path / "lake"
        assert root / "raw/public.t/load_date=2026-12-01" in synced  # the file's entry
        for folder in ("raw/public.t", "raw", "."):  # each new folder's entry
            assert (root / folder).resolve() in {p.resolve() for p in synced}
        synced.clear()
        lake.write_bytes("raw/public.t/load_date=2026-12-01/b.parquet", b"y")
        assert synced == [root / "raw/public.t/load_date=2026-12-01"]  # nothing new: one fsync


class TestKeylessResume:
    def test_a_resumed_snapshot_of_a_keyless_table_stages_no_row_twice(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Rows inserted between the crash and the resume land once: the keyless table is
        re-read whole at a known LSN behind a truncate marker; keyed tables just resume."""
        from collections import Counter

        from rawlake import stream_until_caught_up
        from test_compact import assert_staged_equals_source, staged_rows

        from cdc.staged.runner import compact_lake

        source.execute("CREATE TABLE events (k int, n int)")
        source.execute("ALTER TABLE events REPLICA IDENTITY FULL")
        source.execute("INSERT INTO events SELECT g % 10, g FROM generate_series(1, 30000) g")
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        source.execute("INSERT INTO t SELECT g, 0 FROM generate_series(1, 30000) g")
        source.execute("ANALYZE")
        copied: list[tuple[str, int]] = []

        def crash_after_four(point: str, at: dict[str, Any]) -> None:
            copied.append((at["table"], at["index"]))
            if len(copied) == 4:
                raise RuntimeError("injected crash")

        with faults.armed("snapshot.after_chunk", crash_after_four), \
                pytest.raises(RuntimeError, match="injected crash"):
            ConsistentSnapshot(settings, LocalLake(settings.lake), workers=1,
                               chunk_rows=3000).run()
        assert {t for t, _ in copied} == {"public.events"}  # some of the keyless chunks done
        source.execute("INSERT INTO events SELECT 100, g FROM generate_series(1, 2000) g")
        source.execute("UPDATE t SET v = 1 WHERE id % 100 = 0")
        result = ConsistentSnapshot(settings, LocalLake(settings.lake), workers=2,
                                    chunk_rows=3000).run()
        assert result.resumed
        source.execute("INSERT INTO events SELECT 200, g FROM generate_series(1, 500) g")
        stream_until_caught_up(settings)
        compact_lake(LocalLake(settings.lake), settings.slot)
        rows = staged_rows(settings, "public.events")
        assert len(rows) == 32500
        assert max(Counter((r["k"], r["n"]) for r in rows).values()) == 1
        assert_staged_equals_source(source, settings, "events", "t")
