"""`cdc maintain raw`: a closed day's raw files consolidated without losing or doubling a
change (for readers that dedupe on (_commit_lsn, _seq)), beside the stream and compactor."""

from __future__ import annotations

import datetime as dt
import random
import shutil
import tempfile
import threading
from pathlib import Path

import pytest
from conftest import SourceDb, with_settings
from hypothesis import given, settings
from hypothesis import strategies as st
from polling import wait_for
from rawlake import dedupe, raw_files, read_raw, stream_until_caught_up, streaming_in_thread
from test_compact import assert_staged_equals_source, compact
from test_compact_files import (
    DAY0,
    KEYED,
    KEYLESS,
    SLOT,
    Change,
    ListingLake,
    Stream,
    replayed,
    source_log,
    staged,
    steps,
)

from cdc import faults
from cdc.config import Settings
from cdc.errors import ConfigError
from cdc.lake import lease
from cdc.lake.layout import parse_raw_key, staged_key
from cdc.lake.maintain import consolidate, expire
from cdc.lake.store import LocalLake
from cdc.staged.compactor import CompactOptions, staged_watermark
from cdc.staged.files import raw_tables
from cdc.staged.runner import compact_lake


def watermarks(lake: LocalLake) -> dict[str, int | None]:
    return {t: staged_watermark(lake, t)[0] for t in raw_tables(lake)}


def changes(lake_dir: Path, table: str) -> list[tuple[int, int, str, int]]:
    """Every change in raw once, as a deduping reader sees it."""
    return [(r["_commit_lsn"], r["_seq"], r["_op"], r["id"])
            for r in dedupe(read_raw(lake_dir, table))]


class TestConsolidation:
    @settings(max_examples=40)
    @given(st.composite(source_log)(), steps, st.lists(st.integers(0, 40), max_size=4))
    def test_consolidating_closed_days_keeps_every_change_once_and_staged_equals_replay(
        self, log: list[Change], plan: list[tuple[str, int, bool]], when: list[int]
    ) -> None:
        """Consolidation at any point of a stream with replays, days and compactions: a
        deduping reader sees the same changes, and staged still equals raw replayed."""
        with tempfile.TemporaryDirectory() as tmp:
            lake, root = LocalLake(tmp), Path(tmp)
            stream = Stream(lake, log)
            steps_ = [*plan, ("write", len(log), True), ("day", 2, False), ("compact", 1000, False)]
            for i, (action, n, save) in enumerate([*steps_, ("compact", 1000, False)]):
                if i in when or i == len(steps_):  # and once after everything is compacted
                    before = {t: changes(root, t) for t in (KEYED, KEYLESS)}
                    consolidate(lake, stream.day - dt.timedelta(days=1), watermarks(lake),
                                today=stream.day, file_rows=5)
                    assert {t: changes(root, t) for t in (KEYED, KEYLESS)} == before
                if action == "write":
                    stream.write(n, save)
                elif action == "crash":
                    stream.crash()
                elif action == "day":
                    stream.day += dt.timedelta(days=n)
                else:
                    compact_lake(lake, SLOT, options=CompactOptions(
                        chunk_rows=n, optimize_every=0, today=lambda d=stream.day: d))
            state, inserts = replayed(root, KEYED, stream.checkpoint)
            assert staged(root, KEYED) == sorted(state.items())
            assert staged(root, KEYLESS) == inserts
            for key in (str(p.relative_to(root)) for p in root.glob("raw/*/*/*.parquet")):
                assert parse_raw_key(key) is not None  # the lake contract's names

    def test_a_day_of_small_files_becomes_one_file_named_by_its_changes(
        self, tmp_path: Path
    ) -> None:
        """Ten applied files of a day → one file, first/last commit LSN and first seq."""
        lake = LocalLake(tmp_path)
        log = [("c", i, i, 0x100 * i, 0) for i in range(1, 11)]
        stream = Stream(lake, log)
        for _ in range(10):
            stream.write(1, True)
        compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0, today=lambda: DAY0))
        [day] = consolidate(lake, DAY0 + dt.timedelta(days=1), watermarks(lake),
                            today=DAY0 + dt.timedelta(days=2))[:1]
        assert (day.files_before, day.files_after, day.changes) == (10, 1, 10)
        [only] = raw_files(tmp_path, KEYED)
        assert only.name == f"{0x100:016X}-{0xA00:016X}-0.parquet"

    def test_a_second_run_lists_and_consolidates_only_the_days_closed_since_the_first(
        self, tmp_path: Path
    ) -> None:
        """Days consolidated once are not listed again (a year of them would be listed on
        every run); the days closed since are consolidated; every change is kept."""
        lake = ListingLake(tmp_path)
        stream = Stream(lake, [("c", i, i, 0x100 * i, 0) for i in range(1, 21)])
        for _ in range(10):
            stream.write(1, True)
            stream.write(1, True)
            stream.day += dt.timedelta(days=1)
        compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0,
                                                        today=lambda: stream.day))
        before = {t: changes(tmp_path, t) for t in (KEYED, KEYLESS)}
        today, day = stream.day, [str(DAY0 + dt.timedelta(days=d)) for d in range(10)]
        first = consolidate(lake, DAY0 + dt.timedelta(days=5), watermarks(lake), today=today)
        assert sorted({r.load_date for r in first}) == day[:5]
        lake.listed.clear()
        second = consolidate(lake, DAY0 + dt.timedelta(days=8), watermarks(lake), today=today)
        assert sorted({r.load_date for r in second}) == day[5:8]
        listed = {p.split("/")[2] for p in lake.listed if p.startswith("raw/")}
        assert listed == {f"load_date={d}" for d in day[5:8]}
        assert {t: changes(tmp_path, t) for t in (KEYED, KEYLESS)} == before

    def test_files_above_the_staged_watermark_are_left_for_the_compactor(
        self, tmp_path: Path
    ) -> None:
        """Not compacted yet: nothing is consolidated (compaction may be reading them)."""
        lake = LocalLake(tmp_path)
        stream = Stream(lake, [("c", i, i, 0x100 * i, 0) for i in range(1, 5)])
        for _ in range(4):
            stream.write(1, True)
        assert consolidate(lake, DAY0 + dt.timedelta(days=1), watermarks(lake),
                           today=DAY0 + dt.timedelta(days=2)) == []
        assert len(raw_files(tmp_path, KEYED)) == 4

    def test_consolidation_waits_for_a_compactor_holding_the_tables_lease(
        self, tmp_path: Path
    ) -> None:
        """While a compactor holds the table's single-writer lease, no raw file of that
        table is replaced; consolidation goes ahead once the lease is released."""
        lake = LocalLake(tmp_path)
        stream = Stream(lake, [("c", i, i, 0x100 * i, 0) for i in range(1, 5)])
        for _ in range(4):
            stream.write(1, True)
        compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0, today=lambda: DAY0))
        held = lease.try_acquire(lake, staged_key(KEYED), "cdc compact")
        assert isinstance(held, lease.Lease)
        done = threading.Event()
        worker = threading.Thread(target=lambda: (consolidate(
            lake, DAY0 + dt.timedelta(days=1), watermarks(lake),
            today=DAY0 + dt.timedelta(days=2)), done.set()))
        worker.start()
        try:
            wait_for(lambda: lease.current(lake, staged_key(KEYED)) is not None, timeout=5)
            assert not done.wait(1.0)  # held: it waits rather than replacing files
            assert len(raw_files(tmp_path, KEYED)) == 4
        finally:
            held.release()
        worker.join(timeout=60)
        assert done.is_set()
        assert len(raw_files(tmp_path, KEYED)) == 1

    def test_a_crash_between_writing_and_removing_leaves_both_which_readers_dedupe(
        self, tmp_path: Path
    ) -> None:
        """Dying after the consolidated file is durable: originals stay, nothing doubles for
        a deduping reader, and the re-run removes them."""
        lake = LocalLake(tmp_path)
        stream = Stream(lake, [("c", i, i, 0x100 * i, 0) for i in range(1, 5)])
        for _ in range(4):
            stream.write(1, True)
        compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0, today=lambda: DAY0))
        before = changes(tmp_path, KEYED)
        args = (lake, DAY0 + dt.timedelta(days=1), watermarks(lake))
        point = "maintain.after_write"
        with faults.armed(point, faults.parse(f"{point}=raise")[point]), \
                pytest.raises(faults.InjectedFault):
            consolidate(*args, today=DAY0 + dt.timedelta(days=2))
        assert len(raw_files(tmp_path, KEYED)) == 5
        assert changes(tmp_path, KEYED) == before
        consolidate(*args, today=DAY0 + dt.timedelta(days=2))
        assert len(raw_files(tmp_path, KEYED)) == 1
        assert changes(tmp_path, KEYED) == before

    def test_yesterday_is_refused_because_the_stream_may_still_write_it(
        self, tmp_path: Path
    ) -> None:
        with pytest.raises(ConfigError, match="--before"):
            consolidate(LocalLake(tmp_path), DAY0, {}, today=DAY0)

    def test_retention_deletes_only_old_files_that_staged_holds(self, tmp_path: Path) -> None:
        """Old and applied: deleted; old but above the watermark, or recent: kept."""
        lake = LocalLake(tmp_path)
        stream = Stream(lake, [("c", i, i, 0x100 * i, 0) for i in range(1, 4)])
        stream.write(1, True)
        compact_lake(lake, SLOT, options=CompactOptions(optimize_every=0, today=lambda: DAY0))
        stream.write(1, False)  # day 0, not compacted
        stream.day += dt.timedelta(days=10)
        stream.write(1, True)
        removed = expire(lake, 5, watermarks(lake), today=stream.day)
        assert removed == 2  # one file per table
        assert [f.name for f in raw_files(tmp_path, KEYED)] == [
            f"{0x200:016X}-{0x200:016X}-0.parquet", f"{0x300:016X}-{0x300:016X}-0.parquet"]


class TestBesideTheStream:
    def test_consolidation_beside_a_running_stream_and_compactor_converges_to_the_source(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Earlier days' raw files consolidated over and over while the stream writes today's
        and the compactor runs: staged equals the source, raw replayed equals it too."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, v int)")
        work = random.Random(3)
        small = with_settings(settings, flush_rows=20)

        def burst(round_: int) -> None:
            source.execute("INSERT INTO t SELECT g, 0 FROM generate_series(%s::int, %s::int) g",
                           (round_ * 40, round_ * 40 + 39))
            source.execute("UPDATE t SET v = v + 1 WHERE id %% 5 = %s", (work.randrange(5),))
            source.execute("DELETE FROM t WHERE id = %s", (work.randrange(round_ * 40 + 1),))

        with streaming_in_thread(small):
            wait_for(source.slot_confirmed_lsn, what="slot creation")
            for round_ in range(4):
                burst(round_)
        stream_until_caught_up(small)  # a stopped stream leaves the rest in the slot
        compact(settings)
        today = dt.datetime.now(dt.UTC).date()
        old = str(today - dt.timedelta(days=5))
        earlier = raw_files(lake_dir, "public.t")
        assert len(earlier) > 1
        for path in earlier:  # as if written days ago
            target = path.parent.parent / f"load_date={old}" / path.name
            target.parent.mkdir(exist_ok=True)
            shutil.move(path, target)
        lake = LocalLake(lake_dir)
        stop = threading.Event()
        errors: list[BaseException] = []

        def maintain() -> None:
            while not stop.is_set():
                try:
                    consolidate(lake, today - dt.timedelta(days=1), watermarks(lake),
                                today=today, file_rows=50)
                except BaseException as exc:
                    errors.append(exc)
                    return

        maintainer = threading.Thread(target=maintain, daemon=True)
        with streaming_in_thread(small):
            maintainer.start()
            for round_ in range(4, 12):
                burst(round_)
                compact(settings)
        stop.set()
        maintainer.join(timeout=60)
        assert not errors, errors
        stream_until_caught_up(settings)
        compact(settings)
        consolidate(lake, today - dt.timedelta(days=1), watermarks(lake), today=today)

        assert_staged_equals_source(source, settings, "t")
        assert len(list((lake_dir / "raw" / "public.t" / f"load_date={old}").iterdir())) == 1
        replay = {}
        for r in dedupe(read_raw(lake_dir, "public.t")):
            if r["_op"] == "d":
                replay.pop(r["id"], None)
            else:
                replay[r["id"]] = r["v"]
        assert sorted(replay.items()) == sorted(source.execute("SELECT id, v FROM t"))
