"""Names are data: every (schema, table) has its own folder inside the lake, whatever its name."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from conftest import SourceDb
from hypothesis import given
from hypothesis import strategies as st
from psycopg import sql
from rawlake import run_cdc

from cdc.config import Settings
from cdc.errors import LakeError
from cdc.lake.layout import check_key, segment_table, table_segment
from cdc.lake.store import LocalLake
from cdc.names import TableName, parse_table_list
from cdc.ops.names import athena_name, view_map

HOSTILE = [
    ("tenant", "x/../../raw/public.orders"),
    ("../../somewhere", "t"),
    ("s.x", "t"),
    ("s", "x.t"),
    ("public", "%20pct"),
    ("public", "a/b"),
    ("public", "Foo"),
    ("public", "foo"),
    ("Sales.EU", "Order Items"),
    ("public", "€"),
    ("public", "orders"),
]
NAMES = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                min_size=1, max_size=63).filter(lambda s: len(s.encode()) <= 63)


class TestSegments:
    def test_ordinary_names_keep_their_folder(self) -> None:
        assert table_segment("public", "invoice") == "public.invoice"
        assert table_segment("s_1", "t2_x") == "s_1.t2_x"

    @given(NAMES, NAMES)
    def test_a_segment_is_one_safe_path_part_that_decodes_to_its_names(
        self, schema: str, table: str
    ) -> None:
        segment = table_segment(schema, table)
        assert segment_table(segment) == TableName(schema, table)
        assert re.fullmatch(r"[a-z0-9_.\-]+", segment)
        assert "/" not in segment
        assert "%" not in segment
        assert segment not in (".", "..")
        assert len(segment.encode()) <= 255
        check_key(f"raw/{segment}/load_date=2026-01-01/x.parquet")

    @given(NAMES, NAMES, NAMES, NAMES)
    def test_different_names_never_share_a_segment(self, a: str, b: str, c: str, d: str) -> None:
        if (a, b) != (c, d):
            assert table_segment(a, b) != table_segment(c, d)

    def test_hostile_names_are_all_distinct(self) -> None:
        segments = {table_segment(s, t) for s, t in HOSTILE}
        assert len(segments) == len(HOSTILE)
        assert table_segment("s.x", "t") != table_segment("s", "x.t")

    def test_folders_no_table_writes_are_ignored(self) -> None:
        for stray in ("public.Foo", "a.b.c", "x", "..", "public.-4", "public.-46OO"):
            assert segment_table(stray) is None

    def test_keys_that_leave_the_lake_are_refused(self, tmp_path: Path) -> None:
        lake = LocalLake(tmp_path / "lake")
        for key in ("../x", "raw/../../x", "/etc/x", "raw//x", "raw/./x"):
            with pytest.raises(LakeError):
                lake.write_bytes(key, b"x")
        (tmp_path / "lake").mkdir(exist_ok=True)
        (tmp_path / "lake" / "out").symlink_to(tmp_path)
        with pytest.raises(LakeError, match="resolves outside"):
            lake.write_bytes("out/x", b"x")


class TestEngineNames:
    def test_views_carry_real_names_and_case_twins_stay_apart(self) -> None:
        segs = [table_segment(s, t) for s, t in HOSTILE]
        views = view_map(segs, segs, segs)
        assert views[("staged", table_segment("Sales.EU", "Order Items"))] == (
            "Sales.EU", "Order Items")
        assert views[("raw", table_segment("s.x", "t"))] == ("raw_s.x", "t")
        assert views[("staged", "public.foo")] == ("public", "foo")
        assert views[("staged", table_segment("public", "Foo"))] == ("public", "-46oo")
        lowered = [(s.lower(), t.lower()) for s, t in views.values()]
        assert views[("history", "public.foo")] == ("history_public", "foo")
        assert len(set(lowered)) == len(lowered) == 3 * len(HOSTILE)

    def test_athena_names_are_valid_and_distinct(self) -> None:
        segs = [table_segment(s, t) for s, t in HOSTILE] + [
            table_segment("raw_public", "orders"), table_segment("history_public", "orders")]
        names = [athena_name(s, raw=r, history=h) for s in segs
                 for r, h in ((True, False), (False, True), (False, False))]
        assert all(re.fullmatch(r"[a-z0-9_]{1,255}", n) for n in names)
        assert len(set(names)) == len(names)
        assert athena_name("public.invoice", raw=True) == "raw_public__invoice"

    def test_user_lists_quote_names_as_sql_does(self) -> None:
        assert parse_table_list(['"Sales.EU"."Order Items", public.t', "x"]) == [
            TableName("Sales.EU", "Order Items"), TableName("public", "t"),
            TableName("public", "x")]
        assert TableName("s.x", "t").display() == '"s.x".t'
        from cdc.config import parse_tables

        assert parse_tables('public.a, "x,y"."b c"') == ("public.a", '"x,y"."b c"')
        assert parse_table_list(parse_tables('"x,y"."b c"')) == [TableName("x,y", "b c")]


def _create(source: SourceDb) -> None:
    with source.connect() as conn:
        for schema, table in HOSTILE:
            conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(
                sql.Identifier(schema, table)))
        _insert(conn, 1)


def _insert(conn: object, base: int) -> None:
    for n, (schema, table) in enumerate(HOSTILE):
        values = (base, f"{schema}|{table}|{base}", base + 1000 * (n + 1), f"{schema}|{table}|x")
        conn.execute(  # type: ignore[attr-defined]  # no parameters: a % in a name is no placeholder
            sql.SQL("INSERT INTO {} VALUES ({}, {}), ({}, {})").format(
                sql.Identifier(schema, table), *map(sql.Literal, values)))


class TestHostileNamesEndToEnd:
    def test_every_table_lands_in_its_own_folder_and_round_trips(
        self, source: SourceDb, settings: Settings, tmp_path: Path
    ) -> None:
        """snapshot, stream, compact, query: each table has its rows, only its own, in the lake."""
        _create(source)
        common = ["--dsn", settings.dsn, "--lake", settings.lake, "--slot", settings.slot,
                  "--publication", settings.publication]
        snap = run_cdc(["snapshot", *common])
        assert snap.returncode == 0, snap.stderr
        with source.connect() as conn:
            _insert(conn, 2)
            conn.execute(sql.SQL("UPDATE {} SET v = 'moved' WHERE id = 1").format(
                sql.Identifier("tenant", "x/../../raw/public.orders")))
        stream = run_cdc(["stream", *common, "--until-caught-up", "--compact-every", "0"])
        assert stream.returncode == 0, stream.stderr
        compact = run_cdc(["compact", "--lake", settings.lake, "--slot", settings.slot])
        assert compact.returncode == 0, compact.stderr
        lake = Path(settings.lake).resolve()
        for root, dirs, files in os.walk(tmp_path):
            for name in files + dirs:
                path = Path(root, name).resolve()
                assert path == lake or path.is_relative_to(lake) or lake.is_relative_to(path), path
        assert not (tmp_path / "somewhere").exists()
        assert sorted(p.name for p in (lake / "staged").iterdir()) == sorted(
            table_segment(s, t) for s, t in HOSTILE)
        views = view_map([table_segment(s, t) for s, t in HOSTILE], [])
        for schema, table in HOSTILE:
            expected = source.execute(sql.SQL("SELECT id, v FROM {} ORDER BY id").format(
                sql.Identifier(schema, table)))
            vschema, vname = views[("staged", table_segment(schema, table))]
            ident = sql.Identifier(vschema, vname).as_string(None)
            result = run_cdc(["query", "--lake", settings.lake, "--format", "json",
                              f"SELECT id, v FROM {ident} ORDER BY id"])
            assert result.returncode == 0, result.stderr
            rows = [json.loads(line) for line in result.stdout.splitlines()]
            assert [(r["id"], r["v"]) for r in rows] == [tuple(e) for e in expected], (schema,
                                                                                        table)
            raw = run_cdc(["query", "--lake", settings.lake, "--format", "json",
                           "SELECT count(*) AS n FROM " + sql.Identifier(
                               "raw_" + schema, table).as_string(None)])
            if (schema, table) != ("public", "Foo"):  # its raw view is raw_public."-46oo"
                assert json.loads(raw.stdout)["n"] >= 4, raw.stderr
        status = run_cdc(["status", "--dsn", settings.dsn, "--lake", settings.lake, "--slot",
                          settings.slot, "--json"])
        assert status.returncode == 0, status.stderr
        assert sorted(t["table"] for t in json.loads(status.stdout)["tables"]) == sorted(
            TableName(s, t).display() for s, t in HOSTILE)
        ddl = run_cdc(["ddl", "athena", "--lake", settings.lake, "--location", "s3://b/lake"])
        assert ddl.returncode == 0, ddl.stderr
        tables = re.findall(r"CREATE EXTERNAL TABLE IF NOT EXISTS `cdc`\.`([^`]+)`", ddl.stdout)
        assert len(tables) == len(set(tables)) == 3 * len(HOSTILE)  # raw, staged, history
        assert all(re.fullmatch(r"[a-z0-9_]+", t) for t in tables)


class TestMetadataNamedColumns:
    def test_the_renaming_is_reversible(self) -> None:
        from cdc.lake.columns import lake_column, source_column

        for name in ("_op", "__op", "load_date", "_load_date", "_reason", "__cdc_del", "op",
                     "id", "_id", "_commit_ts", "cdc_x", "_cdc_x"):
            assert source_column(lake_column(name)) == name
        assert lake_column("_op") == "__op"
        assert lake_column("load_date") == "_load_date"
        assert lake_column("_id") == "_id"
        assert len({lake_column(n) for n in ("_op", "__op", "___op")}) == 3

    def test_columns_named_like_metadata_land_exactly_and_other_tables_go_on(
        self, source: SourceDb, settings: Settings
    ) -> None:
        source.execute("""
            CREATE TABLE meta (id int PRIMARY KEY, _op text, _lsn text, _commit_lsn int,
                _seq int, _xid text, _commit_ts text, _unchanged text, load_date date,
                __op text, big text);
            ALTER TABLE meta ALTER COLUMN big SET STORAGE EXTERNAL;
            CREATE TABLE plain (id int PRIMARY KEY, v int);
            INSERT INTO meta VALUES (1, 'o1', 'l1', 11, 12, 'x1', 'ts1', 'u1', '2001-02-03',
                'oo1', repeat('b', 10000));
            INSERT INTO plain VALUES (1, 1);
        """)
        common = ["--dsn", settings.dsn, "--lake", settings.lake, "--slot", settings.slot,
                  "--publication", settings.publication]
        check = run_cdc(["check", *common[:2], *common[4:]])
        assert "_op as __op" in check.stdout
        assert check.returncode == 0, check.stdout
        assert run_cdc(["snapshot", *common]).returncode == 0
        source.execute("INSERT INTO meta VALUES (2, 'o2', 'l2', 21, 22, 'x2', 'ts2', 'u2', "
                       "'2002-03-04', 'oo2', 'small')")
        source.execute("UPDATE meta SET _op = 'changed', _seq = 99 WHERE id = 1")  # big: TOAST
        source.execute("DELETE FROM meta WHERE id = 2")
        source.execute("INSERT INTO plain VALUES (2, 2)")
        stream = run_cdc(["stream", *common, "--until-caught-up", "--compact-every", "0"])
        assert stream.returncode == 0, stream.stderr
        assert run_cdc(["compact", "--lake", settings.lake, "--slot", settings.slot]
                       ).returncode == 0
        result = run_cdc(["query", "--lake", settings.lake, "--format", "json",
                          "SELECT id, __op, __lsn, __commit_lsn, __seq, __xid, __commit_ts, "
                          "__unchanged, _load_date, ___op, length(big) AS big FROM public.meta"])
        assert result.returncode == 0, result.stderr
        rows = [json.loads(line) for line in result.stdout.splitlines()]
        assert rows == [{"id": 1, "__op": "changed", "__lsn": "l1", "__commit_lsn": 11,
                         "__seq": 99, "__xid": "x1", "__commit_ts": "ts1", "__unchanged": "u1",
                         "_load_date": "2001-02-03", "___op": "oo1", "big": 10000}]
        raw = run_cdc(["query", "--lake", settings.lake, "--format", "json",
                       "SELECT DISTINCT _load_date, load_date = current_date AS today "
                       "FROM raw_public.meta WHERE id = 2 AND _op = 'c'"])
        assert [json.loads(x) for x in raw.stdout.splitlines()] == [
            {"_load_date": "2002-03-04", "today": True}]
        plain = run_cdc(["query", "--lake", settings.lake, "--format", "csv",
                         "SELECT count(*) AS n FROM public.plain"])
        assert plain.stdout.splitlines()[1] == "2"
