"""SCD2 planning (cdc/history/versions.py) against a brute-force oracle: pure, no database."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pyarrow as pa
from hypothesis import given, settings
from hypothesis import strategies as st

from cdc.history.versions import HISTORY_META, plan_versions
from cdc.staged.merge import dedupe

T0 = dt.datetime(2026, 11, 30, tzinfo=dt.UTC)
SCHEMA = pa.schema([("id", pa.int64()), ("a", pa.int64()), ("b", pa.string()),
                    ("_op", pa.string()), ("_lsn", pa.int64()), ("_commit_lsn", pa.int64()),
                    ("_seq", pa.int64()), ("_xid", pa.int64()),
                    ("_commit_ts", pa.timestamp("us", tz="UTC")),
                    ("_unchanged", pa.list_(pa.string()))])

Change = dict[str, Any]


@st.composite
def transactions(draw: Any) -> list[list[Change]]:
    """Changes a real table could produce: inserts of absent keys, updates (some leaving
    the TOASTed ``b`` unchanged), deletes, key changes and truncates of present ones."""
    alive: dict[int, tuple[int | None, str]] = {}
    txns: list[list[Change]] = []
    for _ in range(draw(st.integers(1, 12))):
        txn: list[Change] = []
        for _ in range(draw(st.integers(1, 4))):
            kind = draw(st.sampled_from(["insert", "update", "toast", "delete", "rekey",
                                         "truncate"]))
            k = draw(st.integers(1, 4))
            a = draw(st.none() | st.integers(0, 9))
            if kind == "truncate" and draw(st.integers(0, 3)) == 0:
                alive.clear()
                txn.append({"_op": "t", "id": None, "a": None, "b": None})
            elif k not in alive:
                b = draw(st.sampled_from(["x", "y", "z"]))
                alive[k] = (a, b)
                txn.append({"_op": "c", "id": k, "a": a, "b": b})
            elif kind in ("update", "toast"):
                b = alive[k][1] if kind == "toast" else draw(st.sampled_from(["x", "y", "z"]))
                alive[k] = (a, b)
                txn.append({"_op": "u", "id": k, "a": a, "b": None if kind == "toast" else b,
                            "_unchanged": ["b"] if kind == "toast" else []})
            elif kind == "rekey" and (free := [j for j in range(1, 6) if j not in alive]):
                new = draw(st.sampled_from(free))
                alive[new] = (a, alive.pop(k)[1])
                txn.append({"_op": "d", "id": k, "a": None, "b": None})
                txn.append({"_op": "u", "id": new, "a": a, "b": alive[new][1]})
            else:
                del alive[k]
                txn.append({"_op": "d", "id": k, "a": None, "b": None})
        txns.append(txn)
    return txns


def raw_rows(txns: list[list[Change]]) -> list[Change]:
    rows = []
    for i, txn in enumerate(txns):
        lsn = 100 * (i + 1)
        for seq, change in enumerate(txn):
            rows.append({"_unchanged": [], **change, "_lsn": lsn - 50 + seq, "_commit_lsn": lsn,
                         "_seq": seq, "_xid": i, "_commit_ts": T0 + dt.timedelta(seconds=i)})
    return rows


def oracle(txns: list[list[Change]]) -> list[Change]:
    """Replay transaction by transaction; at each commit compare each key's state."""
    state: dict[int, Change] = {}
    versions: list[Change] = []
    open_: dict[int, Change] = {}
    rows = raw_rows(txns)
    for i in range(len(txns)):
        lsn = 100 * (i + 1)
        ts = T0 + dt.timedelta(seconds=i)
        touched: dict[int, str] = {}
        for row in (r for r in rows if r["_commit_lsn"] == lsn):
            if row["_op"] == "t":
                for k in list(state):
                    touched[k] = "t"
                state.clear()
            elif row["_op"] == "d":
                state.pop(row["id"], None)
                touched[row["id"]] = "d"
            else:
                b = state[row["id"]]["b"] if "b" in row["_unchanged"] and row["id"] in state \
                    else row["b"]
                state[row["id"]] = {"id": row["id"], "a": row["a"], "b": b}
                touched[row["id"]] = row["_op"]
        for k, last in touched.items():
            after = state.get(k)
            if k in open_:
                open_.pop(k).update(_valid_to=ts, _valid_to_lsn=lsn, _is_current=False,
                                    _ended_by="u" if after is not None else last)
            if after is not None:
                version = {**after, "_valid_from": ts, "_valid_to": None, "_valid_from_lsn": lsn,
                           "_valid_to_lsn": None, "_is_current": True, "_op": last,
                           "_ended_by": None}
                versions.append(version)
                open_[k] = version
    return sorted(versions, key=lambda v: (v["id"], v["_valid_from_lsn"]))


def plan_in_two_slices(txns: list[list[Change]], cut: int) -> list[Change]:
    """Plan the first ``cut`` transactions, then the rest against the current versions."""
    rows = raw_rows(txns)
    history: list[Change] = []
    for part in ([r for r in rows if r["_commit_lsn"] <= 100 * cut],
                 [r for r in rows if r["_commit_lsn"] > 100 * cut]):
        changes = dedupe(pa.Table.from_pylist(part, schema=SCHEMA))
        current = pa.Table.from_pylist([v for v in history if v["_is_current"]],
                                       schema=pa.schema([SCHEMA.field("id"), SCHEMA.field("a"),
                                                         SCHEMA.field("b"),
                                                         ("_valid_from_lsn", pa.int64())]))
        plan = plan_versions(changes, ["id"], current, "public.t")
        for close in plan.closes.to_pylist():
            [target] = [v for v in history if v["id"] == close["id"] and v["_is_current"]]
            target.update(close, _is_current=False)
        history.extend(plan.opened.to_pylist())
    return sorted(history, key=lambda v: (v["id"], v["_valid_from_lsn"]))


class TestVersionsAgainstOracle:
    @settings(max_examples=300, deadline=None)
    @given(transactions(), st.integers(0, 12))
    def test_random_changes_planned_in_two_slices_give_the_oracles_versions(
        self, txns: list[list[Change]], cut: int
    ) -> None:
        """Any change sequence, cut anywhere between transactions: one version per key per
        transaction, closed by the next change, TOAST filled, truncates close all."""
        assert plan_in_two_slices(txns, min(cut, len(txns))) == oracle(txns)

    @settings(max_examples=100, deadline=None)
    @given(transactions())
    def test_a_replayed_copy_of_every_change_changes_nothing(
        self, txns: list[list[Change]]
    ) -> None:
        """Raw delivered twice (at-least-once) dedupes to the same versions."""
        rows = raw_rows(txns)
        changes = dedupe(pa.Table.from_pylist(rows + rows, schema=SCHEMA))
        empty = pa.table({"id": pa.array([], pa.int64()), "_valid_from_lsn": pa.array([],
                                                                                    pa.int64())})
        opened = plan_versions(changes, ["id"], empty, "public.t").opened.to_pylist()
        assert sorted(opened, key=lambda v: (v["id"], v["_valid_from_lsn"])) == oracle(txns)

    @settings(max_examples=200, deadline=None)
    @given(transactions(), st.integers(0, 12))
    def test_changes_planned_again_against_the_history_they_made_change_nothing(
        self, txns: list[list[Change]], cut: int
    ) -> None:
        """A rerun redoing the transactions from any point, after every key's versions from
        them are in (a crash between a chunk's file-group commits): nothing opens or closes,
        also for keys those transactions deleted (only a closed version's end marks them)."""
        history = oracle(txns)
        redone = [r for r in raw_rows(txns) if r["_commit_lsn"] > 100 * min(cut, len(txns))]
        if not redone:
            return
        changes = dedupe(pa.Table.from_pylist(redone, schema=SCHEMA))
        current = pa.Table.from_pylist(
            [v for v in history if v["_is_current"]],
            schema=pa.schema([SCHEMA.field("id"), SCHEMA.field("a"), SCHEMA.field("b"),
                              ("_valid_from_lsn", pa.int64())]))
        ended = pa.Table.from_pylist(
            [v for v in history if not v["_is_current"]],
            schema=pa.schema([SCHEMA.field("id"), ("_valid_to_lsn", pa.int64())]))
        plan = plan_versions(changes, ["id"], current, "public.t", ended)
        assert (plan.opened.num_rows, plan.closes.num_rows) == (0, 0)


class TestVersionShapes:
    def test_several_changes_to_one_key_in_one_transaction_are_one_version(self) -> None:
        """Insert, update, update in one transaction: one version with the final values."""
        txns = [[{"_op": "c", "id": 1, "a": 1, "b": "x"}, {"_op": "u", "id": 1, "a": 2, "b": "y"},
                 {"_op": "u", "id": 1, "a": 3, "b": "z"}]]
        [version] = plan_in_two_slices(txns, 1)
        assert (version["a"], version["b"], version["_op"], version["_is_current"]) == (
            3, "z", "u", True)

    def test_changes_at_or_before_a_keys_current_version_are_applied_already(self) -> None:
        """A backfill redone after a crash opens nothing for keys whose read is in."""
        rows = raw_rows([[{"_op": "r", "id": k, "a": k, "b": "x"} for k in (1, 2, 3)]])
        changes = pa.Table.from_pylist(rows, schema=SCHEMA)
        current = pa.table({"id": pa.array([1, 2], pa.int64()),
                            "_valid_from_lsn": pa.array([100, 100], pa.int64())})
        plan = plan_versions(changes, ["id"], current, "public.t")
        assert plan.opened["id"].to_pylist() == [3]
        assert plan.closes.num_rows == 0

    def test_columns_are_the_source_columns_then_the_history_columns(self) -> None:
        rows = raw_rows([[{"_op": "c", "id": 1, "a": 1, "b": "x"}]])
        empty = pa.table({"id": pa.array([], pa.int64()),
                          "_valid_from_lsn": pa.array([], pa.int64())})
        plan = plan_versions(pa.Table.from_pylist(rows, schema=SCHEMA), ["id"], empty, "t")
        assert plan.opened.column_names == ["id", "a", "b", *HISTORY_META]
        assert plan.opened.schema.field("_valid_from").type == pa.timestamp("us", tz="UTC")


class TestTypeChanges:
    def test_only_types_every_old_value_converts_to_exactly_are_followed(self) -> None:
        from cdc.history.retype import converts_exactly

        exact = [(pa.int32(), pa.int64()), (pa.int16(), pa.string()),
                 (pa.int32(), pa.decimal128(12, 2)), (pa.float32(), pa.float64()),
                 (pa.decimal128(10, 2), pa.decimal128(14, 4)), (pa.string(), pa.large_string())]
        inexact = [(pa.int64(), pa.int32()), (pa.string(), pa.int32()),
                   (pa.int64(), pa.decimal128(12, 2)), (pa.decimal128(10, 2), pa.decimal128(10, 4)),
                   (pa.float64(), pa.string()), (pa.int32(), pa.uint64()),
                   (pa.decimal128(10, 2), pa.string()), (pa.date32(), pa.string())]
        assert [converts_exactly(a, b) for a, b in exact] == [True] * len(exact)
        assert [converts_exactly(a, b) for a, b in inexact] == [False] * len(inexact)

    def test_older_raw_parts_are_read_in_the_newest_type_where_it_is_exact(self) -> None:
        from cdc.history.retype import widened_parts

        old = pa.table({"id": pa.array([1], pa.int32()), "v": pa.array([7], pa.int32())})
        new = pa.table({"id": pa.array([2], pa.int64()), "v": pa.array(["x"])})
        first, _ = widened_parts([old, new])
        assert first.schema == new.schema
        assert first.to_pylist() == [{"id": 1, "v": "7"}]
        text = pa.table({"id": pa.array([1], pa.int64()), "v": pa.array(["a"])})
        number = pa.table({"id": pa.array([2], pa.int64()), "v": pa.array([1], pa.int32())})
        assert widened_parts([text, number])[0].schema == text.schema  # left to unify's error
