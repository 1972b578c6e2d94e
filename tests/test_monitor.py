"""`cdc status`, the metrics endpoint and heartbeats, against a real PostgreSQL."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from conftest import SourceDb, with_settings
from polling import wait_for
from psycopg import sql
from psycopg.conninfo import make_conninfo
from rawlake import prepare, run_cdc, start_cdc, stop, stream_until_caught_up, streaming_in_thread

from cdc.config import Settings
from cdc.events import format_lsn
from cdc.lake.store import LocalLake
from cdc.ops.status import check, collect
from cdc.sandbox import free_port


def write_lsn(source: SourceDb) -> int:
    """The server's WAL write position, as pg_stat_replication and `cdc status` use it."""
    from cdc.events import parse_lsn

    return parse_lsn(source.execute("SELECT pg_current_wal_lsn()::text")[0][0])


def status_args(settings: Settings, *extra: str) -> list[str]:
    return ["status", "--dsn", settings.dsn, "--lake", settings.lake, "--slot", settings.slot,
            *extra]


class TestStatus:
    def test_lag_bytes_match_what_the_server_reports(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """After unstreamed writes the slot's lag is the WAL written since its confirmation."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        prepare(settings)
        stream_until_caught_up(settings)
        confirmed = source.slot_confirmed_lsn()
        assert confirmed is not None
        source.execute("INSERT INTO t SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
        before = write_lsn(source)

        report = collect(settings.dsn, LocalLake(settings.lake), settings.slot)
        after = write_lsn(source)

        lag = report.slot.confirmed_lag_bytes
        assert lag is not None
        assert before - confirmed <= lag <= after - confirmed
        assert report.slot.confirmed_flush_lsn == format_lsn(confirmed)
        assert report.slot.plugin == "pgoutput"
        assert report.slot.active is False
        assert report.checkpoint_lsn is not None
        assert any("not being read" in w for w in report.warnings)
        assert check(report, max_lag_bytes=lag - 1) == [
            f"slot '{settings.slot}' lags {lag} bytes (max {lag - 1})"]
        assert check(report, max_lag_bytes=lag + 10**9) == []

    def test_per_table_raw_watermarks_follow_what_was_streamed(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Each table shows its newest raw commit LSN and its file count."""
        source.execute("CREATE TABLE a (id int PRIMARY KEY)")
        source.execute("CREATE TABLE b (id int PRIMARY KEY)")
        prepare(settings)
        source.execute("INSERT INTO a VALUES (1)")
        source.execute("INSERT INTO b VALUES (1)")
        source.execute("INSERT INTO a VALUES (2)")
        stream_until_caught_up(settings)
        from rawlake import read_raw

        report = collect(settings.dsn, LocalLake(settings.lake), settings.slot)
        by_table = {t.table: t for t in report.tables}
        last_a = read_raw(lake_dir, "public.a")[-1]
        assert by_table["public.a"].raw_last_commit_lsn == format_lsn(last_a["_commit_lsn"])
        assert by_table["public.a"].raw_files == 1
        assert by_table["public.a"].raw_last_commit_ts is not None
        assert report.lag_seconds == 0.0  # caught up

    def test_thresholds_set_the_exit_code_with_a_one_line_reason(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """--max-lag-bytes breached: exit 1 and the reason; generous: exit 0; --json parses."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        prepare(settings)
        source.execute("INSERT INTO t SELECT generate_series(1, 10000)")
        source.execute("SELECT pg_switch_wal()")

        breached = run_cdc(status_args(settings, "--max-lag-bytes", "1"))
        assert breached.returncode == 1
        assert f"cdc: lag: slot '{settings.slot}' lags" in breached.stderr
        fine = run_cdc(status_args(settings, "--max-lag-bytes", "10GB", "--json"))
        assert fine.returncode == 0, fine.stderr
        doc = json.loads(fine.stdout)
        assert doc["slot"]["name"] == settings.slot
        assert doc["slot"]["confirmed_lag_bytes"] > 0
        assert doc["breaches"] == []

    def test_missing_slot_is_reported_and_breaches_a_lag_threshold(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """No slot: the report says so; with a threshold it exits 1."""
        result = run_cdc(status_args(settings, "--max-lag-seconds", "60"))
        assert result.returncode == 1
        assert "does not exist" in result.stdout + result.stderr


class TestMetrics:
    def test_metrics_endpoint_serves_the_documented_names(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Changes by table and op, flushes and lag appear on /metrics while streaming."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        port = free_port()
        proc = start_cdc(settings, "--metrics-port", str(port), "--flush-seconds", "0.2s")
        try:
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            source.execute("INSERT INTO t SELECT generate_series(1, 5)")
            source.execute("DELETE FROM t WHERE id = 1")

            def scrape() -> str:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                                timeout=2) as response:
                        return str(response.read().decode())
                except OSError:
                    return ""

            def scraped_delete() -> str:
                text = scrape()
                return text if 'op="d"' in text else ""

            text = wait_for(scraped_delete, what="delete counted in metrics")
        finally:
            assert stop(proc) == 0
        assert 'cdc_changes_written_total{op="c",table="public.t"} 5.0' in text
        assert 'cdc_changes_written_total{op="d",table="public.t"} 1.0' in text
        for name in ("cdc_batches_written_total", "cdc_flush_seconds_bucket",
                     "cdc_raw_bytes_written_total", "cdc_lag_bytes", "cdc_lag_seconds",
                     "cdc_acknowledged_lsn", "cdc_transactions_total"):
            assert name in text, name


class TestHeartbeat:
    @pytest.mark.slow
    def test_quiet_database_slot_retains_little_wal_while_another_database_writes(
        self, source: SourceDb, settings: Settings, server_dsn: str
    ) -> None:
        """Invariant 5: an idle slot keeps up with the server's WAL written elsewhere."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        busy = f"busy_{uuid.uuid4().hex[:8]}"
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(busy)))
        try:
            quiet = with_settings(settings, heartbeat_seconds=2.0, status_seconds=1.0)
            with streaming_in_thread(quiet), psycopg.connect(
                    make_conninfo(server_dsn, dbname=busy), autocommit=True) as writer:
                wait_for(source.slot_confirmed_lsn, what="slot creation")
                writer.execute("CREATE TABLE noise (id bigserial, payload text)")
                start = source.current_lsn()
                began = time.monotonic()
                early: int | None = None
                while time.monotonic() < began + 45:
                    writer.execute("INSERT INTO noise (payload) SELECT repeat('n', 200) "
                                   "FROM generate_series(1, 2000)")
                    time.sleep(0.05)
                    if early is None and time.monotonic() > began + 5:
                        early = source.current_lsn()
                written = source.current_lsn() - start
                row = source.execute(
                    "SELECT restart_lsn::text, pg_wal_lsn_diff(pg_current_wal_insert_lsn(), "
                    "confirmed_flush_lsn)::bigint "
                    "FROM pg_replication_slots WHERE slot_name = %s", (settings.slot,))[0]
        finally:
            with psycopg.connect(server_dsn, autocommit=True) as admin:
                admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    sql.Identifier(busy)))
        from cdc.events import parse_lsn

        restart, unconfirmed = parse_lsn(row[0]), row[1]
        assert written > 50 * 2**20, f"only {written} bytes of WAL written"
        assert unconfirmed < written * 0.2, (unconfirmed, written)
        # the server moves restart_lsn at its running-transactions records (every 15 s while
        # busy): after 45 s it is past where the WAL was at 5 s, so retention stays bounded
        assert early is not None
        assert restart > early, (format_lsn(restart), format_lsn(early))
