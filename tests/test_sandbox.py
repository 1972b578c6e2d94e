"""The test sandbox cleans up after runs killed with SIGKILL, and never touches a cluster
whose owner still runs (other test runs share this machine)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from cdc.sandbox import reap_orphans

OWNER = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from cdc.sandbox import LocalCluster\n"
    "cluster = LocalCluster(base_dir=Path(sys.argv[1])).start()\n"
    "print(cluster.dsn(), flush=True)\n"
    "time.sleep(3600)\n"
)


@pytest.fixture
def base() -> Iterator[Path]:
    """A folder the server's user can enter (pytest's tmp_path is private to root)."""
    path = Path(tempfile.mkdtemp(prefix="cdc-sandbox-test-"))
    os.chmod(path, 0o755)  # noqa: S103  the server runs as another user
    try:
        yield path
    finally:
        reap_orphans(path)
        shutil.rmtree(path, ignore_errors=True)


def start_owner(base: Path) -> tuple[subprocess.Popen[str], str]:
    """A process that starts a cluster in ``base`` and keeps it; (process, its DSN)."""
    proc = subprocess.Popen([sys.executable, "-c", OWNER, str(base)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def answers(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            return conn.execute("SELECT 1").fetchone() == (1,)
    except psycopg.OperationalError:
        return False


class TestReapingOrphans:
    def test_a_cluster_whose_owner_was_killed_is_stopped_and_removed_by_the_next_start(
            self, base: Path) -> None:
        """kill -9 of the owner leaves the server running; the next reap stops it and
        removes its directory and record."""
        proc, dsn = start_owner(base)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert answers(dsn)  # orphaned, still running
        [cluster] = reap_orphans(base)
        assert not answers(dsn)
        assert not cluster.exists()
        assert list(base.iterdir()) == []

    def test_a_cluster_whose_owner_runs_is_left_alone(self, base: Path) -> None:
        """Another run's cluster keeps serving while reaps happen beside it."""
        proc, dsn = start_owner(base)
        try:
            assert reap_orphans(base) == []
            assert answers(dsn)
        finally:
            proc.kill()
            proc.wait(timeout=30)
        assert len(reap_orphans(base)) == 1

    def test_a_cluster_without_an_owner_record_or_from_elsewhere_is_never_touched(
            self, base: Path) -> None:
        """No record (an older sandbox's), or a record from another pid namespace/host."""
        (base / "cdc-pg-norecord").mkdir()
        (base / "cdc-pg-elsewhere").mkdir()
        (base / "cdc-pg-elsewhere.owner").write_text(json.dumps(
            {"pid": 999_999_999, "start": "1", "host": "another-host", "namespace": "x"}))
        assert reap_orphans(base) == []
        assert (base / "cdc-pg-norecord").exists()
        assert (base / "cdc-pg-elsewhere").exists()

    def test_a_reused_pid_does_not_keep_an_orphan_alive(self, base: Path) -> None:
        """The record's start time tells the owner from a later process with its pid."""
        from cdc.owner import this_process

        (base / "cdc-pg-reused").mkdir()
        record = {**this_process(), "start": "1"}  # our pid, but not our start time
        (base / "cdc-pg-reused.owner").write_text(json.dumps(record))
        assert reap_orphans(base) == [base / "cdc-pg-reused"]
        assert list(base.iterdir()) == []
