"""A table whose compaction fails is recorded in the lake until it compacts again.

``cdc compact`` and the stream's background compaction go on with the other tables (one
table never blocks the rest); the record lets ``cdc status`` say which table is stuck,
why, and how to fix it, from any host.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime

from cdc.errors import CdcError
from cdc.lake.layout import compaction_failure_key
from cdc.lake.store import Lake


@dataclass(frozen=True)
class Failure:
    table: str
    error: str  # the error's one line, fix included
    kind: str  # the exception class
    at: str  # ISO time of the failed run


def record_failure(lake: Lake, table: str, exc: CdcError) -> Failure:
    failure = Failure(table, str(exc), type(exc).__name__, datetime.now(UTC).isoformat())
    lake.write_bytes(compaction_failure_key(table), json.dumps(failure.__dict__).encode())
    return failure


def clear_failure(lake: Lake, table: str) -> None:
    if lake.read_bytes(compaction_failure_key(table)) is not None:
        lake.delete(compaction_failure_key(table))


def failure(lake: Lake, table: str) -> Failure | None:
    data = lake.read_bytes(compaction_failure_key(table))
    if data is None:
        return None
    doc = json.loads(data)
    return Failure(str(doc["table"]), str(doc["error"]), str(doc["kind"]), str(doc["at"]))
