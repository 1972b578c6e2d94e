"""``cdc ddl athena``: Athena (Glue catalog) DDL for the lake's raw and staged tables.

- raw ``raw/<schema>.<table>/`` → ``<database>.raw_<schema>__<table>``: parquet, every
  source column plus the metadata columns, ``PARTITIONED BY (load_date string)`` with
  partition projection (``projection.load_date.type = date``, range from the first
  partition to ``NOW``), so no crawler or ``MSCK REPAIR`` is needed as days go by;
- staged ``staged/<schema>.<table>/`` → ``<database>.<schema>__<table>``:
  ``TBLPROPERTIES ('table_type'='DELTA')``; Athena reads the columns from the Delta log
  (they are listed in a comment for reference);
- history ``history/<schema>.<table>/`` → ``<database>.history_<schema>__<table>``, a Delta
  table like staged.

Athena table names have no dots, hence ``<schema>__<table>`` (other names:
``cdc.ops.names``). Arrow types map to Athena types (:func:`athena_type`);
``timestamp[us, UTC]`` becomes ``timestamp``: Athena's parquet timestamps carry no zone,
the values are UTC.
"""

from __future__ import annotations

import pyarrow as pa
from deltalake import DeltaTable

from cdc.errors import ConfigError, HistoryTableUnreadable, LakeError, StagedTableUnreadable
from cdc.history.writer import history_location
from cdc.lake.layout import display_name, staged_key
from cdc.lake.store import Lake
from cdc.ops.names import athena_name
from cdc.ops.query import history_tables, raw_schema, raw_tables, staged_tables


def athena_type(t: pa.DataType) -> str:
    """The Athena (Hive DDL) type that reads a parquet column of Arrow type ``t``."""
    simple = {
        pa.int8(): "tinyint", pa.int16(): "smallint", pa.int32(): "int", pa.int64(): "bigint",
        pa.float32(): "float", pa.float64(): "double", pa.bool_(): "boolean",
        pa.date32(): "date", pa.string(): "string", pa.large_string(): "string",
        pa.binary(): "binary", pa.large_binary(): "binary",
    }
    if t in simple:
        return simple[t]
    if pa.types.is_decimal(t):
        if t.precision > 38:
            raise _unsupported(t)
        return f"decimal({t.precision},{t.scale})"
    if pa.types.is_timestamp(t):
        return "timestamp"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"array<{athena_type(t.value_type)}>"
    if pa.types.is_struct(t):
        fields = ",".join(f"{f.name}:{athena_type(f.type)}" for f in t)
        return f"struct<{fields}>"
    raise _unsupported(t)


def _unsupported(t: pa.DataType) -> LakeError:
    return LakeError(f"Arrow type {t} has no Athena equivalent",
                     fix="leave the column out of the generated DDL by hand, or cast it at "
                     "the source")


def _q(name: str) -> str:
    if "`" in name:
        raise ConfigError(f"name {name!r} contains a backtick, which Athena cannot quote",
                          fix="rename it at the source")
    return f"`{name}`"


def _s(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _columns(schema: pa.Schema) -> tuple[list[tuple[str, str]], list[str]]:
    """(name, Athena type) of the columns Athena can read, and a note for each it cannot.

    Athena matches parquet columns by name, so a column left out is simply not read.
    """
    columns, skipped = [], []
    for f in schema:
        if f.name == "load_date":
            continue
        try:
            columns.append((f.name, athena_type(f.type)))
        except LakeError:
            skipped.append(f"-- column {f.name} ({f.type}) left out: Athena has no such type")
    return columns, skipped


def raw_ddl(database: str, table: str, schema: pa.Schema, location: str,
            first_day: str) -> str:
    """``CREATE EXTERNAL TABLE`` for one raw table at ``location`` (its folder, with /)."""
    readable, skipped = _columns(schema)
    columns = ",\n".join(f"  {_q(name)} {kind}" for name, kind in readable)
    return "".join(f"{note}\n" for note in skipped) + (
        f"CREATE EXTERNAL TABLE IF NOT EXISTS {_q(database)}.{_q(athena_name(table, raw=True))} "
        f"(\n{columns}\n)\n"
        f"COMMENT {_s(f'cdc raw change history of {display_name(table)}')}\n"
        "PARTITIONED BY (`load_date` string)\n"
        "STORED AS PARQUET\n"
        f"LOCATION {_s(location)}\n"
        "TBLPROPERTIES (\n"
        "  'projection.enabled'='true',\n"
        "  'projection.load_date.type'='date',\n"
        "  'projection.load_date.format'='yyyy-MM-dd',\n"
        f"  'projection.load_date.range'={_s(f'{first_day},NOW')},\n"
        "  'projection.load_date.interval'='1',\n"
        "  'projection.load_date.interval.unit'='DAYS',\n"
        f"  'storage.location.template'={_s(location + 'load_date=${load_date}/')}\n"
        ");"
    )


def staged_ddl(database: str, table: str, schema: pa.Schema | None, location: str,
               name: str | None = None) -> str:
    """``CREATE EXTERNAL TABLE`` for one staged (or, named, history) Delta table (columns
    from the Delta log)."""
    lines = []
    if schema is not None:
        readable, skipped = _columns(schema)
        lines.append(f"-- {display_name(table)} columns (read by Athena from the Delta log): "
                     + ", ".join(f"{name} {kind}" for name, kind in readable))
        lines.extend(skipped)
    lines.append(
        f"CREATE EXTERNAL TABLE IF NOT EXISTS {_q(database)}."
        f"{_q(name or athena_name(table, raw=False))}\n"
        f"LOCATION {_s(location)}\n"
        "TBLPROPERTIES ('table_type'='DELTA');")
    return "\n".join(lines)


def athena_ddl(lake: Lake, database: str = "cdc", location: str | None = None) -> str:
    """DDL for every raw and staged table of ``lake``, as stored under ``location``.

    ``location`` is the lake root in S3 (``s3://bucket/prefix``); by default the lake's own
    URI when it is in S3.
    """
    if location is None:
        if not lake.uri.startswith("s3://"):
            raise ConfigError(f"the lake {lake.uri} is not in S3, so Athena cannot read it there",
                              fix="pass --location s3://bucket/prefix where the lake is copied")
        root = lake.uri.rstrip("/")
    else:
        if not location.startswith("s3://"):
            raise ConfigError(f"--location {location!r} is not an S3 URI",
                              fix="write it as s3://bucket/prefix")
        root = location.rstrip("/")
    statements = [f"CREATE DATABASE IF NOT EXISTS {_q(database)};"]
    for table, keys in sorted(raw_tables(lake).items()):
        first_day = min(k.split("/")[2].removeprefix("load_date=") for k in keys)
        statements.append(raw_ddl(database, table, raw_schema(lake, keys, table),
                                  f"{root}/raw/{table}/", first_day))
    for table in staged_tables(lake):
        uri, storage = lake.delta_location(staged_key(table))
        target = f"{uri.rstrip('/')}/" if location is None else f"{root}/staged/{table}/"
        statements.append(staged_ddl(database, table,
                                     _delta_schema(uri, storage, StagedTableUnreadable), target))
    for table in history_tables(lake):
        uri, storage = history_location(lake, table)
        target = f"{uri.rstrip('/')}/" if location is None else f"{root}/history/{table}/"
        statements.append(staged_ddl(database, table,
                                     _delta_schema(uri, storage, HistoryTableUnreadable), target,
                                     athena_name(table, history=True)))
    return "\n\n".join(statements) + "\n"


def _delta_schema(uri: str, storage: dict[str, str] | None,
                  unreadable: type[StagedTableUnreadable | HistoryTableUnreadable]) -> pa.Schema:
    try:
        return pa.schema(DeltaTable(uri, storage_options=storage).schema().to_arrow())
    except Exception as exc:  # delta-rs raises DeltaError and plain Exception
        raise unreadable(uri, exc) from exc
