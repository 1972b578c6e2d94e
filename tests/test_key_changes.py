"""Key changes inside a transaction: staged equals the source through swaps, rotations and
moves through a freed key, under REPLICA IDENTITY FULL and the default replica identity."""

from __future__ import annotations

import itertools
import random
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from conftest import SourceDb, with_settings
from hypothesis import given, settings
from hypothesis import strategies as st
from rawlake import prepare, stream_until_caught_up, streaming_in_thread
from test_compact import BIG, compact, source_rows, staged_rows
from test_schema_changes import drained

from cdc.config import Settings
from cdc.staged.merge import DELETED, against_staged, dedupe, latest_per_key
from cdc.staged.moves import COLUMNS, fill_borrowed, plan_moves

KEYS = 4
SCHEMA = pa.schema([("id", pa.int32()), ("v", pa.string()), ("body", pa.string()),
                    ("_op", pa.string()), ("_lsn", pa.int64()), ("_commit_lsn", pa.int64()),
                    ("_seq", pa.int64()), ("_unchanged", pa.list_(pa.string()))])


class Source:
    """A brute-force model of one table with key ``id``: physical rows, statement by statement
    (the key is unique between statements), and the raw rows pgoutput would send."""

    def __init__(self, full: bool) -> None:
        self.full = full
        self.rows: dict[int, tuple[str, str]] = {}  # id → (v, body): the state at commit
        self.raw: list[dict[str, Any]] = []
        self.lsn = self.commit = 0
        self.seq = 0
        self.n = 0

    def _value(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def _emit(self, op: str, k: int | None, v: str | None, body: str | None, *,
              unchanged: tuple[str, ...] = (), same_lsn: bool = False) -> None:
        if not same_lsn:
            self.lsn += 1
        self.raw.append({"id": k, "v": v, "body": body, "_op": op, "_lsn": self.lsn,
                         "_commit_lsn": self.commit, "_seq": self.seq,
                         "_unchanged": list(unchanged)})
        self.seq += 1

    def _old(self, k: int) -> tuple[str | None, str | None]:
        return self.rows[k] if self.full else (None, None)

    def begin(self) -> None:
        self.commit += 1000
        self.lsn, self.seq = self.commit - 999, 0

    def insert(self, k: int) -> None:
        self.rows[k] = (self._value("v"), self._value("b"))
        self._emit("c", k, *self.rows[k])

    def update(self, k: int, touch_body: bool) -> None:
        body = self.rows[k][1]
        self.rows[k] = (self._value("v"), self._value("b") if touch_body else body)
        self._update(k, k, touch_body)

    def _update(self, old: int, new: int, touch_body: bool) -> None:
        v = self.rows[new][0]
        if touch_body or self.full:  # under FULL the old row fills an unchanged value
            self._emit("u", new, v, self.rows[new][1], same_lsn=old != new)
        else:
            self._emit("u", new, v, None, unchanged=("body",), same_lsn=old != new)

    def delete(self, k: int) -> None:
        self._emit("d", k, *self._old(k))
        del self.rows[k]

    def move(self, mapping: dict[int, int], order: list[int], touch_body: bool) -> None:
        """One statement moving each row of ``mapping``'s keys to its image, row by row in
        ``order`` (PostgreSQL's order of the heap): the key may repeat until it ends."""
        before = dict(self.rows)
        for k in mapping:
            del self.rows[k]
        for k in order:
            body = before[k][1]
            self.lsn += 1
            old = before[k] if self.full else (None, None)
            self._emit("d", k, *old, same_lsn=True)
            self.rows[mapping[k]] = (self._value("v"), self._value("b") if touch_body else body)
            self._update(k, mapping[k], touch_body)

    def truncate(self) -> None:
        self.rows.clear()
        self._emit("t", None, None, None)


def statement(data: st.DataObject, src: Source) -> None:
    live, free = sorted(src.rows), [k for k in range(KEYS) if k not in src.rows]
    kinds = ["insert"] * bool(free) + ["update", "delete", "move"] * bool(live) + ["truncate"]
    kind = data.draw(st.sampled_from(kinds))
    if kind == "insert":
        src.insert(data.draw(st.sampled_from(free)))
    elif kind == "update":
        src.update(data.draw(st.sampled_from(live)), data.draw(st.booleans()))
    elif kind == "delete":
        src.delete(data.draw(st.sampled_from(live)))
    elif kind == "truncate":
        src.truncate()
    else:
        if src.full:  # a permutation of some keys onto themselves and free keys
            moved = data.draw(st.lists(st.sampled_from(live), min_size=1, unique=True))
            targets = data.draw(st.permutations([*moved, *free]))[:len(moved)]
            mapping = {k: t for k, t in zip(moved, targets, strict=True) if k != t}
            if not mapping:
                return
            order = data.draw(st.permutations(list(mapping)))
        elif free:  # a non-deferrable key: one row at a time, to a free key
            k = data.draw(st.sampled_from(live))
            mapping, order = {k: data.draw(st.sampled_from(free))}, [k]
        else:
            return
        src.move(mapping, list(order), data.draw(st.booleans()))


def compact_in_chunks(rows: list[dict[str, Any]], cuts: list[int]) -> dict[int, tuple[Any, ...]]:
    """The compactor's per-chunk steps over an in-memory staged table, chunk by chunk."""
    staged: dict[int, dict[str, Any]] = {}
    commits = sorted({r["_commit_lsn"] for r in rows})
    bounds = [commits[0] if commits else 0, *sorted({commits[c] for c in cuts
                                                     if c < len(commits)}), 2**62]
    for lower, upper in itertools.pairwise(bounds):
        part = [r for r in rows if lower <= r["_commit_lsn"] < upper]
        if not part:
            continue
        chunk = dedupe(pa.Table.from_pylist(part, SCHEMA))
        truncates = pc.indices_nonzero(pc.equal(chunk["_op"], "t"))
        if len(truncates):
            staged.clear()
            chunk = chunk.slice(truncates[-1].as_py() + 1)
        moves = plan_moves(chunk, ("id",))
        lookup = None
        if moves.borrow is not None:
            wanted = moves.borrow["id"].to_pylist()
            lookup = pa.Table.from_pylist([staged[k] for k in wanted if k in staged])
            assert all(set(c) == {"body"} for c in moves.borrow[COLUMNS].to_pylist())
        chunk = fill_borrowed(moves.rows, moves.borrow, ("id",), lookup if lookup else None)
        state, keep = latest_per_key(chunk, ("id",), "t")
        current = pa.Table.from_pylist(
            [staged[k] for k in state["id"].to_pylist() if k in staged],
            pa.schema([("id", pa.int32()), ("v", pa.string()), ("body", pa.string()),
                       ("_commit_lsn", pa.int64()), ("_seq", pa.int64())]))
        removals, inserts = against_staged(state, current, ("id",), keep)
        for k in removals["id"].to_pylist():
            staged.pop(k, None)
        for r in inserts.drop_columns([c for c in inserts.column_names
                                       if c in ("_op", "_lsn", "_unchanged", DELETED)]
                                      ).to_pylist():
            staged[r["id"]] = r
    return {k: (r["v"], r["body"]) for k, r in staged.items()}


class TestAgainstABruteForceReplay:
    @settings(max_examples=300)
    @given(data=st.data(), full=st.booleans())
    def test_random_key_changes_compact_to_the_replayed_source(
            self, data: st.DataObject, full: bool) -> None:
        """Random transactions of inserts, updates, deletes, key moves (permutations under
        a deferrable key, one row to a free key otherwise) and truncates, compacted in random
        chunks of whole transactions, equal the modelled table."""
        src = Source(full)
        for _ in range(data.draw(st.integers(1, 6))):
            src.begin()
            for _ in range(data.draw(st.integers(1, 4))):
                statement(data, src)
        cuts = data.draw(st.lists(st.integers(0, 6), max_size=3))
        assert compact_in_chunks(src.raw, cuts) == src.rows


class TestKeySwapsInOneTransaction:
    def test_swapping_two_keys_keeps_both_rows(self) -> None:
        """``UPDATE k SET id = 3 - id`` (deferrable key, REPLICA IDENTITY FULL)."""
        src = Source(full=True)
        src.begin()
        src.insert(1)
        src.insert(2)
        src.begin()
        src.move({1: 2, 2: 1}, [1, 2], touch_body=False)
        assert compact_in_chunks(src.raw, [1]) == src.rows
        assert sorted(src.rows) == [1, 2]

    def test_a_moved_row_keeps_its_unchanged_toast_value_from_the_staged_old_key(self) -> None:
        """Default replica identity: the moved row's untouched body comes from key 1's
        staged row, compacted in an earlier chunk."""
        src = Source(full=False)
        src.begin()
        src.insert(1)
        src.begin()
        src.move({1: 3}, [1], touch_body=False)
        assert compact_in_chunks(src.raw, [1]) == src.rows
        assert src.rows[3][1] is not None


def _table(source: SourceDb, deferrable: bool) -> None:
    constraint = " DEFERRABLE INITIALLY IMMEDIATE" if deferrable else ""
    source.execute(f"CREATE TABLE k (id int PRIMARY KEY{constraint}, v text, body text)")
    source.execute("ALTER TABLE k ALTER body SET STORAGE EXTERNAL")
    if deferrable:
        source.execute("ALTER TABLE k REPLICA IDENTITY FULL")


@pytest.mark.parametrize("plugin", ["pgoutput", "wal2json"])
class TestKeyChangesEndToEnd:
    def test_swaps_rotations_and_moves_through_a_freed_key_stage_the_source(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """Against PostgreSQL: each statement, streamed and compacted, leaves staged equal to
        the source, big untouched TOAST values included."""
        settings = with_settings(settings, plugin=plugin)
        _table(source, deferrable=True)
        prepare(settings)
        source.execute(f"INSERT INTO k SELECT i, 'v' || i, repeat(i::text, {BIG}) "
                       "FROM generate_series(1, 5) i")
        steps = [
            "UPDATE k SET id = 3 - id WHERE id IN (1, 2)",            # swap
            "UPDATE k SET id = CASE id WHEN 5 THEN 3 ELSE id + 1 END WHERE id >= 3",  # rotation
            "BEGIN; DELETE FROM k WHERE id = 1; UPDATE k SET id = 1 WHERE id = 2; "
            "UPDATE k SET id = 2, v = 'moved' WHERE id = 4; COMMIT",  # through a freed key
            "BEGIN; UPDATE k SET id = id + 10; UPDATE k SET id = id - 10; COMMIT",
        ]
        with streaming_in_thread(settings):  # cdc stream runs while the keys change
            drained(source, settings)
            compact(settings)
            for step in steps:
                source.execute(step)
                drained(source, settings)
                compact(settings)
                assert staged_rows(settings, "public.k") == source_rows(source, "k"), step

    def test_a_key_change_under_the_default_identity_keeps_an_untouched_toast_value(
            self, source: SourceDb, settings: Settings, plugin: str) -> None:
        """``UPDATE SET id = id + 100`` sends the untouched TOAST value as unchanged and the
        old key only: staged fills it from the old key's row (staged, or earlier in the
        chunk), never NULL."""
        settings = with_settings(settings, plugin=plugin)
        _table(source, deferrable=False)
        rng = random.Random(12)
        prepare(settings)
        source.execute(f"INSERT INTO k SELECT i, 'v' || i, repeat(i::text, {BIG}) "
                       "FROM generate_series(1, 4) i")
        stream_until_caught_up(settings)
        compact(settings)
        source.execute("UPDATE k SET id = id + 100 WHERE id <= 2")
        source.execute(f"INSERT INTO k VALUES (7, 'x', repeat('z', {BIG + rng.randint(1, 9)}))")
        source.execute("UPDATE k SET id = 8, v = 'y' WHERE id = 7")
        stream_until_caught_up(settings)
        compact(settings)
        staged = staged_rows(settings, "public.k")
        assert staged == source_rows(source, "k")
        assert all(r["body"] is not None for r in staged)
