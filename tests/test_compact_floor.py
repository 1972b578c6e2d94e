"""The recorded listing floor (``staged/files.py``) stays correct through issue 12's runs:
a renamed table's earlier folder, a resync's truncate and hold, and ``updated_at`` exports
without a stream. Nothing below a watermark is skipped, nothing is applied twice."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable
from test_compact_files import change_lsns

from cdc.lake.checkpoint import CheckpointStore, ExportRuns, ResyncHold
from cdc.lake.layout import compaction_floor_key, raw_key
from cdc.lake.maintain import expire
from cdc.lake.raw import encode
from cdc.lake.store import LocalLake
from cdc.staged.compactor import CompactOptions, staged_watermark
from cdc.staged.runner import compact_lake
from cdc.stream.batcher import META_SCHEMA

SLOT = "floor"
DAY0 = dt.date(2026, 1, 1)
TABLE, OLD, NEW = "public.t", "public.old", "public.new"

#: one change: (op, id, v, commit_lsn, seq)
Change = tuple[str, int | None, int | None, int, int]


def write_file(lake: LocalLake, table: str, day: int, changes: list[Change],
               tail: str | None = None) -> str:
    """A raw file of ``table`` (OID 42 whatever its name) in the partition of DAY0 + ``day``."""
    meta = {"pg_type": "bigint", "pg_relid": "42"}
    schema = pa.schema([pa.field("id", pa.int64(), metadata=meta),
                        pa.field("v", pa.int64(), metadata=meta), *META_SCHEMA],
                       metadata={"cdc_table": table, "cdc_key": "id"})
    ops, ids, vs, lsns, seqs = (list(c) for c in zip(*changes, strict=True))
    n = len(changes)
    rows = pa.Table.from_arrays(
        [pa.array(ids, pa.int64()), pa.array(vs, pa.int64()), pa.array(ops),
         pa.array(change_lsns(lsns, seqs)), pa.array(lsns), pa.array(seqs),
         pa.array([1] * n, pa.int64()),
         pa.array(lsns, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
         pa.nulls(n, pa.list_(pa.string()))], schema=schema)
    key = raw_key(table, (DAY0 + dt.timedelta(days=day)).isoformat(), lsns[0], lsns[-1],
                  seqs[0] if tail is None else tail)
    lake.write_bytes(key, encode(rows))
    return key


def compact(lake: LocalLake, day: int, tables: tuple[str, ...] = ()) -> None:
    compact_lake(lake, SLOT, tables, options=CompactOptions(
        optimize_every=0, today=lambda: DAY0 + dt.timedelta(days=day)))


def staged(lake: LocalLake, table: str) -> list[tuple[int, int]]:
    rows = DeltaTable(str(lake.path(f"staged/{table}"))).to_pyarrow_table(
        columns=["id", "v"]).to_pylist()
    return sorted((r["id"], r["v"]) for r in rows)


def floor(lake: LocalLake, table: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(lake.path(compaction_floor_key(table)).read_text())
    return doc


def test_a_renamed_tables_earlier_folder_is_listed_from_its_floor_and_applied_once(
    tmp_path: Path
) -> None:
    lake = LocalLake(tmp_path)
    write_file(lake, OLD, 0, [("c", 1, 1, 0x100, 0)])
    CheckpointStore(lake, SLOT).save(0x101)
    compact(lake, 1)
    assert staged(lake, OLD) == [(1, 1)]
    # the rename: a late change of the old name on day 5, the new name's first on day 6
    write_file(lake, OLD, 5, [("u", 1, 10, 0x200, 0)])
    write_file(lake, NEW, 6, [("c", 2, 2, 0x300, 0)])
    CheckpointStore(lake, SLOT).save(0x301)
    compact(lake, 6)
    assert staged(lake, NEW) == [(1, 10), (2, 2)]
    assert staged(lake, OLD) == []
    assert floor(lake, NEW) == {"watermark": 0x300, "load_date": "2026-01-06"}
    write_file(lake, NEW, 21, [("c", 3, 3, 0x500, 0), ("u", 1, 11, 0x500, 1)])
    CheckpointStore(lake, SLOT).save(0x501)
    compact(lake, 21, (OLD,))  # the old name reaches the table under its new name
    assert staged(lake, NEW) == [(1, 11), (2, 2), (3, 3)]
    assert staged(lake, OLD) == []


def test_raw_retention_before_a_rename_is_seen_keeps_the_old_folders_newest_file(
    tmp_path: Path
) -> None:
    lake = LocalLake(tmp_path)
    write_file(lake, OLD, 0, [("c", 1, 1, 0x100, 0)])
    write_file(lake, OLD, 0, [("c", 4, 4, 0x180, 0)])
    CheckpointStore(lake, SLOT).save(0x181)
    compact(lake, 1)
    expire(lake, 2, {OLD: staged_watermark(lake, OLD)[0]}, today=DAY0 + dt.timedelta(days=20))
    assert [p.name for p in (tmp_path / "raw" / OLD).rglob("*.parquet")] == [
        "0000000000000180-0000000000000180-0.parquet"]  # its OID follows the rename
    write_file(lake, NEW, 21, [("c", 2, 2, 0x300, 0)])  # renamed, then written
    CheckpointStore(lake, SLOT).save(0x301)
    compact(lake, 21)
    assert staged(lake, NEW) == [(1, 1), (2, 2), (4, 4)]


def test_a_resync_truncate_is_skipped_to_and_its_hold_keeps_the_floor_valid(
    tmp_path: Path
) -> None:
    lake = LocalLake(tmp_path)
    write_file(lake, TABLE, 0, [("c", 1, 1, 0x100, 0), ("c", 2, 2, 0x200, 0)])
    CheckpointStore(lake, SLOT).save(0x201)
    compact(lake, 0)
    hold = ResyncHold(lake, TABLE)
    hold.hold(0x400)  # a resync starts; the stream goes on
    write_file(lake, TABLE, 3, [("u", 1, 5, 0x300, 0)])
    write_file(lake, TABLE, 3, [("u", 2, 6, 0x500, 0)])
    CheckpointStore(lake, SLOT).save(0x501)
    compact(lake, 9)  # held below the resync: the day-3 change above it keeps day 3 listed
    assert staged(lake, TABLE) == [(1, 5), (2, 2)]
    assert staged_watermark(lake, TABLE)[0] == 0x3FF
    write_file(lake, TABLE, 3, [("t", None, None, 0x400, 0)], tail="s0000000000000400-t")
    write_file(lake, TABLE, 3, [("r", 1, 7, 0x480, 0), ("r", 3, 3, 0x480, 1)],
               tail="s0000000000000400-000000")
    hold.release()
    write_file(lake, TABLE, 9, [("u", 3, 30, 0x600, 0)])
    CheckpointStore(lake, SLOT).save(0x601)
    compact(lake, 9)
    # key 2's update at 0x500 follows the truncate, the resync's rows are at 0x480
    assert staged(lake, TABLE) == [(1, 7), (2, 6), (3, 30)]
    assert floor(lake, TABLE) == {"watermark": 0x600, "load_date": "2026-01-09"}
    write_file(lake, TABLE, 10, [("d", 1, None, 0x700, 0)])
    CheckpointStore(lake, SLOT).save(0x701)
    compact(lake, 10)
    assert staged(lake, TABLE) == [(2, 6), (3, 30)]


def test_updated_at_runs_on_later_days_apply_after_the_floor_once_each(tmp_path: Path) -> None:
    lake = LocalLake(tmp_path)
    runs = ExportRuns(lake)
    first = runs.start(0x100)
    write_file(lake, TABLE, 0, [("r", 1, 1, first, 0), ("r", 2, 2, first, 1)], tail="u1-0")
    runs.finish(first)
    compact(lake, 0)
    assert staged(lake, TABLE) == [(1, 1), (2, 2)]
    second = runs.start(0x100)  # after the first, whatever the server's position
    write_file(lake, TABLE, 4, [("r", 2, 20, second, 0), ("r", 3, 3, second, 1)], tail="u2-0")
    compact(lake, 6)  # not finished: not applied, and its day stays listed
    assert staged(lake, TABLE) == [(1, 1), (2, 2)]
    assert floor(lake, TABLE)["load_date"] == "2026-01-05"
    runs.finish(second)
    compact(lake, 7)
    assert staged(lake, TABLE) == [(1, 1), (2, 20), (3, 3)]
    assert staged_watermark(lake, TABLE)[0] == second
