"""Commands that capture from the source: stream, snapshot, resync, check and slot admin."""

from __future__ import annotations

from typing import Annotated

import typer

from cdc.cli.options import (
    ConfigOpt,
    ContractsOpt,
    Dsn,
    ExcludeOpt,
    HistoryOpt,
    KeylessOpt,
    KeyOpt,
    LakeOpt,
    LeaseOpt,
    LogFormatOpt,
    LogLevelOpt,
    PluginOpt,
    PublicationOpt,
    ResyncChunkRowsOpt,
    ResyncWaitOpt,
    S3EndpointOpt,
    S3MaxAttemptsOpt,
    SlotOpt,
    TablesOpt,
    ViaRootOpt,
    _open_lake,
    _settings,
    app,
    lsn_text,
    option,
    slot_app,
)
from cdc.errors import ConfigError


@app.command()
def stream(
    dsn: Dsn = None, lake: LakeOpt = None, slot: SlotOpt = None,
    publication: PublicationOpt = None, tables: TablesOpt = None, plugin: PluginOpt = None,
    config: ConfigOpt = None, log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    exclude_tables: ExcludeOpt = None, keyless_tables: KeylessOpt = None,
    table_sync_seconds: Annotated[str | None, option("table_sync_seconds")] = None,
    backfill_new_tables: Annotated[bool | None, option("backfill_new_tables")] = None,
    flush_rows: Annotated[int | None, option("flush_rows")] = None,
    flush_bytes: Annotated[str | None, option("flush_bytes")] = None,
    flush_seconds: Annotated[str | None, option("flush_seconds")] = None,
    until_caught_up: Annotated[bool | None, option("until_caught_up")] = None,
    metrics_port: Annotated[int | None, option("metrics_port")] = None,
    compact_every: Annotated[str | None, option("compact_every")] = None,
    keys: KeyOpt = None,
    publish_via_partition_root: ViaRootOpt = None, contracts: ContractsOpt = None,
    history: HistoryOpt = None,
    heartbeat_seconds: Annotated[str | None, option("heartbeat_seconds")] = None,
    status_seconds: Annotated[str | None, option("status_seconds")] = None,
    progress_seconds: Annotated[str | None, option("progress_seconds")] = None,
    max_backoff_seconds: Annotated[str | None, option("max_backoff_seconds")] = None,
    unconvertible: Annotated[str | None, option("unconvertible")] = None,
    silence_seconds: Annotated[str | None, option("silence_seconds")] = None,
    slot_busy_seconds: Annotated[str | None, option("slot_busy_seconds")] = None,
    lease_seconds: LeaseOpt = None,
    resync_chunk_rows: ResyncChunkRowsOpt = None, resync_wait_seconds: ResyncWaitOpt = None,
    binary: Annotated[str | None, option("binary")] = None,
) -> None:
    """Stream changes from the slot into <lake>/raw/ until stopped (Ctrl-C / SIGTERM flush,
    acknowledge and exit 0).

    Runs `cdc check` first and stops on what would harm the source. Creates the publication
    (an explicit, checked table list; tables created later are added when they qualify) and
    the slot when missing.
    A position is acknowledged to the slot only after everything up to it is durable in
    the lake and recorded in <lake>/_cdc/checkpoints/.
    """
    from cdc.stream.streamer import stream as run_stream

    settings = _settings(locals())
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
    snapshot_mode: Annotated[str | None, option("snapshot_mode")] = None,
    workers: Annotated[int | None, option("workers")] = None,
    chunk_rows: Annotated[int | None, option("chunk_rows")] = None,
    updated_at_column: Annotated[str | None, option("updated_at_column")] = None,
    updated_at: Annotated[list[str] | None, option("updated_at")] = None,
    updated_at_lookback: Annotated[str | None, option("updated_at_lookback")] = None,
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

    settings = _settings(locals())
    target = _open_lake(settings)
    if settings.snapshot_mode == "consistent":
        from cdc.snapshot.consistent import ConsistentSnapshot

        result = ConsistentSnapshot(settings, target, workers=settings.workers,
                                    chunk_rows=settings.chunk_rows).run()
        total = sum(result.rows.values())
        if result.already_done:
            typer.echo(f"snapshot into slot {settings.slot} already done at "
                       f"{lsn_text(result.consistent_point)}: nothing to copy; run cdc stream "
                       f"--slot {settings.slot}", err=True)
            return
        typer.echo(f"snapshot {'resumed and ' if result.resumed else ''}done: {total} rows "
                   f"from {len(result.rows)} tables at {lsn_text(result.consistent_point)}; "
                   f"now run cdc stream --slot {settings.slot}", err=True)
    else:  # updated_at (the settings know no other mode)
        from cdc.snapshot.updated_at import UpdatedAtExport, parse_column_overrides

        exported = UpdatedAtExport(settings, target,
                                   default_column=settings.updated_at_column,
                                   columns=parse_column_overrides(settings.updated_at),
                                   page_rows=settings.chunk_rows).run()
        typer.echo(f"updated_at export done: {sum(exported.values())} rows from "
                   f"{len(exported)} tables", err=True)


@app.command("check")
def check_cmd(
    dsn: Dsn = None, slot: SlotOpt = None, publication: PublicationOpt = None,
    tables: TablesOpt = None, exclude_tables: ExcludeOpt = None,
    keyless_tables: KeylessOpt = None, config: ConfigOpt = None,
    check_json: Annotated[bool | None, option("check_json")] = None,
    check_strict: Annotated[bool | None, option("check_strict")] = None,
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

    s = _settings(locals())
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

    s = _settings(locals())
    with connect(s.dsn) as conn:
        names = pub.prepare(conn, s)
        info, created = Admin(conn, s.dsn).ensure_slot(s.slot, s.plugin)
    lsn = format_lsn(info.confirmed_flush) if info.confirmed_flush else "?"
    typer.echo(f"slot {s.slot} {'created' if created else 'exists'} at {lsn}; "
               f"publication {', '.join(names)}")


@slot_app.command("drop")
def slot_drop(dsn: Dsn = None, slot: SlotOpt = None, publication: PublicationOpt = None,
              config: ConfigOpt = None,
              keep_publication: Annotated[bool | None, option("keep_publication")] = None) -> None:
    """Drop the replication slot so the server stops retaining WAL for it, and the publication
    when cdc created it (its COMMENT says so); says what it left."""
    from cdc.source import publication as pub
    from cdc.source.admin import Admin
    from cdc.source.connection import connect

    s = _settings(locals())
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
def resync(
    dsn: Dsn = None, lake: LakeOpt = None, slot: SlotOpt = None, tables: TablesOpt = None,
    config: ConfigOpt = None, log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    resync_chunk_rows: ResyncChunkRowsOpt = None, resync_wait_seconds: ResyncWaitOpt = None,
) -> None:
    """Re-read tables (--tables public.t) from the source while `cdc stream` keeps running,
    and replace their staged state at the next `cdc compact` (raw keeps its history).

    Chunks are read in key order between watermarks written into the WAL, with no lock held;
    changes racing with a chunk win over its rows. A table without a key is read whole in the
    snapshot of a temporary replication slot (no lock; it needs a free slot). The way out after a
    rewriting ALTER COLUMN ... TYPE, a DROP + re-CREATE of a table, a value the stream could
    not store, or a table added to the publication after it had rows (`cdc stream` backfills
    those itself). `cdc stream` must run on the same slot.
    """
    from cdc.snapshot.resync import Resync

    settings = _settings(locals())
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


