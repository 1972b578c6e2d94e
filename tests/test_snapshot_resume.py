"""A consistent snapshot killed after some chunks and run again stages the source exactly.

The rerun cannot read in the first exported snapshot (it died with the process). A row
changed between the two can leave an unfinished chunk for a finished one — a ctid-chunked
row updated onto another page, an integer key moved into a finished key range — so neither
read contains it, and its streamed update carries only the unchanged-TOAST marker. These
tests make such rows on purpose and compare staged with the source, TOASTed values included.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import SourceDb, with_settings
from rawlake import stream_until_caught_up
from test_compact import assert_staged_equals_source

from cdc import faults
from cdc.config import Settings
from cdc.lake.store import LocalLake
from cdc.snapshot.consistent import ConsistentSnapshot
from cdc.staged.runner import compact_lake

#: out-of-line, uncompressed (STORAGE EXTERNAL) values of 2.5 kB: unchanged-TOAST in updates
BODY = "md5(g::text || 'a') || repeat(md5(g::text), 80)"


def snapshot(settings: Settings, **kwargs: Any) -> Any:
    return ConsistentSnapshot(settings, LocalLake(settings.lake), **kwargs).run()


def crash_after(chunks: int) -> Any:
    """A fault action that raises once ``chunks`` chunks are done."""
    done: list[int] = []

    def action(point: str, at: dict[str, Any]) -> None:
        done.append(at["index"])
        if len(done) == chunks:
            raise RuntimeError("injected crash")

    return action


def resume_then_stream(settings: Settings) -> None:
    result = snapshot(settings, workers=2, chunk_rows=500)
    assert result.resumed
    stream_until_caught_up(settings)
    compact_lake(LocalLake(settings.lake), settings.slot)


@pytest.fixture
def resume_settings(settings: Settings) -> Settings:
    return with_settings(settings, slot=f"i13_{settings.slot[:40]}")


class TestResumedSnapshotKeepsUnchangedToast:
    def test_rows_updated_onto_a_finished_page_keep_their_toasted_value(
        self, source: SourceDb, resume_settings: Settings, lake_dir: Path
    ) -> None:
        """A text-keyed (ctid-chunked) table: rows of unfinished chunks updated between the
        crash and the rerun move into free space on finished pages; staged keeps their
        TOASTed bodies."""
        source.execute("CREATE TABLE docs (k text PRIMARY KEY, n int, body text) "
                       "WITH (fillfactor = 100, autovacuum_enabled = off)")
        source.execute("ALTER TABLE docs ALTER body SET STORAGE EXTERNAL")
        source.execute(f"INSERT INTO docs SELECT 'k' || lpad(g::text, 5, '0'), 0, {BODY} "
                       "FROM generate_series(1, 3000) g")
        # free space on the first pages, so later updates move rows there
        source.execute("DELETE FROM docs WHERE ctid < '(4,0)'::tid")
        source.execute("VACUUM docs")
        source.execute("ANALYZE docs")
        with faults.armed("snapshot.after_chunk", crash_after(2)), \
                pytest.raises(RuntimeError, match="injected crash"):
            snapshot(resume_settings, workers=1, chunk_rows=500)
        progress = snapshot_plan(lake_dir, resume_settings.slot)
        finished_below = progress["chunks"][1]["hi"]  # chunks 0 and 1 are done
        source.execute("UPDATE docs SET n = 1 WHERE ctid >= %s::tid "
                       "AND k IN (SELECT k FROM docs ORDER BY k DESC LIMIT 400)",
                       (f"({finished_below},0)",))
        moved = source.execute("SELECT count(*) FROM docs WHERE n = 1 AND ctid < %s::tid",
                               (f"({finished_below},0)",))[0][0]
        assert moved > 0  # the case under test happened: rows left unfinished ranges
        resume_then_stream(resume_settings)
        assert_staged_equals_source(source, resume_settings, "docs")

    def test_integer_keys_moved_into_a_finished_range_keep_their_toasted_value(
        self, source: SourceDb, resume_settings: Settings
    ) -> None:
        """An integer-keyed (key-range-chunked) table: keys of unfinished ranges changed into
        the finished first range between the crash and the rerun; staged keeps the rows and
        their TOASTed bodies."""
        source.execute("CREATE TABLE docs (id int PRIMARY KEY, n int, body text)")
        source.execute("ALTER TABLE docs ALTER body SET STORAGE EXTERNAL")
        source.execute(f"INSERT INTO docs SELECT g, 0, {BODY} FROM generate_series(1, 3000) g")
        source.execute("ANALYZE docs")
        with faults.armed("snapshot.after_chunk", crash_after(2)), \
                pytest.raises(RuntimeError, match="injected crash"):
            snapshot(resume_settings, workers=1, chunk_rows=500)
        source.execute("UPDATE docs SET id = -id, n = 1 WHERE id > 2800")  # into chunk 0
        source.execute("UPDATE docs SET n = 2 WHERE id BETWEEN 2000 AND 2100")
        resume_then_stream(resume_settings)
        assert_staged_equals_source(source, resume_settings, "docs")


class TestResumeKeepsFinishedTables:
    def test_a_finished_table_is_not_copied_again_and_a_partly_finished_one_is_reread(
        self, source: SourceDb, resume_settings: Settings
    ) -> None:
        """Resume reads again only what it must: tables whose chunks were all done stay, a
        partly finished table is read whole in the rerun's snapshot."""
        for table in ("a", "b"):
            source.execute(f"CREATE TABLE {table} (id int PRIMARY KEY, v int)")
            source.execute(f"INSERT INTO {table} SELECT g, 0 FROM generate_series(1, 2000) g")
        source.execute("ANALYZE")
        with faults.armed("snapshot.after_chunk", crash_after(6)), \
                pytest.raises(RuntimeError, match="injected crash"):
            snapshot(resume_settings, workers=1, chunk_rows=500)  # a: 4 chunks, b: 2 of 4
        source.execute("UPDATE a SET v = 1 WHERE id % 7 = 0")
        source.execute("UPDATE b SET v = 1 WHERE id % 7 = 0")
        copied: list[tuple[str, int]] = []
        with faults.armed("snapshot.after_chunk",
                          lambda point, at: copied.append((at["table"], at["index"]))):
            resume_then_stream(resume_settings)
        assert sorted(copied) == [("public.b", i) for i in range(4)]
        assert_staged_equals_source(source, resume_settings, "a", "b")


def snapshot_plan(lake_dir: Path, slot: str, table: str = "public.docs") -> dict[str, Any]:
    import json

    doc = json.loads((lake_dir / "_cdc" / "snapshots" / f"{slot}.json").read_bytes())
    plan: dict[str, Any] = doc["tables"][table]
    return plan
