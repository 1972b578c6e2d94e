"""History through the query layer: ``cdc query --as-of`` / ``--as-of-lsn``, the
``history_`` views, Athena DDL, and which tables get a history (against real PostgreSQL)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from conftest import SourceDb, with_settings
from rawlake import dedupe, prepare, read_raw, run_cdc, stream_until_caught_up
from test_history import COLUMNS, Workload, compact, replayed, small, stream_phases

from cdc.config import Settings
from cdc.events import format_lsn
from cdc.history.as_of import AsOf
from cdc.lake.store import LocalLake
from cdc.ops.query import duckdb_views
from cdc.staged.runner import compact_lake

__all__ = ["small"]  # the fixture, shared with test_history.py


class TestPointInTime:
    def test_as_of_each_commit_every_staged_name_shows_the_table_as_it_was(
        self, source: SourceDb, small: Settings
    ) -> None:
        """--as-of-lsn at every commit and --as-of at commit times equal raw replayed."""
        work = Workload(source)
        stream_phases(work, small, work.first, work.second, work.third)
        compact(small)
        changes = dedupe(read_raw(Path(small.lake), "public.person"))
        lake = LocalLake(small.lake)
        sql = "SELECT id, name, email, body FROM public.person ORDER BY id"

        def rows(as_of: AsOf) -> list[dict[str, Any]]:
            cursor = duckdb_views(lake, sql, as_of).execute(sql)
            return [dict(zip(COLUMNS, r, strict=True)) for r in cursor.fetchall()]

        for lsn in sorted({r["_commit_lsn"] for r in changes}):
            assert rows(AsOf(lsn=lsn)) == replayed(changes, lsn), f"at {lsn:X}"
        for ts in sorted({r["_commit_ts"] for r in changes}):
            last = max(r["_commit_lsn"] for r in changes if r["_commit_ts"] <= ts)
            assert rows(AsOf(time=ts)) == replayed(changes, last), f"at {ts}"
        assert rows(AsOf(time=changes[0]["_commit_ts"] - dt.timedelta(seconds=1))) == []

    def test_query_as_of_history_views_and_athena_ddl_from_the_command_line(
        self, source: SourceDb, small: Settings
    ) -> None:
        """--as-of-lsn, --as-of, history_ views, a bad time, and history tables in Athena."""
        work = Workload(source)
        stream_phases(work, small, work.first)
        compact(small)
        first = max(r["_commit_lsn"] for r in read_raw(Path(small.lake), "public.person"))
        stream_phases(work, small, work.third)
        compact(small)

        def query(*args: str) -> str:
            result = run_cdc(["query", "--lake", small.lake, "--format", "csv", *args])
            assert result.returncode == 0, result.stderr
            return result.stdout

        assert query("SELECT count(*) AS n FROM public.person") == "n\n2\n"
        assert query("--as-of-lsn", format_lsn(first),
                     "SELECT count(*) AS n FROM public.person") == "n\n8\n"
        assert query("--as-of", "2000-01-01T00:00:00Z",
                     "SELECT count(*) AS n FROM public.person") == "n\n0\n"
        assert query("SELECT count(*) AS n FROM history_public.person WHERE id = 8") == "n\n3\n"
        bad = run_cdc(["query", "--lake", small.lake, "--as-of", "yesterday", "SELECT 1"])
        assert bad.returncode == 2
        assert "ISO 8601" in bad.stderr
        ddl = run_cdc(["ddl", "athena", "--lake", small.lake, "--location", "s3://b/lake"])
        assert "`history_public__person`" in ddl.stdout
        assert "LOCATION 's3://b/lake/history/public.person/'" in ddl.stdout


class TestWhichTablesGetHistory:
    def test_a_table_without_a_key_gets_no_history_and_history_off_writes_none(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Keyless tables: raw is their history (--as-of shows the inserts committed by
        then); --history off skips keyed ones, and --as-of then says how to build it."""
        settings = with_settings(settings, keyless_tables="insert-only")  # append-only
        source.execute("CREATE TABLE events (v int)")
        source.execute("CREATE TABLE person (id int PRIMARY KEY, name text)")
        prepare(settings)
        source.execute("INSERT INTO events VALUES (1), (2)")
        source.execute("INSERT INTO person VALUES (1, 'a')")
        source.execute("INSERT INTO events VALUES (3)")
        stream_until_caught_up(settings)
        lake = Path(settings.lake)
        first = min(r["_commit_lsn"] for r in read_raw(lake, "public.events"))

        compact_lake(LocalLake(settings.lake), settings.slot, history=False)
        assert not (lake / "history").exists()
        as_of = ["query", "--lake", settings.lake, "--format", "csv", "--as-of-lsn",
                 format_lsn(first)]
        refused = run_cdc([*as_of, "SELECT * FROM public.person"])
        assert refused.returncode == 2
        assert "public.person has no history table" in refused.stderr
        assert "--history on" in refused.stderr
        result = run_cdc(["compact", "--lake", settings.lake, "--slot", settings.slot,
                          "--history", "on"])

        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in (lake / "history").iterdir()) == ["public.person"]
        assert (lake / "staged" / "public.events").exists()
        events = run_cdc([*as_of, "SELECT v FROM public.events ORDER BY v"])
        assert events.returncode == 0, events.stderr
        assert events.stdout == "v\n1\n2\n"
        person = run_cdc([*as_of, "SELECT count(*) AS n FROM public.person"])
        assert person.stdout == "n\n0\n"
