"""ALTER TABLE ... RENAME TO: a table's identity is its OID, not its name.

After a rename the stream writes the table's new files under the new name's raw folder; the
old folder keeps the files from before (raw is append-only). Each raw column records the
table's OID (``pg_relid``, ``source/catalog.py``), so compaction sees two raw folders of one
table: the one whose newest change is newer is the table's name now. Its staged table takes
both folders' files, and the staged and history tables of the old name move to the new
name (copied, Delta log last, with their watermarks; the old ones are then emptied by a
Delta delete, so their earlier versions stay readable and nothing is left that looks
current; history keeps versions whose raw files retention removed).
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow.parquet as pq
import structlog
from deltalake import DeltaTable

from cdc.lake import lease
from cdc.lake.layout import compaction_floor_key, history_key, staged_key
from cdc.lake.store import Lake
from cdc.staged.files import RawFile, newest_file

log = structlog.get_logger("cdc.staged.renames")


def table_oid(lake: Lake, key: str) -> str | None:
    """The source table's OID recorded in a raw file (its footer only), if any."""
    schema = pq.read_schema(key, filesystem=lake.arrow_filesystem())
    oids = {m for f in schema if (m := (f.metadata or {}).get(b"pg_relid")) is not None}
    return oids.pop().decode() if len(oids) == 1 else None


def find_renames(lake: Lake, tables: Sequence[str]) -> dict[str, str]:
    """Old name → current name of the raw folders of one table (one OID in their newest
    files): the current one is the folder with the newest change.

    Each folder's newest file is read (its footer), so this works whatever raw retention
    removed before it (``lake/maintain.py`` keeps each folder's newest file).
    """
    owners: dict[str, list[tuple[RawFile, str]]] = {}
    for table in tables:
        newest = newest_file(lake, table)
        if newest is not None and (oid := table_oid(lake, newest.key)) is not None:
            owners.setdefault(oid, []).append((newest, table))
    renamed: dict[str, str] = {}
    for folders in owners.values():
        if len(folders) < 2:
            continue
        folders.sort(key=lambda ft: (ft[0].last_lsn, ft[0].key))
        current = folders[-1][1]
        for _, old in folders[:-1]:
            renamed[old] = current
    return renamed


def earlier_names(renamed: dict[str, str], table: str) -> list[str]:
    """The raw folders of ``table`` under its earlier names."""
    return sorted(old for old, new in renamed.items() if new == table)


def move_renamed(lake: Lake, renamed: dict[str, str], purpose: str) -> None:
    """``move_staged`` for each rename, under both tables' single-writer leases (a table
    another compactor holds is moved by a later run)."""
    for old, new in sorted(renamed.items()):
        held: list[lease.Lease] = []
        try:
            for name in sorted((old, new)):
                got = lease.try_acquire(lake, staged_key(name), purpose)
                if not isinstance(got, lease.Lease):
                    log.info("rename_move_deferred", old=old, new=new, held_by=got.describe())
                    break
                held.append(got)
            else:
                for got in held:
                    got.fence()
                move_staged(lake, old, new)
        finally:
            for got in held:
                got.release()


#: the Delta tables a rename moves, by the compaction consumer that writes each
_LAYERS = {"staged": staged_key, "history": history_key}


def move_staged(lake: Lake, old: str, new: str) -> bool:
    """Copy staged/<old> and history/<old> each to the new name when only the old one
    exists, then empty the old one. True when the staged table moved."""
    moving = {name: keys for name, layer in _LAYERS.items()
              if (keys := _movable(lake, layer(old), layer(new)))}
    if moving:  # a floor of the new name's folder alone; a listing aid only, so deleted
        for consumer in _LAYERS:  # first: a crash cannot leave it behind
            lake.delete(compaction_floor_key(new, consumer))
    for name, keys in moving.items():
        _move_table(lake, keys, _LAYERS[name](old), _LAYERS[name](new))
        log.warning(f"{name}_table_moved", old=old, new=new, note="the table was renamed "
                    f"at the source; the old {name} table is emptied")
    return "staged" in moving


def _movable(lake: Lake, old_key: str, new_key: str) -> list[str]:
    """The old table's keys when it has a Delta log and the new one has none, else []."""
    keys = lake.list(old_key + "/")
    if not any("/_delta_log/" in k for k in keys) or lake.list(new_key + "/_delta_log/"):
        return []
    return keys


def _move_table(lake: Lake, keys: list[str], old_key: str, new_key: str) -> None:
    """Copy one Delta table, data files first and the log last in version order (a crash
    leaves no log or an older version there), then empty the old table with a Delta delete
    (its versions stay readable by time travel)."""
    old_prefix, new_prefix = old_key + "/", new_key + "/"
    for key in sorted(keys, key=lambda k: ("/_delta_log/" in k, k)):
        data = lake.read_bytes(key)
        if data is not None:
            lake.write_bytes(new_prefix + key[len(old_prefix):], data)
    uri, storage = lake.delta_location(old_key)
    DeltaTable(uri, storage_options=storage).delete()
