"""cdc never harms the source: publications are checked table by table, `cdc check` says why."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import psycopg
from conftest import SourceDb, with_settings
from polling import wait_for
from psycopg import sql
from psycopg.conninfo import make_conninfo
from rawlake import read_raw, run_cdc, streaming_in_thread

from cdc.config import Settings

APP_TABLES = """
CREATE TABLE orders (id int PRIMARY KEY, total int);
CREATE TABLE logs (msg text, n int);
CREATE TABLE deferred (id int PRIMARY KEY DEFERRABLE INITIALLY DEFERRED, v int);
INSERT INTO orders VALUES (1, 10), (2, 20);
INSERT INTO logs VALUES ('a', 1), ('b', 2);
INSERT INTO deferred VALUES (1, 1), (2, 2);
"""


def common(settings: Settings) -> list[str]:
    return ["--dsn", settings.dsn, "--slot", settings.slot, "--publication", settings.publication]


def lake_args(settings: Settings) -> list[str]:
    return [*common(settings), "--lake", settings.lake]


def errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("cdc: error:")]


def app_writes_succeed(source: SourceDb, *tables: str) -> None:
    """The application's own UPDATE and DELETE on every table still work."""
    with source.connect() as conn:
        for table in tables:
            ident = sql.Identifier(table)
            conn.execute(sql.SQL("UPDATE {} SET n = n + 1").format(ident)
                         if table == "logs" else
                         sql.SQL("UPDATE {} SET {} = {} + 1").format(
                             ident, sql.Identifier(_value_column(table)),
                             sql.Identifier(_value_column(table))))
            conn.execute(sql.SQL("DELETE FROM {} WHERE false").format(ident))
            conn.execute(sql.SQL("DELETE FROM {} WHERE ctid = (SELECT min(ctid) FROM {})")
                         .format(ident, ident))


def _value_column(table: str) -> str:
    return {"orders": "total", "deferred": "v"}.get(table, "v")


def publications(source: SourceDb) -> dict[str, list[str]]:
    rows = source.execute("SELECT p.pubname::text, coalesce(string_agg(t.tablename::text, ',' "
                          "ORDER BY t.tablename), '') FROM pg_publication p LEFT JOIN "
                          "pg_publication_tables t ON t.pubname = p.pubname GROUP BY 1")
    return {r[0]: [t for t in r[1].split(",") if t] for r in rows}


class TestPublicationSafety:
    def test_keyless_and_deferrable_key_tables_are_refused_with_one_line_each(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """slot create refuses before it creates anything; each table gets its line and fixes."""
        source.execute(APP_TABLES)
        result = run_cdc(["slot", "create", *common(settings)])
        assert result.returncode == 4, result.stderr
        lines = errors(result.stderr)
        assert len(lines) == 2, result.stderr
        assert any("public.logs:" in line and "no primary key" in line for line in lines)
        assert any("public.deferred:" in line and "DEFERRABLE" in line for line in lines)
        for line in lines:
            assert "REPLICA IDENTITY FULL" in line
            assert "--exclude-tables" in line
            assert "--keyless-tables insert-only" in line
        assert publications(source) == {}
        assert source.execute("SELECT count(*) FROM pg_replication_slots WHERE slot_name = %s",
                              (settings.slot,))[0][0] == 0
        app_writes_succeed(source, "orders", "logs", "deferred")

    def test_following_the_fix_lets_slot_create_go_on(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """REPLICA IDENTITY FULL on one table and --exclude-tables for the other: accepted."""
        source.execute(APP_TABLES)
        source.execute("ALTER TABLE logs REPLICA IDENTITY FULL")
        result = run_cdc(["slot", "create", *common(settings), "--exclude-tables",
                          "public.deferred"])
        assert result.returncode == 0, result.stderr
        assert publications(source) == {settings.publication: ["logs", "orders"]}
        app_writes_succeed(source, "orders", "logs", "deferred")

    def test_the_application_keeps_working_after_every_cdc_command(
        self, source: SourceDb, settings: Settings, tmp_path: Path
    ) -> None:
        """check, slot create, snapshot and stream under insert-only, and a later keyless table:
        the application's UPDATE and DELETE succeed on every table after each command."""
        source.execute(APP_TABLES)
        tables = ("orders", "logs", "deferred")
        check = run_cdc(["check", *common(settings)])
        assert check.returncode == 1
        app_writes_succeed(source, *tables)
        snap = run_cdc(["snapshot", *lake_args(settings), "--keyless-tables", "insert-only"])
        assert snap.returncode == 0, snap.stderr
        assert publications(source) == {settings.publication: ["orders"],
                                        f"{settings.publication}_inserts": ["deferred", "logs"]}
        app_writes_succeed(source, *tables)
        source.execute("INSERT INTO logs VALUES ('c', 3)")
        source.execute("CREATE TABLE late_keyless (v int)")
        source.execute("INSERT INTO late_keyless VALUES (1)")
        source.execute("CREATE TABLE late_keyed (id int PRIMARY KEY, v int)")
        # a refusing stream: the later keyless table is left out, the keyed one added
        stream = run_cdc(["stream", *lake_args(settings), "--until-caught-up",
                          "--compact-every", "0"])
        assert stream.returncode == 0, stream.stderr
        assert "late_keyless" in stream.stderr  # the warning names it
        pubs = publications(source)
        assert pubs[settings.publication] == ["late_keyed", "orders"]
        assert "late_keyless" not in pubs[f"{settings.publication}_inserts"]
        app_writes_succeed(source, *tables, "late_keyless", "late_keyed")
        source.execute("INSERT INTO late_keyed VALUES (1, 1)")
        other = Settings(**{**settings.__dict__, "slot": f"{settings.slot}_b"})
        create = run_cdc(["slot", "create", *common(other)])
        assert create.returncode == 0, create.stderr
        stream = run_cdc(["stream", *lake_args(settings), "--until-caught-up",
                          "--compact-every", "0"])
        assert stream.returncode == 0, stream.stderr
        app_writes_succeed(source, *tables, "late_keyless", "late_keyed")
        lake = Path(settings.lake)
        assert [r["msg"] for r in read_raw(lake, "public.logs") if r["_op"] == "c"] == ["c"]
        assert {r["_op"] for r in read_raw(lake, "public.logs")} == {"r", "c"}  # no u/d
        assert [r["id"] for r in read_raw(lake, "public.late_keyed") if r["_op"] == "c"] == [1]
        check = run_cdc(["check", *common(settings), "--json"])
        report = json.loads(check.stdout)
        assert any(p["subject"] == "public.late_keyless" and p["check"] == "replica_identity"
                   for p in report["problems"])
        assert check.returncode == 1

    def test_tables_created_while_the_stream_runs_join_when_they_qualify(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A keyed table created mid-stream is added and its later rows land; a keyless one is
        left out and the application's UPDATE/DELETE on it keep working."""
        source.execute("CREATE TABLE first (id int PRIMARY KEY)")
        live = with_settings(settings, table_sync_seconds=0.2)
        with streaming_in_thread(live):
            wait_for(lambda: publications(source).get(settings.publication) == ["first"],
                     what="the publication")
            source.execute("CREATE TABLE later (id int PRIMARY KEY, v text)")
            source.execute("CREATE TABLE later_keyless (v int)")
            wait_for(lambda: "later" in publications(source)[settings.publication],
                     what="the new table in the publication")
            source.execute("INSERT INTO later VALUES (1, 'a'), (2, 'b')")
            source.execute("INSERT INTO later_keyless VALUES (1)")
            wait_for(lambda: sorted(r["id"] for r in read_raw(Path(settings.lake), "public.later")
                                    if r["_op"] == "c") == [1, 2],
                     what="the new table's rows in raw")
            app_writes_succeed(source, "later_keyless")
        assert "later_keyless" not in publications(source)[settings.publication]

    def test_slot_drop_drops_the_publications_cdc_created_and_leaves_others(
        self, source: SourceDb, settings: Settings
    ) -> None:
        source.execute(APP_TABLES)
        source.execute("CREATE PUBLICATION someone_elses FOR TABLE orders")
        created = run_cdc(["slot", "create", *common(settings), "--keyless-tables",
                           "insert-only"])
        assert created.returncode == 0, created.stderr
        dropped = run_cdc(["slot", "drop", *common(settings)])
        assert dropped.returncode == 0, dropped.stderr
        assert f"publication {settings.publication} dropped" in dropped.stdout
        assert f"publication {settings.publication}_inserts dropped" in dropped.stdout
        assert publications(source) == {"someone_elses": ["orders"]}
        user_pub = run_cdc(["slot", "drop", *common(settings), "--publication", "someone_elses"])
        assert "publication someone_elses left in place" in user_pub.stdout
        assert "someone_elses" in publications(source)


class TestCheck:
    def test_clean_database_exits_0(self, source: SourceDb, settings: Settings) -> None:
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        result = run_cdc(["check", *common(settings), "--json"])
        report = json.loads(result.stdout)
        assert [p for p in report["problems"] if p["level"] == "error"] == []
        assert report["ok"] is True
        assert report["tables"] == ["public.t"]
        assert result.returncode == 0, result.stdout

    def test_every_table_problem_has_its_line(self, source: SourceDb, settings: Settings) -> None:
        source.execute("""
            CREATE TABLE ok (id int PRIMARY KEY);
            CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);
            CREATE TABLE gen (id int PRIMARY KEY, a int, b int GENERATED ALWAYS AS (a * 2) STORED);
            CREATE TABLE meta (id int PRIMARY KEY, _op text, load_date date);
            CREATE TABLE nothing (id int PRIMARY KEY);
            ALTER TABLE nothing REPLICA IDENTITY NOTHING;
            CREATE TABLE parted (id int, at date) PARTITION BY RANGE (at);
            CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM ('2020-01-01')
                TO ('2030-01-01');
        """)
        result = run_cdc(["check", *common(settings)])
        assert result.returncode == 1
        lines = result.stdout.splitlines()

        def line(subject: str, check_text: str) -> str:
            found = [x for x in lines if f": {subject}: " in x and check_text in x]
            assert found, result.stdout
            return found[0]

        assert line("public.scratch", "UNLOGGED").startswith("warning:")
        assert "SET LOGGED" in line("public.scratch", "UNLOGGED")
        assert "generated column(s) b" in line("public.gen", "pgoutput")
        assert line("public.meta", "_op as __op, load_date as _load_date").startswith("warning:")
        assert "REPLICA IDENTITY is NOTHING" in line("public.nothing", "NOTHING")
        parted = line("public.parted_1", "no primary key")
        assert "partition of public.parted" in parted
        assert "--exclude-tables public.parted" in parted
        assert not [x for x in lines if ": public.ok: " in x]

    def test_check_on_a_sql_ascii_database_reads_wal_level(
        self, source: SourceDb, server_dsn: str
    ) -> None:
        """SHOW wal_level on SQL_ASCII used to come back as bytes ("b'logical'")."""
        name = f"a_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(server_dsn, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {} ENCODING 'SQL_ASCII' TEMPLATE template0 "
                                 "LC_COLLATE 'C' LC_CTYPE 'C'").format(sql.Identifier(name)))
        try:
            dsn = make_conninfo(server_dsn, dbname=name)
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute("CREATE TABLE t (id int PRIMARY KEY)")
            result = run_cdc(["check", "--dsn", dsn, "--slot", "s_" + name, "--json"])
            report = json.loads(result.stdout)
            assert not [p for p in report["problems"] if p["check"] == "wal_level"], report
            assert result.returncode == 0, result.stdout
        finally:
            with psycopg.connect(server_dsn, autocommit=True) as conn:
                conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(
                    sql.Identifier(name)))
