"""`cdc query` (DuckDB over the lake, offline) and `cdc ddl athena`, on a streamed lake."""

from __future__ import annotations

import csv
import io
import json
import uuid
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
from conftest import SourceDb, with_settings
from faultproxy import FaultProxy
from rawlake import prepare, raw_files, run_cdc, stream_until_caught_up

from cdc.config import Settings
from cdc.lake.store import Lake, LocalLake, open_lake
from cdc.ops.athena import athena_type, raw_ddl
from cdc.ops.query import run_query
from cdc.staged.runner import compact_lake
from cdc.stream.streamer import Streamer

SCHEMA = ("CREATE TABLE invoice (id int PRIMARY KEY, customer text, total numeric(10,2), "
          "paid boolean, day date, paid_at timestamptz, seen timestamp, n smallint, big bigint, "
          "ratio real, score double precision, blob bytea)")


@pytest.fixture
def streamed(source: SourceDb, settings: Settings) -> Settings:
    """A lake with raw history and staged tables: inserts, an update, a delete, then an
    ADD COLUMN mid-stream with rows that use it, all streamed and compacted."""
    source.execute(SCHEMA)
    source.execute("CREATE TABLE customer (id bigint PRIMARY KEY, name text)")
    prepare(settings)
    source.execute("INSERT INTO invoice VALUES "
                   "(1, 'ann', 10.50, true, '2024-01-02', '2024-01-02 03:04:05+00', "
                   "'2024-01-02 03:04:05', 1, 10000000000, 0.5, 0.25, '\\x0102'), "
                   "(2, 'bob', 20.00, false, NULL, NULL, NULL, 2, 2, 1.5, 1.25, NULL), "
                   "(3, 'cy', 30.25, NULL, NULL, NULL, NULL, 3, 3, NULL, NULL, NULL)")
    source.execute("UPDATE invoice SET total = 11.75 WHERE id = 1")
    source.execute("DELETE FROM invoice WHERE id = 2")
    source.execute("INSERT INTO customer VALUES (7, 'ann')")
    source.execute("ALTER TABLE invoice ADD COLUMN note text")
    source.execute("INSERT INTO invoice (id, customer, total, note) VALUES (4, 'di', 4.00, 'new')")
    source.execute("UPDATE invoice SET note = 'later' WHERE id = 3")
    stream_until_caught_up(settings)
    compact_lake(LocalLake(settings.lake), settings.slot)
    return settings


def query(settings: Settings, sql: str, *extra: str) -> str:
    result = run_cdc(["query", sql, "--lake", settings.lake, *extra])
    assert result.returncode == 0, result.stderr
    return result.stdout


def query_csv(settings: Settings, sql: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(query(settings, sql, "--format", "csv"))))


def query_json(settings: Settings, sql: str) -> list[dict[str, object]]:
    out = query(settings, sql, "--format", "json")
    return [json.loads(line) for line in out.splitlines()]


def load_dates(settings: Settings, table: str) -> set[str]:
    return {f.parent.name.removeprefix("load_date=") for f in raw_files(Path(settings.lake), table)}


class TestQuery:
    def test_a_staged_table_is_a_view_named_like_the_source(self, streamed: Settings) -> None:
        """`public.invoice` is the staged table: the source's current rows."""
        rows = query_csv(streamed, "SELECT id, customer, total, note FROM public.invoice "
                         "ORDER BY id")

        assert rows == [
            {"id": "1", "customer": "ann", "total": "11.75", "note": ""},
            {"id": "3", "customer": "cy", "total": "30.25", "note": "later"},
            {"id": "4", "customer": "di", "total": "4.00", "note": "new"},
        ]

    def test_the_raw_history_has_every_change_with_its_op_and_load_date(
        self, streamed: Settings
    ) -> None:
        """`raw_public.invoice` holds each change in order, with `_op` and `load_date`."""
        rows = query_json(streamed, "SELECT id, _op, load_date FROM raw_public.invoice "
                          "ORDER BY _commit_lsn, _seq")

        assert [(r["id"], r["_op"]) for r in rows] == [
            (1, "c"), (2, "c"), (3, "c"), (1, "u"), (2, "d"), (4, "c"), (3, "u")]
        assert {r["load_date"] for r in rows} == load_dates(streamed, "public.invoice")

    def test_a_column_added_mid_stream_reads_null_in_the_older_raw_rows(
        self, streamed: Settings
    ) -> None:
        """Files from before ADD COLUMN lack `note`: the raw view has it, NULL there."""
        assert len(raw_files(Path(streamed.lake), "public.invoice")) >= 2  # two schemas

        rows = query_json(streamed, "SELECT id, _op, note FROM raw_public.invoice "
                          "ORDER BY _commit_lsn, _seq")

        assert [r["note"] for r in rows] == [None, None, None, None, None, "new", "later"]

    def test_csv_output_has_a_header_and_empty_fields_for_null(self, streamed: Settings) -> None:
        """CSV parses back: header, exact decimals, ISO dates, NULL as an empty field."""
        rows = query_csv(streamed, "SELECT id, total, paid, day, paid_at, seen, ratio, big "
                         "FROM public.invoice ORDER BY id")

        assert rows[0] == {"id": "1", "total": "11.75", "paid": "True", "day": "2024-01-02",
                           "paid_at": "2024-01-02T03:04:05+00:00",
                           "seen": "2024-01-02T03:04:05+00:00", "ratio": "0.5",
                           "big": "10000000000"}
        assert rows[1]["paid"] == rows[1]["day"] == rows[1]["ratio"] == ""

    def test_json_output_is_one_object_per_line_with_typed_values(
        self, streamed: Settings
    ) -> None:
        """JSON lines: numbers stay numbers, decimals are exact strings, NULL is null."""
        rows = query_json(streamed, "SELECT id, total, paid, score, blob, _unchanged "
                          "FROM raw_public.invoice WHERE _op = 'c' ORDER BY id")

        assert rows[0] == {"id": 1, "total": "10.50", "paid": True, "score": 0.25,
                           "blob": "AQI=", "_unchanged": None}
        assert rows[2]["paid"] is None

    def test_the_table_format_is_duckdbs_rendering_with_every_column(
        self, streamed: Settings
    ) -> None:
        """The default output is DuckDB's box table with names and types."""
        out = query(streamed, "SELECT * FROM raw_public.customer")

        assert "│" in out
        for name in ("id", "name", "_op", "_commit_lsn", "load_date", "int64", "date"):
            assert name in out
        assert "ann" in out

    def test_every_lake_table_is_listed_by_show_all_tables(self, streamed: Settings) -> None:
        """A query naming no table sees every view (staged, history_ and raw_ schemas)."""
        rows = query_csv(streamed, "SELECT schema, name FROM (SHOW ALL TABLES) "
                         "WHERE schema <> 'main' ORDER BY 1, 2")

        assert [(r["schema"], r["name"]) for r in rows] == [
            ("history_public", "customer"), ("history_public", "invoice"),
            ("public", "customer"), ("public", "invoice"),
            ("raw_public", "customer"), ("raw_public", "invoice")]

    def test_bad_sql_exits_2_with_one_line_and_a_fix(self, streamed: Settings) -> None:
        """A syntax error is one stderr line naming the fix, exit code 2, nothing on stdout."""
        result = run_cdc(["query", "SELEC id FROM public.invoice", "--lake", streamed.lake])

        assert result.returncode == 2
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert lines[0].startswith("cdc: error: bad SQL: Parser Error: syntax error")
        assert "check the syntax" in lines[0]

    def test_an_unknown_table_exits_2_naming_the_lake_tables(self, streamed: Settings) -> None:
        """An unqualified or unknown name: one line listing the views that exist."""
        result = run_cdc(["query", "SELECT * FROM invoice", "--lake", streamed.lake])

        assert result.returncode == 2
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1
        assert "invoice does not exist" in lines[0]
        assert "public.invoice, raw_public.customer, raw_public.invoice" in lines[0]

    def test_an_unknown_format_is_a_configuration_error(self, streamed: Settings) -> None:
        """--format xml exits 2 and names the formats."""
        result = run_cdc(["query", "SELECT 1", "--lake", streamed.lake, "--format", "xml"])

        assert result.returncode == 2
        assert "use one of: table, csv, json" in result.stderr

    def test_a_lake_that_is_not_a_local_folder_is_read_through_the_lake_interface(
        self, streamed: Settings
    ) -> None:
        """Raw files of another backend are read through its pyarrow filesystem (never whole
        with read_bytes); same rows, same NULLs."""

        class Remote:
            def __init__(self, inner: LocalLake) -> None:
                self.inner = inner

            @property
            def uri(self) -> str:
                return self.inner.uri

            def list(self, prefix: str) -> list[str]:
                return self.inner.list(prefix)

            def read_bytes(self, key: str) -> bytes | None:
                raise AssertionError(f"{key} was downloaded whole")

            def arrow_filesystem(self) -> pafs.SubTreeFileSystem:
                return pafs.SubTreeFileSystem(self.inner.uri, pafs.LocalFileSystem())

            def delta_location(self, key: str) -> tuple[str, dict[str, str] | None]:
                return self.inner.delta_location(key)

        lake: Lake = Remote(LocalLake(streamed.lake))  # type: ignore[assignment]
        out = io.StringIO()

        run_query(lake, "SELECT id, _op, note, load_date FROM raw_public.invoice "
                  "ORDER BY _commit_lsn, _seq", out, "json")

        rows = [json.loads(line) for line in out.getvalue().splitlines()]
        assert [r["note"] for r in rows] == [None, None, None, None, None, "new", "later"]
        assert {r["load_date"] for r in rows} == load_dates(streamed, "public.invoice")


class TestAthenaDdl:
    def test_each_raw_and_staged_table_gets_a_create_external_table(
        self, streamed: Settings
    ) -> None:
        """Raw: parquet, mapped types, load_date projection; staged: a DELTA table."""
        result = run_cdc(["ddl", "athena", "--lake", streamed.lake, "--database", "shop",
                          "--location", "s3://bucket/lake/"])

        assert result.returncode == 0, result.stderr
        ddl = result.stdout
        lines = ddl.splitlines()
        assert ddl.count("CREATE EXTERNAL TABLE") == 6  # raw, staged and history of two
        assert "CREATE EXTERNAL TABLE IF NOT EXISTS `shop`.`raw_public__invoice` (" in lines
        assert "CREATE EXTERNAL TABLE IF NOT EXISTS `shop`.`raw_public__customer` (" in lines
        raw = ddl[ddl.index("`raw_public__invoice`"):]
        raw = raw[:raw.index(");")]
        for column in ("`id` int", "`customer` string", "`total` decimal(10,2)",
                       "`paid` boolean", "`day` date", "`paid_at` timestamp", "`seen` timestamp",
                       "`n` smallint", "`big` bigint", "`ratio` float", "`score` double",
                       "`blob` binary", "`note` string", "`_op` string", "`_lsn` bigint",
                       "`_commit_ts` timestamp", "`_unchanged` array<string>"):
            assert f"  {column}," in raw.splitlines() or f"  {column}" in raw.splitlines()
        assert "`load_date`" not in raw.split("PARTITIONED BY")[0]
        first = min(load_dates(streamed, "public.invoice"))
        for line in ("PARTITIONED BY (`load_date` string)",
                     "STORED AS PARQUET",
                     "LOCATION 's3://bucket/lake/raw/public.invoice/'",
                     "  'projection.enabled'='true',",
                     "  'projection.load_date.type'='date',",
                     "  'projection.load_date.format'='yyyy-MM-dd',",
                     f"  'projection.load_date.range'='{first},NOW',",
                     "  'storage.location.template'="
                     "'s3://bucket/lake/raw/public.invoice/load_date=${load_date}/'"):
            assert line in raw.splitlines(), line
        staged = ddl[ddl.index("`shop`.`public__invoice`"):]
        assert staged.splitlines()[:3] == [
            "`shop`.`public__invoice`",
            "LOCATION 's3://bucket/lake/staged/public.invoice/'",
            "TBLPROPERTIES ('table_type'='DELTA');"]
        assert "CREATE EXTERNAL TABLE IF NOT EXISTS `shop`.`public__customer`" in lines
        assert lines[0] == "CREATE DATABASE IF NOT EXISTS `shop`;"

    def test_a_local_lake_without_location_asks_for_one(self, streamed: Settings) -> None:
        """Athena reads S3 only: without --location a local lake is a one-line error."""
        result = run_cdc(["ddl", "athena", "--lake", streamed.lake])

        assert result.returncode == 2
        assert "pass --location s3://bucket/prefix" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1



@pytest.fixture
def s3_lake(source: SourceDb, settings: Settings, moto_endpoint: str,
            monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A streamed and compacted lake in a bucket of moto's S3 server (fake credentials)."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
                 "CDC_S3_ENDPOINT", "CDC_LAKE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in (("AWS_ACCESS_KEY_ID", "cdc-test"), ("AWS_SECRET_ACCESS_KEY", "fake"),
                        ("AWS_DEFAULT_REGION", "us-east-1"), ("AWS_CONFIG_FILE", "/dev/null"),
                        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")):
        monkeypatch.setenv(name, value)
    bucket = f"cdc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=bucket)
    s3 = with_settings(settings, lake=f"s3://{bucket}/lake", s3_endpoint=moto_endpoint)
    lake = open_lake(s3.lake, s3_endpoint=moto_endpoint)
    source.execute("CREATE TABLE invoice (id int PRIMARY KEY, total numeric(10,2))")
    Streamer(s3, lake).prepare()
    source.execute("INSERT INTO invoice VALUES (1, 1.50), (2, 2.50)")
    source.execute("ALTER TABLE invoice ADD COLUMN note text")
    source.execute("UPDATE invoice SET note = 'x' WHERE id = 2")
    Streamer(s3, lake).run(until_caught_up=True)
    compacted = run_cdc(["compact", "--lake", s3.lake, "--s3-endpoint", moto_endpoint,
                         "--slot", s3.slot])
    assert compacted.returncode == 0, compacted.stderr
    return s3


class TestOnS3:
    def test_cdc_query_reads_staged_and_raw_tables_of_an_s3_lake(self, s3_lake: Settings) -> None:
        """Staged through delta-rs's S3 options, raw through the lake; NULL before ADD COLUMN."""
        staged = query_csv_s3(s3_lake, "SELECT id, total, note FROM public.invoice ORDER BY id")
        raw = query_csv_s3(s3_lake, "SELECT id, _op, note FROM raw_public.invoice "
                           "ORDER BY _commit_lsn, _seq")

        assert staged == [{"id": "1", "total": "1.50", "note": ""},
                          {"id": "2", "total": "2.50", "note": "x"}]
        assert raw == [{"id": "1", "_op": "c", "note": ""}, {"id": "2", "_op": "c", "note": ""},
                       {"id": "2", "_op": "u", "note": "x"}]

    def test_a_raw_scan_on_s3_fetches_byte_ranges_never_whole_files(
        self, s3_lake: Settings
    ) -> None:
        """Raw parquet is read lazily through pyarrow's S3 filesystem: every GET is ranged."""
        with FaultProxy(s3_lake.s3_endpoint) as proxy:
            out = io.StringIO()
            run_query(open_lake(s3_lake.lake, s3_endpoint=proxy.url),
                      "SELECT id, note FROM raw_public.invoice ORDER BY _commit_lsn, _seq",
                      out, "csv")

        assert list(csv.DictReader(io.StringIO(out.getvalue()))) == [
            {"id": "1", "note": ""}, {"id": "2", "note": ""}, {"id": "2", "note": "x"}]
        gets = [(path, headers) for method, path, _, headers in proxy.requests
                if method == "GET" and "/raw/" in path and ".parquet" in path]
        assert gets
        assert all("range" in headers for _, headers in gets), [p for p, _ in gets]

    def test_ddl_athena_locates_tables_in_the_s3_lake_itself(self, s3_lake: Settings) -> None:
        """Without --location the DDL points at the s3:// lake's own folders."""
        result = run_cdc(["ddl", "athena", "--lake", s3_lake.lake,
                          "--s3-endpoint", s3_lake.s3_endpoint])

        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert f"LOCATION '{s3_lake.lake}/raw/public.invoice/'" in lines
        assert f"LOCATION '{s3_lake.lake}/staged/public.invoice/'" in lines
        assert "  `note` string," in lines


def query_csv_s3(settings: Settings, sql: str) -> list[dict[str, str]]:
    result = run_cdc(["query", sql, "--lake", settings.lake, "--s3-endpoint",
                      settings.s3_endpoint, "--format", "csv"])
    assert result.returncode == 0, result.stderr
    return list(csv.DictReader(io.StringIO(result.stdout)))


class TestAthenaTypes:
    def test_arrow_types_map_to_athena_types_and_the_zone_is_dropped(self) -> None:
        """Each raw Arrow type has its Athena name; timestamps lose their zone."""
        cases = {pa.int16(): "smallint", pa.int32(): "int", pa.int64(): "bigint",
                 pa.decimal128(12, 3): "decimal(12,3)", pa.float32(): "float",
                 pa.float64(): "double", pa.bool_(): "boolean", pa.date32(): "date",
                 pa.timestamp("us", tz="UTC"): "timestamp", pa.timestamp("us"): "timestamp",
                 pa.string(): "string", pa.binary(): "binary",
                 pa.list_(pa.string()): "array<string>", pa.list_(pa.int32()): "array<int>"}

        assert {t: athena_type(t) for t in cases} == cases

    def test_a_column_athena_cannot_type_is_left_out_with_a_comment(self) -> None:
        """time and decimal256 columns are skipped, said so, and the rest stays valid."""
        schema = pa.schema([("id", pa.int32()), ("at", pa.time64("us")),
                            ("huge", pa.decimal256(50, 2))])

        ddl = raw_ddl("db", "public.t", schema, "s3://b/lake/raw/public.t/", "2026-01-01")

        lines = ddl.splitlines()
        assert lines[0] == "-- column at (time64[us]) left out: Athena has no such type"
        assert lines[1].startswith("-- column huge (decimal256(50, 2)) left out")
        assert lines[2:5] == ["CREATE EXTERNAL TABLE IF NOT EXISTS `db`.`raw_public__t` (",
                              "  `id` int", ")"]
