"""Commands that work on the lake: status, compact, maintain, query and ddl."""

from __future__ import annotations

from typing import Annotated

import typer

from cdc.cli.help import COMPACT_TABLES
from cdc.cli.options import (
    ConfigOpt,
    Dsn,
    HistoryOpt,
    KeyOpt,
    LakeOpt,
    LeaseOpt,
    LogFormatOpt,
    LogLevelOpt,
    PublicationOpt,
    S3EndpointOpt,
    S3MaxAttemptsOpt,
    SlotOpt,
    _open_lake,
    _settings,
    app,
    option,
)
from cdc.errors import ConfigError
from cdc.log import scrub


@app.command()
def status(
    dsn: Dsn = None, lake: LakeOpt = None, slot: SlotOpt = None, config: ConfigOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    publication: PublicationOpt = None,
    status_json: Annotated[bool | None, option("status_json")] = None,
    max_lag_bytes: Annotated[str | None, option("max_lag_bytes")] = None,
    max_lag_seconds: Annotated[str | None, option("max_lag_seconds")] = None,
    max_compaction_lag_seconds: Annotated[str | None, option("max_compaction_lag_seconds")] = None,
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

    s = _settings(locals())
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



@app.command()
def compact(
    lake: LakeOpt = None, slot: SlotOpt = None, config: ConfigOpt = None,
    log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    s3_endpoint: S3EndpointOpt = None, s3_max_attempts: S3MaxAttemptsOpt = None,
    tables: Annotated[str | None, option("tables", text=COMPACT_TABLES)] = None,
    keys: KeyOpt = None, history: HistoryOpt = None,
    optimize_every: Annotated[int | None, option("optimize_every")] = None,
    vacuum_retention_hours: Annotated[int | None, option("vacuum_retention_hours")] = None,
    lease_seconds: LeaseOpt = None,
) -> None:
    """Merge raw changes into the staged Delta tables <lake>/staged/<schema>.<table>/ now,
    and (unless --history off) every committed version of each keyed table's rows into
    <lake>/history/<schema>.<table>/.

    Applies every change below the stream's checkpoint exactly once (the applied position is
    recorded in each Delta commit), so running it again, or after a crash, is safe. Needs no
    source connection: it reads only the lake.
    """
    from cdc.staged.compactor import CompactOptions
    from cdc.staged.runner import compact_lake, parse_keys

    settings = _settings(locals(), need_dsn=False)
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
    maintain_before: Annotated[str | None, option("maintain_before")] = None,
    lake: LakeOpt = None, config: ConfigOpt = None, s3_endpoint: S3EndpointOpt = None,
    s3_max_attempts: S3MaxAttemptsOpt = None,
    log_format: LogFormatOpt = None, log_level: LogLevelOpt = None,
    retention_days: Annotated[int | None, option("retention_days")] = None,
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

    settings = _settings(locals(), need_dsn=False)
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
    query_format: Annotated[str | None, option("query_format")] = None,
    as_of: Annotated[str | None, option("as_of")] = None,
    as_of_lsn: Annotated[str | None, option("as_of_lsn")] = None,
) -> None:
    """Run SQL over the lake with DuckDB, offline (no extension download, no source database).

    Example: cdc query "SELECT _op, count(*) FROM raw_public.invoice GROUP BY 1".
    Bad SQL or an unknown table exits 2 with one line naming the fix.
    """
    from cdc.history.as_of import parse_as_of
    from cdc.ops.query import query_main

    settings = _settings(locals(), need_dsn=False)
    query_main(_open_lake(settings), sql, settings.query_format,
               parse_as_of(settings.as_of or None, settings.as_of_lsn or None))


ddl_app = typer.Typer(help="Print DDL that lets other engines read the lake.",
                      no_args_is_help=True)
app.add_typer(ddl_app, name="ddl")


@ddl_app.command("athena")
def ddl_athena(
    lake: LakeOpt = None, config: ConfigOpt = None, s3_endpoint: S3EndpointOpt = None,
    s3_max_attempts: S3MaxAttemptsOpt = None,
    athena_database: Annotated[str | None, option("athena_database")] = None,
    athena_location: Annotated[str | None, option("athena_location")] = None,
) -> None:
    """Print CREATE EXTERNAL TABLE statements for Athena: every raw table (parquet,
    partition projection on load_date, no crawler needed) as raw_<schema>__<table>, every
    staged Delta table as <schema>__<table> and every history Delta table as
    history_<schema>__<table>.
    """
    from cdc.ops.athena import athena_ddl

    settings = _settings(locals(), need_dsn=False)
    typer.echo(athena_ddl(_open_lake(settings), settings.athena_database,
                          settings.athena_location or None), nl=False)


