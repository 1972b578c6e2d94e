"""`--plugin wal2json`: the same raw rows as pgoutput for the same changes."""

from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from conftest import SourceDb, with_settings
from rawlake import prepare, raw_files, read_raw, stream_until_caught_up

from cdc.config import Settings
from cdc.decoding.wal2json import Wal2JsonDecoder, type_modifier
from cdc.events import UNCHANGED, Begin, Commit, Delete, Insert, Relation, Truncate, Update

TS = "2024-01-02 03:04:05.123456+00"


def msg(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def col(name: str, typ: str, oid: int, value: Any = None) -> dict[str, Any]:
    return {"name": name, "type": typ, "typeoid": oid, "value": value}


def test_messages_decode_to_pgoutput_events() -> None:
    d = Wal2JsonDecoder()
    begin = d.decode(msg(action="B", xid=7, timestamp=TS, lsn="0/10", nextlsn="0/20"))
    assert begin == [Begin(0x10, 1704164645123456, 7)]
    columns = [col("id", "integer", 23, 1), col("n", "numeric(10,2)", 1700, 1.50),
               col("ok", "boolean", 16, True), col("t", "text", 25, None)]
    pk = [{"name": "id", "type": "integer", "typeoid": 23}]
    rel, ins = d.decode(b'{"action":"I","schema":"s","table":"t","columns":'
                        + json.dumps(columns).replace("1.5", "1.50").encode()
                        + b',"pk":' + json.dumps(pk).encode() + b"}")
    assert isinstance(rel, Relation)
    assert rel.key_columns == ("id",)
    assert [c.type_modifier for c in rel.columns] == [-1, (10 << 16 | 2) + 4, -1, -1]
    assert ins == Insert(rel.oid, ("1", "1.50", "t", None))
    # an update leaving a TOASTed column out: unchanged, same relation
    upd = d.decode(msg(action="U", schema="s", table="t", columns=columns[:3], pk=pk,
                       identity=[col("id", "integer", 23, 1)]))
    assert upd == [Update(rel.oid, ("1", "1.5", "t", UNCHANGED))]
    moved = d.decode(msg(action="U", schema="s", table="t",
                         columns=[col("id", "integer", 23, 2), *columns[1:]], pk=pk,
                         identity=[col("id", "integer", 23, 1)]))
    assert moved == [Update(rel.oid, ("2", "1.5", "t", None), ("1", None, None, None), True)]
    assert d.decode(msg(action="D", schema="s", table="t", pk=pk,
                        identity=[col("id", "integer", 23, 2)])) == [
        Delete(rel.oid, ("2", None, None, None), True)]
    assert d.decode(msg(action="T", schema="s", table="t")) == [Truncate((rel.oid,), False,
                                                                         False)]
    assert d.decode(msg(action="C", xid=7, timestamp=TS, lsn="0/10", nextlsn="0/20")) == [
        Commit(0, 0x10, 0x20, 1704164645123456)]
    # a new column: a new Relation first
    wider = d.decode(msg(action="I", schema="s", table="t", pk=pk,
                         columns=[*columns, col("x", "integer", 23, 5)]))
    assert isinstance(wider[0], Relation)
    assert len(wider[0].columns) == 5


def test_tables_outside_the_publication_and_messages_are_skipped() -> None:
    d = Wal2JsonDecoder(tables={("public", "a")})
    assert d.decode(msg(action="I", schema="public", table="b",
                        columns=[col("id", "integer", 23, 1)])) == []
    assert d.decode(msg(action="M", transactional=False, prefix="x", content="y")) == []


def test_numeric_typmods_come_from_the_type_name() -> None:
    assert type_modifier("numeric(12,3)", 1700) == (12 << 16 | 3) + 4
    assert type_modifier("numeric(5)", 1700) == (5 << 16) + 4
    assert type_modifier("numeric", 1700) == -1
    assert type_modifier("numeric(8,2)[]", 1231) == (8 << 16 | 2) + 4
    assert type_modifier("character varying(5)", 1043) == -1


def _wal2json_installed() -> bool:
    return bool(glob.glob("/usr/lib/postgresql/*/lib/wal2json.so"))


WORKLOAD = [
    "INSERT INTO w VALUES (1, 'a', 1.50, 0.25, true, '2024-01-01 00:00:00+00', '{1,NULL}', "
    "'\\x00ff', '{\"k\": [1, 2.50]}', 'happy', repeat('big', 10000))",
    "INSERT INTO w VALUES (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL), "
    "(3, 'ünï \"q\", {x}', -99999999.99, 1e300, false, '1900-01-01 00:00:00+00', '{}', "
    "'\\x', 'null', 'sad', 'small')",
    "INSERT INTO other VALUES (1)",
    "UPDATE w SET name = 'a2' WHERE id = 1",  # TOASTed big stays unchanged
    "UPDATE w SET id = 4 WHERE id = 2",  # key change
    "DELETE FROM w WHERE id = 3",
    "BEGIN; INSERT INTO w (id, name) VALUES (5, 'x'); UPDATE w SET price = 1 WHERE id = 5; "
    "COMMIT",
    "ALTER TABLE w ADD COLUMN extra int",
    "INSERT INTO w (id, extra) VALUES (6, 42)",
    "TRUNCATE w",
    "INSERT INTO w (id, name) VALUES (7, 'after')",
    "INSERT INTO w (id, big) VALUES (8, repeat('toast', 5000))",
]


@pytest.mark.skipif(not _wal2json_installed(),
                    reason="the wal2json plugin is not installed (scripts/ensure-postgres.sh "
                    "installs postgresql-15-wal2json)")
def test_one_workload_gives_the_same_raw_rows_through_pgoutput_and_wal2json(
    source: SourceDb, settings: Settings, tmp_path: Path
) -> None:
    source.execute("CREATE TYPE mood AS ENUM ('sad', 'happy')")
    source.execute("CREATE TABLE w (id int PRIMARY KEY, name text, price numeric(10,2), "
                   "ratio float8, ok bool, at timestamptz, tags int[], raw bytea, doc jsonb, "
                   "m mood, big text)")
    source.execute("ALTER TABLE w ALTER big SET STORAGE EXTERNAL")  # TOASTed, uncompressed
    source.execute("CREATE TABLE other (id int PRIMARY KEY)")
    source.execute(f"CREATE PUBLICATION {settings.publication} FOR TABLE w")
    json_settings = with_settings(settings, slot=settings.slot + "_j", plugin="wal2json",
                                  lake=str(tmp_path / "lake_j"))
    prepare(settings)
    prepare(json_settings)
    with source.connect() as conn:
        for statement in WORKLOAD:
            conn.execute(statement)
    stream_until_caught_up(settings)
    stream_until_caught_up(json_settings)
    # a new session whose first change of w names only some columns (the decoder asks the
    # catalog for the rest)
    source.execute("UPDATE w SET name = 'late' WHERE id = 8")  # big: unchanged TOAST
    stream_until_caught_up(settings)
    stream_until_caught_up(json_settings)
    source.execute("DELETE FROM w WHERE id = 7")
    source.execute("UPDATE w SET name = 'n' WHERE id = 8")
    stream_until_caught_up(settings)
    stream_until_caught_up(json_settings)

    via_pgoutput = read_raw(Path(settings.lake), "public.w")
    via_wal2json = read_raw(Path(json_settings.lake), "public.w")
    assert [r["_op"] for r in via_pgoutput] == ["c", "c", "c", "u", "d", "u", "d", "c", "u",
                                                "c", "t", "c", "c", "u", "d", "u"]
    assert via_wal2json == via_pgoutput
    assert [r["_unchanged"] for r in via_pgoutput if r["_op"] == "u"][-2:] == [["big"], ["big"]]
    assert not raw_files(Path(json_settings.lake), "public.other")
    schemas = [pq.read_schema(f) for f in raw_files(Path(json_settings.lake), "public.w")]
    assert schemas == [pq.read_schema(f) for f in raw_files(Path(settings.lake), "public.w")]


@pytest.mark.skipif(not _wal2json_installed(),
                    reason="the wal2json plugin is not installed (scripts/ensure-postgres.sh "
                    "installs postgresql-15-wal2json)")
def test_insert_only_tables_keep_only_inserts_through_either_plugin(
    source: SourceDb, settings: Settings, tmp_path: Path
) -> None:
    """wal2json ignores publications: the decoder drops an insert-only table's updates and
    deletes as pgoutput never sends them, instead of stopping on a delete without identity."""
    source.execute("CREATE TABLE events (kind text, n int)")
    source.execute("CREATE TABLE k (id int PRIMARY KEY, v int)")
    pg = with_settings(settings, keyless_tables="insert-only")
    js = with_settings(pg, slot=settings.slot + "_j", plugin="wal2json",
                       lake=str(tmp_path / "lake_j"))
    prepare(pg)
    prepare(js)
    for statement in ("INSERT INTO events VALUES ('a', 1), ('b', 2)", "INSERT INTO k VALUES (1, 1)",
                      "UPDATE events SET n = 9", "DELETE FROM events WHERE kind = 'a'",
                      "UPDATE k SET v = 2", "INSERT INTO events VALUES ('c', 3)"):
        source.execute(statement)
    stream_until_caught_up(pg)
    stream_until_caught_up(js)
    for lake in (Path(pg.lake), Path(js.lake)):
        assert [(r["_op"], r["kind"]) for r in read_raw(lake, "public.events")] == [
            ("c", "a"), ("c", "b"), ("c", "c")]
        assert [r["_op"] for r in read_raw(lake, "public.k")] == ["c", "u"]
