"""The ack policy (invariant 1), driven by a scripted source: no PostgreSQL needed."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scripted_source import ScriptedSource, keepalive, relation, transaction

from cdc import faults
from cdc.config import Settings
from cdc.events import Lsn
from cdc.lake.checkpoint import CheckpointStore
from cdc.lake.layout import RAW
from cdc.lake.store import LocalLake
from cdc.source.protocol import Source
from cdc.stream.ack import AckPolicy
from cdc.stream.session import Session
from cdc.stream.streamer import Stopper, Streamer

START = 0x1000


def run_session(root: Path, frames: list[bytes], *, flush_rows: int = 1000, start: Lsn = START,
                on_status: Callable[[Lsn], None] | None = None,
                fault: str = "") -> ScriptedSource:
    """One session from checkpoint ``start`` over ``frames``; the source, as played.

    ``fault`` arms fault points for the session (the ``CDC_FAULTS`` format).
    """
    lake = LocalLake(root)
    settings = Settings(dsn="host=/nonexistent", lake=str(root), flush_rows=flush_rows,
                        flush_seconds=3600, status_seconds=3600, progress_seconds=3600,
                        heartbeat_seconds=0, compact_every=0)
    CheckpointStore(lake, settings.slot).save(start)
    stopper = Stopper()
    sources: list[ScriptedSource] = []

    def open_source(start_lsn: Lsn) -> Source:
        assert start_lsn == start
        sources.append(ScriptedSource(frames, stopper, on_status))
        return sources[0]

    session = Session(Streamer(settings, lake, stopper, source=open_source), None)
    try:
        with contextlib.ExitStack() as stack:
            for point, action in faults.parse(fault).items():
                stack.enter_context(faults.armed(point, action))
            session.run()
    finally:
        assert sources[0].closed
    return sources[0]


def raw_keys_in(root: Path) -> set[int]:
    """Primary keys of every row durable in raw."""
    keys: set[int] = set()
    for path in (root / RAW).rglob("*.parquet"):
        keys.update(pq.read_table(path, columns=["id"])["id"].to_pylist())
    return keys


def checkpoint_of(root: Path) -> Lsn | None:
    return CheckpointStore(LocalLake(root), "cdc").load()


class TestAckPolicyInSession:
    def test_a_keepalive_inside_a_transaction_never_acknowledges_past_the_last_durable_commit(
        self, tmp_path: Path
    ) -> None:
        """A keepalive whose WAL end is past the open transaction's commit acks the last commit."""
        first = transaction(0x2000, 1, [1])
        second = transaction(0x3000, 2, [2, 3])
        frames = [relation(), *first, *second[:2], keepalive(0x9000), *second[2:]]
        source = run_session(tmp_path, frames, flush_rows=1)

        # the keepalive's reply (it waits for the flush in flight): tx 1's end, not 0x9000
        at_keepalive = [s.lsn for s in source.sent if s.played == len(first) + 4]
        assert at_keepalive
        assert set(at_keepalive) == {0x2008}
        before_second_commit = [s.lsn for s in source.sent if s.played < len(frames) - 1]
        assert max(before_second_commit) == 0x2008
        assert source.acknowledged()[-1] == 0x3008  # the stop flushes and acks tx 2
        assert checkpoint_of(tmp_path) == 0x3008

    def test_a_flush_inside_a_transaction_acknowledges_only_up_to_the_previous_commit(
        self, tmp_path: Path
    ) -> None:
        """Rows of the open transaction are durable after the flush, but its commit is not."""
        first = transaction(0x2000, 1, [1])
        second = transaction(0x3000, 2, [2, 3, 4])
        frames = [relation(), *first, *second[:2]]  # flush_rows=2: the 2nd row cuts a batch
        seen: list[tuple[Lsn, set[int]]] = []
        source = run_session(tmp_path, frames, flush_rows=2,
                             on_status=lambda lsn: seen.append((lsn, raw_keys_in(tmp_path))))

        assert (0x2008, {1, 2}) in seen  # tx 2's first row is in raw, its commit not acked
        assert max(source.acknowledged()) == 0x2008
        assert checkpoint_of(tmp_path) == 0x2008

    def test_the_checkpoint_never_moves_back(self, tmp_path: Path) -> None:
        """Positions behind the checkpoint (an old keepalive, a replayed commit) ack it as is."""
        frames = [relation(), keepalive(0x4000), *transaction(0x3000, 7, [1]), keepalive(0x4800)]
        source = run_session(tmp_path, frames, start=0x5000)

        assert source.acknowledged()
        assert min(source.acknowledged()) == 0x5000
        assert checkpoint_of(tmp_path) == 0x5000

    def test_an_idle_stream_acknowledges_the_servers_position(self, tmp_path: Path) -> None:
        """Nothing in flight: a keepalive moves checkpoint and slot to its WAL end (inv. 5)."""
        frames = [relation(), *transaction(0x2000, 1, [1]), keepalive(0x2100, reply=False),
                  keepalive(0x2200)]
        source = run_session(tmp_path, frames, flush_rows=1)

        assert source.acknowledged()[-1] == 0x2200
        assert checkpoint_of(tmp_path) == 0x2200

    def test_a_keepalive_between_transactions_is_acknowledged_once_the_buffered_rows_are_written(
        self, tmp_path: Path
    ) -> None:
        """Rows still buffered at an idle keepalive: the stop writes them and acknowledges the
        keepalive's WAL end, not just the last commit (a stream caught up to a target past
        its last commit ends at the target)."""
        frames = [relation(), *transaction(0x2000, 1, [1, 2]), keepalive(0x2600, reply=False)]
        source = run_session(tmp_path, frames, flush_rows=1000)

        assert raw_keys_in(tmp_path) == {1, 2}
        assert source.acknowledged()[-1] == 0x2600
        assert checkpoint_of(tmp_path) == 0x2600

    @pytest.mark.parametrize(("fault", "durable"), [
        ("checkpoint.before_save=raise", {1}),  # the row is in raw, its commit not recorded
        ("raw.before_write=raise", set()),  # the file never became durable
    ], ids=["checkpoint save fails", "raw write fails"])
    def test_nothing_is_acknowledged_or_checkpointed_past_a_step_that_failed(
        self, tmp_path: Path, fault: str, durable: set[int]
    ) -> None:
        """Raw, then checkpoint, then acknowledge: a failed step leaves slot and checkpoint at
        the start."""
        frames = [relation(), *transaction(0x2000, 1, [1]), keepalive(0x2100)]
        sent: list[Lsn] = []
        with pytest.raises(faults.InjectedFault):
            run_session(tmp_path, frames, flush_rows=1, on_status=sent.append, fault=fault)

        assert raw_keys_in(tmp_path) == durable
        assert all(lsn <= START for lsn in sent)
        assert checkpoint_of(tmp_path) == START

    def test_a_status_update_that_fails_leaves_the_checkpoint_ahead_of_the_slot(
        self, tmp_path: Path
    ) -> None:
        """Checkpointed but not acknowledged is safe: the server only replays (invariant 3)."""
        frames = [relation(), *transaction(0x2000, 1, [1])]
        sent: list[Lsn] = []
        with pytest.raises(faults.InjectedFault):
            # the first status is the stop's, after the checkpoint recorded the commit (with
            # flushes written beside the loop, when a mid-stream flush is acknowledged
            # depends on the writer thread: none happens here)
            run_session(tmp_path, frames, on_status=sent.append,
                        fault="status.before_send=raise@1")

        assert sent == []
        assert checkpoint_of(tmp_path) == 0x2008

# -- property: every acknowledgement is covered by raw and the checkpoint ---------------------


@dataclass
class Script:
    frames: list[bytes] = field(default_factory=list)
    #: key → commit LSN of its transaction
    commits: dict[int, Lsn] = field(default_factory=dict)
    safe_end: Lsn = START  # the highest position the stop must acknowledge


@st.composite
def scripts(draw: st.DrawFn) -> Script:
    """Transactions in commit order with keepalives between and inside them.

    An idle keepalive's WAL end stays below the next commit (the walsender has not decoded
    it yet); one inside a transaction may be anywhere, also past that transaction's commit.
    """
    script = Script(frames=[relation()])
    lsn, key = START, 0
    for xid in range(1, draw(st.integers(0, 6)) + 1):
        if draw(st.booleans()):
            wal_end = lsn + draw(st.integers(0, 0xF00))
            script.frames.append(keepalive(wal_end, reply=draw(st.booleans())))
            script.safe_end = max(script.safe_end, wal_end)
        commit_lsn = lsn + 0x1000
        keys = list(range(key, key + draw(st.integers(0, 4))))
        key += len(keys)
        frames = transaction(commit_lsn, xid, keys)
        inside = draw(st.integers(1, len(frames) - 1))
        if draw(st.booleans()):  # a keepalive inside the transaction, maybe past its commit
            frames.insert(inside, keepalive(commit_lsn + draw(st.integers(-0x800, 0x800))))
        script.frames += frames
        script.commits.update(dict.fromkeys(keys, commit_lsn))
        script.safe_end = commit_lsn + 8
        lsn = commit_lsn + 8
    if draw(st.booleans()):  # an idle keepalive last, while the last rows may be buffered
        wal_end = lsn + draw(st.integers(0, 0xF00))
        script.frames.append(keepalive(wal_end, reply=draw(st.booleans())))
        script.safe_end = max(script.safe_end, wal_end)
    return script


class TestAckOracle:
    @given(scripts(), st.integers(1, 5))
    def test_every_acknowledged_position_is_durable_in_raw_and_checkpointed(
        self, script: Script, flush_rows: int
    ) -> None:
        """At each status update: every change committed before it is in raw, the checkpoint
        is at or past it, and it never moves back; at the stop, everything is acknowledged."""
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            previous = [START]

            def check(lsn: Lsn) -> None:
                assert lsn >= previous[-1]
                previous.append(lsn)
                checkpoint = checkpoint_of(root)
                assert checkpoint is not None
                assert checkpoint >= lsn
                due = {k for k, commit_lsn in script.commits.items() if commit_lsn < lsn}
                assert due <= raw_keys_in(root)

            source = run_session(root, script.frames, flush_rows=flush_rows, on_status=check)
            assert source.acknowledged()[-1] == script.safe_end
            assert raw_keys_in(root) == set(script.commits)


class TestAckPolicyAlone:
    def test_a_save_that_returns_a_higher_stored_position_is_what_is_acknowledged(self) -> None:
        """The store's answer wins: the policy acknowledges the stored checkpoint, not less."""

        class Ahead:
            def save(self, lsn: Lsn) -> Lsn:
                return max(lsn, 0x7000)

        policy = AckPolicy(Ahead(), START)
        policy.commit(0x2008, buffered=False)
        sent: list[Lsn] = []
        assert policy.acknowledge(sent.append) == 0x7000
        assert sent == [0x7000]
        assert policy.acknowledged == policy.durable == 0x7000
