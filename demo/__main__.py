"""``python -m demo``: media-retail sales streamed into a parquet lake, end to end.

Starts a throwaway PostgreSQL, seeds ``media_retail``, backfills it with
``cdc snapshot``, runs ``cdc stream`` while sales traffic flows, stops it with
SIGTERM and prints what landed (snapshot rows apart from changes); then
compacts raw into staged and history Delta tables, queries them with DuckDB and
prints one customer's address/email history and a repriced track's price history.
Exits non-zero if the streamer fails, does not acknowledge everything, or the
lake is missing changes the traffic made.

``--s3`` (``make demo LAKE=s3``) runs the same against the S3 API: an in-process
moto server on loopback with bucket ``media-retail``, every cdc command given
``--lake s3://media-retail/lake --s3-endpoint http://127.0.0.1:PORT``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow

from cdc.errors import CdcError
from cdc.sandbox import LocalCluster
from demo import DemoFailure, history, seed, staged, streamer, summary, traffic

DATABASE = "media_retail"
SLOT = PUBLICATION = "cdc_demo"
LAKE_ENTRIES = {"raw", "staged", "history", "_cdc"}
#: how long the streamer gets to acknowledge the end of traffic before SIGTERM
ACK_TIMEOUT = 60.0
S3_BUCKET = "media-retail"
S3_LAKE = f"s3://{S3_BUCKET}/lake"


@contextlib.contextmanager
def s3_server() -> Iterator[str]:
    """A moto S3 server on loopback with the demo bucket; sets the environment cdc reads."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log on the terminal
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    # a throwaway store: fake credentials, never the user's own
    os.environ.pop("AWS_PROFILE", None)
    os.environ.update(AWS_ACCESS_KEY_ID="demo", AWS_SECRET_ACCESS_KEY="demo",  # noqa: S106
                      AWS_DEFAULT_REGION="us-east-1", CDC_S3_ENDPOINT=endpoint)
    try:
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        print(f"moto S3 server on {endpoint}, bucket {S3_BUCKET!r}: cdc runs with "
              f"--lake {S3_LAKE} --s3-endpoint {endpoint}", flush=True)
        yield endpoint
    finally:
        server.stop()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lake", type=Path, default=Path(os.environ.get("LAKE_DIR", "lake")),
                   help="lake directory, wiped at start (env LAKE_DIR; default ./lake)")
    p.add_argument("--seconds", type=float, default=float(os.environ.get("DEMO_SECONDS", "30")),
                   help="how long traffic runs (env DEMO_SECONDS; default 30)")
    p.add_argument("--rate", type=float, default=50.0,
                   help="target transactions per second, 0 for flat out (default 50)")
    p.add_argument("--seed", type=int, default=42, help="random seed for data and traffic")
    p.add_argument("--stream-log", type=Path,
                   help="file for the streamer's output (default: a new temporary file)")
    p.add_argument("--no-stream", action="store_true",
                   help="run the cluster and traffic only, without cdc stream")
    p.add_argument("--s3", action="store_true",
                   help=f"use an S3 lake, {S3_LAKE}, on a moto S3 server started on loopback "
                   "(make demo LAKE=s3)")
    return p.parse_args(argv)


def prepare_lake(lake: Path) -> Path:
    """Wipe the demo lake, refusing anything that does not look like one."""
    lake = lake.resolve()
    if lake.exists():
        foreign = {p.name for p in lake.iterdir()} - LAKE_ENTRIES if lake.is_dir() else {"?"}
        if foreign:
            raise DemoFailure(f"refusing to wipe {lake}: it holds more than a lake "
                              f"({', '.join(sorted(foreign))}); choose another --lake")
        shutil.rmtree(lake)
    lake.mkdir(parents=True)
    return lake


def stream_traffic(admin: psycopg.Connection[TupleRow], dsn: str, args: argparse.Namespace,
                   problems: list[str]) -> traffic.TrafficReport:
    """Traffic with ``cdc stream`` running; stop it and check its acknowledgement."""
    log_path = args.stream_log or Path(tempfile.mkstemp(prefix="cdc-demo-stream-",
                                                        suffix=".log")[1])
    print(f"starting cdc stream (output in {log_path})", flush=True)
    with streamer.running(dsn, args.lake, SLOT, PUBLICATION, log_path) as proc:
        streamer.wait_for_slot(admin, proc, SLOT, PUBLICATION)
        print(f"slot {SLOT!r} and publication {PUBLICATION!r} exist; traffic starts",
              flush=True)
        report = traffic.run(dsn, seconds=args.seconds, seed=args.seed + 1, rate=args.rate)
        print(f"traffic ended at WAL {report.end_lsn}")
        waited = streamer.wait_until_acknowledged(admin, SLOT, report.end_lsn, ACK_TIMEOUT)
        if waited is None:
            print(f"the streamer has not acknowledged it after {ACK_TIMEOUT:.0f}s;"
                  " stopping it anyway (it flushes on SIGTERM)")
        else:
            print(f"the streamer flushed and acknowledged it {waited:.1f}s later")
        try:
            took = streamer.stop(proc)
            print(f"streamer stopped cleanly {took:.1f}s after SIGTERM (exit 0)")
        except DemoFailure as exc:
            problems.append(str(exc))
    confirmed = streamer.confirmed_flush(admin, SLOT)
    ok = streamer.lsn_int(confirmed) >= streamer.lsn_int(report.end_lsn)
    print(f"slot confirmed_flush_lsn {confirmed} {'>=' if ok else '<'} {report.end_lsn}"
          f" {'(everything acknowledged)' if ok else '(NOT everything acknowledged)'}")
    if not ok:
        problems.append(f"confirmed_flush_lsn {confirmed} is behind the end of traffic "
                        f"{report.end_lsn}")
    return report


def create_database(cluster: LocalCluster, seed_value: int) -> tuple[str, dict[str, int]]:
    """Create and seed the demo database; return its DSN and the rows seeded per table."""
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DATABASE)))
    dsn = cluster.dsn(DATABASE)
    with psycopg.connect(dsn, autocommit=True) as conn:
        seeded = seed.load(conn, seed_value)
    print(f"seeded {DATABASE}: " + ", ".join(f"{t} {n}" for t, n in seeded.items()))
    return dsn, seeded


def report_lake(summaries: list[summary.TableSummary], report: traffic.TrafficReport | None,
                lake: str | Path, seeded: dict[str, int]) -> list[str]:
    """Print what landed (against the snapshot and traffic, if streamed); return rows missing."""
    if report is not None:
        for s in summaries:
            schema, _, table = s.name.partition(".")
            if schema == "public" and table in seed.TABLES:
                s.made = report.made_in(table)
                s.made["r"] = seeded.get(table, 0)
    print(f"\nlake {lake}\n{summary.render(summaries)}\n")
    missing, extra = summary.compare(summaries)
    for note in extra:
        print(f"note: {note} (delivery is at-least-once)")
    if report is not None and not missing:
        print("every change the traffic made is in the lake")
    return missing


def run(args: argparse.Namespace) -> int:
    if not args.s3:
        return run_demo(args)
    with s3_server():
        args.lake = S3_LAKE
        return run_demo(args)


def run_demo(args: argparse.Namespace) -> int:
    started = time.monotonic()
    if not args.s3:
        args.lake = prepare_lake(args.lake)
    problems: list[str] = []
    tables = [f"public.{t}" for t in seed.TABLES]
    with LocalCluster() as cluster:
        print(f"PostgreSQL running on 127.0.0.1:{cluster.port}", flush=True)
        dsn, seeded = create_database(cluster, args.seed)
        with psycopg.connect(dsn, autocommit=True) as admin:
            if not args.no_stream:
                print("cdc snapshot: " + streamer.snapshot(dsn, args.lake, SLOT, PUBLICATION),
                      flush=True)
            if args.no_stream:
                report = traffic.run(dsn, seconds=args.seconds, seed=args.seed + 1,
                                     rate=args.rate)
            else:
                report = stream_traffic(admin, dsn, args, problems)
            summaries = summary.read_lake(args.lake, tables)
            summary.count_source(admin, summaries, tables)
            kinds = ", ".join(f"{n} {kind}" for kind, n in report.kinds.most_common())
            print(f"\n{report.transactions} transactions in {report.seconds:.1f}s"
                  + (f": {kinds}" if kinds else ""))
            problems += report_lake(summaries, None if args.no_stream else report, args.lake,
                                    seeded)
            if not args.no_stream:
                problems += staged.run(args.lake, SLOT, admin)
                problems += history.run(args.lake)
    print(f"demo took {time.monotonic() - started:.0f}s")
    if problems:
        raise DemoFailure("\n  ".join(["", *problems]))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except DemoFailure as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        return 1
    except CdcError as exc:
        print(f"demo FAILED: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
