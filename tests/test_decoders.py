"""Both pgoutput decoders (pure Python, compiled) buffer the same rows and raise the same errors.

The pure decoder (``cdc.decoding.core.PureDecoder``) is the reference. Each test here runs
on both through the one ``Decoder`` protocol; the differential tests generate streams of
valid and malformed messages (every message type, every column kind) with hypothesis and
hold the compiled decoder to the reference's events, errors and cut Arrow batches.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_pgoutput import (
    begin_msg,
    column_value,
    commit_msg,
    delete_msg,
    insert_msg,
    message_msg,
    origin_msg,
    relation_msg,
    truncate_msg,
    tuple_data,
    type_msg,
    update_msg,
)

from cdc.decoding.core import Decoder, PureDecoder, native_module
from cdc.errors import DecodeError
from cdc.events import UNCHANGED, Relation, Truncate, Value
from cdc.stream.batcher import Batch, Batcher, FlushLimits, NativeTableBuffer

try:  # both decoders are tested where the extension is built, whatever CDC_PURE_PYTHON says
    from cdc.decoding import _native as NATIVE  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - a machine without a C compiler
    NATIVE = None
TEXT_OID = 25
OID = 16384
KINDS = ["pure", "native"]


@dataclass
class Counter:
    changes: int = 0


@dataclass
class Harness:
    """A decoder over its batcher, fed the way the stream session feeds it."""

    decoder: Decoder
    batcher: Batcher
    relations: dict[int, Relation]
    stats: Counter
    lsn: int = 0x1000
    cut: list[Batch] = field(default_factory=list)

    def feed(self, message: bytes) -> Any:
        """The event, None for a buffered row, or ("error", message) for a DecodeError."""
        self.lsn += 8
        try:
            event = self.decoder.feed(message, self.lsn)
        except DecodeError as exc:
            return ("error", str(exc))
        if isinstance(event, Relation):
            known = self.relations.get(event.oid)
            if known is not None and known != event:  # its schema changes: close its batch
                self.cut += [buffer.cut() for buffer in self.batcher.detach(event.oid)]
            self.relations[event.oid] = event
        elif isinstance(event, Truncate):
            for oid in event.relation_oids:
                if oid in self.relations:
                    self.decoder.append(oid, "t", None, self.lsn, len(message))
        return event

    def batches(self) -> list[Batch]:
        return self.cut + [buffer.cut() for buffer in self.batcher.detach_all()]


def harness(kind: str) -> Harness:
    batcher = Batcher(FlushLimits(10**9, 10**15, 1e9))
    relations: dict[int, Relation] = {}
    stats = Counter()
    if kind == "pure":
        return Harness(PureDecoder(batcher, relations, stats), batcher, relations, stats)
    if NATIVE is None:
        pytest.skip("the compiled decoder is not built (pip install -e . builds it)")
    batcher.buffer_type = NativeTableBuffer
    return Harness(NATIVE.NativeDecoder(batcher, relations, stats), batcher, relations, stats)


def rel_msg(ncols: int = 3, keys: tuple[int, ...] = (0,), identity: str = "d",
            oid: int = OID) -> bytes:
    return relation_msg(oid, "public", f"t{oid}", identity,
                        [(1 if i in keys else 0, f"c{i}", TEXT_OID, -1) for i in range(ncols)])


def run(kind: str, messages: list[bytes]) -> tuple[list[Any], list[tuple[str, pa.Table]],
                                                   tuple[int, int, int, int]]:
    h = harness(kind)
    events = [h.feed(m) for m in messages]
    counts = (h.stats.changes, h.batcher.rows, h.batcher.bytes, h.decoder.seq)
    return events, [(b.qualified_name, b.table) for b in h.batches()], counts


def assert_same(messages: list[bytes]) -> None:
    pure = run("pure", messages)
    native = run("native", messages)
    assert native[0] == pure[0]
    assert native[2] == pure[2]
    assert [name for name, _ in native[1]] == [name for name, _ in pure[1]]
    for (_, got), (_, want) in zip(native[1], pure[1], strict=True):
        assert got.equals(want, check_metadata=True), (got.to_pylist(), want.to_pylist())


def rows(kind: str, messages: list[bytes]) -> list[dict[str, Any]]:
    _, batches, _ = run(kind, messages)
    return [{k: v for k, v in row.items() if k in ("c0", "c1", "c2", "_op", "_seq",
                                                   "_unchanged")}
            for _, table in batches for row in table.to_pylist()]


START = [begin_msg(0x5000, 1_000_000, 7), rel_msg()]


@pytest.mark.parametrize("kind", KINDS)
class TestRowChanges:
    def test_insert_lands_its_values_in_order(self, kind: str) -> None:
        """Two inserts become two 'c' rows with their text values, NULL kept, seq 0 and 1."""
        got = rows(kind, [*START, insert_msg(OID, tuple_data("1", "a", None)),
                          insert_msg(OID, tuple_data("2", "", "ü"))])
        assert got == [
            {"c0": "1", "c1": "a", "c2": None, "_op": "c", "_seq": 0, "_unchanged": None},
            {"c0": "2", "c1": "", "c2": "ü", "_op": "c", "_seq": 1, "_unchanged": None},
        ]

    def test_update_with_unchanged_toast_lists_the_column(self, kind: str) -> None:
        """An update whose TOASTed column did not change lands NULL there, named in _unchanged."""
        got = rows(kind, [*START, update_msg(OID, tuple_data("1", UNCHANGED, "x"))])
        assert got == [{"c0": "1", "c1": None, "c2": "x", "_op": "u", "_seq": 0,
                        "_unchanged": ["c1"]}]

    def test_update_of_the_key_is_a_delete_then_an_update(self, kind: str) -> None:
        """With an old key tuple ('K') the old key is deleted before the new row lands."""
        got = rows(kind, [*START, update_msg(OID, tuple_data("2", "b", "c"),
                                             old=tuple_data("1", None, None), old_kind=b"K")])
        assert [(r["_op"], r["c0"], r["_seq"]) for r in got] == [("d", "1", 0), ("u", "2", 1)]

    def test_full_identity_update_takes_unchanged_values_from_the_old_tuple(
            self, kind: str) -> None:
        """Under REPLICA IDENTITY FULL ('O') the old tuple fills unchanged TOAST values; the
        key did not change, so there is no delete."""
        got = rows(kind, [begin_msg(1, 1, 1), rel_msg(identity="f"), update_msg(
            OID, tuple_data("1", UNCHANGED, "new"), old=tuple_data("1", "big", "old"),
            old_kind=b"O")])
        assert got == [{"c0": "1", "c1": "big", "c2": "new", "_op": "u", "_seq": 0,
                        "_unchanged": None}]

    def test_full_identity_update_of_the_key_deletes_the_old_row(self, kind: str) -> None:
        """Under REPLICA IDENTITY FULL a changed key column makes a delete of the old row."""
        got = rows(kind, [begin_msg(1, 1, 1), rel_msg(identity="f"), update_msg(
            OID, tuple_data("2", "a", "b"), old=tuple_data("1", "a", "b"), old_kind=b"O")])
        assert [(r["_op"], r["c0"]) for r in got] == [("d", "1"), ("u", "2")]

    def test_delete_carries_the_old_key(self, kind: str) -> None:
        """A delete lands its old key tuple as a 'd' row."""
        got = rows(kind, [*START, delete_msg(OID, b"K", tuple_data("9", None, None))])
        assert got == [{"c0": "9", "c1": None, "c2": None, "_op": "d", "_seq": 0,
                        "_unchanged": None}]

    def test_truncate_appended_as_values_shares_the_transaction_order(self, kind: str) -> None:
        """A truncate between two inserts gets the seq between theirs."""
        got = rows(kind, [*START, insert_msg(OID, tuple_data("1", "a", "b")),
                          truncate_msg([OID]), insert_msg(OID, tuple_data("2", "a", "b"))])
        assert [(r["_op"], r["_seq"]) for r in got] == [("c", 0), ("t", 1), ("c", 2)]

    def test_begin_restarts_the_change_order(self, kind: str) -> None:
        """Each transaction's changes count their seq from 0."""
        got = rows(kind, [*START, insert_msg(OID, tuple_data("1", "a", "b")),
                          commit_msg(0x5000, 0x5008, 1), begin_msg(0x6000, 2, 8),
                          insert_msg(OID, tuple_data("2", "a", "b"))])
        assert [r["_seq"] for r in got] == [0, 0]

    def test_row_before_its_relation_is_a_decode_error(self, kind: str) -> None:
        """A change of a relation never described is refused, not guessed."""
        events, batches, _ = run(kind, [begin_msg(1, 1, 1),
                                        insert_msg(OID, tuple_data("1"))])
        assert events[1][0] == "error"
        assert "before its Relation message" in events[1][1]
        assert batches == []

    def test_wrong_column_count_is_a_decode_error_and_buffers_nothing(self, kind: str) -> None:
        """A tuple with fewer columns than its relation is refused; nothing is half-buffered."""
        events, batches, counts = run(kind, [*START, insert_msg(OID, tuple_data("1", "a"))])
        assert events[2] == ("error", events[2][1])
        assert "has 2 columns, its Relation message 3" in events[2][1]
        assert batches == []
        assert counts == (0, 0, 0, 0)

    def test_unchanged_marker_in_an_insert_is_a_decode_error(self, kind: str) -> None:
        """Only an update's new tuple may say 'unchanged TOAST value'."""
        events, _, _ = run(kind, [*START, insert_msg(OID, tuple_data("1", UNCHANGED, "b"))])
        assert events[2][0] == "error"
        assert "unchanged-TOAST marker in an insert" in events[2][1]

    def test_truncated_row_message_raises_the_pure_decoders_error(self, kind: str) -> None:
        """A row message cut short inside a value raises DecodeError naming the message type."""
        message = insert_msg(OID, tuple_data("1", "abcdef", "c"))
        events, _, _ = run(kind, [*START, message[:-5]])
        assert events[2][0] == "error"
        assert "malformed pgoutput 'I' message" in events[2][1]

    def test_invalid_utf8_text_is_a_decode_error(self, kind: str) -> None:
        """Text that is not UTF-8 is refused as the pure decoder refuses it."""
        bad = struct.pack("!h", 3) + column_value("1") + b"t" + struct.pack("!i", 2) + \
            b"\xc3\x28" + column_value(None)
        events, _, _ = run(kind, [*START, insert_msg(OID, bad)])
        assert events[2][0] == "error"
        assert "utf-8" in events[2][1]


def test_decoders_agree_on_every_hand_written_case() -> None:
    """The cases above give identical events, counts and batches on both decoders."""
    assert_same([*START, insert_msg(OID, tuple_data("1", "a", None)),
                 update_msg(OID, tuple_data("1", UNCHANGED, "x")),
                 update_msg(OID, tuple_data("2", "b", "c"), old=tuple_data("1", None, None),
                            old_kind=b"K"),
                 delete_msg(OID, b"K", tuple_data("9", None, None)), truncate_msg([OID]),
                 commit_msg(0x5000, 0x5008, 1)])


# --------------------------------------------------------------------------- differential

values = st.one_of(st.none(), st.just(UNCHANGED),
                   st.text(st.characters(codec="utf-8"), max_size=12))


@st.composite
def tuples(draw: st.DrawFn, ncols: int) -> bytes:
    """TupleData, usually of ``ncols`` columns (sometimes not: a count the relation refutes)."""
    n = draw(st.sampled_from([ncols] * 6 + [max(ncols - 1, 0), ncols + 1]))
    row: list[Value] = draw(st.lists(values, min_size=n, max_size=n))
    return tuple_data(*row)


def message(kind: str, oid: int, ncols: int, identity: str,
            keys: tuple[int, ...]) -> st.SearchStrategy[bytes]:
    """One pgoutput message of ``kind`` (X: garbage) for relation ``oid``."""
    row = tuples(ncols)
    old_kinds = st.sampled_from([b"", b"K", b"O"])
    strategies: dict[str, st.SearchStrategy[bytes]] = {
        "R": st.just(rel_msg(ncols, keys, identity, oid)),
        "I": row.map(lambda new: insert_msg(oid, new)),
        "U": st.tuples(old_kinds, row, row).map(lambda t: update_msg(
            oid, t[2], old=t[1] if t[0] else None, old_kind=t[0])),
        "D": st.tuples(st.sampled_from([b"K", b"O"]), row).map(
            lambda t: delete_msg(oid, t[0], t[1])),
        "B": st.tuples(st.integers(0, 2**64 - 1), st.integers(-2**40, 2**50),
                       st.integers(0, 2**32 - 1)).map(lambda t: begin_msg(*t)),
        "C": st.just(commit_msg(0x5000, 0x5008, 1)),
        "T": st.integers(0, 3).map(lambda options: truncate_msg([oid], options)),
        "O": st.text(max_size=5).map(lambda name: origin_msg(0x5000, name)),
        "Y": st.just(type_msg(90000, "public", "mood")),
        "M": st.tuples(st.booleans(), st.binary(max_size=8)).map(
            lambda t: message_msg(t[0], 0x5000, "p", t[1])),
        "X": st.binary(max_size=40),
    }
    return strategies[kind]


@st.composite
def stream_messages(draw: st.DrawFn) -> list[bytes]:
    """A message stream over two relations: all message types, valid and malformed."""
    shapes = {oid: (draw(st.integers(1, 4)), draw(st.sampled_from("dfin")))
              for oid in (OID, OID + 1)}
    keys = {oid: tuple(draw(st.sets(st.integers(0, n - 1), max_size=n)))
            for oid, (n, _) in shapes.items()}
    messages = [begin_msg(0x5000, 1_000_000, 7)]
    for _ in range(draw(st.integers(1, 25))):
        oid = draw(st.sampled_from([OID, OID + 1, OID + 2]))
        ncols, identity = shapes.get(oid, (2, "d"))
        kind = draw(st.sampled_from("RIIIUUUDDBCTOYMX"))
        if kind == "R" and draw(st.booleans()):  # a schema change: one column more
            ncols += 1
            shapes[oid] = (ncols, identity)
        msg = draw(message(kind, oid, ncols, identity, keys.get(oid, ())))
        mutation = draw(st.sampled_from(["none"] * 5 + ["cut", "flip", "append"]))
        if mutation == "cut" and msg:
            msg = msg[:draw(st.integers(0, len(msg) - 1))]
        elif mutation == "flip" and msg:
            at = draw(st.integers(0, len(msg) - 1))
            msg = msg[:at] + bytes([draw(st.integers(0, 255))]) + msg[at + 1:]
        elif mutation == "append":
            msg += draw(st.binary(min_size=1, max_size=4))
        messages.append(msg)
    return messages


#: CDC_DIFF_EXAMPLES=5000 for a longer hunt
EXAMPLES = int(os.environ.get("CDC_DIFF_EXAMPLES", "400"))


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream_messages())
def test_compiled_decoder_matches_the_reference_on_any_message_stream(
        messages: list[bytes]) -> None:
    """Valid and malformed streams: the same events, errors, counts and Arrow batches."""
    if NATIVE is None:
        pytest.skip("the compiled decoder is not built")
    assert_same(messages)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.sampled_from(b"IUD"))
def test_compiled_decoder_matches_the_reference_on_random_row_bytes(
        body: bytes, kind: int) -> None:
    """Random bytes after a row message's type byte: the same error (or row) from both."""
    if NATIVE is None:
        pytest.skip("the compiled decoder is not built")
    assert_same([*START, bytes([kind]) + struct.pack("!I", OID) + body])


def test_pure_python_is_chosen_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """CDC_PURE_PYTHON=1 selects the pure decoder even where the extension is built."""
    monkeypatch.setenv("CDC_PURE_PYTHON", "1")
    assert native_module() is None


@pytest.mark.slow
def test_fuzzing_the_compiled_decoder_finds_no_crash_and_no_hang(tmp_path: Path) -> None:
    """atheris feeds mutated pgoutput messages to the compiled decoder for a bounded time:
    every input decodes or raises DecodeError; none crashes the process or hangs."""
    if NATIVE is None:
        pytest.skip("the compiled decoder is not built")
    pytest.importorskip("atheris")
    script = Path(__file__).with_name("fuzz_native.py")
    env = {**os.environ, "CDC_PURE_PYTHON": ""}
    result = subprocess.run(
        [sys.executable, str(script), "-max_total_time=60", "-timeout=10", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/"], env=env, capture_output=True, text=True,
        timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done" in result.stderr, result.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []  # no crash or timeout artifact


def frames_of(kind: str, frames: list[bytes]) -> tuple[list[Any], list[tuple[str, pa.Table]]]:
    h = harness(kind)
    events: list[Any] = []
    for frame in frames:
        try:
            events.append(h.decoder.feed_frame(memoryview(frame)))
        except DecodeError as exc:
            events.append(("error", str(exc)))
        if isinstance(events[-1], Relation):
            h.relations[events[-1].oid] = events[-1]
    return events, [(b.qualified_name, b.table) for b in h.batches()]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(
    st.binary(max_size=30),
    st.sampled_from([*START, insert_msg(OID, tuple_data("1", "a", None))]).map(
        lambda m: b"w" + struct.pack("!QQq", 0x7000, 0x7000, 0) + m)), max_size=6))
def test_both_decoders_read_xlogdata_frames_alike(frames: list[bytes]) -> None:
    """Whole XLogData frames (what the session feeds), short ones too: same events and rows,
    the row at the frame's WAL start."""
    pure, native = frames_of("pure", frames), frames_of("native", frames)
    assert native[0] == pure[0]
    assert [(n, t.to_pylist()) for n, t in native[1]] == [(n, t.to_pylist()) for n, t in pure[1]]


def test_a_value_that_is_not_text_is_refused_before_anything_is_buffered() -> None:
    """The compiled buffer's append (truncates, wal2json) checks every value first: a wrong
    one leaves no half row behind."""
    if NATIVE is None:
        pytest.skip("the compiled decoder is not built")
    core = NATIVE.ColumnBuffer(("a", "b"), (True, False))
    with pytest.raises(TypeError, match="column 'b' is not text"):
        core.append("c", ("1", 2), 1, 1, 0, 1, 0)
    with pytest.raises(TypeError, match="column 'a'"):
        core.append("c", (UNCHANGED, "x"), 1, 1, 0, 1, 0)  # unchanged only in an update
    assert len(core) == 0
    core.append("u", ("1", UNCHANGED), 1, 1, 0, 1, 0)
    columns, *_, unchanged = core.take()
    assert columns[0].to_pylist() == ["1"]
    assert unchanged.to_pylist() == [["b"]]
