"""`cdc stream` against a real PostgreSQL: what lands in raw, in what order, when it is acked."""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import SourceDb, with_settings
from polling import wait_for
from rawlake import (
    dedupe,
    prepare,
    raw_files,
    read_raw,
    replay,
    run_cdc_measured,
    start_cdc,
    stop,
    stream_until_caught_up,
    streaming_in_thread,
)

from cdc.config import Settings
from cdc.events import format_lsn
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.store import LocalLake

ITEMS = """
CREATE TABLE items (
    id bigint PRIMARY KEY, name text, price numeric(10,2), qty integer, small smallint,
    ratio double precision, active boolean, born date, seen timestamp, at timestamptz,
    doc jsonb, raw bytea, uid uuid, tags text[]
)"""


class TestChangesInRaw:
    def test_inserts_updates_deletes_and_truncate_arrive_with_values_ops_and_order(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Every committed change lands once, typed, with its op, in commit order."""
        source.execute(ITEMS)
        prepare(settings)
        source.execute(
            "INSERT INTO items VALUES (1, 'a', 12.34, 5, 2, 0.5, true, '2024-02-29', "
            "'2024-01-02 03:04:05.123456', '2024-01-02 03:04:05.654321+02', "
            "'{\"k\": [1, 2]}', '\\xdeadbeef', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', "
            "'{x,y}'), (2, 'b', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, "
            "NULL, NULL)")
        source.execute("UPDATE items SET name = 'a2', price = 99.99 WHERE id = 1")
        source.execute("DELETE FROM items WHERE id = 2")
        source.execute("TRUNCATE items")
        source.execute("INSERT INTO items (id, name) VALUES (3, 'after truncate')")

        stream_until_caught_up(settings)

        rows = read_raw(lake_dir, "public.items")
        assert [(r["_op"], r["id"]) for r in rows] == [
            ("c", 1), ("c", 2), ("u", 1), ("d", 2), ("t", None), ("c", 3)]
        first = rows[0]
        assert first["name"] == "a"
        assert first["price"] == Decimal("12.34")
        assert first["qty"] == 5
        assert first["small"] == 2
        assert first["ratio"] == 0.5
        assert first["active"] is True
        assert first["born"] == dt.date(2024, 2, 29)
        assert first["seen"] == dt.datetime(2024, 1, 2, 3, 4, 5, 123456)
        assert first["at"] == dt.datetime(2024, 1, 2, 1, 4, 5, 654321, tzinfo=dt.UTC)
        assert json.loads(first["doc"]) == {"k": [1, 2]}
        assert first["raw"] == b"\xde\xad\xbe\xef"
        assert first["uid"] == "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11"
        assert first["tags"] == ["x", "y"]  # arrays are lists of their element type
        assert rows[1]["name"] == "b"
        assert rows[1]["price"] is None
        assert rows[2]["name"] == "a2"
        assert rows[2]["price"] == Decimal("99.99")
        assert rows[3]["id"] == 2
        assert rows[3]["name"] is None
        commit_lsns = [r["_commit_lsn"] for r in rows]
        assert commit_lsns == sorted(commit_lsns)
        assert rows[0]["_commit_lsn"] == rows[1]["_commit_lsn"]  # one transaction
        assert [rows[0]["_seq"], rows[1]["_seq"]] == [0, 1]
        assert rows[0]["_xid"] > 0
        assert rows[0]["_lsn"] < rows[0]["_commit_lsn"]
        assert isinstance(rows[0]["_commit_ts"], dt.datetime)
        assert all(r["_unchanged"] is None for r in rows)

    def test_raw_files_follow_the_lake_layout_and_record_postgres_types(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Files sit under raw/<schema>.<table>/load_date=<UTC date>/ with pg types in metadata."""
        import pyarrow.parquet as pq

        source.execute(ITEMS)
        prepare(settings)
        source.execute("INSERT INTO items (id, price) VALUES (1, 1.5)")
        stream_until_caught_up(settings)

        files = raw_files(lake_dir, "public.items")
        assert len(files) == 1
        today = dt.datetime.now(dt.UTC).date()
        allowed = {f"load_date={d.isoformat()}" for d in (today, today - dt.timedelta(days=1))}
        assert files[0].parent.name in allowed  # the UTC date of the load (midnight-safe)
        first, last, seq = files[0].stem.split("-")
        assert len(first) == 16
        assert len(last) == 16
        assert seq == "0"
        schema = pq.read_schema(files[0])
        assert schema.field("price").metadata[b"pg_type"] == b"numeric(10,2)"
        assert schema.field("at").metadata[b"pg_type"] == b"timestamp with time zone"
        assert schema.field("id").metadata[b"pg_key"] == b"1"
        assert str(schema.field("_commit_ts").type) == "timestamp[us, tz=UTC]"

    def test_a_multi_table_transaction_shares_one_commit_lsn_ordered_by_seq(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Changes of one transaction across tables carry its commit LSN and xid, seq in order."""
        source.execute("CREATE TABLE orders (id int PRIMARY KEY, total numeric(10,2))")
        source.execute("CREATE TABLE lines (order_id int, n int, sku text, "
                       "PRIMARY KEY (order_id, n))")
        prepare(settings)
        with source.connect() as conn, conn.transaction():
            conn.execute("INSERT INTO orders VALUES (1, 10)")
            conn.execute("INSERT INTO lines VALUES (1, 1, 'x'), (1, 2, 'y')")
            conn.execute("UPDATE orders SET total = 20 WHERE id = 1")

        stream_until_caught_up(settings)

        orders = read_raw(lake_dir, "public.orders")
        lines = read_raw(lake_dir, "public.lines")
        assert [(r["_op"], r["_seq"]) for r in orders] == [("c", 0), ("u", 3)]
        assert [(r["sku"], r["_seq"]) for r in lines] == [("x", 1), ("y", 2)]
        assert {r["_commit_lsn"] for r in orders + lines} == {orders[0]["_commit_lsn"]}
        assert {r["_xid"] for r in orders + lines} == {orders[0]["_xid"]}

    def test_unchanged_toast_value_is_listed_in_unchanged_never_written_as_null(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """An update that leaves a TOASTed value alone names it in _unchanged."""
        source.execute("CREATE TABLE docs (id int PRIMARY KEY, body text, n int)")
        source.execute("ALTER TABLE docs ALTER body SET STORAGE EXTERNAL")
        prepare(settings)
        big = "x" * 100_000
        source.execute("INSERT INTO docs VALUES (1, %s, 0)", (big,))
        source.execute("UPDATE docs SET n = 1 WHERE id = 1")

        stream_until_caught_up(settings)

        insert, update = read_raw(lake_dir, "public.docs")
        assert insert["body"] == big
        assert insert["_unchanged"] is None
        assert update["_op"] == "u"
        assert update["n"] == 1
        assert update["_unchanged"] == ["body"]
        assert update["body"] is None  # not a value: the compactor keeps the stored one

    def test_changing_a_primary_key_records_a_delete_of_the_old_key(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """An update that moves a row to a new key deletes the old key first."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        prepare(settings)
        source.execute("INSERT INTO t VALUES (1, 'a')")
        source.execute("UPDATE t SET id = 2 WHERE id = 1")
        stream_until_caught_up(settings)

        rows = read_raw(lake_dir, "public.t")
        assert [(r["_op"], r["id"], r["v"]) for r in rows] == [
            ("c", 1, "a"), ("d", 1, None), ("u", 2, "a")]
        assert replay(rows) == {2: {"id": 2, "v": "a"}}

    def test_replica_identity_full_keeps_the_primary_key_and_whole_old_rows(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Under FULL: the key stays the primary key, key changes delete the old key,
        unchanged TOASTed values come from the old row, deletes carry every column."""
        import pyarrow.parquet as pq

        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text, body text)")
        source.execute("ALTER TABLE t REPLICA IDENTITY FULL")
        source.execute("ALTER TABLE t ALTER body SET STORAGE EXTERNAL")
        prepare(settings)
        big = "b" * 50_000
        source.execute("INSERT INTO t VALUES (1, 'a', %s)", (big,))
        source.execute("UPDATE t SET v = 'a2' WHERE id = 1")
        source.execute("UPDATE t SET id = 5 WHERE id = 1")
        source.execute("DELETE FROM t")
        stream_until_caught_up(settings)

        rows = read_raw(lake_dir, "public.t")
        assert [(r["_op"], r["id"], r["v"]) for r in rows] == [
            ("c", 1, "a"), ("u", 1, "a2"), ("d", 1, "a2"), ("u", 5, "a2"), ("d", 5, "a2")]
        assert all(r["body"] == big for r in rows)  # never NULL, never "unchanged"
        assert all(r["_unchanged"] is None for r in rows)
        schema = pq.read_schema(raw_files(lake_dir, "public.t")[0])
        assert schema.metadata[b"cdc_key"] == b"id"

    def test_a_column_added_mid_stream_starts_a_new_file_with_the_new_schema(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """A schema change closes the table's batch; later rows carry the new column."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        prepare(settings)
        source.execute("INSERT INTO t VALUES (1)")
        source.execute("ALTER TABLE t ADD COLUMN note text")
        source.execute("INSERT INTO t VALUES (2, 'new')")
        stream_until_caught_up(settings)

        assert len(raw_files(lake_dir, "public.t")) == 2
        rows = read_raw(lake_dir, "public.t")
        assert [(r["id"], r.get("note")) for r in rows] == [(1, None), (2, "new")]

    def test_tables_limits_a_new_publication_to_the_named_tables(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """--tables creates the publication for just those tables."""
        source.execute("CREATE TABLE a (id int PRIMARY KEY)")
        source.execute("CREATE TABLE b (id int PRIMARY KEY)")
        narrowed = with_settings(settings, tables=("public.a",))
        stream_until_caught_up(narrowed)  # creates publication and slot
        source.execute("INSERT INTO a VALUES (1)")
        source.execute("INSERT INTO b VALUES (1)")
        stream_until_caught_up(narrowed)

        assert [r["id"] for r in read_raw(lake_dir, "public.a")] == [1]
        assert read_raw(lake_dir, "public.b") == []


class TestAcknowledgement:
    def test_caught_up_run_checkpoints_then_acknowledges_its_position(
        self, source: SourceDb, settings: Settings, lake: LocalLake
    ) -> None:
        """After a run the checkpoint is at or past every commit, and the slot no further."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        prepare(settings)
        source.execute("INSERT INTO t SELECT generate_series(1, 100)")
        wal_after_workload = source.current_lsn()

        stream_until_caught_up(settings)

        checkpoint = CheckpointStore(lake, settings.slot).load()
        confirmed = source.slot_confirmed_lsn()
        assert checkpoint is not None
        assert confirmed is not None
        assert checkpoint >= wal_after_workload
        assert confirmed <= checkpoint

    def test_second_run_streams_only_what_changed_since_the_first(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """A restart continues from the checkpoint: nothing is streamed twice."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        prepare(settings)
        source.execute("INSERT INTO t VALUES (1)")
        first = stream_until_caught_up(settings)
        source.execute("INSERT INTO t VALUES (2)")
        second = stream_until_caught_up(settings)

        assert (first.changes, second.changes) == (1, 1)
        assert [r["id"] for r in read_raw(lake_dir, "public.t")] == [1, 2]

    def test_idle_stream_moves_the_slot_to_the_server_position(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """With nothing in flight the slot advances even when no published table changes."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        source.execute("CREATE TABLE unpublished (id int)")
        narrowed = with_settings(settings, tables=("public.t",))
        with streaming_in_thread(narrowed):
            wait_for(source.slot_confirmed_lsn, what="slot")
            source.execute("INSERT INTO unpublished SELECT generate_series(1, 1000)")
            target = source.current_lsn()
            wait_for(lambda: (source.slot_confirmed_lsn() or 0) >= target, timeout=60,
                     what="slot to pass the unpublished writes")

    def test_sigterm_flushes_acknowledges_and_exits_zero(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """A running `cdc stream` stopped with SIGTERM writes what it buffered and exits 0."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        proc = start_cdc(with_settings(settings), "--flush-seconds", "1h")
        try:
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            source.execute("INSERT INTO t SELECT generate_series(1, 500)")
            written = source.current_lsn()
            time.sleep(1.5)  # let it receive (nothing is flushed: the limits are far away)
            assert read_raw(lake_dir, "public.t") == []
        finally:
            code = stop(proc)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
        assert len(read_raw(lake_dir, "public.t")) == 500
        assert (source.slot_confirmed_lsn() or 0) >= written

    def test_slot_consumed_past_the_checkpoint_is_refused(
        self, source: SourceDb, settings: Settings, lake: LocalLake
    ) -> None:
        """If something else advanced the slot, cdc stops instead of skipping changes."""
        from cdc.errors import SlotError

        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        stream_until_caught_up(settings)
        checkpoint = CheckpointStore(lake, settings.slot).load() or 0
        source.execute("INSERT INTO t VALUES (1)")
        target = source.current_lsn()

        def consume_behind_cdcs_back() -> bool:
            source.execute("SELECT pg_replication_slot_advance(%s, %s::pg_lsn)",
                           (settings.slot, format_lsn(target)))
            return (source.slot_confirmed_lsn() or 0) > checkpoint

        wait_for(consume_behind_cdcs_back, what="slot advanced by another consumer")

        with pytest.raises(SlotError, match=r"consumed up to .* checkpoint is at"):
            stream_until_caught_up(settings)


class TestResilience:
    def test_stream_survives_an_idle_period_longer_than_wal_sender_timeout(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Keepalives are answered: after 15 s of silence (timeout 10 s) changes still flow."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        with streaming_in_thread(settings) as streamer:
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            source.execute("INSERT INTO t VALUES (1)")
            wait_for(lambda: read_raw(lake_dir, "public.t"), what="first row")
            time.sleep(15)
            source.execute("INSERT INTO t VALUES (2)")
            wait_for(lambda: len(read_raw(lake_dir, "public.t")) == 2, what="second row")
            pid = source.execute("SELECT active_pid FROM pg_replication_slots "
                                 "WHERE slot_name = %s", (settings.slot,))[0][0]
        assert pid is not None  # still the same live connection, never dropped
        assert streamer.stats.changes == 2

    def test_stream_reconnects_after_the_server_drops_the_connection(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """A terminated walsender is replaced; changes made meanwhile arrive."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        with streaming_in_thread(settings):
            wait_for(lambda: source.execute("SELECT active_pid FROM pg_replication_slots "
                                            "WHERE slot_name = %s", (settings.slot,))
                     [0][0] if source.slot_confirmed_lsn() else None, what="active slot")
            source.execute("SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                           "WHERE slot_name = %s", (settings.slot,))
            source.execute("INSERT INTO t VALUES (1)")
            wait_for(lambda: read_raw(lake_dir, "public.t"), timeout=60, what="row after drop")
        assert [r["id"] for r in dedupe(read_raw(lake_dir, "public.t"))] == [1]

    @pytest.mark.slow
    def test_a_million_row_transaction_streams_in_bounded_parts(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """One 1M-row transaction is flushed in parts no larger than --flush-rows."""
        import pyarrow.parquet as pq

        source.execute("CREATE TABLE big (id bigint PRIMARY KEY, name text, amount numeric(12,2))")
        prepare(settings)
        source.execute("INSERT INTO big SELECT g, 'name ' || g, g / 100.0 "
                       "FROM generate_series(1, 1000000) g")
        code, stderr, peak_rss_mb = run_cdc_measured(settings, "--until-caught-up",
                                                     "--flush-rows", "50000")
        assert code == 0, stderr

        files = raw_files(lake_dir, "public.big")
        counts = [pq.read_metadata(f).num_rows for f in files]
        assert sum(counts) == 1_000_000
        assert len(files) >= 20
        assert max(counts) <= 50_000
        assert 0 < peak_rss_mb < 512, f"peak RSS {peak_rss_mb:.0f} MB"

    @pytest.mark.slow
    def test_kill_9_mid_workload_then_restart_loses_no_committed_change(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """At-least-once: after SIGKILL and a restart every committed change is in raw."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        proc = start_cdc(settings, "--flush-rows", "700", "--flush-seconds", "0.5s")
        committed = 0
        try:
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            with source.connect() as conn:
                for batch in range(60):
                    with conn.transaction():
                        conn.execute("INSERT INTO t SELECT g, 0 FROM "
                                     "generate_series(%s::int, %s::int) g",
                                     (batch * 500 + 1, batch * 500 + 500))
                        conn.execute("UPDATE t SET v = v + 1 WHERE mod(id, 7) = 0")
                    committed += 1
                    if batch == 30:
                        wait_for(lambda: raw_files(lake_dir, "public.t"), what="some files")
                        proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert committed == 60
        stream_until_caught_up(settings)

        rows = read_raw(lake_dir, "public.t")
        inserted = {r["id"] for r in rows if r["_op"] == "c"}
        assert inserted == set(range(1, 30_001))
        expected = {r[0]: r[1] for r in source.execute("SELECT id, v FROM t")}
        assert {k: v["v"] for k, v in replay(rows).items()} == expected
