"""Which raw files a compaction run reads: only the partitions that can hold what is left.

Raw files are never moved and the raw layer grows forever, so listing all of
``raw/<table>/`` on every run would make compaction cost grow with the table's history.
After each run the compactor records, per table, a *floor*: a load date such that every
raw file holding a change above the watermark is in a partition at or after it
(``_cdc/compaction/staged/<table>.json``: ``{"watermark": w, "load_date": floor}``; the
history layer keeps its own beside it, ``_cdc/compaction/history/``, for its own
watermark). The next run lists only ``load_date=`` partitions from the floor on.

Why a floor from the files, not from the watermark's LSN: a batch replayed after a crash
lands in a later load date than its LSNs suggest (its first copy may sit in an older
partition), and a resumed snapshot writes old LSNs on a new day. So the floor is the
oldest load date among the files that still hold unapplied changes (``last_lsn > w``),
and never later than the day before the run (files written after the listing carry the
writer's date at write time, which a clock behind ours, or a write that began before
midnight, can date one day earlier). Later runs only see more changes applied, so a
floor stays valid for every higher watermark; a recorded watermark above the staged
table's (the staged table was deleted to be rebuilt) is ignored and everything is
listed, as is a missing or unreadable record.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta

import pyarrow.fs as pafs
import structlog

from cdc.events import Lsn
from cdc.lake.layout import RAW, compaction_floor_key, parse_raw_key
from cdc.lake.store import Lake

log = structlog.get_logger("cdc.staged.files")

#: how much earlier than the run a file written after its listing can be dated
MARGIN = timedelta(days=1)
_MIN = -(2**63)
_QUARANTINE = "_rejected"  # raw/_rejected/ holds rows rejected by a schema contract


@dataclass(frozen=True)
class RawFile:
    key: str
    load_date: str
    first_lsn: Lsn
    last_lsn: Lsn
    #: None for a backfill file named by a label: its rows are all at ``first_lsn``, read
    #: rows of distinct keys whose order among themselves does not matter
    first_seq: int | None

    @property
    def first(self) -> tuple[int, int]:
        return (self.first_lsn, _MIN if self.first_seq is None else self.first_seq)


@dataclass(frozen=True)
class Listing:
    files: list[RawFile]  # in log order (by first change)
    since: str | None  # the oldest load date listed (None: all of them)
    partitions: int  # load_date partitions listed
    recorded: tuple[Lsn, str] | None  # the floor record this listing followed
    consumer: str = "staged"


def raw_tables(lake: Lake) -> list[str]:
    """The table segments under ``raw/`` (one folder listing, not a listing of files)."""
    return [name for name in _folders(lake, RAW.rstrip("/")) if name != _QUARANTINE]


def list_raw(lake: Lake, table: str, watermark: Lsn | None, *,
             consumer: str = "staged", folders: Sequence[str] = ()) -> Listing:
    """The table's raw files in the partitions that can hold changes above ``watermark``
    (the watermark of ``consumer``: ``staged`` or ``history``, each with its own floor).

    ``folders``: the table's raw folders under earlier names (``staged/renames.py``), listed
    from the same floor, which covers them too: it is taken over all the files listed.
    """
    recorded = recorded_floor(lake, table, watermark, consumer=consumer)
    since = recorded[1] if recorded else None
    files: list[RawFile] = []
    partitions = 0
    for folder in dict.fromkeys([table, *folders]):
        listed, count = _list_folder(lake, folder, since)
        files += listed
        partitions += count
    files.sort(key=lambda f: (f.first, f.key))
    return Listing(files, since, partitions, recorded, consumer)


def _list_folder(lake: Lake, table: str, since: str | None) -> tuple[list[RawFile], int]:
    prefix = f"{RAW}{table}/"
    if since is None:
        keys, partitions = lake.list(prefix), -1
    else:
        dates = [d for d in load_dates(lake, table) if d >= since]
        keys = [k for d in dates for k in lake.list(f"{prefix}load_date={d}/")]
        partitions = len(dates)
    files = _parsed(keys, table)
    if partitions < 0:
        partitions = len({f.load_date for f in files})
    return files, partitions


def load_dates(lake: Lake, table: str) -> list[str]:
    """The dates of a table folder's ``load_date=`` partitions, oldest first (a folder
    listing: names only, however many files they hold)."""
    return [name.removeprefix("load_date=") for name in _folders(lake, f"{RAW}{table}")
            if name.startswith("load_date=")]


def _parsed(keys: Sequence[str], table: str) -> list[RawFile]:
    files = []
    for key in keys:
        parsed = parse_raw_key(key)
        if parsed is not None and parsed.table == table:
            files.append(RawFile(parsed.key, parsed.load_date, parsed.first_commit_lsn,
                                 parsed.last_commit_lsn, parsed.first_seq))
    return files


def newest_file(lake: Lake, table: str) -> RawFile | None:
    """The table folder's file with the newest change, from its newest non-empty partitions
    (a folder listing and a listing per partition; a file written later is newer)."""
    prefix = f"{RAW}{table}/"
    for name in reversed(_folders(lake, prefix.rstrip("/"))):
        files = _parsed(lake.list(f"{prefix}{name}/"), table)
        if files:
            return max(files, key=lambda f: (f.last_lsn, f.key))
    return None


def floor(files: Sequence[RawFile], watermark: Lsn, today: date) -> str:
    """The oldest load date that can hold a change above ``watermark`` (see the module)."""
    pending = [f.load_date for f in files if f.last_lsn > watermark]
    return min([*pending, (today - MARGIN).isoformat()])


def record_floor(lake: Lake, table: str, watermark: Lsn, listing: Listing,
                 today: date) -> str:
    """Record the floor for ``watermark`` (after the commit that made it the watermark).

    ``listing`` is this run's, taken before that commit; nothing is written when the
    record would not change.
    """
    load_date = floor(listing.files, watermark, today)
    if listing.recorded != (watermark, load_date):
        lake.write_bytes(compaction_floor_key(table, listing.consumer),
                         json.dumps({"watermark": watermark, "load_date": load_date}).encode())
    return load_date


def recorded_floor(lake: Lake, table: str, watermark: Lsn | None, *,
                   consumer: str = "staged") -> tuple[Lsn, str] | None:
    """The recorded (watermark, floor) when valid for ``watermark``; None: list everything."""
    if watermark is None:
        return None
    data = lake.read_bytes(compaction_floor_key(table, consumer))
    if data is None:
        return None
    try:
        doc = json.loads(data)
        recorded, load_date = int(doc["watermark"]), str(doc["load_date"])
        date.fromisoformat(load_date)
    except (ValueError, KeyError, TypeError):
        log.warning("compaction_floor_unreadable", table=table, action="listing all of raw")
        return None
    return (recorded, load_date) if recorded <= watermark else None


def _folders(lake: Lake, prefix: str) -> list[str]:
    """Names of the folders directly under ``prefix`` (S3: a delimiter listing)."""
    selector = pafs.FileSelector(prefix, allow_not_found=True, recursive=False)
    infos = lake.arrow_filesystem().get_file_info(selector)
    return sorted(i.base_name for i in infos
                  if i.type == pafs.FileType.Directory and not i.base_name.startswith("."))
