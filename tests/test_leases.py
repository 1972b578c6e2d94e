"""Single-writer compaction: a lease per staged table, across processes and on S3.

Two compactors never apply the same changes twice (keyed or keyless), a second one waits or
skips and says which, and a holder that lost its lease while paused commits nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import SourceDb, with_settings
from polling import wait_for
from rawlake import run_cdc, start_cdc, stop
from test_compact import assert_staged_equals_source, staged_rows
from test_s3 import aws_env, bucket, lake_of  # noqa: F401 (fixtures)
from test_s3 import staged_rows as s3_staged_rows

from cdc.config import Settings
from cdc.errors import LeaseLost
from cdc.lake import lease
from cdc.lake.store import Lake, LocalLake
from cdc.staged.compactor import CompactOptions
from cdc.staged.runner import compact_lake


@pytest.fixture(params=["local", "s3"])
def any_lake(request: pytest.FixtureRequest, tmp_path: Path) -> Lake:
    if request.param == "local":
        return LocalLake(tmp_path / "lake")
    request.getfixturevalue("aws_env")
    from cdc.lake.s3 import S3Lake

    name = request.getfixturevalue("bucket")
    return S3Lake(f"s3://{name}/lake", endpoint=request.getfixturevalue("moto_endpoint"))


class TestLease:
    def test_put_if_absent_writes_once_and_keeps_the_first_content(self, any_lake: Lake) -> None:
        """The lease's primitive: the second conditional write loses and changes nothing."""
        assert any_lake.write_if_absent("_cdc/x/one.json", b"first")
        assert not any_lake.write_if_absent("_cdc/x/one.json", b"second")
        assert any_lake.read_bytes("_cdc/x/one.json") == b"first"
        any_lake.delete("_cdc/x/one.json")
        assert any_lake.read_bytes("_cdc/x/one.json") is None

    def test_a_held_lease_is_refused_with_its_holder_and_taken_after_release(
        self, any_lake: Lake
    ) -> None:
        """Exactly one holder; the next one gets a higher token once it is released."""
        held = lease.try_acquire(any_lake, "staged/public.t", "first")
        assert isinstance(held, lease.Lease)
        rival = lease.try_acquire(any_lake, "staged/public.t", "second")
        assert isinstance(rival, lease.LeaseRecord)
        assert rival.purpose == "first"
        assert rival.token == held.token
        held.release()
        nxt = lease.try_acquire(any_lake, "staged/public.t", "second")
        assert isinstance(nxt, lease.Lease)
        assert nxt.token == held.token + 1
        nxt.fence()
        nxt.release()
        assert [k.rsplit("/", 1)[1] for k in any_lake.list("_cdc/leases/staged/public.t/")] == [
            f"{nxt.token:012d}.json"]  # older tokens are cleaned up

    def test_a_holder_killed_on_this_machine_is_taken_over_at_once_a_live_one_never(
        self, tmp_path: Path
    ) -> None:
        """kill -9 leaves the lease unreleased for its whole term; its record names the
        holder process, so a taker on the same machine sees it gone and takes over at once;
        a live holder in another process, or one on another host, keeps it."""
        lake = LocalLake(tmp_path / "lake")
        holder = subprocess.Popen(
            [sys.executable, "-c", "import sys, time\nfrom cdc.lake import lease\n"
             "from cdc.lake.store import LocalLake\n"
             f"got = lease.try_acquire(LocalLake({str(tmp_path / 'lake')!r}), 'staged/t', "
             "'holder', ttl=600)\nprint(type(got).__name__, flush=True)\ntime.sleep(600)"],
            stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline().strip() == "Lease"
            rival = lease.try_acquire(lake, "staged/t", "rival")
            assert isinstance(rival, lease.LeaseRecord)
            assert rival.purpose == "holder"
        finally:
            holder.kill()
            holder.wait()
        taken = lease.try_acquire(lake, "staged/t", "rival")
        assert isinstance(taken, lease.Lease)
        assert taken.token == rival.token + 1
        taken.release()
        record = lease.LeaseRecord(9, "h", "elsewhere", 10**12, {
            **(taken.record.owner or {}), "host": "another-host"})
        assert record.live(0)  # a pid of another host is never guessed at

    def test_a_paused_holder_is_fenced_off_once_its_lease_expired_and_was_taken(
        self, any_lake: Lake
    ) -> None:
        """A holder whose renewals stopped (a paused process) may no longer commit."""
        held = lease.try_acquire(any_lake, "staged/public.t", "paused", ttl=1.0)
        assert isinstance(held, lease.Lease)
        held._stop.set()  # the pause: no renewal from now on
        held._thread.join()
        wait_for(lambda: lease.current(any_lake, "staged/public.t") is None, timeout=30,
                 what="the lease to expire")
        taker = wait_for(lambda: _taken(any_lake), timeout=30, what="a new holder")
        with pytest.raises(LeaseLost, match=r"renewed|taken over"):
            held.fence()
        held.release()  # releasing a lost lease leaves the new holder's record alone
        assert lease.current(any_lake, "staged/public.t") == taker.record
        taker.fence()
        taker.release()


def _taken(lake: Lake) -> lease.Lease | None:
    got = lease.try_acquire(lake, "staged/public.t", "taker", ttl=30.0)
    return got if isinstance(got, lease.Lease) else None


def setup_and_stream(source: SourceDb, settings: Settings) -> None:
    source.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint)")
    source.execute("CREATE TABLE events (k int, n int)")  # no key: staged is an append
    source.execute("ALTER TABLE events REPLICA IDENTITY FULL")
    created = run_cdc(["slot", "create", "--dsn", settings.dsn, "--slot", settings.slot,
                       "--publication", settings.publication])
    assert created.returncode == 0, created.stderr
    source.execute("INSERT INTO accounts SELECT g, g FROM generate_series(1, 20000) g")
    source.execute("INSERT INTO events SELECT g % 10, g FROM generate_series(1, 20000) g")
    common = ["--dsn", settings.dsn, "--lake", settings.lake, "--slot", settings.slot,
              "--publication", settings.publication]
    if settings.s3_endpoint:
        common += ["--s3-endpoint", settings.s3_endpoint]
    result = run_cdc(["stream", *common, "--until-caught-up", "--compact-every", "0"])
    assert result.returncode == 0, result.stderr


def compact_command(settings: Settings) -> list[str]:
    extra = ["--s3-endpoint", settings.s3_endpoint] if settings.s3_endpoint else []
    return [sys.executable, "-m", "cdc", "compact", "--lake", settings.lake, "--slot",
            settings.slot, *extra]


def run_together(settings: Settings, n: int, faults: str = "") -> list[str]:
    """``n`` `cdc compact` processes started at once; their stderr (each must exit 0)."""
    env = {**os.environ, "CDC_FAULTS": faults}
    procs = [subprocess.Popen(compact_command(settings), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(n)]
    errors = []
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        errors.append(err)
    return errors


class TestOneCompactorPerTable:
    def test_two_compact_processes_started_together_stage_each_row_once(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """Both exit 0; keyed and keyless staged tables hold every row exactly once."""
        setup_and_stream(source, settings)
        # both stall right before their commit, so they surely overlap
        errors = run_together(settings, 2, faults="staged.before_commit=sleep:1")
        assert_staged_equals_source(source, settings, "accounts", "events")
        assert any("compaction_waiting" in e for e in errors)

    def test_a_second_compactor_waits_for_the_holder_and_says_so(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """`cdc compact` waits while another holds the table, then compacts once it is free."""
        setup_and_stream(source, settings)
        lake = LocalLake(settings.lake)
        held = lease.try_acquire(lake, "staged/public.accounts", "a test holding it")
        assert isinstance(held, lease.Lease)
        proc = subprocess.Popen(compact_command(settings), stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True)
        reader.start()
        wait_for(lambda: any("compaction_waiting" in line and "a test holding it" in line
                             for line in lines), timeout=120, what="the compactor to wait")
        assert not (Path(settings.lake) / "staged" / "public.accounts").exists()
        held.release()
        assert proc.wait(timeout=300) == 0
        reader.join(timeout=30)
        assert_staged_equals_source(source, settings, "accounts", "events")

    def test_the_background_compactor_skips_a_held_table_and_says_by_whom(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """compact_lake without waiting (what `cdc stream --compact-every` runs) skips."""
        setup_and_stream(source, settings)
        lake = LocalLake(settings.lake)
        held = lease.try_acquire(lake, "staged/public.events", "someone else")
        assert isinstance(held, lease.Lease)
        try:
            results = {r.table: r for r in compact_lake(lake, settings.slot,
                                                       options=CompactOptions(wait=False))}
        finally:
            held.release()
        assert "someone else" in results["public.events"].held_by
        assert results["public.accounts"].changes == 20000
        result = run_cdc(compact_command(settings)[3:])
        assert result.returncode == 0, result.stderr
        assert_staged_equals_source(source, settings, "accounts", "events")

    def test_compact_beside_a_stream_compacting_every_second_stages_each_row_once(
        self, source: SourceDb, settings: Settings
    ) -> None:
        """`cdc compact` run repeatedly while `cdc stream --compact-every 1s` writes."""
        setup_and_stream(source, settings)
        proc = start_cdc(with_settings(settings), "--compact-every", "1s",
                         "--flush-seconds", "1s")
        try:
            for round_ in range(4):
                source.execute("INSERT INTO events SELECT %s, g FROM generate_series(1, 2000) g",
                               (100 + round_,))
                source.execute("UPDATE accounts SET balance = balance + 1 WHERE id %% 4 = %s",
                               (round_,))
                errors = run_together(settings, 1, faults="staged.before_commit=sleep:0.5")
                assert "Traceback" not in errors[0]
            target = source.current_lsn()
            wait_for(lambda: (source.slot_confirmed_lsn() or 0) >= target, timeout=120,
                     what="the stream to confirm the workload")
        finally:
            assert stop(proc, signal.SIGTERM) == 0
        result = run_cdc(compact_command(settings)[3:])
        assert result.returncode == 0, result.stderr
        assert_staged_equals_source(source, settings, "accounts", "events")
        rows: list[dict[str, Any]] = staged_rows(settings, "public.events")
        assert max(Counter((r["k"], r["n"]) for r in rows).values()) == 1

    def test_two_compactors_on_one_s3_lake_stage_each_row_once(
        self, source: SourceDb, settings: Settings, bucket: str, moto_endpoint: str  # noqa: F811
    ) -> None:
        """The lease on S3 is a conditional PUT: two processes, one writer per table."""
        s3 = with_settings(settings, lake=f"s3://{bucket}/lake", s3_endpoint=moto_endpoint)
        setup_and_stream(source, s3)
        run_together(s3, 2, faults="staged.before_commit=sleep:1")
        lake = lake_of(s3)
        for table in ("accounts", "events"):
            staged = s3_staged_rows(lake, f"public.{table}")
            expected = source.execute(f"SELECT count(*) FROM {table}")[0][0]
            assert len(staged) == expected, table
