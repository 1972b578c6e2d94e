"""Compaction lists only the raw partitions that can hold unapplied changes, and still
applies every change below the checkpoint exactly once (against a brute-force replay)."""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from deltalake import DeltaTable
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.layout import compaction_floor_key, raw_key
from cdc.lake.raw import encode
from cdc.lake.store import LocalLake
from cdc.staged.compactor import CompactOptions
from cdc.staged.files import list_raw
from cdc.staged.runner import compact_lake
from cdc.stream.batcher import META_SCHEMA

SLOT = "files"
DAY0 = dt.date(2026, 1, 1)
KEYED, KEYLESS = "public.keyed", "public.keyless"


def schema(table: str, key: str) -> pa.Schema:
    return pa.schema([pa.field("id", pa.int64(), metadata={"pg_type": "bigint"}),
                      pa.field("v", pa.int64(), metadata={"pg_type": "bigint"}), *META_SCHEMA],
                     metadata={"cdc_table": table, "cdc_key": key})


#: one change: (op, id, v, commit_lsn, seq)
Change = tuple[str, int, int, int, int]


def write_file(lake: LocalLake, table: str, day: dt.date, changes: list[Change]) -> str:
    """A raw file as the stream names it, in the partition of ``day``."""
    ops, ids, vs, lsns, seqs = (list(c) for c in zip(*changes, strict=True))
    n = len(changes)
    rows = pa.Table.from_arrays(
        [pa.array(ids, pa.int64()), pa.array(vs, pa.int64()), pa.array(ops),
         pa.array(change_lsns(lsns, seqs)), pa.array(lsns), pa.array(seqs),
         pa.array([1] * n, pa.int64()),
         pa.array(lsns, pa.int64()).cast(pa.timestamp("us", tz="UTC")),
         pa.nulls(n, pa.list_(pa.string()))],
        schema=schema(table, "id" if table == KEYED else ""))
    key = raw_key(table, day.isoformat(), lsns[0], lsns[-1], seqs[0])
    lake.write_bytes(key, encode(rows))
    return key


def change_lsns(commit_lsns: list[int], seqs: list[int]) -> list[int]:
    """Each change's own ``_lsn``, before its commit: two changes share one only when a
    key-changing update is split into its delete and update (``staged/moves.py``)."""
    return [lsn - 0x80 + seq for lsn, seq in zip(commit_lsns, seqs, strict=True)]


Rows = list[tuple[int, int]]


def replayed(lake_dir: Path, table: str, below: int) -> tuple[dict[int, int], Rows]:
    """Brute force over every raw file: (state per key, the inserted rows once each)."""
    rows = [r for f in sorted((lake_dir / "raw" / table).glob("load_date=*/*.parquet"))
            for r in pq.read_table(f).to_pylist()]
    seen: dict[tuple[int, int], dict[str, Any]] = {}
    for r in rows:
        if r["_commit_lsn"] < below:
            seen.setdefault((r["_commit_lsn"], r["_seq"]), r)
    state: dict[int, int] = {}
    inserts = []
    for _, r in sorted(seen.items()):
        if r["_op"] == "d":
            state.pop(r["id"], None)
        else:
            state[r["id"]] = r["v"]
        if r["_op"] == "c":
            inserts.append((r["id"], r["v"]))
    return state, sorted(inserts)


def staged(lake_dir: Path, table: str) -> list[tuple[int, int]]:
    path = lake_dir / "staged" / table
    if not path.exists():
        return []
    rows = DeltaTable(str(path)).to_pyarrow_table(columns=["id", "v"]).to_pylist()
    return sorted((r["id"], r["v"]) for r in rows)


@dataclass
class Stream:
    """A stream that writes batches on its day, checkpoints, crashes and replays."""

    lake: LocalLake
    log: list[Change]
    day: dt.date = DAY0
    written: int = 0  # changes of ``log`` written by this incarnation so far
    checkpoint: int = 0
    keys: list[str] = field(default_factory=list)

    def write(self, n: int, save: bool) -> None:
        part = self.log[self.written:self.written + n]
        if not part:
            return
        for table in (KEYED, KEYLESS):
            self.keys.append(write_file(self.lake, table, self.day, part))
        self.written += len(part)
        if save:  # every change below the next unwritten transaction is durable
            nxt = self.log[self.written][3] if self.written < len(self.log) else part[-1][3] + 1
            self.checkpoint = max(self.checkpoint, nxt)
            CheckpointStore(self.lake, SLOT).save(self.checkpoint)

    def crash(self) -> None:
        """Restart from the checkpoint: what follows it is streamed (and written) again."""
        self.written = next((i for i, c in enumerate(self.log) if c[3] >= self.checkpoint),
                            len(self.log))


def source_log(draw: st.DrawFn) -> list[Change]:
    """Transactions of 1-4 changes over a few keys, kept consistent with a source state."""
    state: dict[int, int] = {}
    log: list[Change] = []
    for tx in range(draw(st.integers(5, 25))):
        for seq in range(draw(st.integers(1, 4))):
            key = draw(st.integers(1, 6))
            op = "c" if key not in state else draw(st.sampled_from("uud"))
            v = draw(st.integers(0, 99))
            if op == "d":
                del state[key]
            else:
                state[key] = v
            log.append((op, key, v, 0x100 * (tx + 1), seq))
    return log


steps = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(1, 6), st.booleans()),
    st.tuples(st.just("crash"), st.just(0), st.just(False)),
    st.tuples(st.just("day"), st.integers(1, 3), st.just(False)),
    st.tuples(st.just("compact"), st.integers(1, 9), st.just(False))), max_size=30)


class TestRawListing:
    @settings(max_examples=50)
    @given(st.composite(source_log)(), steps, st.sampled_from([1, 16 * 2**20]))
    @example(log=[("c", i, i, 0x100 * i, 0) for i in range(1, 7)],  # a batch past the checkpoint
             plan=[("write", 1, True), ("write", 2, False), ("day", 3, False),  # days before
                   ("compact", 1, False)],  # the run that must keep its partition listed
             file_bytes=16 * 2**20)
    def test_compacting_from_the_recorded_floor_applies_every_change_below_the_checkpoint_once(
        self, log: list[Change], plan: list[tuple[str, int, bool]], file_bytes: int
    ) -> None:
        """Batches replayed into later partitions, chunks cut anywhere, runs on later days,
        merged in one MERGE or per staged file: staged equals raw replayed (keyed) and holds
        each insert once (keyless)."""
        with tempfile.TemporaryDirectory() as tmp:
            lake = LocalLake(tmp)
            stream = Stream(lake, log)
            for action, n, save in [*plan, ("write", len(log), True), ("compact", 1000, False)]:
                if action == "write":
                    stream.write(n, save)
                elif action == "crash":
                    stream.crash()
                elif action == "day":
                    stream.day += dt.timedelta(days=n)
                else:
                    compact_lake(lake, SLOT, options=CompactOptions(
                        chunk_rows=n, optimize_every=0, file_bytes=file_bytes,
                        today=lambda d=stream.day: d))
            state, inserts = replayed(Path(tmp), KEYED, stream.checkpoint)
            assert staged(Path(tmp), KEYED) == sorted(state.items())
            assert staged(Path(tmp), KEYLESS) == inserts

    def test_partitions_below_the_floor_are_not_listed_and_the_new_file_is_applied(
        self, tmp_path: Path
    ) -> None:
        """A year of compacted raw files, then one new file: the run lists the new day and
        the one before, nothing older."""
        lake = LocalLake(tmp_path)
        lsn = 0x100
        for day in range(365):
            write_file(lake, KEYED, DAY0 + dt.timedelta(days=day), [("c", day, day, lsn, 0)])
            lsn += 0x100
        CheckpointStore(lake, SLOT).save(lsn)
        last = DAY0 + dt.timedelta(days=364)
        compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0, today=lambda: last))
        floor = json.loads(lake.path(compaction_floor_key(KEYED, "staged")).read_text())
        assert floor == {"watermark": lsn - 1, "load_date": "2026-12-30"}
        write_file(lake, KEYED, last + dt.timedelta(days=1), [("u", 5, 500, lsn, 0)])
        CheckpointStore(lake, SLOT).save(lsn + 1)
        listing = list_raw(lake, KEYED, lsn - 1)
        assert (listing.since, listing.partitions, len(listing.files)) == ("2026-12-30", 3, 3)
        compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0, today=lambda: last))
        assert dict(staged(tmp_path, KEYED))[5] == 500
        assert len(staged(tmp_path, KEYED)) == 365

    def test_a_floor_recorded_above_the_staged_watermark_is_ignored(self, tmp_path: Path) -> None:
        """A staged table deleted to be rebuilt starts from all of raw, not from the floor."""
        lake = LocalLake(tmp_path)
        write_file(lake, KEYED, DAY0, [("c", 1, 1, 0x100, 0)])
        write_file(lake, KEYED, DAY0 + dt.timedelta(days=9), [("c", 2, 2, 0x200, 0)])
        lake.write_bytes(compaction_floor_key(KEYED),
                         json.dumps({"watermark": 0x1FF, "load_date": "2026-01-09"}).encode())
        CheckpointStore(lake, SLOT).save(0x201)
        assert list_raw(lake, KEYED, 0x100).since is None
        compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0))
        assert staged(tmp_path, KEYED) == [(1, 1), (2, 2)]


class ListingLake(LocalLake):
    """A local lake that records the prefixes it lists files under."""

    def __init__(self, root: str | Path) -> None:
        super().__init__(root)
        self.listed: list[str] = []

    def list(self, prefix: str) -> list[str]:
        self.listed.append(prefix)
        return super().list(prefix)


class TestKeylessListing:
    def test_a_keyless_tables_runs_list_only_the_partitions_from_its_floor(
        self, tmp_path: Path
    ) -> None:
        """A keyless table has no history: its history pass lists no raw (it listed all of
        it on every run), staged lists from its floor, and the new rows are appended."""
        lake = ListingLake(tmp_path)
        lsn = 0x100
        for day in range(30):
            write_file(lake, KEYLESS, DAY0 + dt.timedelta(days=day), [("c", day, day, lsn, 0)])
            lsn += 0x100
        CheckpointStore(lake, SLOT).save(lsn)
        last = DAY0 + dt.timedelta(days=29)
        options = CompactOptions(optimize_every=0, today=lambda: last)
        compact_lake(lake, SLOT, options=options)
        write_file(lake, KEYLESS, last, [("c", 99, 99, lsn, 0)])
        CheckpointStore(lake, SLOT).save(lsn + 1)
        lake.listed.clear()
        compact_lake(lake, SLOT, options=options)
        assert staged(tmp_path, KEYLESS) == [*((d, d) for d in range(30)), (99, 99)]
        raw = sorted({p for p in lake.listed if p.startswith("raw/")})
        assert raw == [f"raw/{KEYLESS}/load_date={last - dt.timedelta(days=1)}/",
                       f"raw/{KEYLESS}/load_date={last}/"]


def files(table: DeltaTable) -> list[dict[str, Any]]:
    return list(pa.table(table.get_add_actions(flatten=True)).to_pylist())


class TestFileGroups:
    def test_changes_in_two_of_three_staged_files_rewrite_just_those_two(
        self, tmp_path: Path
    ) -> None:
        """The touched file groups are rewritten in one commit (cdc's own copy-on-write,
        ``staged/rewrite.py``, not a MERGE) that removes only their files; the untouched
        files stay; staged equals raw replayed."""
        lake = LocalLake(tmp_path)
        options = CompactOptions(optimize_every=0, file_bytes=1, today=lambda: DAY0)
        lsn = 0x100
        for low in (0, 100, 200):  # three compactions: three files of disjoint key ranges
            write_file(lake, KEYED, DAY0, [("c", low + i, i, lsn, i) for i in range(10)])
            lsn += 0x100
            CheckpointStore(lake, SLOT).save(lsn)
            compact_lake(lake, SLOT, (KEYED,), options=options)
        table = DeltaTable(str(tmp_path / "staged" / KEYED))
        untouched = {a["path"] for a in files(table) if a["min.id"] == 100}
        before, version = {a["path"] for a in files(table)}, table.version()
        write_file(lake, KEYED, DAY0, [("u", 3, 33, lsn, 0), ("d", 205, 0, lsn, 1),
                                       ("c", 500, 5, lsn, 2)])
        CheckpointStore(lake, SLOT).save(lsn + 1)
        compact_lake(lake, SLOT, (KEYED,), options=options)

        table = DeltaTable(str(tmp_path / "staged" / KEYED))
        assert table.version() == version + 1  # one commit
        assert table.history(1)[0]["operation"] == "WRITE"
        assert len(before - {a["path"] for a in files(table)}) == 2  # the files of 3 and 205
        assert untouched <= {a["path"] for a in files(table)}
        state, _ = replayed(tmp_path, KEYED, lsn + 1)
        assert staged(tmp_path, KEYED) == sorted(state.items())
        assert table.transaction_version("cdc-compact") == lsn
