"""`cdc resync`: one table re-read while `cdc stream` runs and writes go on; its staged state
is replaced (no phantom rows), raw stays append-only; the way out of rewriting DDL."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any

import psycopg
import pyarrow as pa
import pytest
from conftest import SourceDb, with_settings
from deltalake import DeltaTable
from rawlake import prepare, run_cdc, streaming_in_thread
from test_compact import staged_rows
from test_schema_changes import drained, history_rows, rows_of

from cdc.config import Settings
from cdc.lake.checkpoint import ResyncHold
from cdc.lake.store import LocalLake
from cdc.snapshot.resync import Resync
from cdc.staged.compactor import CompactOptions, TableResult
from cdc.staged.runner import compact_lake

PLUGINS = pytest.mark.parametrize("plugin", ["pgoutput", "wal2json"])


def compact(settings: Settings, **options: Any) -> list[TableResult]:
    """Staged and history; the tables that failed (reported, not raised)."""
    results = compact_lake(LocalLake(settings.lake), settings.slot,
                           options=CompactOptions(**options))
    return [r for r in results if r.error]


@contextmanager
def repeating(source: SourceDb, step: Callable[[psycopg.Connection[Any], random.Random], None],
              seed: int) -> Iterator[None]:
    """``step`` again and again on one connection in a thread until the block ends."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def run() -> None:
        rng = random.Random(seed)
        try:
            with psycopg.connect(source.dsn, autocommit=True) as conn:
                while not stop.is_set():
                    step(conn, rng)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=30)
    if errors:
        raise errors[0]


def writing(source: SourceDb, table: str, value: str, keys: int,
            seed: int) -> AbstractContextManager[None]:
    """Random inserts, updates and deletes on ``table`` in a thread until the block ends."""

    def step(conn: psycopg.Connection[Any], rng: random.Random) -> None:
        k = rng.randint(1, keys)
        kind = rng.random()
        if kind < 0.5:
            conn.execute(f"UPDATE {table} SET v = {value} WHERE id = %s",
                         (k, rng.randint(0, 999)))
        elif kind < 0.75:
            conn.execute(f"DELETE FROM {table} WHERE id = %s", (k,))
        else:
            conn.execute(f"INSERT INTO {table} (id, v) VALUES (%s, {value}) "
                         "ON CONFLICT (id) DO NOTHING", (k, rng.randint(0, 999)))

    return repeating(source, step, seed)


def resync(settings: Settings, table: str) -> int:
    return Resync(settings, LocalLake(settings.lake), table, chunk_rows=37,
                  wait_seconds=60).run().rows


@PLUGINS
class TestResyncWhileStreaming:
    def test_after_a_rewriting_type_change_the_advised_resync_stages_the_source(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """ALTER COLUMN v TYPE text USING ...: compaction stops and names `cdc resync`;
        following it, under concurrent writes, staged equals the source."""
        settings = with_settings(settings, plugin=plugin)
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        prepare(settings)
        with streaming_in_thread(settings):
            source.execute("INSERT INTO t SELECT g, g FROM generate_series(1, 300) g")
            drained(source, settings)
            compact(settings)
            source.execute("ALTER TABLE t ALTER v TYPE text USING 'was ' || v")
            source.execute("UPDATE t SET v = 'new' WHERE id = 1")
            drained(source, settings)
            [failed] = compact(settings)  # reported, not raised: other tables go on
            assert "cdc resync --tables public.t" in failed.error
            with writing(source, "t", "'w' || %s", keys=320, seed=7):
                assert resync(settings, "public.t") > 0
            drained(source, settings)
        assert compact(settings, chunk_rows=5) == []  # small chunks: none may stop before
        assert staged_rows(settings, "public.t") == rows_of(source, "SELECT * FROM t")
        # history followed the type: every version in text, the int ones as PostgreSQL
        # prints them, the resync's truncate closing them
        versions = history_rows(settings, "public.t")
        schema = pa.schema(DeltaTable(f"{settings.lake}/history/public.t").schema().to_arrow())
        assert pa.types.is_string(schema.field("v").type)
        assert [v["v"] for v in versions if v["id"] == 2][:1] == ["2"]
        assert [v["v"] for v in versions if v["id"] == 1][:2] == ["1", "new"]
        current = sorted(({"id": v["id"], "v": v["v"]} for v in versions if v["_is_current"]),
                         key=repr)
        assert current == rows_of(source, "SELECT * FROM t")

    def test_history_behind_a_type_change_follows_it_across_a_crash_and_other_chunks(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """History not yet past the int rows when v becomes text: the first run reads both
        (old ones in text), rewrites history in text and dies before its chunk's commit; a
        rerun with small chunks reads int rows alone and puts them in text too."""
        from test_history import Crash, crash_at

        from cdc import faults

        settings = with_settings(settings, plugin=plugin)
        source.execute("CREATE TABLE h (id int PRIMARY KEY, v int)")
        prepare(settings)
        lake = LocalLake(settings.lake)
        with streaming_in_thread(settings):
            source.execute("INSERT INTO h SELECT g, g FROM generate_series(1, 40) g")
            drained(source, settings)
            assert compact(settings) == []  # history holds v as int
            source.execute("UPDATE h SET v = v + 100 WHERE id <= 10")
            drained(source, settings)
            compact_lake(lake, settings.slot, history=False)  # staged only: history behind
            source.execute("ALTER TABLE h ALTER v TYPE text USING 'was ' || v")
            source.execute("UPDATE h SET v = 'new' WHERE id = 1")
            drained(source, settings)
            assert resync(settings, "public.h") > 0
            drained(source, settings)
        with faults.armed("history.after_commit", crash_at(1)), pytest.raises(Crash):
            compact_lake(lake, settings.slot)  # the retype's commit, then death
        schema = pa.schema(DeltaTable(f"{settings.lake}/history/public.h").schema().to_arrow())
        assert pa.types.is_string(schema.field("v").type)
        assert compact(settings, chunk_rows=5) == []
        versions = history_rows(settings, "public.h")
        assert [v["v"] for v in versions if v["id"] == 1] == ["1", "101", "new", "new"]
        assert [v["v"] for v in versions if v["id"] == 20] == ["20", "was 20"]
        assert sorted(({"id": v["id"], "v": v["v"]} for v in versions if v["_is_current"]),
                      key=repr) == rows_of(source, "SELECT * FROM h")

    def test_a_dropped_and_recreated_table_is_replaced_without_phantom_rows(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """DROP + re-CREATE with other columns: the old table's rows leave staged."""
        settings = with_settings(settings, plugin=plugin)
        source.execute("CREATE TABLE d (id int PRIMARY KEY, v int, old text)")
        # the re-created table streams at once (cdc's own list adds it at its table sync)
        source.execute(f"CREATE PUBLICATION {settings.publication} FOR ALL TABLES")
        prepare(settings)
        with streaming_in_thread(settings):
            source.execute("INSERT INTO d SELECT g, g, 'o' FROM generate_series(1, 100) g")
            drained(source, settings)
            compact(settings)
            source.execute("DROP TABLE d")
            source.execute("CREATE TABLE d (id bigint PRIMARY KEY, v text)")
            source.execute("INSERT INTO d SELECT g, 'n' || g FROM generate_series(90, 150) g")
            with writing(source, "d", "'w' || %s", keys=160, seed=3):
                resync(settings, "public.d")
            drained(source, settings)
        assert compact(settings) == []
        staged = staged_rows(settings, "public.d")
        assert staged == rows_of(source, "SELECT * FROM d")
        # history too: int → bigint and int → text convert exactly; the old rows are closed
        versions = history_rows(settings, "public.d")
        assert sorted(({"id": v["id"], "v": v["v"]} for v in versions if v["_is_current"]),
                      key=repr) == rows_of(source, "SELECT id, v FROM d")
        assert next(v["v"] for v in versions if v["id"] == 5) == "5"  # its first version
        assert all("old" not in r for r in staged)  # the old table's columns are gone too


class TestResyncCommand:
    def test_a_table_added_to_the_publication_later_gets_its_older_rows(
            self, source: SourceDb, settings: Settings) -> None:
        """Rows written before ALTER PUBLICATION ... ADD TABLE reach staged through
        `cdc resync`; compaction is held while it runs and released after."""
        source.execute("CREATE TABLE a (id int PRIMARY KEY, v int)")
        source.execute("CREATE TABLE late (id int PRIMARY KEY, v int)")
        source.execute(f"CREATE PUBLICATION {settings.publication} FOR TABLE a")
        prepare(settings)
        with streaming_in_thread(settings):
            source.execute("INSERT INTO late SELECT g, g FROM generate_series(1, 50) g")
            source.execute(f"ALTER PUBLICATION {settings.publication} ADD TABLE late")
            source.execute("UPDATE late SET v = -1 WHERE id <= 5")
            drained(source, settings)
            result = run_cdc(["resync", "--dsn", settings.dsn, "--lake", settings.lake,
                              "--slot", settings.slot, "--tables", "public.late",
                              "--resync-chunk-rows", "20"])
            assert result.returncode == 0, result.stderr
            assert "public.late: resynced" in result.stderr
            drained(source, settings)
        assert ResyncHold(LocalLake(settings.lake), "public.late").load() is None
        compact(settings)
        assert staged_rows(settings, "public.late") == rows_of(source, "SELECT * FROM late")

    def test_a_second_resync_of_a_table_waits_for_the_first_and_nothing_is_lost(
            self, source: SourceDb, settings: Settings) -> None:
        """`cdc resync` of a table another resync (or a stream's backfill) is re-reading
        refuses with a fix (one finishing first would release the hold the other needs);
        the first goes on to staged equal to the source, and the advice works after."""
        source.execute("CREATE TABLE busy (id int PRIMARY KEY, v int)")
        prepare(settings)
        inside, release = threading.Event(), threading.Event()

        def held(chunk: int) -> None:
            inside.set()
            release.wait(60)

        with streaming_in_thread(settings):
            source.execute("INSERT INTO busy SELECT g, g FROM generate_series(1, 100) g")
            drained(source, settings)
            first = Resync(settings, LocalLake(settings.lake), "public.busy", chunk_rows=30,
                           wait_seconds=60, after_chunk=held)
            done: list[int] = []
            thread = threading.Thread(target=lambda: done.append(first.run().rows))
            thread.start()
            try:
                assert inside.wait(60)
                second = run_cdc(["resync", "--dsn", settings.dsn, "--lake", settings.lake,
                                  "--slot", settings.slot, "--tables", "public.busy"])
                assert second.returncode != 0
                assert "a resync of public.busy runs already" in second.stderr
                assert "wait for it to finish" in second.stderr
            finally:
                release.set()
                thread.join(120)
            assert done == [100]
            again = run_cdc(["resync", "--dsn", settings.dsn, "--lake", settings.lake,
                             "--slot", settings.slot, "--tables", "public.busy"])
            assert again.returncode == 0, again.stderr
            drained(source, settings)
        assert ResyncHold(LocalLake(settings.lake), "public.busy").load() is None
        assert compact(settings) == []
        assert staged_rows(settings, "public.busy") == rows_of(source, "SELECT * FROM busy")


class TestUnconvertibleValues:
    def test_a_nan_in_a_decimal_column_has_a_way_out_that_works(
            self, source: SourceDb, settings: Settings) -> None:
        """NaN in numeric(10,2) stops the stream, and an ALTER alone cannot help (the WAL
        keeps the change's old type). Following the fix: restart with --unconvertible
        quarantine (the batch goes to raw/_rejected, staged stops before it), ALTER the
        column, cdc resync the table: staged equals the source, NaN included."""
        from rawlake import stream_until_caught_up

        from cdc.errors import ConversionError

        source.execute("CREATE TABLE n (id int PRIMARY KEY, amount numeric(10,2))")
        prepare(settings)
        source.execute("INSERT INTO n SELECT g, g * 1.5 FROM generate_series(1, 20) g")
        stream_until_caught_up(settings)
        compact(settings)
        source.execute("INSERT INTO n VALUES (21, 'NaN')")
        with pytest.raises(ConversionError) as stopped:
            stream_until_caught_up(settings)
        assert "--unconvertible quarantine" in stopped.value.fix
        assert "cdc resync --tables public.n" in stopped.value.fix

        quarantining = with_settings(settings, unconvertible="quarantine")
        with streaming_in_thread(quarantining):
            source.execute("UPDATE n SET amount = 0 WHERE id = 1")
            drained(source, settings)
            compact(settings)  # held below the quarantined batch: staged does not pass it
            held = {r["id"]: r["amount"] for r in staged_rows(settings, "public.n")}
            assert held[1] == Decimal("1.50")
            assert 21 not in held
            assert list(Path(settings.lake, "raw", "_rejected", "public.n").rglob("*.parquet"))
            source.execute("ALTER TABLE n ALTER amount TYPE numeric")
            resync(settings, "public.n")
            drained(source, settings)
        compact(settings)
        staged = {r["id"]: r["amount"] for r in staged_rows(settings, "public.n")}
        assert staged == {r["id"]: r["amount"] for r in rows_of(
            source, "SELECT id, amount::text AS amount FROM n")}
        assert staged[21] == "NaN"
