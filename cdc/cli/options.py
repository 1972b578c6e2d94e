"""The command line's apps, shared options (each a setting: flag, CDC_* variable, cdc.toml
key) and the step from flags to one frozen ``Settings``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from cdc.config import Settings, load_settings
from cdc.log import configure

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
ResyncChunkRowsOpt = Annotated[int | None, typer.Option(
    "--resync-chunk-rows", help="Rows per chunk of a re-read (cdc resync, and cdc stream's "
    "backfill of a table that joins the publication) (env: CDC_RESYNC_CHUNK_ROWS; default: "
    "100000)", show_default=False)]
ResyncWaitOpt = Annotated[str | None, typer.Option(
    "--resync-wait-seconds", help="How long a re-read waits for the stream's checkpoint to "
    "pass a chunk, e.g. 5m (env: CDC_RESYNC_WAIT_SECONDS; default: 5m)", show_default=False)]
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


def lsn_text(lsn: int) -> str:
    from cdc.events import format_lsn

    return format_lsn(lsn)
