"""wal2json (format-version 2) messages → the same change events as ``pgoutput``. Pure: no I/O.

The slot is read with ``format-version 2, include-xids, include-timestamp, include-lsn,
include-type-oids, include-typmod, include-pk`` (:data:`OPTIONS`). Each message is one JSON
object; values keep their text form (``parse_float``/``parse_int`` keep the digits, booleans
become ``t``/``f``), so the raw layer converts them exactly as it converts pgoutput's.

wal2json has no Relation message: one is synthesised from a change's columns (name, type
OID, typmod parsed from the type name, primary key from ``pk``) whenever a table is new or
its columns change. A change that does not name every column (a delete, a truncate, an
update leaving TOASTed columns out) takes the known Relation, or asks ``describe`` for it.

Limits of the plugin itself, not of this decoder: wal2json writes ``NaN`` and ``±Infinity``
of ``real``/``double precision``/``numeric`` columns as JSON ``null``, so such values
arrive as NULL; it has no table OIDs (relations get stable per-decoder numbers) and no
replica identity (the primary key is the key).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Container, Iterable, MutableSet
from datetime import datetime
from typing import Any

from cdc.decoding.pgtypes import BYTEA, NUMERIC
from cdc.errors import DecodeError, PublicationError
from cdc.events import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Event,
    Insert,
    Relation,
    Row,
    Truncate,
    Update,
    Value,
    parse_lsn,
)

#: START_REPLICATION options this decoder relies on
OPTIONS = (("format-version", "2"), ("include-xids", "1"), ("include-timestamp", "1"),
           ("include-lsn", "1"), ("include-type-oids", "1"), ("include-typmod", "1"),
           ("include-pk", "1"))

_NUMERIC_TYPMOD = re.compile(r"numeric\((\d+)(?:,(-?\d+))?\)")
_TYPMOD_TYPES = (NUMERIC, 1231)  # numeric, numeric[]: their typmod picks the Arrow type
_BYTEA = str(BYTEA)  # type OIDs are parsed as text (parse_int=str)
_EPOCH = datetime.fromisoformat("1970-01-01 00:00:00+00:00")

Describe = Callable[[str, str], Relation]
Generated = Callable[[str, str], Container[str]]
"""A table's generated columns: wal2json sends them, pgoutput (PostgreSQL 15) never does."""


def _micros(timestamp: str) -> int:
    delta = datetime.fromisoformat(timestamp) - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def type_modifier(type_name: str, type_oid: int) -> int:
    """The typmod that matters for conversion (numeric's precision and scale), else -1."""
    if type_oid not in _TYPMOD_TYPES:
        return -1
    m = _NUMERIC_TYPMOD.match(type_name)
    if m is None:
        return -1
    precision, scale = int(m[1]), int(m[2] or 0)
    return ((precision << 16) | (scale & 0x7FF)) + 4


def _text(value: Any, type_oid: Any = None) -> Value:
    if isinstance(value, str):
        # wal2json writes bytea's hex digits without pgoutput's \x prefix
        return "\\x" + value if type_oid == _BYTEA else value
    if value is None:
        return value
    if value is True:
        return "t"
    if value is False:
        return "f"
    return json.dumps(value, separators=(",", ":"))  # not produced by wal2json for a column


class Wal2JsonDecoder:
    """Stateful: remembers each table's columns to synthesise Relation events."""

    def __init__(self, tables: Iterable[tuple[str, str]] | None = None,
                 describe: Describe | None = None,
                 insert_only: Iterable[tuple[str, str]] = (),
                 generated: Generated | None = None) -> None:
        # the publication's tables; None: every table. A MutableSet other than a set (such
        # as source/catalog.PublishedTables) is kept: it may look up tables it has not seen
        self.tables: MutableSet[tuple[str, str]] | None = (
            None if tables is None else tables
            if isinstance(tables, MutableSet) and not isinstance(tables, set) else set(tables))
        self.describe = describe
        # tables published for inserts and truncates only (wal2json ignores publications)
        self.insert_only = set(insert_only)
        self.generated = generated
        #: generated columns per table, for the column names they were looked up for
        self._generated: dict[tuple[str, str], tuple[tuple[str, ...], Container[str]]] = {}
        self._keys: dict[tuple[str, str], tuple[tuple[str, ...], set[str]]] = {}
        self.relations: dict[tuple[str, str], Relation] = {}
        self.oids: dict[tuple[str, str], int] = {}

    def publish(self, tables: Iterable[tuple[str, str]], *, insert_only: bool = False) -> None:
        """Tables added to the publication while the stream runs."""
        added = set(tables)
        if self.tables is not None:
            self.tables |= added
        if insert_only:
            self.insert_only |= added

    def decode(self, payload: bytes) -> list[Event]:  # noqa: PLR0911, PLR0912  dispatch on the message's action letter
        try:
            msg = json.loads(payload, parse_float=str, parse_int=str)
            action = msg["action"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DecodeError(f"malformed wal2json message: {bytes(payload[:120])!r}",
                              fix="read the slot with format-version 2") from exc
        if action == "B":
            return [Begin(parse_lsn(msg["lsn"]), _micros(msg["timestamp"]), int(msg["xid"]))]
        if action == "C":
            return [Commit(0, parse_lsn(msg["lsn"]), parse_lsn(msg["nextlsn"]),
                           _micros(msg["timestamp"]))]
        if action not in ("I", "U", "D", "T"):
            return []  # M (logical messages) carry nothing for the raw layer
        table = (msg["schema"], msg["table"])
        if self.tables is not None and table not in self.tables:
            return []
        if action in ("U", "D") and table in self.insert_only:
            return []
        events: list[Event] = []
        columns = msg.get("columns")
        relation = self.relations.get(table)
        if relation is None and action != "I" and self.describe is not None:
            # an update may leave TOASTed columns out: only the catalog knows them all
            relation = self._described(table)
            events.append(relation)
        if columns is not None and (relation is None or action == "I" or not self._partial(
                relation, columns)):
            fresh = self._relation(table, columns, msg.get("pk") or [])
            if fresh != relation:
                relation = self.relations[table] = fresh
                events.append(fresh)
        if relation is None:
            relation = self._described(table)
            events.append(relation)
        oid = relation.oid
        if action == "T":
            events.append(Truncate((oid,), cascade=False, restart_identity=False))
            return events
        identity = msg.get("identity")
        old = None if identity is None else self._row(relation, identity, missing=None)
        full_old = identity is not None and len(identity) == len(relation.columns)
        if action == "D":
            if old is None:
                raise DecodeError(f"wal2json delete of {table[0]}.{table[1]} has no identity",
                                  fix="give the table a primary key or replica identity")
            events.append(Delete(oid, old, old_is_key=not full_old))
            return events
        new = self._row(relation, columns or [], missing=UNCHANGED)
        if action == "I":
            events.append(Insert(oid, new))
        else:
            if old is not None and not full_old:
                keys = [i for i, c in enumerate(relation.columns) if c.is_key]
                if all(old[i] == new[i] for i in keys):
                    old = None  # key unchanged: pgoutput sends no old tuple either
            events.append(Update(oid, new, old, old_is_key=old is not None and not full_old))
        return events

    @staticmethod
    def _partial(relation: Relation, columns: list[dict[str, Any]]) -> bool:
        """True when an update's columns are the known ones minus some (unchanged TOAST)."""
        known = {c.name: c.type_oid for c in relation.columns}
        return len(columns) < len(known) and all(
            known.get(c["name"]) == int(c.get("typeoid", -1)) for c in columns)

    def _oid(self, table: tuple[str, str]) -> int:
        return self.oids.setdefault(table, len(self.oids) + 1)

    def _relation(self, table: tuple[str, str], columns: list[dict[str, Any]],
                  pk: list[dict[str, Any]]) -> Relation:
        keys = {k["name"] for k in pk} or self._catalog_key(table, columns)
        skip = self._generated_columns(table, columns)
        cols = tuple(Column(c["name"], int(c["typeoid"]),
                            type_modifier(c.get("type", ""), int(c["typeoid"])),
                            c["name"] in keys) for c in columns if c["name"] not in skip)
        return Relation(self._oid(table), table[0], table[1], "d", cols)

    def _generated_columns(self, table: tuple[str, str],
                           columns: list[dict[str, Any]]) -> Container[str]:
        """Left out, as pgoutput leaves them out (looked up again when the columns change)."""
        if self.generated is None:
            return ()
        names = tuple(c["name"] for c in columns)
        cached = self._generated.get(table)
        if cached is None or cached[0] != names:
            cached = self._generated[table] = (names, self.generated(*table))
        return cached[1]

    def _catalog_key(self, table: tuple[str, str],
                     columns: list[dict[str, Any]]) -> set[str]:
        """The primary key when wal2json names none: it leaves a DEFERRABLE one out (the
        server's relcache knows only immediate primary keys), pgoutput's catalog does not."""
        if self.describe is None:
            return set()
        names = tuple(c["name"] for c in columns)
        cached = self._keys.get(table)
        if cached is None or cached[0] != names:
            try:
                key = {c.name for c in self.describe(*table).columns if c.is_key}
            except PublicationError:  # dropped since: as wal2json says, no key
                key = set()
            cached = self._keys[table] = (names, key)
        return cached[1]

    def _described(self, table: tuple[str, str]) -> Relation:
        if self.describe is None:
            raise DecodeError(f"wal2json sent a change of {table[0]}.{table[1]} without its "
                              "columns", fix="restart the stream")
        described = self.describe(*table)
        columns = tuple(  # typmods as _relation derives them, so the two compare equal
            Column(c.name, c.type_oid, c.type_modifier if c.type_oid in _TYPMOD_TYPES else -1,
                   c.is_key) for c in described.columns)
        relation = Relation(self._oid(table), table[0], table[1], "d", columns)
        self.relations[table] = relation
        return relation

    @staticmethod
    def _row(relation: Relation, columns: list[dict[str, Any]], missing: Value | None) -> Row:
        values = {c["name"]: _text(c.get("value"), c.get("typeoid")) for c in columns}
        return tuple(values.get(c.name, missing) for c in relation.columns)
