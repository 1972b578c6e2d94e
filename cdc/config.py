"""One frozen settings object from the config file, ``CDC_*`` env and flags.

Precedence: flags over environment over file over defaults. Every option of every
command is a field of ``Settings`` and has all three spellings: ``--flush-rows`` /
``CDC_FLUSH_ROWS`` / ``flush_rows`` in ``cdc.toml`` (top level or a ``[cdc]`` table);
``FLAG_NAMES`` lists the flags named otherwise (``--json`` is ``status_json``). Text from
the environment and the file goes through the field's parser (sizes, durations, lists,
booleans); everything is validated once, here.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from cdc.errors import ConfigError
from cdc.log import SecretStr

DEFAULT_CONFIG_FILE = "cdc.toml"
PLUGINS = ("pgoutput", "wal2json")
SNAPSHOT_MODES = ("consistent", "updated_at")
_NAME = re.compile(r"^[a-z0-9_]{1,63}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
               "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
               "tib": 2**40}
_DURATION_UNITS = {"": 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def _parse_int(value: object) -> int:
    if isinstance(value, bool) or not str(value).strip().lstrip("-").isdigit():
        raise ValueError(f"not a whole number: {value!r}")
    return int(str(value))


def parse_size(value: object) -> int:
    if isinstance(value, int):
        return value
    match = _SIZE.match(str(value))
    if not match:
        raise ValueError(f"not a size: {value!r} (use e.g. 64MB, 512KiB, 1000000)")
    return int(float(match.group(1)) * _SIZE_UNITS[(match.group(2) or "").lower()])


def parse_duration(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(f"not a duration: {value!r} (use e.g. 10s, 500ms, 2m)")
    return float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "").lower()]


def _parse_list(value: object) -> tuple[str, ...]:
    """A list, or ``,``-separated items."""
    items = value if isinstance(value, list | tuple) else str(value).split(",")
    return tuple(str(t).strip() for t in items if str(t).strip())


def parse_tables(value: object) -> tuple[str, ...]:
    """Table names: a list, or ``,``-separated items (commas inside "quoted names" stay)."""
    from cdc.names import split_table_list

    items = value if isinstance(value, list | tuple) else split_table_list(str(value))
    return tuple(str(t).strip() for t in items if str(t).strip())


def parse_bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {value!r} (use true or false)")


def _parse_key_items(value: object) -> tuple[str, ...]:
    """Key overrides: a list, or ``;``-separated ``schema.table=col1,col2`` items."""
    items = value if isinstance(value, list | tuple) else str(value).split(";")
    return tuple(str(k).strip() for k in items if str(k).strip())


def _setting(default: Any, parse: Callable[[object], Any] = str) -> Any:
    """A field of ``Settings`` with the parser its env / file / flag text goes through."""
    return field(default=default, metadata={"parse": parse})


@dataclass(frozen=True)
class Settings:
    """Every option of every command; the field name is the ``cdc.toml`` key and, upper-cased
    with ``CDC_`` in front, the environment variable. The flag is ``--<name-with-dashes>``
    except for the few in ``FLAG_NAMES``."""

    dsn: str = ""
    lake: str = "./lake"
    s3_endpoint: str = ""  # S3-compatible endpoint URL; else AWS_ENDPOINT_URL, else AWS
    s3_max_attempts: int = _setting(10, _parse_int)  # per S3 request, then LakeError
    slot: str = "cdc"
    publication: str = "cdc"
    tables: tuple[str, ...] = _setting((), parse_tables)
    # tables the publication cdc manages leaves out; keyless: refuse or insert-only
    exclude_tables: tuple[str, ...] = _setting((), parse_tables)
    keyless_tables: str = "refuse"
    plugin: str = "pgoutput"
    #: pgoutput binary transfer: auto (when exact for every published column), on, off;
    #: off by default: measured no faster (README "Binary transfer")
    binary: str = "off"
    # cdc stream
    flush_rows: int = _setting(200_000, _parse_int)
    flush_bytes: int = _setting(128 * 2**20, parse_size)  # estimated memory of buffered changes
    flush_seconds: float = _setting(10.0, parse_duration)
    status_seconds: float = _setting(10.0, parse_duration)
    progress_seconds: float = _setting(10.0, parse_duration)
    max_backoff_seconds: float = _setting(30.0, parse_duration)
    #: give a replication connection up after this long without any message; 0: the
    #: server's wal_sender_timeout (60 s when that is off)
    silence_seconds: float = _setting(0.0, parse_duration)
    #: a slot busy this long across reconnects is held by another consumer: stop
    slot_busy_seconds: float = _setting(300.0, parse_duration)
    heartbeat_seconds: float = _setting(60.0, parse_duration)  # 0 disables the heartbeat
    compact_every: float = _setting(60.0, parse_duration)  # seconds between compactions; 0: never
    until_caught_up: bool = _setting(False, parse_bool)
    # add new tables to a managed publication this often while streaming; 0: at start only
    table_sync_seconds: float = _setting(60.0, parse_duration)
    #: a table that joins the publication while the lake follows the slot is backfilled by
    #: the stream (a resync of it, recorded in _cdc/backfill/ before it joins)
    backfill_new_tables: bool = _setting(True, parse_bool)
    metrics_port: int = _setting(0, _parse_int)  # 0: no metrics endpoint
    publish_via_partition_root: bool = _setting(True, parse_bool)  # for a publication cdc creates
    contracts: str = ""  # folder of <schema>.<table>.toml schema contracts; "": none
    #: a value the stream cannot store exactly (NaN in numeric(p,s), a multi-dimensional
    #: array): "fail" stops without ack; "quarantine" puts the batch in raw/_rejected, holds
    #: compaction of the table and goes on (then: fix the column, cdc resync the table)
    unconvertible: str = "fail"
    # ``;``-separated schema.table=col1,col2 for tables without a primary key (compact, stream)
    keys: tuple[str, ...] = _setting((), _parse_key_items)
    # cdc snapshot
    snapshot_mode: str = "consistent"
    workers: int = _setting(2, _parse_int)
    chunk_rows: int = _setting(500_000, _parse_int)
    updated_at_column: str = "updated_at"
    updated_at: tuple[str, ...] = _setting((), _parse_list)  # schema.table=column overrides
    #: updated_at exports re-read rows changed this long before the previous run started
    #: (longer than the longest transaction), so late commits are not missed
    updated_at_lookback: float = _setting(300.0, parse_duration)
    # cdc resync
    resync_chunk_rows: int = _setting(100_000, _parse_int)
    resync_wait_seconds: float = _setting(300.0, parse_duration)
    # cdc compact (and the compaction inside cdc stream)
    history: bool = _setting(True, parse_bool)  # history/<schema>.<table>/ (SCD2) beside staged
    optimize_every: int = _setting(10, _parse_int)
    #: term of a staged table's single-writer compaction lease (renewed every third of it)
    lease_seconds: float = _setting(60.0, parse_duration)
    vacuum_retention_hours: int = _setting(168, _parse_int)
    # cdc maintain raw
    maintain_before: str = ""  # consolidate raw days before this UTC date (YYYY-MM-DD)
    retention_days: int | None = _setting(None, _parse_int)  # None: keep raw forever
    # cdc status: thresholds (None: not checked)
    status_json: bool = _setting(False, parse_bool)
    max_lag_bytes: int | None = _setting(None, parse_size)
    max_lag_seconds: float | None = _setting(None, parse_duration)
    max_compaction_lag_seconds: float | None = _setting(None, parse_duration)
    # cdc check, cdc slot drop
    check_json: bool = _setting(False, parse_bool)
    check_strict: bool = _setting(False, parse_bool)  # warnings fail too
    keep_publication: bool = _setting(False, parse_bool)  # even one cdc created
    # cdc query, cdc ddl athena
    query_format: str = "table"
    as_of: str = ""  # ISO 8601 time: query the tables as they were then (from history)
    as_of_lsn: str = ""  # a commit LSN (0/1A2B3C), likewise
    athena_database: str = "cdc"
    athena_location: str = ""
    # every command
    log_format: str = "console"
    log_level: str = "info"

    def __repr__(self) -> str:  # tracebacks with locals print this: never the password
        shown = ", ".join(f"{k}={v!r}" for k, v in self.redacted().items())
        return f"Settings({shown})"

    def redacted(self) -> dict[str, Any]:
        """The settings as safe to print (no password)."""
        from cdc.source.connection import describe

        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values["dsn"] = describe(self.dsn) if self.dsn else ""
        return values


FIELDS = tuple(f.name for f in fields(Settings))
_PARSERS: dict[str, Callable[[object], Any]] = {
    f.name: f.metadata.get("parse", str) for f in fields(Settings)}
# Flags whose name is not the field's: a generic word on one command (``cdc status --json``)
# gets a specific key, so a shared cdc.toml stays readable.
FLAG_NAMES = {"keys": "--key", "snapshot_mode": "--mode", "status_json": "--json",
              "check_json": "--json", "check_strict": "--strict",
              "query_format": "--format", "athena_database": "--database",
              "athena_location": "--location", "maintain_before": "--before"}


def flag_name(name: str) -> str:
    """The command-line flag of the setting ``name``."""
    return FLAG_NAMES.get(name, "--" + name.replace("_", "-"))


def _read_file(path: Path | None) -> dict[str, Any]:
    if path is None:
        default = Path(DEFAULT_CONFIG_FILE)
        if not default.exists():
            return {}
        path = default
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {path} not found",
                          fix="check --config / CDC_CONFIG") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}",
                          fix="fix the file's syntax") from exc
    section = data.get("cdc", data)
    beside = sorted(set(data) - {"cdc"}) if "cdc" in data else []
    if beside:
        raise ConfigError(f"config file {path} has keys beside its [cdc] table: "
                          f"{', '.join(beside)}",
                          fix="move them into the [cdc] table, or remove them")
    unknown = sorted(set(section) - set(FIELDS) - {"cdc"})
    if unknown:
        raise ConfigError(f"config file {path} has unknown keys: {', '.join(unknown)}",
                          fix=f"valid keys are: {', '.join(FIELDS)}")
    return {k: v for k, v in section.items() if k in FIELDS}


def load_settings(
    flags: Mapping[str, Any] | None = None,
    config_file: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    *,
    need_dsn: bool = True,
) -> Settings:
    """Merge file, environment and flags (``None`` flags are unset) and validate.

    ``need_dsn=False`` for commands that read only the lake (``cdc compact``).
    """
    env = os.environ if env is None else env
    config_file = config_file or env.get("CDC_CONFIG") or None
    merged: dict[str, Any] = _read_file(Path(config_file) if config_file else None)
    for name in FIELDS:
        value = env.get(f"CDC_{name.upper()}")
        if value is not None and value != "":
            merged[name] = value
    for name, value in (flags or {}).items():
        if value is not None:
            merged[name] = value
    values: dict[str, Any] = {}
    for name, value in merged.items():
        try:
            values[name] = _PARSERS[name](value)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{name}: {exc}",
                              fix=f"fix {flag_name(name)} / CDC_{name.upper()} / "
                                  f"{name} in the config file") from exc
    return validate(Settings(**values), need_dsn=need_dsn)


# Settings with a fixed set of values (what the error calls them, the values) ...
_CHOICES = {"plugin": ("output plugin", PLUGINS),
            "binary": ("binary transfer mode", ("auto", "on", "off")),
            "snapshot_mode": ("snapshot mode", SNAPSHOT_MODES),
            "log_format": ("log format", ("console", "json")),
            "log_level": ("log level", ("debug", "info", "warning", "error")),
            "keyless_tables": ("keyless tables policy", ("refuse", "insert-only")),
            "unconvertible": ("unconvertible-value policy", ("fail", "quarantine"))}
# ... and whole numbers with a least value.
_AT_LEAST = {"workers": 1, "chunk_rows": 1, "resync_chunk_rows": 1, "s3_max_attempts": 1,
             "optimize_every": 0, "vacuum_retention_hours": 0}


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def check_dsn(dsn: str) -> None:
    """A malformed DSN is a configuration error, told without the password it may hold."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    from cdc.log import redact_libpq

    scheme = _SCHEME.match(dsn)
    if scheme and scheme.group(1).lower() not in ("postgresql", "postgres"):
        raise ConfigError(f"the DSN's scheme {scheme.group(1)!r}:// is not PostgreSQL's",
                          fix="write postgresql://user:password@host:5432/db or key=value "
                          "pairs (host=... dbname=...)")
    try:
        conninfo_to_dict(dsn)
    except ProgrammingError as exc:
        raise ConfigError(f"the DSN is malformed: {redact_libpq(str(exc).strip())}",
                          fix="percent-encode special characters of a URL's password (@ %40, "
                          ": %3A, / %2F, % %25, space %20), or write key=value pairs with "
                          "'single-quoted' values") from None


def validate(s: Settings, *, need_dsn: bool = True) -> Settings:
    if need_dsn and not s.dsn:
        raise ConfigError("no source database given",
                          fix="pass --dsn postgresql://user@host/db or set CDC_DSN")
    if not 0 <= s.metrics_port <= 65535:
        raise ConfigError(f"metrics port {s.metrics_port} is not a TCP port",
                          fix="use 1-65535 for --metrics-port / CDC_METRICS_PORT (0: off)")
    for what in ("slot", "publication"):
        if not _NAME.match(getattr(s, what)):
            raise ConfigError(f"{what} name {getattr(s, what)!r} is not valid",
                              fix="use 1-63 characters of lower-case letters, digits and _")
    for what, (label, choices) in _CHOICES.items():
        if getattr(s, what) not in choices:
            raise ConfigError(f"{label} {getattr(s, what)!r} is not supported",
                              fix=f"set {flag_name(what)} / CDC_{what.upper()} to one of: "
                              f"{', '.join(choices)}")
    for what, least in _AT_LEAST.items():
        if getattr(s, what) < least:
            raise ConfigError(f"{what} must be at least {least}",
                              fix=f"fix {flag_name(what)} / CDC_{what.upper()}")
    if s.flush_rows < 1 or s.flush_bytes < 1 or s.flush_seconds <= 0:
        raise ConfigError("flush limits must be positive",
                          fix="check --flush-rows, --flush-bytes and --flush-seconds")
    if s.dsn:  # last: the other settings' errors come first
        check_dsn(s.dsn)
        object.__setattr__(s, "dsn", SecretStr(s.dsn))  # its repr never shows the password
    return s  # the S3 endpoint is checked where it is used (lake.s3.resolve_endpoint)
