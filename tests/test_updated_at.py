"""`cdc snapshot --mode updated_at` into staged: runs upsert by key in run order, exactly once,
and the lookback window catches a transaction that commits after a run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import SourceDb, with_settings
from rawlake import run_cdc
from test_compact import compact, source_rows, staged_rows

from cdc.config import Settings
from cdc.lake.store import LocalLake
from cdc.snapshot.updated_at import UpdatedAtExport

TABLE = ("CREATE TABLE items (id int PRIMARY KEY, name text, "
         "updated_at timestamptz NOT NULL DEFAULT now())")


def export(settings: Settings, lake: Path | None = None, **kwargs: Any) -> int:
    narrowed = with_settings(settings, tables=("public.items",),
                             lake=str(lake or settings.lake))
    return UpdatedAtExport(narrowed, LocalLake(narrowed.lake), **kwargs).run()["public.items"]


class TestUpdatedAtIntoStaged:
    def test_several_runs_compact_to_the_source_and_keep_deleted_rows(
            self, source: SourceDb, settings: Settings) -> None:
        """Each run's rows upsert by key after the run before; a second compaction changes
        nothing; a deleted row stays in staged (this mode cannot see deletes), the rest
        equals the source — also through `cdc compact`, which used to find nothing."""
        source.execute(TABLE)
        source.execute("INSERT INTO items (id, name) SELECT g, 'n' || g "
                       "FROM generate_series(1, 50) g")
        export(settings, page_rows=7)
        compact(settings)
        source.execute("UPDATE items SET name = 'second', updated_at = now() WHERE id % 5 = 0")
        source.execute("INSERT INTO items (id, name) VALUES (51, 'new'), (52, 'new')")
        export(settings, page_rows=7)
        source.execute("UPDATE items SET name = 'third', updated_at = now() WHERE id % 10 = 0")
        source.execute("DELETE FROM items WHERE id = 3")
        export(settings, page_rows=7)
        export(settings, page_rows=7)  # nothing new but the lookback window: no change
        result = run_cdc(["compact", "--lake", settings.lake, "--slot", settings.slot])
        assert result.returncode == 0, result.stderr
        assert "public.items:" in result.stderr
        staged = staged_rows(settings, "public.items")
        assert [r for r in staged if r["id"] != 3] == source_rows(source, "items")
        assert [r["name"] for r in staged if r["id"] == 3] == ["n3"]
        version = compact(settings)[0].version
        assert compact(settings)[0].version == version  # exactly once: nothing to apply

    def test_a_long_transaction_straddling_a_run_is_caught_by_the_lookback(
            self, source: SourceDb, settings: Settings, tmp_path: Path) -> None:
        """A transaction sets updated_at = now() (its start), a later one commits a newer
        updated_at, the run passes both, then the first commits: its row is older than the
        run's watermark. Without a lookback the next run misses it; with one it does not."""
        source.execute(TABLE)
        source.execute("INSERT INTO items (id, name) SELECT g, 'n' || g "
                       "FROM generate_series(1, 5) g")
        plain, looking = tmp_path / "plain", tmp_path / "looking"
        for lake in (plain, looking):
            export(settings, lake, lookback_seconds=0 if lake == plain else 3600)
        with source.connect() as long_tx:
            long_tx.execute("BEGIN")
            long_tx.execute("UPDATE items SET name = 'late', updated_at = now() WHERE id = 1")
            source.execute("UPDATE items SET name = 'early', updated_at = now() WHERE id = 2")
            for lake in (plain, looking):
                export(settings, lake, lookback_seconds=0 if lake == plain else 3600)
            long_tx.execute("COMMIT")
        for lake in (plain, looking):
            export(settings, lake, lookback_seconds=0 if lake == plain else 3600)
            compact(with_settings(settings, lake=str(lake)))
        late = {str(lake): [r["name"] for r in staged_rows(with_settings(settings, lake=str(
            lake)), "public.items") if r["id"] == 1] for lake in (plain, looking)}
        assert late == {str(plain): ["n1"], str(looking): ["late"]}
        assert staged_rows(with_settings(settings, lake=str(looking)),
                           "public.items") == source_rows(source, "items")
