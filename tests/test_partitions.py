"""Partitioned tables land under their parent (publish_via_partition_root)."""

from __future__ import annotations

from pathlib import Path

from conftest import SourceDb
from rawlake import raw_files, read_raw, replay, stream_until_caught_up

from cdc.config import Settings
from cdc.lake.store import LocalLake
from cdc.snapshot.consistent import ConsistentSnapshot
from cdc.staged.runner import compact_lake
from cdc.stream.streamer import Streamer

EVENTS = """
CREATE TABLE events (id int, day date, kind text, PRIMARY KEY (id, day))
PARTITION BY RANGE (day);
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_2026 PARTITION OF events FOR VALUES FROM ('2026-01-01') TO ('2027-01-01');
"""


class TestPartitionedTables:
    def test_snapshot_and_stream_of_a_partitioned_table_land_under_the_parent(
        self, source: SourceDb, settings: Settings, lake_dir: Path
    ) -> None:
        """Rows of every partition, copied and streamed, are one table in raw and staged."""
        source.execute(EVENTS)
        source.execute("INSERT INTO events SELECT g, date '2025-06-01' + (g % 400), 'seed' "
                       "FROM generate_series(1, 3000) g")
        ConsistentSnapshot(settings, LocalLake(settings.lake), chunk_rows=1000).run()
        source.execute("INSERT INTO events VALUES (5000, '2025-02-01', 'new'), "
                       "(5001, '2026-02-01', 'new')")
        source.execute("UPDATE events SET kind = 'changed' WHERE id % 100 = 0")
        source.execute("DELETE FROM events WHERE id % 250 = 0")
        stream_until_caught_up(settings)

        assert raw_files(lake_dir, "public.events")
        assert not raw_files(lake_dir, "public.events_2025")
        assert not raw_files(lake_dir, "public.events_2026")
        rows = [{**r, "key": (r["id"], r["day"])} for r in read_raw(lake_dir, "public.events")]
        expected = {(i, d): k for i, d, k in source.execute("SELECT id, day, kind FROM events")}
        assert {k: v["kind"] for k, v in replay(rows, key="key").items()} == expected

        compact_lake(LocalLake(settings.lake), settings.slot)
        from deltalake import DeltaTable

        staged = DeltaTable(str(lake_dir / "staged" / "public.events")).to_pyarrow_table()
        assert {(r["id"], r["day"]): r["kind"] for r in staged.to_pylist()} == expected

    def test_a_partitioned_table_published_via_its_root_is_flagged_with_the_way_out(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """TRUNCATE of one partition is never published via the root: `cdc status` says so
        for the table (staged must not diverge silently), and names the unfinished resync
        that holds a table's compaction."""
        from cdc.lake.checkpoint import ResyncHold
        from cdc.ops.status import collect

        source.execute(EVENTS)
        Streamer(settings, LocalLake(settings.lake)).prepare()
        source.execute("INSERT INTO events VALUES (1, '2025-02-01', 'a'), (2, '2026-02-01', 'b')")
        source.execute("TRUNCATE events_2025")
        stream_until_caught_up(settings)
        ResyncHold(LocalLake(settings.lake), "public.events").hold(1)

        report = collect(settings.dsn, LocalLake(settings.lake), settings.slot,
                         publication=settings.publication)

        flagged = [w for w in report.warnings if w.startswith("public.events is partitioned")]
        assert len(flagged) == 1
        assert "cdc resync --tables public.events" in flagged[0]
        assert any("held below 0/1 by a cdc resync" in w for w in report.warnings)
