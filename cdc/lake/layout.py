"""Where everything lives in the lake: the one place lake keys are built and parsed.

Table names are data (invariant 9). A table's folder is one path segment that encodes its
(schema, table) pair injectively and reversibly (:func:`table_segment`,
:func:`segment_table`): each UTF-8 byte outside ``[a-z0-9_]`` is written ``-xx`` (two
lower-case hex digits) and the two parts are joined by the one ``.`` of the segment, so
ordinary names keep their folder (``public.invoice``), ``public."Foo"`` is
``public.-46oo``, ``"Sales.EU"."Order Items"`` is ``-53ales-2e-45-55.-4frder-20-49tems``;
no segment holds ``/``, ``%``, ``..`` or upper-case letters. A segment that would exceed
200 characters (names of 63 multi-byte characters) is written ``b32.<schema>.<table>``
with each part in unpadded lower-case base32 instead (two dots: never an escaped form).

``raw/<table>/load_date=YYYY-MM-DD/<first_commit_lsn>-<last_commit_lsn>-<tail>.parquet``
where ``<table>`` is the table's path segment (:func:`table_segment`), the LSNs are 16
upper-case hex digits and ``<tail>`` is the batch's first ``_seq`` (a stream batch) or a
label (a snapshot chunk). Writers, compaction, status and query all go through here.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass

from cdc.errors import LakeError
from cdc.events import Lsn
from cdc.names import TableName

RAW = "raw/"
STAGED = "staged/"
HISTORY = "history/"
_NAME = re.compile(r"^([0-9A-F]{16})-([0-9A-F]{16})-([^/]+)\.parquet$")
_SEQ = re.compile(r"^-?\d+$")


_KEEP = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_")
_ESCAPED = re.compile(r"^(?:[a-z0-9_]|-[0-9a-f]{2})+$")
_LONG = 200


def _escape(part: str) -> str:
    return "".join(chr(b) if b in _KEEP else f"-{b:02x}" for b in part.encode())


def _unescape(part: str) -> str | None:
    if not _ESCAPED.match(part):
        return None
    out, i = bytearray(), 0
    while i < len(part):
        if part[i] == "-":
            out.append(int(part[i + 1:i + 3], 16))
            i += 3
        else:
            out.append(ord(part[i]))
            i += 1
    try:
        text = out.decode()
    except UnicodeDecodeError:
        return None
    return text if _escape(text) == part else None  # one spelling per name


def _b32(part: str) -> str:
    return base64.b32encode(part.encode()).decode().rstrip("=").lower()


def _unb32(part: str) -> str | None:
    try:
        text = base64.b32decode(part.upper() + "=" * (-len(part) % 8)).decode()
    except (ValueError, UnicodeDecodeError):
        return None
    return text if text and _b32(text) == part else None


def table_segment(schema: str, table: str) -> str:
    """The one path segment that holds table (schema, table) in raw, staged and history."""
    segment = f"{_escape(schema)}.{_escape(table)}"
    if len(segment) > _LONG:
        segment = f"b32.{_b32(schema)}.{_b32(table)}"
    return segment


def segment_table(segment: str) -> TableName | None:
    """The (schema, table) a segment encodes; None for anything :func:`table_segment` never
    writes (a stray folder)."""
    parts = segment.split(".")
    if len(parts) == 2:
        schema, table = _unescape(parts[0]), _unescape(parts[1])
    elif len(parts) == 3 and parts[0] == "b32":
        schema, table = _unb32(parts[1]), _unb32(parts[2])
    else:
        return None
    if not schema or not table or table_segment(schema, table) != segment:
        return None
    return TableName(schema, table)


def segment_of(name: TableName) -> str:
    return table_segment(name.schema, name.table)


def display_name(segment: str) -> str:
    """The real name of a segment's table, as SQL writes it (``"Sales.EU"."Order Items"``)."""
    name = segment_table(segment)
    return name.display() if name is not None else segment


def check_key(key: str) -> str:
    """``key`` when it stays inside the lake root: relative, no ``.``/``..``/empty parts."""
    parts = key.split("/")
    if key.startswith("/") or "\\" in key or any(p in (".", "..") for p in parts) or (
            "" in parts[:-1]):
        raise LakeError(f"refusing lake key {key!r}: it would leave its folder or the lake",
                        fix="this is a bug in cdc; report it with the table's name")
    return key


@dataclass(frozen=True)
class RawKey:
    """One raw file's key, parsed."""

    table: str  # the table's path segment
    load_date: str
    first_commit_lsn: Lsn
    last_commit_lsn: Lsn
    tail: str  # the first ``_seq`` of a stream batch, or a snapshot chunk's label

    @property
    def first_seq(self) -> int | None:
        """The batch's first ``_seq``, or None for a labelled (snapshot) file."""
        return int(self.tail) if _SEQ.match(self.tail) else None

    @property
    def key(self) -> str:
        return raw_key(self.table, self.load_date, self.first_commit_lsn, self.last_commit_lsn,
                       self.tail)


def raw_key(table: str, load_date: str, first_commit_lsn: Lsn, last_commit_lsn: Lsn,
            tail: str | int, *, prefix: str = RAW) -> str:
    """The key of a raw file (``prefix`` is ``raw/`` or the quarantine's)."""
    return check_key(f"{prefix}{table}/load_date={load_date}/"
                     f"{first_commit_lsn:016X}-{last_commit_lsn:016X}-{tail}.parquet")


def parse_raw_key(key: str, *, prefix: str = RAW) -> RawKey | None:
    """A raw file's key parsed, or None for anything else under ``prefix`` (also a folder
    that is no table's segment)."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix):].split("/")
    if len(parts) != 3 or not parts[1].startswith("load_date="):
        return None
    if segment_table(parts[0]) is None:
        return None
    match = _NAME.match(parts[2])
    if not match:
        return None
    first, last, tail = match.groups()
    return RawKey(parts[0], parts[1].removeprefix("load_date="), int(first, 16), int(last, 16),
                  tail)


def raw_keys(keys: Iterable[str]) -> dict[str, list[RawKey]]:
    """Raw files per table segment, in listing order."""
    tables: dict[str, list[RawKey]] = {}
    for key in keys:
        parsed = parse_raw_key(key)
        if parsed is not None:
            tables.setdefault(parsed.table, []).append(parsed)
    return tables


def staged_key(table: str) -> str:
    """The key of a table's staged Delta folder, relative to the lake root."""
    return check_key(f"{STAGED}{table}")


def history_key(table: str) -> str:
    """The key of a table's history (SCD2) Delta folder, relative to the lake root."""
    return check_key(f"{HISTORY}{table}")


def compaction_floor_key(table: str, consumer: str = "staged") -> str:
    """Where compaction records the oldest raw partition ``consumer`` (``staged`` or
    ``history``) still needs for ``table``."""
    return check_key(f"_cdc/compaction/{consumer}/{table}.json")


def compaction_failure_key(table: str) -> str:
    """Where the last compaction failure of a table (segment) is recorded until it passes."""
    return f"_cdc/compaction/failed/{table}.json"
