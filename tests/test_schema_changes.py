"""Column DDL while `cdc stream` runs, for both plugins: drain, compact, and staged equals the
source (RENAME COLUMN, ADD COLUMN ... DEFAULT, generated columns, a table created meanwhile)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import SourceDb, with_settings
from deltalake import DeltaTable
from polling import wait_for
from rawlake import prepare, raw_files, read_raw, stream_until_caught_up, streaming_in_thread
from test_compact import compact, staged_rows

from cdc.config import Settings
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.store import LocalLake
from cdc.snapshot.consistent import ConsistentSnapshot

PLUGINS = pytest.mark.parametrize("plugin", ["pgoutput", "wal2json"])


def rows_of(source: SourceDb, query: str) -> list[dict[str, Any]]:
    with source.connect() as conn:
        cur = conn.execute(query)
        names = [d.name for d in cur.description or []]
        return sorted((dict(zip(names, r, strict=True)) for r in cur.fetchall()), key=repr)


def drained(source: SourceDb, settings: Settings) -> None:
    """Wait until the running stream's checkpoint passes everything committed so far."""
    target = source.current_lsn()
    wait_for(lambda: (CheckpointStore(LocalLake(settings.lake), settings.slot).load() or 0)
             >= target, what="the stream to checkpoint past the DDL")


def history_rows(settings: Settings, table: str) -> list[dict[str, Any]]:
    rows = DeltaTable(f"{settings.lake}/history/{table}").to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: (r["id"], r["_valid_from_lsn"]))


def assert_staged_equals(source: SourceDb, settings: Settings, table: str) -> None:
    assert staged_rows(settings, f"public.{table}") == rows_of(source, f"SELECT * FROM {table}")


@PLUGINS
class TestColumnDdlWhileStreaming:
    def test_add_column_with_a_default_shows_it_in_rows_staged_before(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """Rows staged before ``ADD COLUMN n int DEFAULT 7`` and rows in raw files from before
        it (compacted in the same run) read 7, as at the source, not NULL."""
        settings = with_settings(settings, plugin=plugin)
        source.execute("CREATE TABLE a (id int PRIMARY KEY, v text)")
        source.execute("CREATE TABLE b (id int PRIMARY KEY, v text)")
        prepare(settings)
        with streaming_in_thread(settings):
            source.execute("INSERT INTO a SELECT g, 'x' FROM generate_series(1, 5) g")
            source.execute("INSERT INTO b SELECT g, 'x' FROM generate_series(1, 5) g")
            drained(source, settings)
            compact(settings, ("public.a",))
            for t in ("a", "b"):
                source.execute(f"ALTER TABLE {t} ADD COLUMN n int DEFAULT 7, "
                               "ADD COLUMN label text DEFAULT 'none'")
                source.execute(f"INSERT INTO {t} (id, v, n) VALUES (6, 'y', 8)")
                source.execute(f"UPDATE {t} SET v = 'z' WHERE id = 2")
            drained(source, settings)
        compact(settings)
        for t in ("a", "b"):
            assert_staged_equals(source, settings, t)
        assert {r["n"] for r in staged_rows(settings, "public.a")} == {7, 8}

    def test_rename_column_carries_staged_values_to_the_new_name(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """RENAME COLUMN: rows untouched since keep their value under the new name; staged
        has no stale old column; a drop + add of a column is not mistaken for a rename."""
        settings = with_settings(settings, plugin=plugin)
        source.execute("CREATE TABLE r (id int PRIMARY KEY, old_name text, gone int)")
        prepare(settings)
        with streaming_in_thread(settings):
            source.execute("INSERT INTO r SELECT g, 'v' || g, g FROM generate_series(1, 5) g")
            drained(source, settings)
            compact(settings)
            source.execute("ALTER TABLE r RENAME COLUMN old_name TO new_name")
            source.execute("UPDATE r SET new_name = 'changed' WHERE id = 1")
            source.execute("ALTER TABLE r DROP COLUMN gone")
            source.execute("ALTER TABLE r ADD COLUMN fresh int")
            source.execute("UPDATE r SET fresh = 1 WHERE id = 2")
            drained(source, settings)
        compact(settings)
        staged = staged_rows(settings, "public.r")
        assert {r["new_name"] for r in staged} == {"changed", "v2", "v3", "v4", "v5"}
        assert "old_name" not in staged[0]
        assert {k: v for k, v in staged[0].items() if k != "gone"} == rows_of(
            source, "SELECT * FROM r")[0]
        assert [r["fresh"] for r in staged] == [r["fresh"] for r in rows_of(
            source, "SELECT * FROM r")]

    def test_rename_table_moves_its_staged_history_to_the_new_name(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """ALTER TABLE t RENAME TO u: staged u holds every row (untouched ones too), and
        history u every version, also of rows whose raw files retention removed; staged and
        history t are emptied; the table's OID, not its name, is its identity."""
        settings = with_settings(settings, plugin=plugin)
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        prepare(settings)
        with streaming_in_thread(settings):
            source.execute("INSERT INTO t SELECT g, 'v' FROM generate_series(1, 5) g")
            drained(source, settings)
            compact(settings)
            source.execute("INSERT INTO t VALUES (7, 'v')")
            drained(source, settings)
            compact(settings)
            # raw retention removed t's older file (it keeps a folder's newest): only the
            # moved history still knows the versions of rows 1-5
            [first, _] = raw_files(Path(settings.lake), "public.t")
            first.unlink()
            source.execute("ALTER TABLE t RENAME TO u")
            source.execute("UPDATE u SET v = 'renamed' WHERE id = 1")
            source.execute("INSERT INTO u VALUES (6, 'new')")
            drained(source, settings)
        compact(settings)
        assert_staged_equals(source, settings, "u")
        assert staged_rows(settings, "public.t") == []
        compact(settings)  # again: nothing moves twice
        assert_staged_equals(source, settings, "u")
        # the history moved with it: every version from before and after the rename
        versions = history_rows(settings, "public.u")
        assert [(v["id"], v["v"], v["_is_current"]) for v in versions] == [
            (1, "v", False), (1, "renamed", True), *((k, "v", True) for k in range(2, 6)),
            (6, "new", True), (7, "v", True)]
        assert history_rows(settings, "public.t") == []  # nothing there looks current

    def test_a_table_created_while_streaming_loses_no_row(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """A table created (FOR ALL TABLES publication) while the stream runs lands in raw
        whole; under wal2json too, whose decoder used to read the publication once."""
        settings = with_settings(settings, plugin=plugin)
        source.execute("CREATE TABLE first (id int PRIMARY KEY)")
        # cdc creates an explicit list (tables created later join at its table sync);
        # a FOR ALL TABLES publication publishes them from their first row
        source.execute(f"CREATE PUBLICATION {settings.publication} FOR ALL TABLES")
        prepare(settings)
        with streaming_in_thread(settings):
            source.execute("INSERT INTO first VALUES (1)")
            drained(source, settings)
            source.execute("CREATE TABLE fresh (id int PRIMARY KEY, v text)")
            source.execute("INSERT INTO fresh SELECT g, 'v' FROM generate_series(1, 20) g")
            source.execute("DELETE FROM fresh WHERE id = 3")
            drained(source, settings)
        assert len(read_raw(Path(settings.lake), "public.fresh")) == 21
        compact(settings)
        assert_staged_equals(source, settings, "fresh")

    def test_generated_columns_are_never_copied_by_snapshot_or_stream(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """pgoutput never sends a STORED generated column; the snapshot does not copy it and
        wal2json's rows leave it out, so raw has one schema and staged no half-NULL column."""
        settings = with_settings(settings, plugin=plugin)
        source.execute("CREATE TABLE g (id int PRIMARY KEY, a int, "
                       "twice int GENERATED ALWAYS AS (a * 2) STORED)")
        source.execute("INSERT INTO g (id, a) SELECT i, i FROM generate_series(1, 3) i")
        ConsistentSnapshot(settings, LocalLake(settings.lake)).run()
        source.execute("UPDATE g SET a = 10 WHERE id = 1")
        source.execute("INSERT INTO g (id, a) VALUES (4, 4)")
        stream_until_caught_up(settings)
        schemas = {tuple(pq.read_schema(f).names) for f in raw_files(Path(settings.lake),
                                                                     "public.g")}
        assert all("twice" not in names for names in schemas)
        compact(settings)
        assert staged_rows(settings, "public.g") == rows_of(source, "SELECT id, a FROM g")
