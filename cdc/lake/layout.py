"""Where everything lives in the lake: the one place lake keys are built and parsed.

``raw/<table>/load_date=YYYY-MM-DD/<first_commit_lsn>-<last_commit_lsn>-<tail>.parquet``
where ``<table>`` is the table's path segment (:func:`table_segment`), the LSNs are 16
upper-case hex digits and ``<tail>`` is the batch's first ``_seq`` (a stream batch) or a
label (a snapshot chunk). Writers, compaction, status and query all go through here.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cdc.events import Lsn

RAW = "raw/"
STAGED = "staged/"
HISTORY = "history/"
_NAME = re.compile(r"^([0-9A-F]{16})-([0-9A-F]{16})-([^/]+)\.parquet$")
_SEQ = re.compile(r"^-?\d+$")


def table_segment(qualified_name: str) -> str:
    """The one path segment that holds a table (``schema.table``) in raw and staged."""
    return qualified_name


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
    return (f"{prefix}{table}/load_date={load_date}/"
            f"{first_commit_lsn:016X}-{last_commit_lsn:016X}-{tail}.parquet")


def parse_raw_key(key: str, *, prefix: str = RAW) -> RawKey | None:
    """A raw file's key parsed, or None for anything else under ``prefix``."""
    if not key.startswith(prefix):
        return None
    parts = key[len(prefix):].split("/")
    if len(parts) != 3 or not parts[1].startswith("load_date="):
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
    return f"{STAGED}{table}"


def history_key(table: str) -> str:
    """The key of a table's history (SCD2) Delta folder, relative to the lake root."""
    return f"{HISTORY}{table}"
