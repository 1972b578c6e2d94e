"""Staged compaction's chunks over hand-built raw files (no database): streamed files, a
labelled backfill, more streamed files, cut into chunks anywhere and killed after any
commit, then run again, give the staged state one single slice gives (as for history in
``test_history_chunks.py``); the run goes through ``compact_lake``, so the recorded floor
(``staged/files.py``) is in play as well."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from deltalake import DeltaTable
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_history import Crash, crash_at
from test_history_chunks import TABLE, change, raw_layouts, write

from cdc import faults
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.store import LocalLake
from cdc.staged.compactor import CompactOptions
from cdc.staged.runner import compact_lake


def staged(lake_dir: Path) -> list[dict[str, Any]]:
    rows = DeltaTable(str(lake_dir / "staged" / TABLE)).to_pyarrow_table().to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def run(lake: LocalLake, bound: int, chunk_rows: int, *, history: bool = False) -> None:
    CheckpointStore(lake, "s").save(bound)
    compact_lake(lake, "s", options=CompactOptions(chunk_rows=chunk_rows, optimize_every=0),
                 history=history)


def lay_out(root: Path, files: list[list[dict[str, Any]]]) -> LocalLake:
    lake = LocalLake(root)
    for part in files:
        labelled = part[0]["_seq"] < 0
        write(lake, part, f"r{part[0]['id']}" if labelled else part[0]["_seq"])
    return lake


SAME_AS_HISTORY = ([[change("c", 1, 10, 0), change("u", 1, 20, 0), change("u", 1, 30, 0),
                     change("c", 2, 40, 0)],
                    [change("u", 1, 50, 0), change("u", 1, 60, 0), change("d", 1, 60, 1)],
                    [change("r", 10, 70, -990)], [change("r", 11, 70, -989)],
                    [change("c", 1, 80, 0), change("u", 1, 90, 0)]], 91)


class TestStagedChunkingProperty:
    @settings(max_examples=100, deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(raw_layouts(), st.integers(1, 5), st.integers(1, 6))
    @example(layout=SAME_AS_HISTORY, chunk_rows=4, crash=2)
    def test_any_chunking_and_any_crash_then_a_rerun_equal_one_slice(
        self, layout: tuple[list[list[dict[str, Any]]], int], chunk_rows: int, crash: int
    ) -> None:
        """Cut anywhere the compactor may cut, killed after any commit and run again: the
        staged table is the one a single slice of every change gives."""
        files, bound = layout
        states = []
        for rows, fault in ((10**6, None), (chunk_rows, crash)):
            root = Path(tempfile.mkdtemp(prefix="cdc-staged-chunks-"))
            try:
                lake = lay_out(root, files)
                if fault is not None:
                    with faults.armed("staged.after_commit", crash_at(fault)), \
                            contextlib.suppress(Crash):
                        run(lake, bound, chunk_rows=rows)
                run(lake, bound, chunk_rows=rows)
                states.append(staged(root))
            finally:
                shutil.rmtree(root)
        assert states[1] == states[0]


@pytest.mark.parametrize("crash", range(1, 5))
def test_history_through_compact_lake_with_its_floor_after_a_crash(
    tmp_path: Path, crash: int
) -> None:
    """The history example again through ``compact_lake`` (history floor recorded and
    followed): chunked, killed after any history commit, run again: one version each."""
    files, bound = SAME_AS_HISTORY
    lake = lay_out(tmp_path, files)
    with faults.armed("history.after_commit", crash_at(crash)), contextlib.suppress(Crash):
        run(lake, bound, chunk_rows=4, history=True)
    run(lake, bound, chunk_rows=4, history=True)

    rows = DeltaTable(str(tmp_path / "history" / TABLE)).to_pyarrow_table().to_pylist()
    assert sorted((r["id"], r["_valid_from_lsn"], r["_valid_to_lsn"]) for r in rows) == [
        (1, 10, 20), (1, 20, 30), (1, 30, 50), (1, 50, 60), (1, 80, 90), (1, 90, None),
        (2, 40, None), (10, 70, None), (11, 70, None)]
