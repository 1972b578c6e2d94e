"""No hang: a stalled or cut connection is noticed and the stream reconnects, losing nothing.

The stream talks to PostgreSQL through a TCP proxy (tests/tcpproxy.py) that can stall its
connections (no data, no close, as a dead network path) or cut them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from conftest import SourceDb, with_settings
from polling import wait_for
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from rawlake import prepare, read_raw, replay, streaming_in_thread
from tcpproxy import TcpProxy

from cdc import faults
from cdc.config import Settings
from cdc.source.connection import conninfo
from cdc.source.replication import parse_pg_duration


@pytest.fixture
def proxy(source: SourceDb) -> Iterator[TcpProxy]:
    params = conninfo_to_dict(source.dsn)
    tcp = TcpProxy(str(params.get("host") or "127.0.0.1"), int(params.get("port") or 5432))
    try:
        yield tcp
    finally:
        tcp.close()


@pytest.fixture
def proxied(settings: Settings, proxy: TcpProxy) -> Settings:
    """Settings whose every connection goes through the proxy, with a heartbeat every second:
    its side-connection statement meets a stall too (TCP cannot tell: the proxy keeps the
    TCP session alive), and must not hang the stream."""
    dsn = make_conninfo(settings.dsn, host="127.0.0.1", port=str(proxy.port))
    return with_settings(settings, dsn=dsn, heartbeat_seconds=1.0)


def insert(source: SourceDb, first: int, n: int) -> int:
    source.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(%s::int, %s::int) g",
                   (first, first + n - 1))
    return source.current_lsn()


def confirmed(source: SourceDb, lsn: int, what: str) -> None:
    wait_for(lambda: (source.slot_confirmed_lsn() or 0) >= lsn, timeout=120, what=what)


def source_rows(source: SourceDb) -> dict[Any, dict[str, Any]]:
    return {r[0]: {"id": r[0], "v": r[1]} for r in source.execute("SELECT id, v FROM t")}


class TestStalledAndCutConnections:
    @pytest.mark.parametrize("fault", ["stall", "cut"])
    def test_a_stalled_or_cut_connection_is_given_up_and_the_stream_reconnects_losing_nothing(
        self, source: SourceDb, proxied: Settings, proxy: TcpProxy, fault: str
    ) -> None:
        """A stalled path (no data, no close) is given up after the silence timeout (the
        server's wal_sender_timeout, 10 s here), a cut one at once: every row lands."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        prepare(proxied)
        with streaming_in_thread(proxied) as streamer:
            confirmed(source, insert(source, 1, 1000), "the first rows")
            if fault == "stall":
                assert proxy.stall() >= 1
            else:
                proxy.cut()
            lsn = insert(source, 1001, 1000)
            confirmed(source, lsn, f"the rows written after the {fault}")
        assert streamer.stats.reconnects >= 1
        assert replay(read_raw(Path(proxied.lake), "public.t")) == source_rows(source)

    def test_a_flush_longer_than_wal_sender_timeout_keeps_the_session(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """The stream answers the server while a raw write stalls for 15 s (> 10 s)."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        prepare(settings)
        stalls = []

        def slow_lake(point: str, context: dict[str, Any]) -> None:
            if not stalls:
                stalls.append(context["key"])
                time.sleep(15)

        with faults.armed("raw.before_write", slow_lake), \
                streaming_in_thread(settings) as streamer:
            confirmed(source, insert(source, 1, 100), "rows written through a slow flush")
        assert stalls
        assert streamer.stats.reconnects == 0
        assert replay(read_raw(Path(settings.lake), "public.t")) == source_rows(source)

    def test_a_genuine_second_consumer_stops_the_stream_instead_of_warnings_forever(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A slot another consumer keeps: after CDC_SLOT_BUSY_SECONDS, exit 4 naming it."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        prepare(settings)
        other = psycopg.connect(conninfo(source.dsn, replication=True), autocommit=True)
        try:
            other.pgconn.send_query(
                f"START_REPLICATION SLOT {source.slot} LOGICAL 0/0 (proto_version '1', "
                f"publication_names '{source.publication}')".encode())
            other.pgconn.get_result()
            env = {**os.environ, "CDC_SLOT_BUSY_SECONDS": "3", "CDC_MAX_BACKOFF_SECONDS": "1"}
            result = subprocess.run(
                [sys.executable, "-m", "cdc", "stream", "--dsn", settings.dsn, "--lake",
                 settings.lake, "--slot", settings.slot, "--publication",
                 settings.publication, "--compact-every", "0"],
                capture_output=True, text=True, timeout=120, env=env, check=False)
        finally:
            other.close()
        assert result.returncode == 4, result.stderr
        assert "still busy" in result.stderr
        assert "another consumer holds this slot" in result.stderr


class TestConnectionSettings:
    def test_user_options_and_application_name_in_the_dsn_are_kept(
        self, source: SourceDb
    ) -> None:
        """Hosted PostgreSQL routes by `options`: cdc adds its settings after the user's."""
        dsn = make_conninfo(source.dsn, options="-c search_path=routed", application_name="mine")
        from cdc.source.connection import connect

        with connect(dsn) as conn:
            values = [conn.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                      for name in ("search_path", "application_name", "TimeZone", "DateStyle")]
        assert values == ["routed", "mine", "UTC", "ISO, MDY"]
        params = conninfo_to_dict(conninfo(source.dsn))
        assert params["keepalives"] == "1"
        assert params["application_name"] == "cdc"

    def test_wal_sender_timeout_values_parse_as_postgresql_prints_them(self) -> None:
        assert [parse_pg_duration(v) for v in ("10s", "1min", "500ms", "0", "60000")] == [
            10.0, 60.0, 0.5, 0.0, 60.0]
