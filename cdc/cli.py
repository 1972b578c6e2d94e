"""The ``cdc`` command line: config + flags → a pipeline; errors → one line and an exit code."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cdc import __version__
from cdc.config import Settings, load_settings
from cdc.errors import CdcError, ConfigError
from cdc.log import configure, scrub

if TYPE_CHECKING:
    from cdc.lake.store import Lake

app = typer.Typer(
    help="Stream a live PostgreSQL database into an analytics lake (raw parquet history "
    "and staged Delta tables) through logical replication.\n\n"
    "Every option also reads from a CDC_* environment variable and a key in cdc.toml; "
    "flags win over the environment, the environment over the file.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
slot_app = typer.Typer(help="Create or drop the replication slot and publication.",
                       no_args_is_help=True)
app.add_typer(slot_app, name="slot")

Dsn = Annotated[str | None, typer.Option(
    "--dsn", help="Source database, e.g. postgresql://user@host:5432/db (env: CDC_DSN)",
    show_default=False)]
LakeOpt = Annotated[str | None, typer.Option(
    "--lake", help="Lake root: a local folder or s3://bucket/prefix (env: CDC_LAKE; default: "
    "./lake)", show_default=False)]
S3EndpointOpt = Annotated[str | None, typer.Option(
    "--s3-endpoint", help="S3-compatible endpoint for an s3:// lake, e.g. "
    "http://127.0.0.1:9000 for MinIO; plain HTTP only when named here (env: CDC_S3_ENDPOINT, "
    "else AWS_ENDPOINT_URL; default: AWS S3)", show_default=False)]
S3MaxAttemptsOpt = Annotated[int | None, typer.Option(
    "--s3-max-attempts", help="Attempts per S3 request (adaptive retries) before the command "
    "stops with a lake error (env: CDC_S3_MAX_ATTEMPTS; default: 10)", show_default=False)]
SlotOpt = Annotated[str | None, typer.Option(
    "--slot", help="Replication slot name (env: CDC_SLOT; default: cdc)", show_default=False)]
PublicationOpt = Annotated[str | None, typer.Option(
    "--publication", help="Publication name; created when missing (env: CDC_PUBLICATION; "
    "default: cdc)", show_default=False)]
TablesOpt = Annotated[str | None, typer.Option(
    "--tables", help="Comma-separated schema.table list for a new publication (default: every "
    "table that qualifies, see cdc check; new ones are added as they appear) (env: CDC_TABLES)",
    show_default=False)]
ExcludeOpt = Annotated[str | None, typer.Option(
    "--exclude-tables", help="Comma-separated schema.table list cdc leaves out of the "
    "publication it manages (quote names with dots or capitals: '\"Sales.EU\".\"Orders\"') "
    "(env: CDC_EXCLUDE_TABLES)", show_default=False)]
KeylessOpt = Annotated[str | None, typer.Option(
    "--keyless-tables", help="Tables without a usable replica identity (no primary key, a "
    "DEFERRABLE key, REPLICA IDENTITY NOTHING): refuse them (publishing their updates would make"
    " the application's UPDATE/DELETE fail), or insert-only: publish only their inserts and "
    "truncates, for append-only tables (env: CDC_KEYLESS_TABLES; default: refuse)",
    show_default=False)]
PluginOpt = Annotated[str | None, typer.Option(
    "--plugin", help="Output plugin (env: CDC_PLUGIN; default: pgoutput)", show_default=False)]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", help="TOML config file (env: CDC_CONFIG; default: ./cdc.toml if present)",
    show_default=False)]
LogFormatOpt = Annotated[str | None, typer.Option(
    "--log-format", help="console or json (env: CDC_LOG_FORMAT; default: console)",
    show_default=False)]
ViaRootOpt = Annotated[bool | None, typer.Option(
    "--publish-via-partition-root/--no-publish-via-partition-root",
    help="For a publication cdc creates: publish partitions' changes as changes of their "
    "partitioned table, so they land under the parent (env: CDC_PUBLISH_VIA_PARTITION_ROOT; "
    "default: on, PostgreSQL 13+)", show_default=False)]
KeyOpt = Annotated[list[str] | None, typer.Option(
    "--key", help="Key of a table without a primary key, schema.table=col1,col2 (repeatable; "
    "env: CDC_KEYS, ;-separated); without one such a table is staged as an append of its "
    "inserts", show_default=False)]
ContractsOpt = Annotated[str | None, typer.Option(
    "--contracts", help="Folder of schema contracts, one <schema>.<table>.toml per checked "
    "table (columns, types, nullability; policy fail, quarantine or evolve) (env: "
    "CDC_CONTRACTS; default: none)", show_default=False)]
HistoryOpt = Annotated[str | None, typer.Option(
    "--history", help="on or off: maintain <lake>/history/<schema>.<table>/, every committed "
    "version of each row of a keyed table (SCD2), beside its staged table (env: CDC_HISTORY; "
    "default: on)", show_default=False)]
LeaseOpt = Annotated[str | None, typer.Option(
    help="Term of a staged table's single-writer compaction lease; a killed compactor holds "
    "a table at most this long (env: CDC_LEASE_SECONDS; default: 60s)", show_default=False)]
LogLevelOpt = Annotated[str | None, typer.Option(
    "--log-level", help="debug, info, warning, error (env: CDC_LOG_LEVEL; default: info)",
    show_default=False)]


def _open_lake(settings: Settings) -> Lake:
    from cdc.lake.store import open_lake

    return open_lake(settings.lake, s3_endpoint=settings.s3_endpoint,
                     s3_max_attempts=settings.s3_max_attempts)


def _settings(config: str | None, *, need_dsn: bool = True, **flags: Any) -> Settings:
    settings = load_settings(flags, config, need_dsn=need_dsn)
    configure(settings.log_format, settings.log_level)
    return settings


@app.command()
def stream(
    dsn: Dsn = None, lake: LakeOpt = None, slot: SlotOpt = None,
    publication: PublicationOpt = None, tables: TablesOpt = None, plugin: PluginOpt = None,
    config: ConfigOpt = None, log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    exclude_tables: ExcludeOpt = None, keyless_tables: KeylessOpt = None,
    table_sync_seconds: Annotated[str | None, typer.Option(
        help="Without --tables: add tables created meanwhile that qualify to the publication "
        "this often while streaming; 0: only at start (env: CDC_TABLE_SYNC_SECONDS; default: "
        "60s)", show_default=False)] = None,
    flush_rows: Annotated[int | None, typer.Option(
        help="Flush when this many changes are buffered (env: CDC_FLUSH_ROWS; default: 200000)",
        show_default=False)] = None,
    flush_bytes: Annotated[str | None, typer.Option(
        help="Flush when the buffered changes take about this much memory, e.g. 64MB "
        "(env: CDC_FLUSH_BYTES; default: 128MiB)", show_default=False)] = None,
    flush_seconds: Annotated[str | None, typer.Option(
        help="Flush when the oldest buffered change is this old, e.g. 10s "
        "(env: CDC_FLUSH_SECONDS; default: 10s)", show_default=False)] = None,
    until_caught_up: Annotated[bool | None, typer.Option(
        "--until-caught-up/--no-until-caught-up", help="Drain the slot up to the WAL position "
        "at start, flush, acknowledge and exit 0, for cron-style runs (env: "
        "CDC_UNTIL_CAUGHT_UP; default: off)", show_default=False)] = None,
    metrics_port: Annotated[int | None, typer.Option(
        help="Serve Prometheus metrics on this port (env: CDC_METRICS_PORT; default: off)",
        show_default=False)] = None,
    compact_every: Annotated[str | None, typer.Option(
        help="Compact raw into the staged Delta tables this often, in the background; 0 "
        "disables (env: CDC_COMPACT_EVERY; default: 60s)", show_default=False)] = None,
    keys: KeyOpt = None,
    publish_via_partition_root: ViaRootOpt = None, contracts: ContractsOpt = None,
    history: HistoryOpt = None,
    heartbeat_seconds: Annotated[str | None, typer.Option(
        help="When idle, write a logical message this often so a quiet database's slot "
        "keeps advancing; 0 disables (env: CDC_HEARTBEAT_SECONDS; default: 60s)",
        show_default=False)] = None,
    status_seconds: Annotated[str | None, typer.Option(
        help="Send the server a status update (acknowledgement) this often, e.g. 10s "
        "(env: CDC_STATUS_SECONDS; default: 10s)", show_default=False)] = None,
    progress_seconds: Annotated[str | None, typer.Option(
        help="Log a progress line this often (env: CDC_PROGRESS_SECONDS; default: 10s)",
        show_default=False)] = None,
    max_backoff_seconds: Annotated[str | None, typer.Option(
        help="Longest wait between reconnection attempts (env: CDC_MAX_BACKOFF_SECONDS; "
        "default: 30s)", show_default=False)] = None,
    unconvertible: Annotated[str | None, typer.Option(
        help="A value that cannot be stored exactly (NaN in numeric(p,s), a multi-dimensional "
        "array): fail stops without acknowledging it; quarantine writes its batch to "
        "raw/_rejected, holds compaction of the table and goes on, until you fix the column "
        "and run cdc resync --tables (env: CDC_UNCONVERTIBLE; default: fail)",
        show_default=False)] = None,
    silence_seconds: Annotated[str | None, typer.Option(
        help="Give the replication connection up and reconnect after this long without any "
        "message from the server (a stalled network path); 0: the server's "
        "wal_sender_timeout (env: CDC_SILENCE_SECONDS; default: 0)", show_default=False)] = None,
    slot_busy_seconds: Annotated[str | None, typer.Option(
        help="Stop (exit 4) when the slot stays held by another consumer this long "
        "(env: CDC_SLOT_BUSY_SECONDS; default: 5m)", show_default=False)] = None,
    lease_seconds: LeaseOpt = None,
) -> None:
    """Stream changes from the slot into <lake>/raw/ until stopped (Ctrl-C / SIGTERM flush,
    acknowledge and exit 0).

    Runs `cdc check` first and stops on what would harm the source. Creates the publication
    (an explicit, checked table list; tables created later are added when they qualify) and
    the slot when missing.
    A position is acknowledged to the slot only after everything up to it is durable in
    the lake and recorded in <lake>/_cdc/checkpoints/.
    """
    from cdc.stream.session import stream as run_stream

    settings = _settings(config, dsn=dsn, lake=lake, slot=slot, publication=publication,
                         tables=tables, plugin=plugin, log_format=log_format,
                         log_level=log_level, flush_rows=flush_rows, flush_bytes=flush_bytes,
                         flush_seconds=flush_seconds, metrics_port=metrics_port,
                         heartbeat_seconds=heartbeat_seconds, compact_every=compact_every,
                         keys=keys, publish_via_partition_root=publish_via_partition_root,
                         s3_endpoint=s3_endpoint, contracts=contracts,
                         s3_max_attempts=s3_max_attempts, until_caught_up=until_caught_up,
                         status_seconds=status_seconds, progress_seconds=progress_seconds,
                         max_backoff_seconds=max_backoff_seconds, history=history,
                         exclude_tables=exclude_tables, keyless_tables=keyless_tables,
                         table_sync_seconds=table_sync_seconds,
                         unconvertible=unconvertible,
                         silence_seconds=silence_seconds, slot_busy_seconds=slot_busy_seconds,
                         lease_seconds=lease_seconds)
    if settings.metrics_port:
        from cdc.ops.metrics import serve

        serve(settings.metrics_port)
    stats = run_stream(settings, _open_lake(settings),
                       until_caught_up=settings.until_caught_up)
    typer.echo(f"streamed {stats.changes} changes in {stats.transactions} transactions "
               f"into {stats.files} files", err=True)


@app.command()
def snapshot(
    dsn: Dsn = None, lake: LakeOpt = None, slot: SlotOpt = None,
    publication: PublicationOpt = None, tables: TablesOpt = None, plugin: PluginOpt = None,
    config: ConfigOpt = None, log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    publish_via_partition_root: ViaRootOpt = None, contracts: ContractsOpt = None,
    exclude_tables: ExcludeOpt = None, keyless_tables: KeylessOpt = None,
    snapshot_mode: Annotated[str | None, typer.Option(
        "--mode", help="consistent: every published table at one instant, tied to a new slot "
        "so `cdc stream` continues exactly where it ends. updated_at: rows whose updated_at "
        "column passed the stored watermark (cannot see deletes, and sees only the last "
        "version of a row between runs) (env: CDC_SNAPSHOT_MODE; default: consistent)",
        show_default=False)] = None,
    workers: Annotated[int | None, typer.Option(
        help="Parallel COPY connections (env: CDC_WORKERS; default: 2)",
        show_default=False)] = None,
    chunk_rows: Annotated[int | None, typer.Option(
        help="Rows per chunk (primary-key or CTID range) and per raw file (env: "
        "CDC_CHUNK_ROWS; default: 500000)", show_default=False)] = None,
    updated_at_column: Annotated[str | None, typer.Option(
        help="updated_at mode: the change-time column of every table (env: "
        "CDC_UPDATED_AT_COLUMN; default: updated_at)", show_default=False)] = None,
    updated_at: Annotated[list[str] | None, typer.Option(
        "--updated-at", help="updated_at mode: per-table column, schema.table=column "
        "(repeatable; env: CDC_UPDATED_AT, comma-separated)", show_default=False)] = None,
    updated_at_lookback: Annotated[str | None, typer.Option(
        help="updated_at mode: also re-read rows whose updated_at is at most this long before "
        "the previous run's start, e.g. 10m: more than your longest transaction, so a row "
        "committed late is not missed (env: CDC_UPDATED_AT_LOOKBACK; default: 5m; 0: off)",
        show_default=False)] = None,
) -> None:
    """Backfill the lake's raw layer from the tables' current contents.

    --mode consistent (default) creates the slot with an exported snapshot and copies every
    published table inside it: run it once, then `cdc stream`; the lake holds every row exactly
    once at the hand-over. Interrupted? Run it again: finished chunks are kept.

    --mode updated_at exports rows changed since the last run by an updated_at column
    (re-reading a --updated-at-lookback window), and `cdc compact` upserts them into staged.
    It cannot see deletes and sees only the last version of a row between runs: use it only
    where logical replication is not available.
    """

    settings = _settings(config, dsn=dsn, lake=lake, slot=slot, publication=publication,
                         tables=tables, plugin=plugin, log_format=log_format,
                         log_level=log_level, s3_endpoint=s3_endpoint,
                         publish_via_partition_root=publish_via_partition_root,
                         contracts=contracts, s3_max_attempts=s3_max_attempts,
                         snapshot_mode=snapshot_mode, workers=workers, chunk_rows=chunk_rows,
                         updated_at_column=updated_at_column, updated_at=updated_at,
                         exclude_tables=exclude_tables, keyless_tables=keyless_tables,
                         updated_at_lookback=updated_at_lookback)
    target = _open_lake(settings)
    if settings.snapshot_mode == "consistent":
        from cdc.snapshot.consistent import ConsistentSnapshot

        result = ConsistentSnapshot(settings, target, workers=settings.workers,
                                    chunk_rows=settings.chunk_rows).run()
        total = sum(result.rows.values())
        if result.already_done:
            typer.echo(f"snapshot into slot {settings.slot} already done at "
                       f"{_lsn(result.consistent_point)}: nothing to copy; run cdc stream "
                       f"--slot {settings.slot}", err=True)
            return
        typer.echo(f"snapshot {'resumed and ' if result.resumed else ''}done: {total} rows "
                   f"from {len(result.rows)} tables at {_lsn(result.consistent_point)}; "
                   f"now run cdc stream --slot {settings.slot}", err=True)
    else:  # updated_at (the settings know no other mode)
        from cdc.snapshot.updated_at import UpdatedAtExport, parse_column_overrides

        exported = UpdatedAtExport(settings, target,
                                   default_column=settings.updated_at_column,
                                   columns=parse_column_overrides(settings.updated_at),
                                   page_rows=settings.chunk_rows).run()
        typer.echo(f"updated_at export done: {sum(exported.values())} rows from "
                   f"{len(exported)} tables", err=True)


def _lsn(lsn: int) -> str:
    from cdc.events import format_lsn

    return format_lsn(lsn)


@app.command()
def status(
    dsn: Dsn = None, lake: LakeOpt = None, slot: SlotOpt = None, config: ConfigOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    publication: PublicationOpt = None,
    status_json: Annotated[bool | None, typer.Option(
        "--json/--no-json", help="Print JSON for machines (env: CDC_STATUS_JSON; default: "
        "off)", show_default=False)] = None,
    max_lag_bytes: Annotated[str | None, typer.Option(
        help="Exit 1 when the slot's unacknowledged WAL exceeds this, e.g. 1GB (env: "
        "CDC_MAX_LAG_BYTES; default: not checked)", show_default=False)] = None,
    max_lag_seconds: Annotated[str | None, typer.Option(
        help="Exit 1 when the stream is further behind the source than this, e.g. 5m (env: "
        "CDC_MAX_LAG_SECONDS; default: not checked)", show_default=False)] = None,
    max_compaction_lag_seconds: Annotated[str | None, typer.Option(
        help="Exit 1 when a staged table is further behind raw than this, e.g. 15m (env: "
        "CDC_MAX_COMPACTION_LAG_SECONDS; default: not checked)", show_default=False)] = None,
) -> None:
    """Show how far behind the slot, the raw layer and the staged tables are.

    Slot: active or not, restart/confirmed LSNs, the server's WAL position, retained WAL,
    wal_status and safe_wal_size. Lake: the checkpoint and each table's newest raw change,
    staged watermark and history watermark. With --max-lag-* thresholds it exits 1 with one
    line per breach (for cron or a health check).
    """
    import json

    from cdc.history.writer import history_watermark
    from cdc.ops.status import check, collect, render
    from cdc.staged.compactor import staged_watermark

    s = _settings(config, dsn=dsn, lake=lake, slot=slot, s3_endpoint=s3_endpoint,
                  s3_max_attempts=s3_max_attempts, status_json=status_json,
                  max_lag_bytes=max_lag_bytes, max_lag_seconds=max_lag_seconds,
                  max_compaction_lag_seconds=max_compaction_lag_seconds,
                  publication=publication)
    report = collect(s.dsn, _open_lake(s), s.slot, staged=staged_watermark,
                     history=history_watermark, publication=s.publication)
    reasons = check(report, max_lag_bytes=s.max_lag_bytes, max_lag_seconds=s.max_lag_seconds,
                    max_compaction_lag_seconds=s.max_compaction_lag_seconds)
    if s.status_json:
        typer.echo(json.dumps({**report.to_dict(), "breaches": reasons}, indent=2))
    else:
        typer.echo(render(report))
    for reason in reasons:
        typer.echo(f"cdc: lag: {reason}", err=True)
    if reasons:
        raise typer.Exit(1)



@app.command("check")
def check_cmd(
    dsn: Dsn = None, slot: SlotOpt = None, publication: PublicationOpt = None,
    tables: TablesOpt = None, exclude_tables: ExcludeOpt = None,
    keyless_tables: KeylessOpt = None, config: ConfigOpt = None,
    check_json: Annotated[bool | None, typer.Option(
        "--json/--no-json", help="Print JSON for machines (env: CDC_CHECK_JSON; default: "
        "off)", show_default=False)] = None,
    check_strict: Annotated[bool | None, typer.Option(
        "--strict/--no-strict", help="Exit 1 on warnings too (env: CDC_CHECK_STRICT; "
        "default: off)", show_default=False)] = None,
) -> None:
    """Preflight: what would break the source or be lost, one line per problem with its fix.

    Checks wal_level, free slots and WAL senders, the REPLICATION privilege,
    max_slot_wal_keep_size and the slot's wal_status, and every table the publication covers
    or would cover: a usable replica identity, UNLOGGED, partitioning and
    publish_via_partition_root, generated columns, columns named like cdc's metadata. Only
    reads the catalog. Exits 0 when there is no error (warnings are printed), 1 otherwise.
    `cdc stream`, `cdc snapshot` and `cdc slot create` run it first.
    """
    import json

    from cdc.source import publication as pub
    from cdc.source.connection import connect

    s = _settings(config, dsn=dsn, slot=slot, publication=publication, tables=tables,
                  exclude_tables=exclude_tables, keyless_tables=keyless_tables,
                  check_json=check_json, check_strict=check_strict)
    with connect(s.dsn) as conn:
        report = pub.check(conn, s)
    if s.check_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        for finding in report.findings:
            typer.echo(finding.line())
        if not report.findings:
            typer.echo(f"ok: {len(report.plan.cover)} tables, nothing would break or be lost")
    if report.errors or (s.check_strict and report.findings):
        raise typer.Exit(1)


@slot_app.command("create")
def slot_create(dsn: Dsn = None, slot: SlotOpt = None, publication: PublicationOpt = None,
                tables: TablesOpt = None, plugin: PluginOpt = None,
                publish_via_partition_root: ViaRootOpt = None,
                config: ConfigOpt = None, exclude_tables: ExcludeOpt = None,
                keyless_tables: KeylessOpt = None) -> None:
    """Create the publication and the replication slot (no-op for what exists), after the
    checks of `cdc check`."""
    from cdc.events import format_lsn
    from cdc.source import publication as pub
    from cdc.source.admin import Admin
    from cdc.source.connection import connect

    s = _settings(config, dsn=dsn, slot=slot, publication=publication, tables=tables,
                  plugin=plugin, publish_via_partition_root=publish_via_partition_root,
                  exclude_tables=exclude_tables, keyless_tables=keyless_tables)
    with connect(s.dsn) as conn:
        names = pub.prepare(conn, s)
        info, created = Admin(conn, s.dsn).ensure_slot(s.slot, s.plugin)
    lsn = format_lsn(info.confirmed_flush) if info.confirmed_flush else "?"
    typer.echo(f"slot {s.slot} {'created' if created else 'exists'} at {lsn}; "
               f"publication {', '.join(names)}")


@slot_app.command("drop")
def slot_drop(dsn: Dsn = None, slot: SlotOpt = None, publication: PublicationOpt = None,
              config: ConfigOpt = None,
              keep_publication: Annotated[bool | None, typer.Option(
                  "--keep-publication/--no-keep-publication", help="Leave the publication "
                  "even when cdc created it (env: CDC_KEEP_PUBLICATION; default: off)",
                  show_default=False)] = None) -> None:
    """Drop the replication slot so the server stops retaining WAL for it, and the publication
    when cdc created it (its COMMENT says so); says what it left."""
    from cdc.source import publication as pub
    from cdc.source.admin import Admin
    from cdc.source.connection import connect

    s = _settings(config, dsn=dsn, slot=slot, publication=publication,
                  keep_publication=keep_publication)
    with connect(s.dsn) as conn:
        dropped = Admin(conn, s.dsn).drop_slot(s.slot)
        said = [] if s.keep_publication else pub.drop(conn, s.dsn, s.publication)
    typer.echo(f"slot {s.slot} {'dropped' if dropped else 'did not exist'}")
    for line in said:
        typer.echo(line)
    if dropped:
        typer.echo(f"a lake that followed it now misses the changes from here on: `cdc stream` "
                   f"refuses it until `cdc snapshot --slot {s.slot}` takes a new snapshot "
                   "(or retire the pipeline)", err=True)


@app.command()
def compact(
    lake: LakeOpt = None, slot: SlotOpt = None, config: ConfigOpt = None,
    log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    tables: Annotated[str | None, typer.Option(
        "--tables", help="Comma-separated schema.table list to compact (env: CDC_TABLES; "
        "default: every table in raw)", show_default=False)] = None,
    keys: KeyOpt = None, history: HistoryOpt = None,
    optimize_every: Annotated[int | None, typer.Option(
        help="OPTIMIZE (compact small files) and VACUUM a staged table every N commits; "
        "0: never (env: CDC_OPTIMIZE_EVERY; default: 10)", show_default=False)] = None,
    vacuum_retention_hours: Annotated[int | None, typer.Option(
        help="VACUUM after OPTIMIZE deletes files removed longer ago than this (env: "
        "CDC_VACUUM_RETENTION_HOURS; default: 168)", show_default=False)] = None,
    lease_seconds: LeaseOpt = None,
) -> None:
    """Merge raw changes into the staged Delta tables <lake>/staged/<schema>.<table>/ now,
    and (unless --history off) every committed version of each keyed table's rows into
    <lake>/history/<schema>.<table>/.

    Applies every change below the stream's checkpoint exactly once (the applied position is
    recorded in each Delta commit), so running it again, or after a crash, is safe. Needs no
    source connection: it reads only the lake.
    """
    from cdc.staged.compactor import CompactOptions, compact_lake, parse_keys

    settings = _settings(config, need_dsn=False, lake=lake, slot=slot, tables=tables,
                         keys=keys, log_format=log_format, log_level=log_level,
                         s3_endpoint=s3_endpoint, s3_max_attempts=s3_max_attempts,
                         optimize_every=optimize_every,
                         vacuum_retention_hours=vacuum_retention_hours, history=history,
                         lease_seconds=lease_seconds)
    options = CompactOptions(optimize_every=settings.optimize_every,
                             vacuum_retention_hours=settings.vacuum_retention_hours,
                             lease_seconds=settings.lease_seconds)
    results = compact_lake(_open_lake(settings), settings.slot, settings.tables,
                           parse_keys(settings.keys), options=options,
                           history=settings.history)
    if not results:
        typer.echo(f"nothing to compact: slot {settings.slot} has no checkpoint in "
                   f"{settings.lake} yet, nor a finished updated_at export (cdc stream, cdc "
                   "snapshot or cdc snapshot --mode updated_at writes it)", err=True)
    from cdc.lake.layout import display_name

    failed = [r for r in results if r.error]
    for r in results:
        name = display_name(r.table)
        if r.error:
            typer.echo(f"{name}: FAILED: {scrub(r.error)}", err=True)
            continue
        if r.held_by:
            typer.echo(f"{name}: skipped, another compactor holds it: {r.held_by}", err=True)
            continue
        typer.echo(f"{name}: {r.changes} changes in {r.commits} commits, "
                   f"staged version {r.version if r.version is not None else '-'}", err=True)
    if failed:
        typer.echo("cdc: error: compaction failed for "
                   f"{', '.join(display_name(r.table) for r in failed)} (the other tables were "
                   "staged); see each table's line for the fix", err=True)
        raise typer.Exit(max(r.exit_code for r in failed))


maintain_app = typer.Typer(help="Upkeep of the lake's layers.", no_args_is_help=True)
app.add_typer(maintain_app, name="maintain")


@maintain_app.command("raw")
def maintain_raw(
    maintain_before: Annotated[str | None, typer.Option(
        "--before", help="Consolidate raw files of days before this UTC date, YYYY-MM-DD, "
        "at most yesterday (env: CDC_MAINTAIN_BEFORE; required)", show_default=False)] = None,
    lake: LakeOpt = None, config: ConfigOpt = None, s3_endpoint: S3EndpointOpt = None,
    s3_max_attempts: S3MaxAttemptsOpt = None,
    log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    retention_days: Annotated[int | None, typer.Option(
        "--retention-days", help="Also delete raw files older than N days whose changes are "
        "all staged (env: CDC_RETENTION_DAYS; default: keep raw forever)",
        show_default=False)] = None,
) -> None:
    """Consolidate each table's small raw files of closed days into large ones.

    Per table and day, the stream's files whose changes are all in the staged table are
    rewritten as a few files of up to a million changes (same partition, named by the lake
    contract), each written durably before the originals are removed; a reader that sees
    both dedupes on (_commit_lsn, _seq). Safe beside cdc stream and cdc compact. With
    --retention-days, older raw is deleted (a staged table can then no longer be rebuilt
    from raw).
    """
    from datetime import UTC, date, datetime

    from cdc.history.writer import history_watermark
    from cdc.lake.maintain import consolidate, expire
    from cdc.staged.compactor import staged_watermark
    from cdc.staged.files import raw_tables

    settings = _settings(config, need_dsn=False, lake=lake, log_format=log_format,
                         log_level=log_level, s3_endpoint=s3_endpoint,
                         s3_max_attempts=s3_max_attempts, maintain_before=maintain_before,
                         retention_days=retention_days)
    try:
        day = date.fromisoformat(settings.maintain_before)
    except ValueError as exc:
        raise ConfigError(f"--before {settings.maintain_before!r} is not a date",
                          fix="name the first day to keep as it is, e.g. --before "
                          "2026-11-01 (or CDC_MAINTAIN_BEFORE)") from exc
    store = _open_lake(settings)
    applied = {}  # below every watermark: staged's, and history's where it exists
    for table in raw_tables(store):
        marks = [staged_watermark(store, table)[0], history_watermark(store, table)]
        applied[table] = None if marks[0] is None else min(m for m in marks if m is not None)
    today = datetime.now(UTC).date()
    for r in consolidate(store, day, applied, today=today):
        typer.echo(f"{r.table} {r.load_date}: {r.files_before} files → {r.files_after} "
                   f"({r.changes} changes)", err=True)
    if settings.retention_days is not None:
        removed = expire(store, settings.retention_days, applied, today=today)
        typer.echo(f"{removed} raw files older than {settings.retention_days} days removed",
                   err=True)


@app.command()
def resync(
    dsn: Dsn = None, lake: LakeOpt = None, slot: SlotOpt = None, tables: TablesOpt = None,
    config: ConfigOpt = None, log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    resync_chunk_rows: Annotated[int | None, typer.Option(
        help="Rows per chunk, read in key order (env: CDC_RESYNC_CHUNK_ROWS; default: 100000)",
        show_default=False)] = None,
    resync_wait_seconds: Annotated[str | None, typer.Option(
        help="How long to wait for the stream's checkpoint to pass a chunk, e.g. 5m (env: "
        "CDC_RESYNC_WAIT_SECONDS; default: 5m)", show_default=False)] = None,
) -> None:
    """Re-read tables (--tables public.t) from the source while `cdc stream` keeps running,
    and replace their staged state at the next `cdc compact` (raw keeps its history).

    Chunks are read in key order between watermarks written into the WAL, with no lock held;
    changes racing with a chunk win over its rows. The way out after a rewriting ALTER COLUMN
    ... TYPE, a DROP + re-CREATE of a table, a value the stream could not store, or a table
    added to the publication after it had rows. `cdc stream` must run on the same slot.
    """
    from cdc.snapshot.resync import Resync

    settings = _settings(config, dsn=dsn, lake=lake, slot=slot, tables=tables,
                         log_format=log_format, log_level=log_level, s3_endpoint=s3_endpoint,
                         s3_max_attempts=s3_max_attempts, resync_chunk_rows=resync_chunk_rows,
                         resync_wait_seconds=resync_wait_seconds)
    if not settings.tables:
        raise ConfigError("cdc resync needs the tables to re-read",
                          fix="name them: cdc resync --tables public.invoice")
    target = _open_lake(settings)
    for table in settings.tables:
        result = Resync(settings, target, table, chunk_rows=settings.resync_chunk_rows,
                        wait_seconds=settings.resync_wait_seconds).run()
        typer.echo(f"{result.table}: resynced {result.rows} rows in {result.chunks} chunks "
                   f"({result.dropped} superseded by changes meanwhile); run cdc compact (or "
                   "let cdc stream's compaction) replace its staged state", err=True)


@app.command()
def query(
    sql: Annotated[str, typer.Argument(
        help="SQL (DuckDB dialect) over the lake's views: staged tables as <schema>.<table> "
        "(e.g. public.invoice), every committed version of each row as "
        "history_<schema>.<table> (with _valid_from, _valid_to, _is_current, ...), raw "
        "change history as raw_<schema>.<table> (e.g. raw_public.invoice, with _op, "
        "_commit_lsn, ... and load_date)",
        show_default=False)],
    lake: LakeOpt = None, config: ConfigOpt = None, s3_endpoint: S3EndpointOpt = None,
    s3_max_attempts: S3MaxAttemptsOpt = None,
    query_format: Annotated[str | None, typer.Option(
        "--format", help="table (DuckDB's rendering), csv (with a header) or json (one "
        "object per line) (env: CDC_QUERY_FORMAT; default: table)", show_default=False)] = None,
    as_of: Annotated[str | None, typer.Option(
        "--as-of", help="Run the query as of this time (ISO 8601, UTC unless a zone is given, "
        "e.g. 2026-11-30T12:00:00Z): each <schema>.<table> is that table as it was then, "
        "from its history (env: CDC_AS_OF)", show_default=False)] = None,
    as_of_lsn: Annotated[str | None, typer.Option(
        "--as-of-lsn", help="Like --as-of, right after the source commit at this LSN, "
        "e.g. 0/1A2B3C (exact: commit times can tie, LSNs cannot) (env: CDC_AS_OF_LSN)",
        show_default=False)] = None,
) -> None:
    """Run SQL over the lake with DuckDB, offline (no extension download, no source database).

    Example: cdc query "SELECT _op, count(*) FROM raw_public.invoice GROUP BY 1".
    Bad SQL or an unknown table exits 2 with one line naming the fix.
    """
    from cdc.history.as_of import parse_as_of
    from cdc.ops.query import query_main

    settings = _settings(config, need_dsn=False, lake=lake, s3_endpoint=s3_endpoint,
                         s3_max_attempts=s3_max_attempts, query_format=query_format,
                         as_of=as_of, as_of_lsn=as_of_lsn)
    query_main(_open_lake(settings), sql, settings.query_format,
               parse_as_of(settings.as_of or None, settings.as_of_lsn or None))


ddl_app = typer.Typer(help="Print DDL that lets other engines read the lake.",
                      no_args_is_help=True)
app.add_typer(ddl_app, name="ddl")


@ddl_app.command("athena")
def ddl_athena(
    lake: LakeOpt = None, config: ConfigOpt = None, s3_endpoint: S3EndpointOpt = None,
    s3_max_attempts: S3MaxAttemptsOpt = None,
    athena_database: Annotated[str | None, typer.Option(
        "--database", help="Athena (Glue) database the tables go into (env: "
        "CDC_ATHENA_DATABASE; default: cdc)", show_default=False)] = None,
    athena_location: Annotated[str | None, typer.Option(
        "--location", help="Where the lake is in S3, s3://bucket/prefix (env: "
        "CDC_ATHENA_LOCATION; default: --lake when it is an s3:// lake)",
        show_default=False)] = None,
) -> None:
    """Print CREATE EXTERNAL TABLE statements for Athena: every raw table (parquet,
    partition projection on load_date, no crawler needed) as raw_<schema>__<table>, every
    staged Delta table as <schema>__<table> and every history Delta table as
    history_<schema>__<table>.
    """
    from cdc.ops.athena import athena_ddl

    settings = _settings(config, need_dsn=False, lake=lake, s3_endpoint=s3_endpoint,
                         s3_max_attempts=s3_max_attempts, athena_database=athena_database,
                         athena_location=athena_location)
    typer.echo(athena_ddl(_open_lake(settings), settings.athena_database,
                          settings.athena_location or None), nl=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"cdc {__version__}")
        raise typer.Exit


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit")] = False,
          ) -> None:
    pass


def main() -> None:
    try:
        app()
    except CdcError as exc:
        for line in scrub(str(exc)).splitlines() or [""]:
            print(f"cdc: error: {line}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print("cdc: interrupted", file=sys.stderr)
        sys.exit(130)
