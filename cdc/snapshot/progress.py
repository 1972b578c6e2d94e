"""The durable record of a consistent snapshot (``_cdc/snapshots/<slot>.json``) and its display.

The record is rewritten after every chunk, so a rerun knows which chunks are done; the
display prints per-table rows, rows/s and ETA while the chunks are read.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass

import structlog

from cdc.events import Lsn, format_lsn
from cdc.lake.store import Lake
from cdc.snapshot.planning import TablePlan

log = structlog.get_logger("cdc.snapshot.consistent")

#: status of a progress record whose slot is gone and whose next generation has begun
SUPERSEDED = "superseded"


def progress_key(slot: str) -> str:
    return f"_cdc/snapshots/{slot}.json"


def snapshot_in_progress(lake: Lake, slot: str) -> bool:
    data = lake.read_bytes(progress_key(slot))
    return data is not None and json.loads(data).get("status") != "done"


@dataclass
class Progress:
    """The durable record of a consistent snapshot, rewritten after every chunk."""

    slot: str
    consistent_point: Lsn
    snapshot_ts_us: int
    tables: dict[str, TablePlan]
    status: str = "running"
    #: 1 for the lake's first snapshot of this slot; +1 each time a snapshot into a newly
    #: created slot replaces a gone one (``cdc.snapshot.generation``)
    generation: int = 1

    def to_json(self) -> bytes:
        return json.dumps({
            "slot": self.slot, "consistent_point": self.consistent_point,
            "consistent_point_text": format_lsn(self.consistent_point),
            "snapshot_ts_us": self.snapshot_ts_us, "status": self.status,
            "generation": self.generation,
            "tables": {n: {"chunks": t.chunks, "estimated_rows": t.estimated_rows,
                           "done": t.done, "point": t.point} for n, t in self.tables.items()},
        }, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Progress:
        doc = json.loads(data)
        tables = {n: TablePlan(n, t["chunks"], t["estimated_rows"], t["done"], t.get("point"))
                  for n, t in doc["tables"].items()}
        return cls(doc["slot"], doc["consistent_point"], doc["snapshot_ts_us"], tables,
                   doc["status"], int(doc.get("generation", 1)))


class ProgressDisplay:
    """Per-table rows, rows/s and ETA: a redrawn line on a terminal, log lines otherwise."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress
        self.started = time.monotonic()
        self.rows_at_start = sum(sum(t.done.values()) for t in progress.tables.values())
        self.tty = sys.stderr.isatty()
        self.lock = threading.Lock()

    def chunk_done(self, table: str, rows: int) -> None:
        plan = self.progress.tables[table]
        done_rows = sum(plan.done.values())
        total = sum(sum(t.done.values()) for t in self.progress.tables.values())
        elapsed = max(time.monotonic() - self.started, 1e-6)
        rate = (total - self.rows_at_start) / elapsed
        remaining = sum(max(t.estimated_rows - sum(t.done.values()), 0)
                        for t in self.progress.tables.values())
        eta = remaining / rate if rate > 0 else None
        fields = {"table": table, "chunks": f"{len(plan.done)}/{len(plan.chunks)}",
                  "rows": done_rows, "rows_per_s": round(rate),
                  "eta_s": round(eta) if eta is not None else None}
        with self.lock:
            if self.tty:
                text = (f"\r{table}: chunk {fields['chunks']}, {done_rows:,} rows | all tables "
                        f"{total:,} rows, {rate:,.0f} rows/s, ETA "
                        f"{fields['eta_s'] if eta is not None else '?'} s")
                sys.stderr.write(text[:200].ljust(100))
                sys.stderr.flush()
            else:
                log.info("snapshot_chunk_done", chunk_rows=rows, **fields)

    def finish(self) -> None:
        if self.tty:
            sys.stderr.write("\n")
