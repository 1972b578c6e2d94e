"""Random kill -9 points over a random workload: staged always converges to the source.

Each round runs `cdc stream --until-caught-up` and `cdc compact` as child processes with one
named fault point armed to SIGKILL them at its N-th hit (``CDC_FAULTS``), then the next round
goes on; at the end one clean stream and compaction must leave staged equal to the source
(the oracle: the source tables themselves, keyed and keyless). The seed is printed: rerun
with ``KILL_SEED=<seed>`` to replay a failure.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter

import pytest
from conftest import SourceDb
from rawlake import run_cdc
from test_compact import assert_staged_equals_source, staged_rows

from cdc.config import Settings

STREAM_POINTS = ["raw.before_write", "raw.after_write", "checkpoint.before_save",
                 "checkpoint.after_save", "status.before_send", "status.after_send"]
COMPACT_POINTS = ["staged.before_commit", "staged.after_commit", "staged.after_maintenance"]


def run(settings: Settings, command: str, faults: str) -> int:
    common = ["--lake", settings.lake, "--slot", settings.slot]
    args = (["stream", "--dsn", settings.dsn, *common, "--publication", settings.publication,
             "--until-caught-up", "--compact-every", "0", "--flush-rows", "50"]
            if command == "stream" else ["compact", *common, "--optimize-every", "2"])
    env = {**os.environ, "CDC_FAULTS": faults, "CDC_LEASE_SECONDS": "3",
           "CDC_MAX_BACKOFF_SECONDS": "1"}
    result = subprocess.run([sys.executable, "-m", "cdc", *args], capture_output=True,
                            text=True, timeout=300, env=env, check=False)
    assert result.returncode in (0, -9), result.stderr  # done, or killed at the point
    return result.returncode


def workload(source: SourceDb, rng: random.Random, next_id: list[int]) -> None:
    with source.connect() as conn:
        for _ in range(rng.randint(20, 80)):
            op = rng.random()
            if op < 0.5:
                next_id[0] += 1
                conn.execute("INSERT INTO accounts VALUES (%s, %s)",
                             (next_id[0], rng.randint(0, 9)))
            elif op < 0.75:
                conn.execute("UPDATE accounts SET balance = balance + 1 WHERE id = %s",
                             (rng.randint(1, max(next_id[0], 1)),))
            elif op < 0.85:
                conn.execute("DELETE FROM accounts WHERE id = %s",
                             (rng.randint(1, max(next_id[0], 1)),))
            else:
                conn.execute("INSERT INTO events VALUES (%s, %s)", (next_id[0], rng.random()))


@pytest.mark.slow
@pytest.mark.parametrize("round_seed", [0, 1, 2])
def test_random_kill_points_over_a_random_workload_converge_to_the_source(
    source: SourceDb, settings: Settings, round_seed: int
) -> None:
    seed = int(os.environ.get("KILL_SEED", random.randrange(1 << 30))) + round_seed
    print(f"kill-point seed {seed}")
    rng = random.Random(seed)
    source.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance int)")
    source.execute("CREATE TABLE events (id int, x float8)")  # no key
    source.execute("ALTER TABLE events REPLICA IDENTITY FULL")
    created = run_cdc(["slot", "create", "--dsn", settings.dsn, "--slot", settings.slot,
                       "--publication", settings.publication])
    assert created.returncode == 0, created.stderr
    next_id = [0]
    kills = 0
    for _ in range(5):
        workload(source, rng, next_id)
        point = f"{rng.choice(STREAM_POINTS)}=kill@{rng.randint(1, 4)}"
        kills += run(settings, "stream", point) == -9
        point = f"{rng.choice(COMPACT_POINTS)}=kill@{rng.randint(1, 3)}"
        kills += run(settings, "compact", point) == -9
    assert kills > 0  # the faults did strike
    assert run(settings, "stream", "") == 0
    assert run(settings, "compact", "") == 0
    assert_staged_equals_source(source, settings, "accounts", "events")
    assert max(Counter((r["id"], r["x"]) for r in staged_rows(settings, "public.events"))
               .values()) == 1
