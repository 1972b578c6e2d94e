"""Tables that join the publication cdc manages while it streams (or while it is down) get
the rows they held before: the stream backfills them, exactly, and survives restarts."""

from __future__ import annotations

import json
import os
import random
import subprocess
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import WAL_SENDER_TIMEOUT, SourceDb, with_settings
from hypothesis import HealthCheck, given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from polling import wait_for
from rawlake import cdc_command, prepare, run_cdc, stream_until_caught_up, streaming_in_thread
from test_compact import staged_rows
from test_resync import compact, repeating, writing
from test_schema_changes import drained, rows_of

from cdc import faults
from cdc.config import Settings, parse_duration
from cdc.lake.checkpoint import ResyncHold
from cdc.lake.store import LocalLake
from cdc.names import TableName
from cdc.snapshot.backfill import Backfills


def published(source: SourceDb, settings: Settings) -> set[str]:
    return {r[0] for r in source.execute(
        "SELECT tablename FROM pg_publication_tables WHERE pubname = ANY(%s)",
        ([settings.publication, f"{settings.publication}_inserts"],))}


def owed(settings: Settings) -> list[str]:
    return [b.name.display() for b in Backfills(LocalLake(settings.lake), settings.slot)
            .load_all()]


@contextmanager
def released(event: threading.Event) -> Iterator[None]:
    """Set ``event`` when the block ends, however it ends (a held thread never outlives it)."""
    try:
        yield
    finally:
        event.set()


def active_pid(source: SourceDb) -> int | None:
    rows = source.execute("SELECT active_pid FROM pg_replication_slots WHERE slot_name = %s",
                          (source.slot,))
    return rows[0][0] if rows else None


def slot_active(source: SourceDb) -> bool:
    rows = source.execute("SELECT active FROM pg_replication_slots WHERE slot_name = %s",
                          (source.slot,))
    return bool(rows and rows[0][0])


def appending(source: SourceDb, table: str, seed: int) -> AbstractContextManager[None]:
    """Inserts of repeated values into a keyless ``table`` in a thread until the block ends."""

    def step(conn: psycopg.Connection[Any], rng: random.Random) -> None:
        with conn.transaction():
            for _ in range(rng.randint(1, 5)):
                conn.execute(f"INSERT INTO {table} VALUES (%s, 'w')", (rng.randint(0, 9),))

    return repeating(source, step, seed)


class TestTablesAddedWhileStreaming:
    @pytest.mark.parametrize("plugin", ["pgoutput", "wal2json"])
    def test_a_table_created_and_filled_while_streaming_reaches_staged_with_its_earlier_rows(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """Rows written before the table sync adds the table are in staged, like the later
        ones, while the application goes on writing during the backfill."""
        source.execute("CREATE TABLE first (id int PRIMARY KEY)")
        live = with_settings(settings, table_sync_seconds=0.5, resync_chunk_rows=40,
                             plugin=plugin)
        prepare(live)
        with streaming_in_thread(live):
            wait_for(lambda: slot_active(source), what="the stream to hold the slot")
            source.execute("CREATE TABLE late (id int PRIMARY KEY, v text)")
            source.execute("INSERT INTO late SELECT g, 'early' FROM generate_series(1, 300) g")
            wait_for(lambda: "late" in published(source, settings),
                     what="the table sync to add the table")
            with writing(source, "late", "'w' || %s", keys=350, seed=5):
                wait_for(lambda: not owed(settings), what="the backfill to finish")
            drained(source, settings)
        compact(settings)
        assert staged_rows(settings, "public.late") == rows_of(source, "SELECT * FROM late")
        assert ResyncHold(LocalLake(settings.lake), "public.late").load() is None

    def test_a_keyless_insert_only_table_is_backfilled_exactly_duplicates_included(
            self, source: SourceDb, settings: Settings) -> None:
        """A table without a key (companion insert-only publication) is re-read in one
        snapshot under a brief lock: staged holds each source row as often as the source,
        with inserts going on before, during and after the backfill."""
        source.execute("CREATE TABLE first (id int PRIMARY KEY)")
        live = with_settings(settings, table_sync_seconds=0.5, resync_chunk_rows=40,
                             keyless_tables="insert-only")
        prepare(live)
        with streaming_in_thread(live):
            wait_for(lambda: slot_active(source), what="the stream to hold the slot")
            source.execute("CREATE TABLE logs (v int, note text)")
            source.execute("INSERT INTO logs SELECT g % 10, 'early' "
                           "FROM generate_series(1, 300) g")
            with appending(source, "logs", seed=11):
                wait_for(lambda: "logs" in published(source, settings),
                         what="the table sync to add the table")
                wait_for(lambda: not owed(settings), what="the backfill to finish")
            drained(source, settings)
        compact(settings)
        staged = staged_rows(settings, "public.logs")
        assert staged == rows_of(source, "SELECT * FROM logs")
        assert sum(1 for r in staged if r["note"] == "early") == 300


def created_while_down(source: SourceDb, settings: Settings, *, rows: int) -> None:
    """A lake that follows the slot; then, with no stream running, a new table ``later``."""
    source.execute("CREATE TABLE first (id int PRIMARY KEY)")
    prepare(settings)
    stream_until_caught_up(settings)
    source.execute("CREATE TABLE later (id int PRIMARY KEY, v int)")
    source.execute("INSERT INTO later SELECT g, g FROM generate_series(1, %s) g", (rows,))


class TestStreamBesideABackfill:
    def test_the_stream_keeps_answering_the_server_while_a_backfill_is_stuck(
            self, source: SourceDb, settings: Settings) -> None:
        """A backfill stuck after its first chunk for longer than the server's
        wal_sender_timeout: the same walsender keeps the slot (no reconnect), and the stream
        goes on landing other tables' changes; released, the backfill finishes."""
        stuck, release = threading.Event(), threading.Event()

        def hold(point: str, context: dict[str, Any]) -> None:
            stuck.set()
            release.wait(120)

        source.execute("CREATE TABLE first (id int PRIMARY KEY)")
        live = with_settings(settings, table_sync_seconds=0.5, resync_chunk_rows=50)
        prepare(live)
        with (faults.armed("resync.after_chunk", hold), streaming_in_thread(live) as streamer,
              released(release)):
            wait_for(lambda: slot_active(source), what="the stream to hold the slot")
            source.execute("CREATE TABLE late (id int PRIMARY KEY, v int)")
            source.execute("INSERT INTO late SELECT g, g FROM generate_series(1, 120) g")
            wait_for(stuck.is_set, what="the backfill to reach its first chunk")
            walsender = active_pid(source)
            began = source.execute("SELECT now()")[0][0]
            timeout = parse_duration(WAL_SENDER_TIMEOUT)
            wait_for(lambda: source.execute("SELECT extract(epoch FROM now() - %s)",
                                            (began,))[0][0] > 1.5 * timeout,
                     what="the server's wal_sender_timeout to pass one and a half times")
            source.execute("INSERT INTO first VALUES (1)")
            drained(source, settings)
            assert (active_pid(source), streamer.stats.reconnects) == (walsender, 0)
            release.set()
            wait_for(lambda: not owed(settings), what="the backfill to finish")
            drained(source, settings)
        compact(settings)
        assert staged_rows(settings, "public.late") == rows_of(source, "SELECT * FROM late")
        assert staged_rows(settings, "public.first") == [{"id": 1}]


class TestTablesAddedWhileDown:
    def test_a_table_created_while_cdc_was_down_is_backfilled_by_an_until_caught_up_run(
            self, source: SourceDb, settings: Settings) -> None:
        """The start adds it; `--until-caught-up` exits only once its backfill is done."""
        created_while_down(source, settings, rows=120)
        stream_until_caught_up(with_settings(settings, resync_chunk_rows=50))
        assert not owed(settings)
        compact(settings)
        assert staged_rows(settings, "public.later") == rows_of(source, "SELECT * FROM later")

    def test_a_backfill_killed_half_way_is_shown_by_status_and_finished_by_the_next_start(
            self, source: SourceDb, settings: Settings) -> None:
        """kill -9 after the backfill's second chunk: `cdc status` shows it running with its
        chunks; compaction stays held; the next `cdc stream` runs it again to the end."""
        created_while_down(source, settings, rows=200)
        killed = subprocess.run(
            cdc_command(settings, "--resync-chunk-rows", "20", "--compact-every", "0"),
            env={**os.environ, "CDC_FAULTS": "resync.after_chunk=kill@3"},
            capture_output=True, text=True, timeout=120, check=False)
        assert killed.returncode == -9, killed.stderr
        status = run_cdc(["status", "--dsn", settings.dsn, "--lake", settings.lake,
                          "--slot", settings.slot, "--json"])
        [backfill] = json.loads(status.stdout)["backfills"]
        assert (backfill["table"], backfill["state"], backfill["chunks"]) == (
            "public.later", "running", 2)
        assert ResyncHold(LocalLake(settings.lake), "public.later").load() is not None
        source.execute("DELETE FROM later WHERE id <= 10")
        stream_until_caught_up(with_settings(settings, resync_chunk_rows=20))
        assert not owed(settings)
        compact(settings)
        assert staged_rows(settings, "public.later") == rows_of(source, "SELECT * FROM later")

    def test_without_backfill_new_tables_only_later_changes_arrive(
            self, source: SourceDb, settings: Settings) -> None:
        """`--no-backfill-new-tables`: nothing is owed, the older rows stay out (as before)."""
        source.execute("CREATE TABLE first (id int PRIMARY KEY)")
        off = with_settings(settings, backfill_new_tables=False)
        prepare(off)
        stream_until_caught_up(off)
        source.execute("CREATE TABLE later (id int PRIMARY KEY, v int)")
        source.execute("INSERT INTO later VALUES (1, 1)")
        stream_until_caught_up(off)
        source.execute("INSERT INTO later VALUES (2, 2)")
        stream_until_caught_up(off)
        assert not owed(settings)
        compact(settings)
        assert staged_rows(settings, "public.later") == [{"id": 2, "v": 2}]


# one operation of the application on a table: ("put", key, value) upserts (keyless: inserts
# the value), ("del", key) deletes (keyless: skipped, an insert-only table captures none)
Op = tuple[Any, ...]
OPS = st.lists(st.one_of(st.tuples(st.just("put"), st.integers(1, 12), st.integers(0, 3)),
                         st.tuples(st.just("del"), st.integers(1, 12))), max_size=25)


def apply(source: SourceDb, table: str, ops: list[Op], *, keyed: bool) -> None:
    with source.connect() as conn:
        for op in ops:
            if op[0] == "put" and keyed:
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s) ON CONFLICT (id) DO UPDATE "
                             "SET v = excluded.v", (op[1], op[2]))
            elif op[0] == "put":
                conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (op[1], op[2]))
            elif keyed:
                conn.execute(f"DELETE FROM {table} WHERE id = %s", (op[1],))


class TestBackfillConverges:
    def test_staged_equals_the_source_whatever_is_written_before_during_and_after_the_join(
            self, source: SourceDb, settings: Settings) -> None:
        """Property: random writes before the table joins, racing with its backfill, and
        after it; staged always ends equal to the source (the oracle), for keyed tables and
        for keyless insert-only ones (duplicates counted). One stream serves every example."""
        source.execute("CREATE TABLE first (id int PRIMARY KEY)")
        live = with_settings(settings, table_sync_seconds=0.3, resync_chunk_rows=4,
                             keyless_tables="insert-only")
        prepare(live)
        made = iter(range(1000))
        with streaming_in_thread(live):
            wait_for(lambda: slot_active(source), what="the stream to hold the slot")

            @hyp_settings(max_examples=6, suppress_health_check=[
                HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
            @given(before=OPS, during=OPS, after=OPS, keyed=st.booleans())
            def converges(before: list[Op], during: list[Op], after: list[Op],
                          keyed: bool) -> None:
                table = f"p{next(made)}"
                source.execute(f"CREATE TABLE {table} (id int {'PRIMARY KEY' if keyed else ''},"
                               " v int)")
                apply(source, table, before, keyed=keyed)
                wait_for(lambda: table in published(source, settings),
                         what="the table sync to add the table")
                apply(source, table, during, keyed=keyed)
                wait_for(lambda: f"public.{table}" not in owed(settings),
                         what="the backfill to finish")
                apply(source, table, after, keyed=keyed)
                drained(source, settings)
                compact(settings)
                expected = rows_of(source, f"SELECT * FROM {table}")
                if expected or Path(settings.lake, "staged", f"public.{table}").exists():
                    assert staged_rows(settings, f"public.{table}") == expected

            converges()


class TestANewSnapshot:
    def test_a_new_snapshot_of_the_slot_drops_the_backfills_it_made_needless(
            self, source: SourceDb, settings: Settings) -> None:
        """Backfills owed by the slot's earlier generation: those of the tables the new
        `cdc snapshot` copied are gone (no second re-read), the others stay owed."""
        source.execute("CREATE TABLE copied (id int PRIMARY KEY)")
        source.execute("INSERT INTO copied VALUES (1), (2)")
        backfills = Backfills(LocalLake(settings.lake), settings.slot)
        for table in ("copied", "elsewhere"):
            backfills.record(TableName("public", table), insert_only=False)
        snapshot = run_cdc(["snapshot", "--dsn", settings.dsn, "--lake", settings.lake,
                            "--slot", settings.slot, "--publication", settings.publication])
        assert snapshot.returncode == 0, snapshot.stderr
        assert owed(settings) == ["public.elsewhere"]
