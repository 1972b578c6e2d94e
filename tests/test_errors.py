"""Each misconfiguration gives one line that says what is wrong and how to fix it."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from conftest import SourceDb, with_settings
from rawlake import prepare, run_cdc

from cdc.config import Settings
from cdc.errors import RawFileUnreadable, SourceError, StagedTableUnreadable
from cdc.lake.layout import raw_key, staged_key
from cdc.lake.store import LocalLake
from cdc.ops.query import run_query
from cdc.ops.status import last_commit_ts
from cdc.sandbox import LocalCluster, free_port
from cdc.source.connection import connect, translated
from cdc.staged.compactor import staged_watermark


def stream_args(settings: Settings, *extra: str) -> list[str]:
    return ["stream", "--dsn", settings.dsn, "--lake", settings.lake, "--slot", settings.slot,
            "--publication", settings.publication, "--until-caught-up", *extra]


def error_line(result: object) -> str:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    lines = [line for line in stderr.splitlines() if line.startswith("cdc: error:")]
    assert len(lines) == 1, stderr
    return lines[0]


@contextmanager
def role(source: SourceDb, name: str, attributes: str) -> Iterator[str]:
    """A throwaway role on the test server; yields a DSN that logs in as it."""
    source.execute(f"DROP ROLE IF EXISTS {name}")
    source.execute(f"CREATE ROLE {name} {attributes}")
    try:
        yield psycopg.conninfo.make_conninfo(source.dsn, user=name)
    finally:
        source.execute(f"DROP OWNED BY {name}")
        source.execute(f"DROP ROLE {name}")


@pytest.fixture(scope="module")
def replica_level_dsn() -> Iterator[str]:
    with LocalCluster(settings={"wal_level": "replica"}) as cluster:
        yield cluster.dsn()


class TestMisconfiguration:
    def test_no_free_replication_slot_says_how_to_free_one_and_that_works(self) -> None:
        """A temporary slot (a resumed snapshot, a keyless re-read) on a server whose slots
        are all taken names the way out; following it lets the slot be created."""
        create = "CREATE_REPLICATION_SLOT cdc_t_tmp TEMPORARY LOGICAL pgoutput"
        with LocalCluster(settings={"max_replication_slots": "1"}) as cluster:
            dsn = cluster.dsn()
            with connect(dsn) as conn:
                conn.execute("SELECT pg_create_logical_replication_slot('cdc_t_idle', 'pgoutput')")
                with pytest.raises(SourceError) as caught, connect(dsn, replication=True) as repl, \
                        translated(dsn):
                    repl.execute(create)
                assert "replication slots are in use" in str(caught.value)
                assert "pg_drop_replication_slot" in (caught.value.fix or "")
                conn.execute("SELECT pg_drop_replication_slot('cdc_t_idle')")  # the advice
            with connect(dsn, replication=True) as repl, translated(dsn):
                row = repl.execute(create).fetchone()
            assert row is not None
            assert row[0] == "cdc_t_tmp"

    def test_wal_level_not_logical_says_how_to_set_it(
        self, replica_level_dsn: str, tmp_path: Path
    ) -> None:
        """A server without wal_level=logical is named and the setting to change is given."""
        result = run_cdc(["stream", "--dsn", replica_level_dsn, "--lake", str(tmp_path / "lake"),
                          "--until-caught-up"])
        assert result.returncode == 4
        [line] = [x for x in result.stderr.splitlines() if "wal_level" in x]
        assert "wal_level is 'replica'" in line
        assert "set wal_level = logical in postgresql.conf and restart" in line

    def test_missing_replication_privilege_says_which_grant_is_needed(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A role without REPLICATION is told to get it."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        prepare(settings)  # as superuser: publication and slot exist
        with role(source, "cdc_plain", "LOGIN") as dsn:
            result = run_cdc(stream_args(with_settings(settings, dsn=dsn)))
        assert result.returncode == 4
        assert "ALTER ROLE <user> REPLICATION" in error_line(result)

    def test_slot_of_another_output_plugin_is_refused(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A slot made with test_decoding is not silently read as pgoutput."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        source.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')",
                       (settings.slot,))
        result = run_cdc(stream_args(settings))
        assert result.returncode == 4
        line = error_line(result)
        assert "uses output plugin 'test_decoding', not 'pgoutput'" in line
        assert "choose another --slot" in line

    def test_empty_publication_says_how_to_add_tables(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A publication that publishes nothing would stream nothing: refuse it."""
        source.execute(f"CREATE PUBLICATION {settings.publication}")
        result = run_cdc(stream_args(settings))
        assert result.returncode == 4
        line = error_line(result)
        assert f"publication '{settings.publication}' publishes no tables" in line
        assert "ALTER PUBLICATION" in line

    def test_missing_publication_that_cannot_be_created_gives_the_statement(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Without rights to create it, the error shows the CREATE PUBLICATION to run."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        with role(source, "cdc_repl", "LOGIN REPLICATION") as dsn:
            result = run_cdc(stream_args(with_settings(settings, dsn=dsn)))
        assert result.returncode == 4
        line = error_line(result)
        assert "does not exist and could not be created" in line
        assert f'CREATE PUBLICATION "{settings.publication}" FOR TABLE "public"."t"' in line

    def test_unknown_table_in_tables_is_named(self, source: SourceDb, settings: Settings) -> None:
        """--tables with a typo fails before anything is created."""
        result = run_cdc(stream_args(settings, "--tables", "public.nope"))
        assert result.returncode == 4
        assert "table public.nope named in --tables does not exist" in error_line(result)

    def test_unreachable_server_is_reported_without_the_password(self, tmp_path: Path) -> None:
        """A closed port gives 'cannot reach', and the DSN's password never appears."""
        dsn = f"postgresql://alice:s3cret-pw@127.0.0.1:{free_port()}/db"
        result = run_cdc(["stream", "--dsn", dsn, "--lake", str(tmp_path / "lake"),
                          "--until-caught-up"])
        assert result.returncode == 4
        line = error_line(result)
        assert "cannot reach PostgreSQL at alice@127.0.0.1" in line
        assert "s3cret-pw" not in result.stderr + result.stdout

    def test_lake_that_cannot_be_written_is_reported_before_streaming(
        self, source: SourceDb, settings: Settings, tmp_path: Path
    ) -> None:
        """A lake path under a regular file cannot be created: say so, touch nothing."""
        blocker = tmp_path / "not-a-dir"
        blocker.write_text("x")
        result = run_cdc(stream_args(with_settings(settings, lake=str(blocker / "lake"))))
        assert result.returncode == 6
        assert "check that the lake folder exists, is writable" in error_line(result)
        assert source.slot_confirmed_lsn() is None  # no slot was created

    def test_missing_dsn_says_which_flag_or_variable_to_set(self, tmp_path: Path) -> None:
        """No --dsn and no CDC_DSN: exit 2 with the fix."""
        result = run_cdc(["stream", "--lake", str(tmp_path)])
        assert result.returncode == 2
        assert "pass --dsn" in error_line(result)
        assert "CDC_DSN" in error_line(result)


class TestBrokenLake:
    """A damaged file in the lake is one error naming it, with a fix that works."""

    def test_a_truncated_raw_file_names_the_file_in_status_and_query(
            self, tmp_path: Path) -> None:
        """Status (footer statistics) and query (schemas) raise the same error for it."""
        lake = LocalLake(tmp_path)
        key = raw_key("public.t", "2026-01-01", 0x10, 0x20, 0)
        lake.write_bytes(key, b"PAR1 not really parquet")

        with pytest.raises(RawFileUnreadable, match="move the broken file out of raw/") as seen:
            last_commit_ts(lake.arrow_filesystem(), key)
        assert key in str(seen.value)
        with pytest.raises(RawFileUnreadable, match=key):
            run_query(lake, "SELECT * FROM raw_public.t", io.StringIO())

    def test_a_damaged_staged_table_is_reported_and_deleting_it_lets_it_be_rebuilt(
            self, tmp_path: Path) -> None:
        """The fix says to delete the folder; without it the table is simply not staged yet."""
        lake = LocalLake(tmp_path)
        log = f"{staged_key('public.t')}/_delta_log/00000000000000000000.json"
        lake.write_bytes(log, b"{not json")

        with pytest.raises(StagedTableUnreadable, match="delete its folder and run cdc compact"):
            staged_watermark(lake, "public.t")
        shutil.rmtree(tmp_path / staged_key("public.t"))
        assert staged_watermark(lake, "public.t") == (None, None)
