"""An s3:// lake over the real S3 HTTP API on loopback (moto's server), healthy and faulty."""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import uuid
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import SourceDb, with_settings
from deltalake import DeltaTable
from faultproxy import FaultProxy
from polling import wait_for
from rawlake import replay, run_cdc

from cdc.config import Settings
from cdc.errors import ConfigError, LakeError
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.layout import staged_key
from cdc.lake.s3 import S3Lake
from cdc.lake.store import Lake, open_lake
from cdc.snapshot.consistent import ConsistentSnapshot
from cdc.staged.merge import META
from cdc.staged.runner import compact_lake
from cdc.stream.streamer import Stopper, Streamer

SECRET = "moto-secret-never-printed"  # noqa: S105 (a fake key for moto)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials for moto; nothing from the developer's own AWS set-up leaks in."""
    for name in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN",
                 "CDC_S3_ENDPOINT", "CDC_S3_MAX_ATTEMPTS", "CDC_LAKE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "cdc-test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")


@pytest.fixture
def bucket(moto_endpoint: str, aws_env: None) -> str:
    name = f"cdc-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1").create_bucket(
        Bucket=name)
    return name


@pytest.fixture
def s3_settings(settings: Settings, bucket: str, moto_endpoint: str) -> Settings:
    return with_settings(settings, lake=f"s3://{bucket}/lake", s3_endpoint=moto_endpoint)


def lake_of(settings: Settings) -> Lake:
    return open_lake(settings.lake, s3_endpoint=settings.s3_endpoint,
                     s3_max_attempts=settings.s3_max_attempts)


def read_raw(lake: Lake, table: str) -> list[dict[str, Any]]:
    """Every raw row of ``table`` read back through the lake, in change order."""
    parts = []
    for key in lake.list(f"raw/{table}/"):
        data = lake.read_bytes(key)
        assert data is not None, key
        parts.append(pq.read_table(pa.BufferReader(data)))
    if not parts:
        return []
    rows = pa.concat_tables(parts, promote_options="default").to_pylist()
    return sorted(rows, key=lambda r: (r["_commit_lsn"], r["_seq"]))


def source_rows(source: SourceDb, table: str) -> list[dict[str, Any]]:
    with source.connect() as conn:
        cur = conn.execute(f"SELECT * FROM {table}")
        names = [d.name for d in cur.description or []]
        rows = [dict(zip(names, row, strict=True)) for row in cur.fetchall()]
    return sorted(rows, key=repr)


def staged_rows(lake: Lake, table: str) -> list[dict[str, Any]]:
    uri, options = lake.delta_location(staged_key(table))
    rows = DeltaTable(uri, storage_options=options).to_pyarrow_table().to_pylist()
    return sorted(({k: v for k, v in r.items() if k not in META} for r in rows), key=repr)


def run_streamer(settings: Settings, lake: Lake) -> None:
    Streamer(settings, lake).run(until_caught_up=True)


@pytest.fixture
def streaming() -> Iterator[Any]:
    """Start a streamer on a background thread; stopped (flush + ack) at the end of the test."""
    running: list[tuple[Stopper, threading.Thread, list[BaseException]]] = []

    def start(settings: Settings, lake: Lake) -> None:
        stopper, errors = Stopper(), []

        def target() -> None:
            try:
                Streamer(settings, lake, stopper).run()
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        running.append((stopper, thread, errors))

    yield start
    for stopper, thread, errors in running:
        stopper.requested = True
        thread.join(timeout=120)
        assert not thread.is_alive(), "streamer did not stop"
        if errors:
            raise errors[0]


class TestS3Lake:
    def test_keys_list_read_and_write_under_the_prefix_with_pagination(
        self, bucket: str, moto_endpoint: str
    ) -> None:
        """Objects land under prefix/; list pages past 1000 keys and hides dot-files."""
        lake = open_lake(f"s3://{bucket}/some/prefix/", s3_endpoint=moto_endpoint)
        assert lake.uri == f"s3://{bucket}/some/prefix"
        lake.check_writable()
        for n in range(1005):
            lake.write_bytes(f"raw/t/{n:05d}", b"x")
        lake.write_bytes("raw/t/.hidden", b"x")
        lake.write_bytes("_cdc/checkpoints/s.json", b"{}")

        keys = lake.list("raw/")
        assert len(keys) == 1005
        assert keys[0] == "raw/t/00000"
        assert lake.read_bytes("raw/t/00007") == b"x"
        assert lake.read_bytes("raw/t/missing") is None
        names = boto3.client("s3", endpoint_url=moto_endpoint).list_objects_v2(
            Bucket=bucket, Prefix="some/prefix/_cdc/")["Contents"]
        assert [o["Key"] for o in names] == ["some/prefix/_cdc/checkpoints/s.json"]

    def test_a_file_above_the_multipart_size_is_uploaded_in_parts_and_reads_back_whole(
        self, bucket: str, moto_endpoint: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Above MULTIPART_BYTES boto3's managed transfer uploads parts; the object is whole."""
        monkeypatch.setattr("cdc.lake.s3.MULTIPART_BYTES", 5 * 2**20)
        data = random.Random(3).randbytes(12 * 2**20)
        with FaultProxy(moto_endpoint, seed=2) as proxy:
            lake = open_lake(f"s3://{bucket}/lake", s3_endpoint=proxy.url)
            lake.write_bytes("raw/t/big.parquet", data)
            assert lake.read_bytes("raw/t/big.parquet") == data
        assert any(r[0] == "POST" and "uploads" in r[1] for r in proxy.requests)
        assert sum(1 for r in proxy.requests if r[0] == "PUT" and "partNumber=" in r[1]) == 3

    def test_a_missing_bucket_is_a_one_line_lake_error_with_the_fix(
        self, moto_endpoint: str, aws_env: None
    ) -> None:
        """NoSuchBucket names the bucket and how to fix it, without the secret key."""
        lake = open_lake("s3://cdc-no-such-bucket/lake", s3_endpoint=moto_endpoint)
        with pytest.raises(LakeError, match="NoSuchBucket; create bucket") as err:
            lake.check_writable()
        assert "\n" not in str(err.value)
        assert SECRET not in str(err.value)

    def test_endpoints_must_be_http_urls_and_http_is_allowed_only_when_named(
        self, aws_env: None, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Delta gets AWS_ALLOW_HTTP only for a named http:// endpoint; AWS_ENDPOINT_URL is read."""
        with pytest.raises(ConfigError):
            open_lake("s3://b-x/lake", s3_endpoint="minio:9000")
        aws = open_lake("s3://b-x/lake")
        assert isinstance(aws, S3Lake)
        options = aws.delta_storage_options()
        assert "AWS_ALLOW_HTTP" not in options
        assert "AWS_ENDPOINT_URL" not in options
        assert options["conditional_put"] == "etag"
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
        local = open_lake("s3://b-x/lake")
        assert isinstance(local, S3Lake)
        assert local.delta_storage_options()["AWS_ALLOW_HTTP"] == "true"
        assert local.delta_location(staged_key("public.t"))[0] == "s3://b-x/lake/staged/public.t"


class TestStreamingToS3:
    def test_inserts_updates_and_deletes_stream_into_s3_and_read_back_through_the_lake(
        self, source: SourceDb, s3_settings: Settings
    ) -> None:
        """Every change lands in s3://bucket/lake/raw with its values and op; ack follows."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, name text, price numeric(10,2), "
                       "at timestamptz)")
        lake = lake_of(s3_settings)
        Streamer(s3_settings, lake).prepare()
        source.execute("INSERT INTO t VALUES (1, 'a', 1.50, '2024-01-02 03:04:05+00'), "
                       "(2, 'b', NULL, NULL)")
        source.execute("UPDATE t SET name = 'a2', price = 9.99 WHERE id = 1")
        source.execute("DELETE FROM t WHERE id = 2")
        end = source.current_lsn()

        run_streamer(s3_settings, lake)

        rows = read_raw(lake, "public.t")
        assert [(r["_op"], r["id"]) for r in rows] == [("c", 1), ("c", 2), ("u", 1), ("d", 2)]
        assert rows[0]["price"] == Decimal("1.50")
        assert rows[0]["at"] == dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        assert rows[2]["name"] == "a2"
        assert replay(rows) == {1: {"id": 1, "name": "a2", "price": Decimal("9.99"),
                                    "at": dt.datetime(2024, 1, 2, 3, 4, 5, tzinfo=dt.UTC)}}
        checkpoint = CheckpointStore(lake, s3_settings.slot).load()
        assert checkpoint is not None
        assert checkpoint >= end
        confirmed = source.slot_confirmed_lsn()
        assert confirmed is not None
        assert end <= confirmed <= checkpoint

    def test_snapshot_stream_and_compact_on_s3_give_a_staged_table_equal_to_the_source(
        self, source: SourceDb, s3_settings: Settings
    ) -> None:
        """cdc snapshot, stream, `cdc compact` (staged and history), `cdc query` and `cdc
        status` all work on an s3:// lake."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text, n int)")
        source.execute("INSERT INTO t SELECT g, 'v' || g, g FROM generate_series(1, 3000) g")
        lake = lake_of(s3_settings)
        ConsistentSnapshot(s3_settings, lake, chunk_rows=700).run()
        source.execute("UPDATE t SET v = 'new', n = n + 1 WHERE id % 7 = 0")
        source.execute("DELETE FROM t WHERE id % 11 = 0")
        source.execute("INSERT INTO t VALUES (5000, 'late', 0)")
        run_streamer(s3_settings, lake)

        s = s3_settings
        common = ["--lake", s.lake, "--s3-endpoint", s.s3_endpoint, "--slot", s.slot]
        compacted = run_cdc(["compact", *common])
        assert compacted.returncode == 0, compacted.stderr
        assert staged_rows(lake, "public.t") == source_rows(source, "t")
        history = run_cdc(["query", "--lake", s.lake, "--s3-endpoint", s.s3_endpoint, "--format",
                           "csv", "SELECT count(*) FILTER (WHERE _is_current) AS current, "
                           "count(*) FILTER (WHERE _op = 'u') AS updated FROM history_public.t"])
        assert history.returncode == 0, history.stderr
        assert history.stdout == f"current,updated\n{len(source_rows(source, 't'))},428\n"
        status = run_cdc(["status", "--dsn", s.dsn, "--json", *common])
        assert status.returncode == 0, status.stderr
        table = json.loads(status.stdout)["tables"][0]
        assert table["table"] == "public.t"
        assert table["staged_commit_lsn"] is not None
        assert table["history_commit_lsn"] == table["staged_commit_lsn"]
        assert table["compaction_lag_seconds"] == 0.0

    def test_compaction_from_the_floor_and_raw_consolidation_work_on_s3(
        self, source: SourceDb, s3_settings: Settings
    ) -> None:
        """The second run lists partitions from the recorded floor (folder listings on S3),
        and `cdc maintain raw` consolidates a closed day's files: staged stays the source."""
        from cdc.lake.maintain import consolidate
        from cdc.staged.compactor import staged_watermark

        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        settings = with_settings(s3_settings, flush_rows=10)
        lake = lake_of(settings)
        Streamer(settings, lake).prepare()
        source.execute("INSERT INTO t SELECT g, g FROM generate_series(1, 50) g")
        run_streamer(settings, lake)
        compact_lake(lake, settings.slot)
        today = dt.datetime.now(dt.UTC).date()
        old = today - dt.timedelta(days=5)
        for key in lake.list("raw/public.t/"):  # as if streamed five days ago
            data = lake.read_bytes(key)
            assert data is not None
            lake.write_bytes(key.replace(f"load_date={today}", f"load_date={old}"), data)
            lake.delete(key)
        source.execute("UPDATE t SET v = -v WHERE id % 3 = 0")
        run_streamer(settings, lake)
        compact_lake(lake, settings.slot)
        assert staged_rows(lake, "public.t") == source_rows(source, "t")

        watermark = staged_watermark(lake, "public.t")[0]
        [day] = consolidate(lake, today - dt.timedelta(days=1), {"public.t": watermark},
                            today=today)
        assert (day.load_date, day.files_after, day.changes) == (str(old), 1, 50)
        assert len(lake.list(f"raw/public.t/load_date={old}/")) == 1
        source.execute("DELETE FROM t WHERE id < 5")
        run_streamer(settings, lake)
        compact_lake(lake, settings.slot)
        assert staged_rows(lake, "public.t") == source_rows(source, "t")

    def test_delta_commits_on_s3_are_conditional_puts(
        self, source: SourceDb, s3_settings: Settings, moto_endpoint: str
    ) -> None:
        """Each _delta_log commit is a put-if-absent (If-None-Match: *): no lost commits."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        source.execute("INSERT INTO t SELECT g, g FROM generate_series(1, 10) g")
        with FaultProxy(moto_endpoint, seed=1) as proxy:
            settings = with_settings(s3_settings, s3_endpoint=proxy.url)
            lake = lake_of(settings)
            ConsistentSnapshot(settings, lake).run()
            compact_lake(lake, settings.slot)
        commits = [r for r in proxy.requests
                   if r[0] == "PUT" and "/_delta_log/" in r[1] and r[1].endswith(".json")]
        assert commits
        assert all(r[3].get("if-none-match") == "*" for r in commits), commits


class TestUnreliableS3:
    def test_a_stream_and_compaction_through_failing_and_slow_requests_lose_nothing(
        self, source: SourceDb, s3_settings: Settings, moto_endpoint: str, streaming: Any
    ) -> None:
        """With 20% of requests failing and 30% delayed, raw and staged end complete."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int, note text)")
        with FaultProxy(moto_endpoint, fail_rate=0.2, delay_rate=0.3, max_delay=0.05) as proxy:
            # the dice may spare the few staged requests: make sure both writers see a failure
            proxy.fail_first = {"/raw/", "/staged/"}
            settings = with_settings(s3_settings, s3_endpoint=proxy.url, flush_rows=40,
                                     s3_max_attempts=12)
            lake = lake_of(settings)
            streaming(settings, lake)
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            for n in range(12):
                source.execute("INSERT INTO t SELECT g, 0, 'n' || g FROM "
                               "generate_series(%s::int, %s::int) g", (n * 40, n * 40 + 39))
                source.execute("UPDATE t SET v = v + 1 WHERE id %% 5 = %s", (n % 5,))
                source.execute("DELETE FROM t WHERE id = %s", (n * 13,))
                if n % 4 == 3:
                    compact_lake(lake, settings.slot)
            end = source.current_lsn()
            wait_for(lambda: (source.slot_confirmed_lsn() or 0) >= end, timeout=120,
                     what="the stream to acknowledge the workload")
            compact_lake(lake, settings.slot)
            assert proxy.failed() > 0
            failed = [r[1] for r in proxy.requests if r[2] >= 500]
            assert any("/raw/" in path for path in failed)  # boto3 retried these
            assert any("/staged/" in path for path in failed)  # and delta-rs these

        healthy = lake_of(s3_settings)
        expected = {r["id"]: r for r in source_rows(source, "t")}
        assert replay(read_raw(healthy, "public.t")) == expected
        assert staged_rows(healthy, "public.t") == source_rows(source, "t")

    def test_exhausted_retries_stop_the_stream_unacknowledged_and_a_rerun_delivers_all(
        self, source: SourceDb, s3_settings: Settings, moto_endpoint: str,
        monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Every raw PUT failing: exit 6 with one line, slot not past durable; healed: all."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        with FaultProxy(moto_endpoint, seed=7) as proxy:
            settings = with_settings(s3_settings, s3_endpoint=proxy.url)
            lake = lake_of(settings)
            Streamer(settings, lake).prepare()
            source.execute("INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 500) g")
            source.execute("UPDATE t SET v = 'u' WHERE id <= 10")
            monkeypatch.setenv("CDC_S3_MAX_ATTEMPTS", "2")
            args = ["stream", "--until-caught-up", "--dsn", settings.dsn, "--lake", settings.lake,
                    "--s3-endpoint", proxy.url, "--slot", settings.slot, "--publication",
                    settings.publication, "--compact-every", "0"]

            proxy.fail_paths = ("/raw/",)
            failed = run_cdc(args)
            durable = CheckpointStore(lake_of(s3_settings), settings.slot).load()
            after_failure = source.slot_confirmed_lsn()
            proxy.fail_paths, proxy.fail_all = (), True
            refused = run_cdc(args)
            proxy.fail_all = False
            healed = run_cdc(args)

        for result in (failed, refused):
            assert result.returncode == 6, result.stderr
            errors = [line for line in result.stderr.splitlines() if "cdc: error:" in line]
            assert len(errors) == 1, result.stderr
            assert "cannot write s3://" in errors[0]
            assert "kept failing after 2 attempts" in errors[0]
            assert SECRET not in result.stderr
        assert "/lake/raw/public.t/" in failed.stderr
        assert healed.returncode == 0, healed.stderr
        rows = read_raw(lake_of(s3_settings), "public.t")
        first_commit = min(r["_commit_lsn"] for r in rows)
        assert after_failure is not None
        assert durable is not None
        assert after_failure <= durable < first_commit
        expected = {r["id"]: r for r in source_rows(source, "t")}
        assert replay(rows) == expected
