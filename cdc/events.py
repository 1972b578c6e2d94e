"""Pure data: LSNs, relation descriptions and the change events of a replication stream.

A tuple's values are the text forms the server sent (``str``), ``None`` for
SQL NULL, or :data:`UNCHANGED` for a TOASTed value that the server did not send
because the update did not change it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Final

Lsn = int
"""A WAL position as an unsigned 64-bit integer (``0/16B3748`` in Postgres' notation)."""


def format_lsn(lsn: Lsn) -> str:
    """``0x16B3748`` → ``'0/16B3748'``, as Postgres writes LSNs."""
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def parse_lsn(text: str) -> Lsn:
    """``'0/16B3748'`` → ``0x16B3748``."""
    hi, sep, lo = text.strip().partition("/")
    if not sep:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(hi, 16) << 32) | int(lo, 16)


class _Unchanged:
    """Marker for an unchanged TOASTed value (pgoutput tuple kind ``u``)."""

    _instance: _Unchanged | None = None

    def __new__(cls) -> _Unchanged:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNCHANGED"


UNCHANGED: Final = _Unchanged()

Value = str | None | _Unchanged | bytes  # bytes: a binary value (cdc.decoding.binary)
Row = tuple[Value, ...]


class Op(StrEnum):
    """The ``_op`` column of the raw layer."""

    READ = "r"
    INSERT = "c"
    UPDATE = "u"
    DELETE = "d"
    TRUNCATE = "t"


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type_oid: int
    type_modifier: int
    is_key: bool


@dataclass(frozen=True, slots=True)
class Relation:
    """A table as the server describes it in a Relation message."""

    oid: int
    schema: str
    name: str
    replica_identity: str  # d default, n nothing, f full, i index
    columns: tuple[Column, ...]

    @property
    def qualified_name(self) -> str:
        """``schema.table`` with each part quoted where SQL needs it, so that ``"s.x".t`` and
        ``s."x.t"`` stay apart (``public.invoice`` for ordinary names)."""
        from cdc.names import quote_ident

        return f"{quote_ident(self.schema)}.{quote_ident(self.name)}"

    @property
    def key_columns(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.columns if c.is_key)


@dataclass(frozen=True, slots=True)
class Begin:
    final_lsn: Lsn  # LSN of the commit record
    commit_ts: int  # microseconds since the Unix epoch, UTC
    xid: int


@dataclass(frozen=True, slots=True)
class Commit:
    flags: int
    commit_lsn: Lsn
    end_lsn: Lsn  # position just past the commit record: what we acknowledge
    commit_ts: int  # microseconds since the Unix epoch, UTC


@dataclass(frozen=True, slots=True)
class Origin:
    commit_lsn: Lsn
    name: str


@dataclass(frozen=True, slots=True)
class TypeInfo:
    oid: int
    schema: str
    name: str


@dataclass(frozen=True, slots=True)
class Insert:
    relation_oid: int
    new: Row


@dataclass(frozen=True, slots=True)
class Update:
    relation_oid: int
    new: Row
    old: Row | None = None  # present under REPLICA IDENTITY FULL or when the key changed
    old_is_key: bool = False  # True when ``old`` holds only the key columns


@dataclass(frozen=True, slots=True)
class Delete:
    relation_oid: int
    old: Row
    old_is_key: bool


@dataclass(frozen=True, slots=True)
class Truncate:
    relation_oids: tuple[int, ...]
    cascade: bool
    restart_identity: bool


@dataclass(frozen=True, slots=True)
class Message:
    transactional: bool
    lsn: Lsn
    prefix: str
    content: bytes


Event = (
    Begin | Commit | Origin | Relation | TypeInfo | Insert | Update | Delete | Truncate | Message
)


def update_rows(relation: Relation, update: Update) -> list[tuple[str, Row]]:
    """The raw rows of one Update: a delete of the old key first when the key changed.

    With an old key tuple ('K') the server says the key changed. With a full old tuple
    ('O', REPLICA IDENTITY FULL) we compare the key columns, and take unchanged TOASTed
    values from the old tuple, which holds them in full.
    """
    new, old = update.new, update.old
    if old is None:
        return [("u", new)]
    if update.old_is_key:
        return [("d", old), ("u", new)]
    if UNCHANGED in new:
        new = tuple(o if n is UNCHANGED else n for n, o in zip(new, old, strict=True))
    keys = [i for i, c in enumerate(relation.columns) if c.is_key]
    if keys and any(old[i] != new[i] for i in keys):
        return [("d", old), ("u", new)]
    return [("u", new)]


def with_key(relation: Relation, key: Sequence[str]) -> Relation:
    """The relation with exactly ``key``'s columns flagged as key columns."""
    columns = tuple(replace(c, is_key=c.name in key) for c in relation.columns)
    return replace(relation, columns=columns)
