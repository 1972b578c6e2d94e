"""No silent gap: a slot re-created over a checkpoint is refused, and each way out works.

Every test follows the advice the refusal prints, through the CLI, and ends with staged
equal to the source.
"""

from __future__ import annotations

import json
from pathlib import Path

import psycopg
from conftest import SourceDb
from polling import wait_for
from rawlake import run_cdc
from test_compact import assert_staged_equals_source

from cdc.config import Settings


def common(settings: Settings) -> list[str]:
    return ["--dsn", settings.dsn, "--lake", settings.lake, "--slot", settings.slot,
            "--publication", settings.publication]


def cdc_ok(*args: str) -> str:
    result = run_cdc(list(args))
    assert result.returncode == 0, result.stderr
    return result.stderr


def stream_and_compact(settings: Settings) -> None:
    cdc_ok("stream", *common(settings), "--until-caught-up", "--compact-every", "0")
    cdc_ok("compact", "--lake", settings.lake, "--slot", settings.slot)


def slot_exists(source: SourceDb) -> bool:
    return bool(source.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s",
                               (source.slot,)))


def workload(source: SourceDb, round_: int) -> None:
    """Updates, deletes and inserts on a keyed and a keyless table."""
    base = 1000 * round_
    source.execute("UPDATE accounts SET balance = balance + %s WHERE id %% 3 = %s",
                   (round_, round_ % 3))
    source.execute("DELETE FROM accounts WHERE id %% 7 = %s", (round_ % 7,))
    source.execute("INSERT INTO accounts SELECT g, g FROM generate_series(%s::int, %s::int) g",
                   (base, base + 49))
    source.execute("INSERT INTO events SELECT %s, g FROM generate_series(1, 20) g", (round_,))


def setup_tables(source: SourceDb) -> None:
    source.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint)")
    source.execute("INSERT INTO accounts SELECT g, g * 10 FROM generate_series(1, 300) g")
    source.execute("CREATE TABLE events (round int, n int)")  # no key: staged is an append
    source.execute("ALTER TABLE events REPLICA IDENTITY FULL")


class TestSlotGoneOverACheckpoint:
    def test_stream_refuses_a_dropped_slot_and_a_new_snapshot_closes_the_gap(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Dropped slot + checkpoint: exit 4, no slot created; `cdc snapshot` then restores
        staged exactly (rows deleted in the gap are gone, keyless rows not doubled)."""
        setup_tables(source)
        stream_and_compact(settings)
        workload(source, 1)
        stream_and_compact(settings)
        assert "dropped" in run_cdc(["slot", "drop", *common(settings)[:2], "--slot",
                                     settings.slot]).stdout
        workload(source, 2)  # the gap: no slot records these changes

        refused = run_cdc(["stream", *common(settings), "--until-caught-up"])
        assert refused.returncode == 4, refused.stderr
        assert "is gone" in refused.stderr
        assert f"cdc snapshot --slot {settings.slot}" in refused.stderr
        assert not slot_exists(source)  # nothing was skipped by a silently created slot

        # the advice, followed
        done = cdc_ok("snapshot", *common(settings))
        assert "snapshot done:" in done
        assert " 0 rows" not in done
        workload(source, 3)
        stream_and_compact(settings)
        assert_staged_equals_source(source, settings, "accounts", "events")
        progress = json.loads((Path(settings.lake) / "_cdc" / "snapshots"
                               / f"{settings.slot}.json").read_bytes())
        assert progress["status"] == "done"
        assert progress["generation"] == 2

    def test_snapshot_after_the_first_one_was_done_starts_a_new_generation(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """The advised `cdc slot drop` after a snapshot-started pipeline: `cdc snapshot`
        copies again (not "0 rows: done") and staged follows the source."""
        setup_tables(source)
        cdc_ok("snapshot", *common(settings))
        stream_and_compact(settings)
        workload(source, 1)
        stream_and_compact(settings)
        again = cdc_ok("snapshot", *common(settings))
        assert "already done" in again  # slot still there: nothing to do, and it says so

        cdc_ok("slot", "drop", "--dsn", settings.dsn, "--slot", settings.slot)
        workload(source, 2)
        refused = run_cdc(["stream", *common(settings), "--until-caught-up"])
        assert refused.returncode == 4
        assert "is gone" in refused.stderr
        done = cdc_ok("snapshot", *common(settings))
        assert " 0 rows" not in done
        stream_and_compact(settings)
        assert_staged_equals_source(source, settings, "accounts", "events")

    def test_a_slot_recreated_behind_the_lake_is_refused_and_the_advice_works(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """A slot created by hand after a drop confirms past the checkpoint: exit 4 with
        drop + snapshot as the way out, which restores staged."""
        setup_tables(source)
        stream_and_compact(settings)
        cdc_ok("slot", "drop", "--dsn", settings.dsn, "--slot", settings.slot)
        workload(source, 1)
        cdc_ok("slot", "create", *common(settings)[:2], "--slot", settings.slot,
               "--publication", settings.publication)
        workload(source, 2)
        refused = run_cdc(["stream", *common(settings), "--until-caught-up"])
        assert refused.returncode == 4, refused.stderr
        assert "was consumed up to" in refused.stderr
        assert f"cdc slot drop --slot {settings.slot}" in refused.stderr
        cdc_ok("slot", "drop", "--dsn", settings.dsn, "--slot", settings.slot)
        cdc_ok("snapshot", *common(settings))
        stream_and_compact(settings)
        assert_staged_equals_source(source, settings, "accounts", "events")


class TestInvalidatedSlot:
    def test_an_invalidated_slot_is_refused_and_its_advice_restores_staged(
        self, source: SourceDb, settings: Settings, server_dsn: str
    ) -> None:
        """The server removed WAL the slot needed (max_slot_wal_keep_size): exit 4 with
        `cdc slot drop` + `cdc snapshot`, which, followed, give staged equal to the source."""
        setup_tables(source)
        stream_and_compact(settings)
        with psycopg.connect(server_dsn, autocommit=True) as admin:
            admin.execute("ALTER SYSTEM SET max_slot_wal_keep_size = '1MB'")
            admin.execute("SELECT pg_reload_conf()")
            try:
                workload(source, 9)  # changes the slot will never deliver

                def lost() -> bool:
                    source.execute("INSERT INTO events SELECT 9, g "
                                   "FROM generate_series(1, 20000) g")
                    source.execute("SELECT pg_switch_wal()")
                    source.execute("CHECKPOINT")
                    rows = source.execute("SELECT wal_status FROM pg_replication_slots "
                                          "WHERE slot_name = %s", (source.slot,))
                    return bool(rows) and rows[0][0] == "lost"

                wait_for(lost, timeout=120, what="the slot to be invalidated")
            finally:
                admin.execute("ALTER SYSTEM RESET max_slot_wal_keep_size")
                admin.execute("SELECT pg_reload_conf()")
        refused = run_cdc(["stream", *common(settings), "--until-caught-up"])
        assert refused.returncode == 4, refused.stderr
        assert "invalidated" in refused.stderr or "wal_status lost" in refused.stderr
        assert f"cdc slot drop --slot {settings.slot}" in refused.stderr
        follow_check_fix(settings)
        workload(source, 10)
        stream_and_compact(settings)
        assert_staged_equals_source(source, settings, "accounts", "events")


def follow_check_fix(settings: Settings) -> None:
    """Run the commands `cdc check` names for the lost slot, word for word, plus the
    connection options every command takes."""
    check = run_cdc(["check", "--json", "--dsn", settings.dsn, "--slot", settings.slot,
                     "--publication", settings.publication])
    assert check.returncode == 1, check.stderr
    [finding] = [f for f in json.loads(check.stdout)["problems"] if f["check"] == "wal_status"]
    commands = [part.split(" (")[0].split() for part in finding["fix"].split(", then ")]
    assert [c[:2] for c in commands] == [["cdc", "slot"], ["cdc", "snapshot"], ["cdc", "stream"]]
    drop, snapshot = commands[0][1:], commands[1][1:]
    assert drop == ["slot", "drop", "--slot", settings.slot]
    assert snapshot == ["snapshot", "--slot", settings.slot]
    cdc_ok(*drop, "--dsn", settings.dsn)
    cdc_ok(*snapshot, "--dsn", settings.dsn, "--lake", settings.lake,
           "--publication", settings.publication)
