"""One table never blocks the rest; dates and timestamps staged exactly, ±infinity apart."""

from __future__ import annotations

import csv
import io

from conftest import SourceDb
from polling import wait_for
from rawlake import prepare, run_cdc, stream_until_caught_up
from test_compact import assert_staged_equals_source

from cdc.config import Settings
from cdc.lake.store import LocalLake
from cdc.ops import metrics
from cdc.staged.runner import CompactionLoop


def query(settings: Settings, sql: str) -> list[dict[str, str]]:
    result = run_cdc(["query", sql, "--lake", settings.lake, "--format", "csv"])
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


class TestOneTableNeverBlocksTheRest:
    def test_a_failing_table_is_reported_and_the_tables_after_it_are_staged(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """`cdc compact` exits non-zero naming the table and its fix; `cdc status` says it
        too, `/metrics` counts it, and once fixed the report clears."""
        for name in ("a_ok", "bad", "z_ok"):
            source.execute(f"CREATE TABLE {name} (k int, v text)")  # no key
            source.execute(f"ALTER TABLE {name} REPLICA IDENTITY FULL")
        prepare(settings)
        for name in ("a_ok", "bad", "z_ok"):
            source.execute(f"INSERT INTO {name} VALUES (1, 'x'), (NULL, 'y')")
        stream_until_caught_up(settings)

        # a key named on a column with NULLs: that table cannot be merged
        result = run_cdc(["compact", "--lake", settings.lake, "--slot", settings.slot,
                          "--key", "public.bad=k"])
        assert result.returncode == 6, result.stderr
        assert "public.bad: FAILED" in result.stderr
        assert "--key public.bad=" in result.stderr  # the fix
        assert "compaction failed for public.bad" in result.stderr
        assert_staged_equals_source(source, settings, "a_ok", "z_ok")

        status = run_cdc(["status", "--dsn", settings.dsn, "--lake", settings.lake,
                          "--slot", settings.slot])
        assert "public.bad: compaction fails: key column 'k'" in status.stdout

        loop = CompactionLoop(LocalLake(settings.lake), settings.slot, 0.1,
                              {"public.bad": ("k",)}).start()
        try:
            wait_for(lambda: (metrics.REGISTRY.get_sample_value(
                "cdc_compaction_failures_total", {"table": "public.bad"}) or 0) >= 1,
                timeout=60, what="the failure to be counted")
        finally:
            loop.stop()

        fixed = run_cdc(["compact", "--lake", settings.lake, "--slot", settings.slot])
        assert fixed.returncode == 0, fixed.stderr
        assert_staged_equals_source(source, settings, "a_ok", "bad", "z_ok")
        status = run_cdc(["status", "--dsn", settings.dsn, "--lake", settings.lake,
                          "--slot", settings.slot])
        assert "compaction fails" not in status.stdout


class TestTemporalEdges:
    def test_infinity_bc_and_far_dates_stage_exactly_and_query_prints_them_apart(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Snapshot, stream, staged and `cdc query` keep `infinity` apart from 9999-12-31,
        `-infinity` from 0001-01-01, also in arrays; BC and year-200000 values stage."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, d date, ts timestamptz, a date[])")
        values = [("infinity", "infinity", "{infinity,9999-12-31}"),
                  ("9999-12-31", "9999-12-31 23:59:59.999999+00", "{-infinity,0001-01-01}"),
                  ("-infinity", "-infinity", None),
                  ("0001-01-01", "0001-01-01 00:00:00+00", None),
                  ("0044-03-15 BC", "0044-03-15 12:00:00+00 BC", "{0044-03-15 BC}"),
                  ("200000-01-01", "200000-01-01 00:00:00+00", "{200000-01-01}")]
        source.execute("INSERT INTO t VALUES " + ", ".join(
            f"({i}, %s, %s, %s)" for i in range(1, 4)), [v for row in values[:3] for v in row])
        result = run_cdc(["snapshot", "--dsn", settings.dsn, "--lake", settings.lake,
                          "--slot", settings.slot, "--publication", settings.publication])
        assert result.returncode == 0, result.stderr
        source.execute("INSERT INTO t VALUES " + ", ".join(
            f"({i}, %s, %s, %s)" for i in range(4, 7)), [v for row in values[3:] for v in row])
        stream_until_caught_up(settings)
        compacted = run_cdc(["compact", "--lake", settings.lake, "--slot", settings.slot])
        assert compacted.returncode == 0, compacted.stderr

        for view in ("public.t", "raw_public.t"):
            rows = query(settings, f"SELECT id, d::varchar AS d, a::varchar AS a FROM {view} "
                         "ORDER BY id")
            assert [r["d"] for r in rows] == ["infinity", "9999-12-31", "-infinity",
                                              "0001-01-01", "0044-03-15 (BC)", "200000-01-01"]
            assert rows[0]["a"] == "[infinity, 9999-12-31]", view
            assert rows[1]["a"] == "[-infinity, 0001-01-01]", view
        stamps = [r["ts"] for r in query(settings, "SELECT ts::varchar AS ts FROM public.t "
                                                   "ORDER BY id")]
        assert stamps[0] == "infinity"
        assert stamps[2] == "-infinity"
        assert len(set(stamps)) == 6
