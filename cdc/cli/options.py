"""The command line's apps, shared options (each a setting: flag, CDC_* variable, cdc.toml
key) and the step from flags to one frozen ``Settings``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import TYPE_CHECKING, Annotated, Any

import typer

from cdc.cli.help import HELP
from cdc.config import FIELDS, Settings, flag_name, load_settings, parse_bool
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

#: settings that are on/off switches (``--x/--no-x``); ``--history`` takes on or off as a
#: value instead, as CDC_HISTORY and the file do
_SWITCHES = frozenset(f.name for f in fields(Settings)
                      if f.metadata.get("parse") is parse_bool) - {"history"}


def option(name: str, *, text: str | None = None) -> Any:
    """The typer option of setting ``name``: its flag (``config.flag_name``, with its
    ``--no-`` form for a switch) and its help (``cli/help.py``, or ``text``)."""
    flag = flag_name(name)
    declared = f"{flag}/--no-{flag[2:]}" if name in _SWITCHES else flag
    return typer.Option(declared, help=HELP[name] if text is None else text,
                        show_default=False)


# the options most commands share
Dsn = Annotated[str | None, option("dsn")]
LakeOpt = Annotated[str | None, option("lake")]
S3EndpointOpt = Annotated[str | None, option("s3_endpoint")]
S3MaxAttemptsOpt = Annotated[int | None, option("s3_max_attempts")]
SlotOpt = Annotated[str | None, option("slot")]
PublicationOpt = Annotated[str | None, option("publication")]
TablesOpt = Annotated[str | None, option("tables")]
ExcludeOpt = Annotated[str | None, option("exclude_tables")]
KeylessOpt = Annotated[str | None, option("keyless_tables")]
PluginOpt = Annotated[str | None, option("plugin")]
ConfigOpt = Annotated[str | None, typer.Option(
    "--config", help="TOML config file (env: CDC_CONFIG; default: ./cdc.toml if present)",
    show_default=False)]
LogFormatOpt = Annotated[str | None, option("log_format")]
LogLevelOpt = Annotated[str | None, option("log_level")]
ViaRootOpt = Annotated[bool | None, option("publish_via_partition_root")]
KeyOpt = Annotated[list[str] | None, option("keys")]
ContractsOpt = Annotated[str | None, option("contracts")]
HistoryOpt = Annotated[str | None, option("history")]
LeaseOpt = Annotated[str | None, option("lease_seconds")]
ResyncChunkRowsOpt = Annotated[int | None, option("resync_chunk_rows")]
ResyncWaitOpt = Annotated[str | None, option("resync_wait_seconds")]


def _open_lake(settings: Settings) -> Lake:
    from cdc.lake.store import open_lake

    return open_lake(settings.lake, s3_endpoint=settings.s3_endpoint,
                     s3_max_attempts=settings.s3_max_attempts)


def _settings(params: Mapping[str, Any], *, need_dsn: bool = True) -> Settings:
    """The settings from a command's parameters, which are named for their settings (plus
    ``config``): a command passes ``locals()`` first thing."""
    settings = load_settings({k: v for k, v in params.items() if k in FIELDS},
                             params.get("config"), need_dsn=need_dsn)
    configure(settings.log_format, settings.log_level)
    return settings


def lsn_text(lsn: int) -> str:
    from cdc.events import format_lsn

    return format_lsn(lsn)
