"""What staged and history share around their commits: the chunk loop over raw files, the
check before each commit, the table settings their files are written with, and the
in-process lock of a table.

Both keep their watermark in the Delta commit that wrote the data (an app transaction) and
read raw in slices [cursor, upper): ``slices`` walks them, each consumer reading one with
its own ``read_chunk`` (where a chunk may be cut differs: staged/compactor.py,
history/writer.py). ``check_watermark`` runs right before every commit, under the
table's lease: the stored watermark must still be the one the run started from, and the
lease still ours (``fence``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pyarrow as pa
from deltalake import DeltaTable

from cdc.errors import CdcError, CompactionError, first_line
from cdc.events import Lsn
from cdc.lake.lease import RIVAL_FIX
from cdc.staged.delta_types import STATS_PROPERTY, limit_stats, stats_columns
from cdc.staged.files import RawFile
from cdc.staged.merge import Pos, between

# Compaction's working set (a chunk, its sort, a group's MERGE) is freed after each commit;
# jemalloc (cdc's Arrow pool, cdc/__init__.py) keeps freed pages for 10 s by default, so
# the next pass (history after staged, the next table) would stack on top of them. Returned
# at once, `cdc stream --compact-every 1s` through a 1M-row transaction peaks at 432 MB
# instead of 552 MB (bench/stream_compact.py). Process-wide, set once on import.
if pa.default_memory_pool().backend_name == "jemalloc":
    pa.jemalloc_set_decay_ms(0)

#: ``read_chunk(todo, cursor, end)`` → (changes, upper, files read whole, clean cut)
ReadChunk = Callable[[list[RawFile], Pos, Pos], tuple[pa.Table, Pos, set[str], bool]]

_locks: dict[str, threading.Lock] = {}
_locks_guard = threading.Lock()


def slices(files: list[RawFile], cursor: Pos, end: Pos,
           read_chunk: ReadChunk) -> Iterator[tuple[pa.Table, Pos, bool]]:
    """The changes in [cursor, end) chunk by chunk: (changes, upper, clean) each, the next
    chunk starting at ``upper``. A file read whole is not offered again; a file is offered
    while it may hold a change at or past the cursor and below ``end``."""
    consumed: set[str] = set()
    while cursor < end:
        todo = [f for f in files if f.key not in consumed and f.last_lsn >= cursor[0]
                and f.first < end]
        if not todo:
            return
        rows, upper, done, clean = read_chunk(todo, cursor, end)
        consumed |= done
        yield rows, upper, clean
        cursor = upper


def cut(read: list[tuple[RawFile, pa.Table]], cursor: Pos, upper: Pos,
        group: Lsn | None) -> tuple[list[pa.Table], set[str]]:
    """The chunk's parts below ``upper`` (the labelled backfill files at LSN ``group`` whole)
    and the keys of the files read completely."""
    parts, done = [], set()
    for f, part in read:
        whole = f.first_seq is None and f.first_lsn == group
        below = part if whole else between(part, cursor, upper)
        if below.num_rows == part.num_rows:
            done.add(f.key)
        parts.append(below)
    return parts, done


def check_watermark(dt: DeltaTable, app_id: str, expected: Lsn | None, what: str,
                    fence: Callable[[], None]) -> None:
    """Right before a commit to ``dt``: fail unless its watermark (app transaction
    ``app_id``) is still ``expected`` and the lease still ours; then limit its statistics
    (``staged.delta_types``). ``what`` names the table for the error."""
    dt.update_incremental()
    found = dt.transaction_version(app_id)
    if found != expected:
        raise CompactionError(
            f"{what} was written by someone else meanwhile (watermark {expected} → {found}); "
            "nothing was committed", fix=RIVAL_FIX)
    fence()
    limit_stats(dt)


def configuration(schema: pa.Schema, checkpoint_interval: int,
                  file_bytes: int) -> dict[str, str]:
    """Table properties of a new staged or history table: its log checkpoints, the size its
    data files are written up to (merges then go file group by file group,
    ``staged/target.py``) and the columns that keep statistics."""
    return {"delta.checkpointInterval": str(checkpoint_interval),
            "delta.targetFileSize": str(file_bytes),
            STATS_PROPERTY: stats_columns(schema)}


def ensure_file_size(dt: DeltaTable, checkpoint_interval: int, file_bytes: int) -> None:
    """Give a table made before ``delta.targetFileSize`` was set its properties."""
    if dt.metadata().configuration.get("delta.targetFileSize") is None:
        dt.alter.set_table_properties(configuration(
            pa.schema(dt.schema().to_arrow()), checkpoint_interval, file_bytes))


def table_lock(uri: str) -> threading.Lock:
    """One lock per table inside this process (the lease covers other processes)."""
    with _locks_guard:
        return _locks.setdefault(uri, threading.Lock())


@contextmanager
def translated(doing: str, fix: str) -> Iterator[None]:
    """delta-rs' errors (DeltaError and plain Exception) while ``doing`` as a
    ``CompactionError`` with ``fix``; cdc's own errors pass as they are."""
    try:
        yield
    except CdcError:
        raise
    except Exception as exc:
        raise CompactionError(f"{doing} failed: {first_line(exc)}", fix=fix) from exc
