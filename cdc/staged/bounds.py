"""How far a compaction run may go: the lake's bound, a table's resync hold, a resync's start.

- The bound is the stream's durable checkpoint; a lake without a stream compacts up to the
  last finished ``cdc snapshot --mode updated_at`` run (``ExportRuns``: its rows upsert by
  key, run after run).
- While ``cdc resync`` re-reads a table, its staged and history tables stay below the hold
  (``ResyncHold``): the resync's rows land at positions the checkpoint may have passed.
- A resync's truncate replaces the table: what lies before it is never read (its files may
  hold a column type the staged table cannot take), so a run skips ahead to it.

None of this changes which raw partitions a run lists (``staged/files.py``): the floor is
recorded for the watermark the run started from, over every file holding a change above
it, so a skipped stretch or a held table only keeps the floor lower, never higher.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import structlog

from cdc.events import Lsn, format_lsn
from cdc.lake.checkpoint import CheckpointStore, ExportRuns, ResyncHold
from cdc.lake.store import Lake
from cdc.staged.files import RawFile
from cdc.staged.merge import Pos

log = structlog.get_logger("cdc.staged.bounds")

RESYNC_START = re.compile(r"-s[0-9A-F]{16}-t\.parquet$")  # snapshot/resync.py's truncate


def lake_bound(lake: Lake, slot: str) -> Lsn | None:
    """Changes below (bound, 0) are complete: the slot's checkpoint, else the finished
    ``updated_at`` runs; None when there is neither yet."""
    bound = CheckpointStore(lake, slot).load()  # before listing: files below it exist
    if bound is None:  # no stream: the finished `updated_at` export runs, if any
        done = ExportRuns(lake).load()[1]
        bound = None if done is None else done + 1
    return bound


def table_bound(lake: Lake, table: str, bound: Lsn) -> Lsn:
    """``bound``, or lower while a resync of ``table`` is under way."""
    held = ResyncHold(lake, table).load()
    if held is not None and held < bound:
        log.info("compaction_held_by_resync", table=table, below=format_lsn(held))
        return held
    return bound


def resync_start(files: Sequence[RawFile], cursor: Pos, end: Pos) -> Pos:
    """Where to read from: ``cursor``, or the last resync truncate in (cursor, end)."""
    starts = [f.first for f in files if RESYNC_START.search(f.key) and cursor < f.first < end]
    return max([cursor, *starts])
