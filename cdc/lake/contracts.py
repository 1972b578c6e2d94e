"""Schema contracts: what a table must look like before its changes land in raw.

A contract folder (``--contracts DIR``) holds one TOML file per table, named
``<schema>.<table>.toml``::

    policy = "fail"            # fail | quarantine | evolve (default: fail)

    [columns.id]
    type = "bigint"            # as ``pg_type`` in the raw field metadata
    nullable = false

    [columns.price]
    type = "numeric(10,2)"

Tables without a file are not checked. The schema (missing column, unexpected
column, other type) is checked on every Relation message of the stream and
before a snapshot copies the table; ``nullable = false`` is checked on every
batch, vectorised, before it is written (inserts, updates and snapshot reads;
a delete carries only its key, and an unchanged TOASTed value is not a NULL).

On a violation the contract's policy applies:

- ``fail``: stop with :class:`ContractError` (nothing past it is acknowledged);
- ``quarantine``: the offending rows (all of the table's rows while its schema
  is off-contract) go to ``raw/_rejected/<schema>.<table>/...`` with a
  ``_reason`` column instead of ``raw/<schema>.<table>/``; the stream goes on;
- ``evolve``: log ``contract_drift`` and go on as if there were no contract.

Pure checking logic and a loader; the only I/O is reading the folder and
writing rejected batches through the lake.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import structlog

from cdc.decoding.pgtypes import ColumnType
from cdc.errors import ConfigError, ContractError
from cdc.events import Relation
from cdc.lake.checkpoint import ResyncHold
from cdc.lake.columns import lake_column
from cdc.lake.layout import table_segment
from cdc.lake.raw import RawSink, encode, file_key
from cdc.lake.store import Lake
from cdc.stream.batcher import Batch

log = structlog.get_logger("cdc.lake.contracts")

FAIL, QUARANTINE, EVOLVE = "fail", "quarantine", "evolve"
POLICIES = (FAIL, QUARANTINE, EVOLVE)
REJECTED_PREFIX = "raw/_rejected/"
REASON_COLUMN = "_reason"
# the fix of a broken contract under policy fail (schema or rows)
_FAIL_FIX = ("nothing past the last acknowledged change was acknowledged; change the source or "
             "the contract (or its policy to quarantine or evolve), then run again")
#: ops whose rows carry every column (a delete carries its key, a truncate nothing)
_FULL_ROW_OPS = pa.array(["c", "u", "r"], pa.string())
_ALIASES = {
    "int": "integer", "int4": "integer", "int2": "smallint", "int8": "bigint",
    "bool": "boolean", "float4": "real", "float8": "double precision",
    "float": "double precision", "decimal": "numeric", "varchar": "character varying",
    "char": "character", "bpchar": "character", "timestamp": "timestamp without time zone",
    "timestamptz": "timestamp with time zone", "time": "time without time zone",
    "timetz": "time with time zone",
}
_TYPE = re.compile(r"^(?P<base>[^(\[]+?)\s*(?P<args>\([^)]*\))?\s*(?P<array>(\[\])*)$")


def normalize_type(name: str) -> str:
    """A type name as ``pg_type`` metadata spells it: ``int4`` → ``integer``,
    ``decimal(10, 2)`` → ``numeric(10,2)``, ``timestamptz`` → ``timestamp with time zone``."""
    text = " ".join(name.strip().lower().split())
    match = _TYPE.match(text)
    if not match:
        return text
    base = _ALIASES.get(match.group("base"), match.group("base"))
    args = (match.group("args") or "").replace(" ", "")
    return f"{base}{args}{match.group('array')}"


@dataclass(frozen=True)
class ColumnContract:
    name: str
    type: str | None  # normalised; None: any type
    nullable: bool = True


@dataclass(frozen=True)
class Violation:
    """One difference between a table and its contract."""

    table: str
    column: str
    expected: str
    found: str

    def __str__(self) -> str:
        return f"{self.table}: column {self.column}: expected {self.expected}, found {self.found}"


@dataclass(frozen=True)
class Contract:
    table: str  # schema.table
    policy: str
    columns: tuple[ColumnContract, ...]
    path: str = ""

    def violations(self, found: Iterable[tuple[str, str]]) -> list[Violation]:
        """Schema differences given the table's (column, pg type) pairs, in column order."""
        actual = dict(found)
        result = []
        for col in self.columns:
            if col.name not in actual:
                result.append(Violation(self.table, col.name, col.type or "a column",
                                        "no such column"))
            elif col.type is not None and normalize_type(actual[col.name]) != col.type:
                result.append(Violation(self.table, col.name, col.type, actual[col.name]))
        declared = {c.name for c in self.columns}
        result += [Violation(self.table, name, "no such column", pg_type)
                   for name, pg_type in actual.items() if name not in declared]
        return result

    @property
    def not_nullable(self) -> list[str]:
        return [c.name for c in self.columns if not c.nullable]


def parse_contract(table: str, doc: Mapping[str, Any], path: str = "") -> Contract:
    """A contract from a parsed TOML document; ConfigError names what is wrong."""
    where = path or table
    unknown = sorted(set(doc) - {"policy", "columns"})
    if unknown:
        raise ConfigError(f"contract {where} has unknown keys: {', '.join(unknown)}",
                          fix="use policy = \"fail|quarantine|evolve\" and [columns.<name>] "
                          "tables")
    policy = doc.get("policy", FAIL)
    if policy not in POLICIES:
        raise ConfigError(f"contract {where}: policy {policy!r} is not known",
                          fix=f"use one of: {', '.join(POLICIES)}")
    columns_doc = doc.get("columns")
    if not isinstance(columns_doc, dict) or not columns_doc:
        raise ConfigError(f"contract {where} declares no columns",
                          fix="add a [columns.<name>] table per column with type and nullable")
    columns = []
    for name, spec in columns_doc.items():
        if not isinstance(spec, dict) or set(spec) - {"type", "nullable"}:
            raise ConfigError(f"contract {where}: column {name} must be a table with only "
                              "type and nullable", fix=f"write [columns.{name}] type = "
                              "\"integer\" nullable = false")
        type_name = spec.get("type")
        nullable = spec.get("nullable", True)
        if (type_name is not None and not isinstance(type_name, str)) or not isinstance(
                nullable, bool):
            raise ConfigError(f"contract {where}: column {name}: type must be a string and "
                              "nullable true or false", fix="e.g. type = \"text\"")
        columns.append(ColumnContract(str(name), normalize_type(type_name) if type_name
                                      else None, nullable))
    return Contract(table, str(policy), tuple(columns), path)


def load_contracts(folder: str) -> dict[str, Contract]:
    """Every ``<schema>.<table>.toml`` of ``folder``; an empty folder name: none."""
    if not folder:
        return {}
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"contracts folder {folder} does not exist",
                          fix="fix --contracts / CDC_CONTRACTS")
    result = {}
    for path in sorted(root.glob("*.toml")):
        table = path.name.removesuffix(".toml")
        if table.count(".") != 1:
            raise ConfigError(f"contract file {path} is not named <schema>.<table>.toml",
                              fix="rename it, e.g. public.invoice.toml")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"contract file {path} cannot be read: {exc}",
                              fix="fix the file's TOML syntax") from exc
        result[table] = parse_contract(table, doc, str(path))
    return result


def rejected_key(batch: Batch, load_date: str) -> str:
    """``raw/_rejected/<schema>.<table>/load_date=.../<name>.parquet`` (raw's file name)."""
    return file_key(batch, load_date, prefix=REJECTED_PREFIX)


class Contracts:
    """The contracts of one run, applied to relations (schema) and batches (rows)."""

    def __init__(self, contracts: Mapping[str, Contract] | None = None) -> None:
        self.contracts = dict(contracts or {})

    @classmethod
    def load(cls, folder: str) -> Contracts:
        return cls(load_contracts(folder))

    def __bool__(self) -> bool:
        return bool(self.contracts)

    def covers(self, table: str) -> bool:
        return table in self.contracts

    def check_schema(self, relation: Relation,
                     types: Sequence[ColumnType]) -> list[Violation]:
        """Check a table's schema: raise under ``fail``, log under the other policies."""
        contract = self.contracts.get(relation.qualified_name)
        if contract is None:
            return []
        found = [(c.name, t.pg_type) for c, t in zip(relation.columns, types, strict=True)]
        violations = contract.violations(found)
        if violations:
            self._schema_violated(contract, violations)
        return violations

    def _schema_violated(self, contract: Contract, violations: list[Violation]) -> None:
        text = "; ".join(str(v) for v in violations)
        if contract.policy == FAIL:
            raise ContractError(
                f"schema contract broken: {text} (contract {contract.path or contract.table})",
                fix=_FAIL_FIX)
        log.warning("contract_drift" if contract.policy == EVOLVE else "contract_violation",
                    table=contract.table, policy=contract.policy, violations=text)

    def write(self, sink: RawSink, batch: Batch) -> tuple[Batch, str, int] | None:
        """Write a batch through the table's contract: rejected rows to ``raw/_rejected``,
        the rest to raw. Returns what went to raw, its key and size (None: nothing did).

        A batch with a value the stream could not store (``--unconvertible quarantine``)
        goes to ``raw/_rejected`` as text whole, and compaction of its table is held below
        it, so staged never passes the gap: ``cdc resync`` of the table releases it."""
        if batch.unconvertible is not None:
            segment = table_segment(batch.relation.schema, batch.relation.name)
            ResyncHold(sink.lake, segment).hold_at_most(batch.first_commit_lsn)
            reason = f"unconvertible: {batch.unconvertible}"
            write_rejected(sink.lake, replace(batch, table=batch.table.append_column(
                REASON_COLUMN, pa.repeat(pa.scalar(reason, pa.string()), batch.table.num_rows))))
            log.warning("compaction_held_until_resync", table=batch.qualified_name,
                        fix=f"fix the column, then cdc resync --tables {batch.qualified_name}")
            return None
        accepted, rejected = self.split(batch)
        if rejected is not None:  # durable in raw/_rejected: acknowledged like the rest
            write_rejected(sink.lake, rejected)
        if accepted is None:
            return None
        key, nbytes = sink.write(accepted)
        return accepted, key, nbytes

    def split(self, batch: Batch) -> tuple[Batch | None, Batch | None]:
        """(the rows to write to raw, the rows to write to ``raw/_rejected``), either None."""
        contract = self.contracts.get(batch.qualified_name)
        if contract is None or (contract.policy == EVOLVE and not contract.not_nullable):
            return batch, None
        table = batch.table
        n = table.num_rows
        schema = table.schema
        found = [(c.name, (schema.field(lake_column(c.name)).metadata or {}).get(
            b"pg_type", b"").decode()) for c in batch.relation.columns]
        violations = contract.violations(found)
        if violations and contract.policy == FAIL:
            self._schema_violated(contract, violations)
        if violations and contract.policy == QUARANTINE:
            reason = "schema: " + "; ".join(str(v) for v in violations)
            rejected = table.append_column(REASON_COLUMN,
                                           pa.repeat(pa.scalar(reason, pa.string()), n))
            return None, replace(batch, table=rejected)
        bad, reasons = self._null_rows(contract, table)
        if bad is None:
            return batch, None
        count = pc.sum(bad).as_py()
        if contract.policy == FAIL:
            first = reasons.filter(bad)[0].as_py()
            raise ContractError(
                f"schema contract broken: {contract.table}: {count} rows: {first} "
                f"(contract {contract.path or contract.table})",
                fix=_FAIL_FIX)
        if contract.policy == EVOLVE:
            log.warning("contract_drift", table=contract.table, policy=contract.policy,
                        rows=count, violations=reasons.filter(bad)[0].as_py())
            return batch, None
        rejected = table.filter(bad).append_column(REASON_COLUMN, reasons.filter(bad))
        accepted = table.filter(pc.invert(bad))
        return (replace(batch, table=accepted) if accepted.num_rows else None,
                replace(batch, table=rejected))

    @staticmethod
    def _null_rows(contract: Contract,
                   table: pa.Table) -> tuple[Any, Any]:
        """(rows with a NULL where the contract forbids it, their reasons), or (None, None)."""
        bad: Any = None
        reasons: Any = None
        full_rows: Any = None
        for source_name in contract.not_nullable:
            name = lake_column(source_name)
            if name not in table.column_names:
                continue  # a missing column is a schema violation, reported as such
            column = table[name]
            if column.null_count == 0:
                continue
            if full_rows is None:
                full_rows = pc.is_in(table["_op"], value_set=_FULL_ROW_OPS).combine_chunks()
            nulls = pc.and_(pc.is_null(column).combine_chunks(), full_rows)
            nulls = _without_unchanged(table, name, nulls)
            if not pc.any(nulls).as_py():
                continue
            reason = pc.if_else(nulls, pa.scalar(f"column {name}: expected NOT NULL, found NULL"),
                                pa.scalar(None, pa.string()))
            if bad is None:
                bad, reasons = nulls, reason
            else:
                bad = pc.or_(bad, nulls)
                reasons = pc.binary_join_element_wise(reasons, reason, "; ",
                                                      null_handling="skip")
        return bad, reasons


def _without_unchanged(table: pa.Table, name: str, nulls: pa.Array) -> pa.Array:
    """``nulls`` without the rows where ``name`` is NULL because its TOASTed value is unchanged."""
    unchanged = table["_unchanged"].combine_chunks()
    if unchanged.null_count == len(unchanged):
        return nulls
    parents = pc.list_parent_indices(unchanged)
    rows = pc.filter(parents, pc.equal(pc.list_flatten(unchanged), name)).cast(pa.int64())
    if len(rows) == 0:
        return nulls
    return pc.and_(nulls, pc.invert(pc.is_in(pa.arange(0, len(nulls)), value_set=rows)))


def write_rejected(lake: Lake, batch: Batch) -> str:
    """Write a rejected batch (raw columns + ``_reason``) durably; its key."""
    key = rejected_key(batch, datetime.now(UTC).strftime("%Y-%m-%d"))
    lake.write_bytes(key, encode(batch.table))
    log.warning("rows_rejected", table=batch.qualified_name, rows=batch.table.num_rows, key=key,
                reason=batch.table[REASON_COLUMN][0].as_py() if batch.table.num_rows else None)
    return key
