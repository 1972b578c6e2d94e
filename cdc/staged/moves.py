"""Key changes inside one transaction → the transaction's net effect per key (pure, no I/O).

An update that changes the key lands in raw as a delete of the old key followed, at the same
``_lsn``, by the update at the new key: a *move*. Taking the last change per key is right as
long as a key holds at most one row at any moment, which a non-deferrable key guarantees.
Under a DEFERRABLE key (REPLICA IDENTITY FULL then, since such a key cannot be the replica
identity) one statement may pass through duplicates: ``UPDATE k SET id = 3 - id`` moves row
A from 1 to 2 while row B still sits at 2, then deletes "2" — meaning B. The last change
of key 2 is that delete, and A would be lost.

So each transaction that moves a key is replayed here on the rows themselves: a key holds a
list of live versions (plus the unknown row it had before the transaction, ``PRE``); an
insert or a move-in adds one, a plain update replaces the newest, and a delete removes the
version it names — the one whose values equal the delete's full old row (REPLICA IDENTITY
FULL), else the row the key had before the transaction, else the newest (a key-only delete,
where at most one version can be live). What is left per key at the end is the
transaction's net change: the surviving version, or a delete. A move's unchanged TOASTed
values (default replica identity) come from the row it moved away from: a version of this
transaction, an earlier change in the chunk, or — listed in ``Moves.borrow`` — the staged
row of the old key (``fill_borrowed``).

Transactions without moves pass through untouched and vectorised; the replay is a Python
loop over the rows of moving transactions only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

RAW_META = ("_op", "_lsn", "_commit_lsn", "_seq", "_xid", "_commit_ts", "_unchanged")
ROW, COLUMNS = "__cdc_row", "__cdc_columns"


@dataclass(frozen=True)
class Moves:
    """The chunk with each moving transaction replaced by its net change per key."""

    rows: pa.Table
    #: rows whose unchanged values are the staged row's of another key: ``ROW`` (index into
    #: ``rows``), that key's columns and ``COLUMNS`` (the names to take); None when none
    borrow: pa.Table | None


@dataclass(frozen=True)
class _Pre:
    """The row a key held before the transaction (unknown here)."""

    key: tuple[Any, ...]


_Source = int | _Pre | None


class _Keys:
    """One transaction's keys: live versions, whether the row before is gone, last delete."""

    def __init__(self) -> None:
        self.live: dict[tuple[Any, ...], list[int]] = {}
        self.pre_gone: set[tuple[Any, ...]] = set()
        self.deleted: dict[tuple[Any, ...], int] = {}
        self.order: list[tuple[Any, ...]] = []

    def versions(self, k: tuple[Any, ...]) -> list[int]:
        if k not in self.live:
            self.live[k] = []
            self.order.append(k)
        return self.live[k]

    def consume(self, k: tuple[Any, ...]) -> _Pre:
        """The row the key held before the transaction, now replaced."""
        self.pre_gone.add(k)
        return _Pre(k)


def moving_transactions(rows: pa.Table) -> pa.Array:
    """True for the rows of transactions holding a move (a delete, then an update at the
    same ``_lsn`` and the next ``_seq``)."""
    n = rows.num_rows
    if n < 2:
        return pa.nulls(n, pa.bool_()).fill_null(False)
    op, lsn, commit, seq = (rows[c].combine_chunks() for c in ("_op", "_lsn", "_commit_lsn",
                                                               "_seq"))
    first, second = slice(0, n - 1), slice(1, n)
    pair = pc.and_(pc.and_(pc.equal(op[first], "d"), pc.equal(op[second], "u")),
                   pc.and_(pc.equal(lsn[first], lsn[second]),
                           pc.and_(pc.equal(commit[first], commit[second]),
                                   pc.equal(pc.add(seq[first], 1), seq[second]))))
    movers = pc.unique(commit[first].filter(pair))
    return pc.is_in(commit, value_set=movers)


def needing_replay(rows: pa.Table, key: Sequence[str], moving: pa.Array) -> pa.Array:
    """The rows of moving transactions the last change per key would get wrong: those
    touching a key twice (the key may pass through duplicates), or moving a row that left
    a TOASTed value unchanged (its value is the old key's). ``UPDATE t SET id = id + 1000000``
    touches each key once and passes through vectorised."""
    moved = rows.filter(moving)
    counts = moved.select(["_commit_lsn", *key]).group_by(["_commit_lsn", *key]).aggregate(
        [([], "count_all")])
    twice = counts.filter(pc.greater(counts["count_all"], 1))["_commit_lsn"]
    toast = moved.filter(pc.and_(pc.equal(moved["_op"], "u"),
                                 pc.greater(pc.fill_null(pc.list_value_length(
                                     moved["_unchanged"]), 0), 0)))["_commit_lsn"]
    replay = pc.unique(pa.concat_arrays([twice.combine_chunks(), toast.combine_chunks()]))
    return pc.and_(moving, pc.is_in(rows["_commit_lsn"], value_set=replay))


def plan_moves(rows: pa.Table, key: Sequence[str]) -> Moves:
    """``rows`` (deduplicated, in change order, no truncate) with moves resolved."""
    moving = moving_transactions(rows)
    if not pc.any(moving).as_py():
        return Moves(rows, None)
    moving = needing_replay(rows, key, moving)
    if not pc.any(moving).as_py():
        return Moves(rows, None)
    replay = _Replay(rows, key, pc.indices_nonzero(moving).to_pylist())
    chosen = sorted([*pc.indices_nonzero(pc.invert(moving)).to_pylist(), *replay.emitted])
    out = rows.take(pa.array(chosen, pa.int64()))
    position = {i: p for p, i in enumerate(chosen)}
    out = _override(out, {(position[i], c): v for (i, c), v in replay.values.items()})
    pending = [(position[i], name, k, lsn) for i, name, k, lsn in replay.pending]
    values, borrowed = _from_earlier(out, key, pending)
    out = _override(out, values)
    if not borrowed:
        return Moves(out, None)
    records = [(*k, row, names) for row, (k, names) in sorted(borrowed.items())]
    columns = list(zip(*records, strict=True))
    types = [rows.schema.field(k).type for k in key] + [pa.int64(), pa.list_(pa.string())]
    return Moves(out, pa.table([pa.array(list(c), t) for c, t in zip(columns, types,
                                                                       strict=True)],
                               names=[*key, ROW, COLUMNS]))


def plan_moves_around_truncates(rows: pa.Table, key: Sequence[str]) -> Moves:
    """``plan_moves`` for changes that may hold truncates (history keeps what precedes one):
    each stretch between truncates is resolved on its own; only the first may borrow from
    the table as it was (after a truncate there is nothing to borrow)."""
    marks = pc.indices_nonzero(pc.equal(rows["_op"], "t")).to_pylist()
    if not marks:
        return plan_moves(rows, key)
    pieces: list[pa.Table] = []
    borrow: pa.Table | None = None
    start = 0
    for cut in [*marks, rows.num_rows]:
        moves = plan_moves(rows.slice(start, cut - start), key)
        if start == 0:
            borrow = moves.borrow
        pieces.append(moves.rows)
        pieces.append(rows.slice(cut, 1))  # the truncate (empty past the end)
        start = cut + 1
    return Moves(pa.concat_tables(pieces), borrow)


def _from_earlier(rows: pa.Table, key: Sequence[str],
                  pending: list[tuple[int, str, tuple[Any, ...], int]],
                  ) -> tuple[dict[tuple[int, str], Any],
                             dict[int, tuple[tuple[Any, ...], list[str]]]]:
    """Unchanged values of rows moved away from another key's earlier state: that key's last
    change before the transaction in this chunk holds them, else its staged row (borrowed)."""
    values: dict[tuple[int, str], Any] = {}
    borrowed: dict[int, tuple[tuple[Any, ...], list[str]]] = {}
    if not pending:
        return values, borrowed
    wanted = {k for _, _, k, _ in pending}
    first = pa.array(sorted({k[0] for k in wanted}, key=repr), rows.schema.field(key[0]).type)
    index = pc.indices_nonzero(pc.is_in(rows[key[0]], value_set=first)).to_pylist()
    earlier: dict[tuple[Any, ...], list[tuple[int, dict[str, Any]]]] = {}
    for i, record in zip(index, rows.take(pa.array(index, pa.int64())).to_pylist(),
                         strict=True):
        k = tuple(record[c] for c in key)
        if k in wanted:
            earlier.setdefault(k, []).append((i, record))
    for row, name, k, commit_lsn in sorted(pending, key=lambda p: p[3]):
        for i, record in reversed(earlier.get(k, [])):
            if record["_commit_lsn"] >= commit_lsn:
                continue
            if record["_op"] == "d":
                values[(row, name)] = None
                break
            if (i, name) in values:
                values[(row, name)] = values[(i, name)]
                break
            if i in borrowed and name in borrowed[i][1]:  # that row borrows it in turn
                borrowed.setdefault(row, (borrowed[i][0], []))[1].append(name)
                break
            if name not in (record["_unchanged"] or []):
                values[(row, name)] = record[name]
                break
        else:
            borrowed.setdefault(row, (k, []))[1].append(name)
    return values, borrowed


def fill_borrowed(rows: pa.Table, borrow: pa.Table | None, key: Sequence[str],
                  staged: pa.Table | None) -> pa.Table:
    """Take the borrowed values from ``staged`` (rows of the old keys; None: there are none,
    the values are NULL) and mark them as no longer unchanged."""
    if borrow is None:
        return rows
    found: dict[tuple[Any, ...], dict[str, Any]] = {}
    if staged is not None:
        for record in staged.to_pylist():
            found[tuple(record[k] for k in key)] = record
    values: dict[tuple[int, str], Any] = {}
    for record in borrow.to_pylist():
        old = found.get(tuple(record[k] for k in key), {})
        for name in record[COLUMNS]:
            values[(record[ROW], name)] = old.get(name)
    return _override(rows, values)


class _Replay:
    """One pass over the rows of moving transactions (see the module docstring)."""

    def __init__(self, rows: pa.Table, key: Sequence[str], indices: list[int]) -> None:
        self.key = list(key)
        names = [c for c in rows.column_names if c not in RAW_META]
        self.others = [c for c in names if c not in key]
        sub = rows.take(pa.array(indices, pa.int64())).select(
            [*names, "_op", "_lsn", "_commit_lsn", "_seq", "_unchanged"]).to_pylist()
        self.row = dict(zip(indices, sub, strict=True))
        self.keys = {i: tuple(r[k] for k in key) for i, r in self.row.items()}
        self.source: dict[int, _Source] = {}
        self.emitted: list[int] = []
        self.values: dict[tuple[int, str], Any] = {}  # (row, column) → value filled in
        self.pending: list[tuple[int, str, tuple[Any, ...], int]] = []
        start = 0
        for end in range(1, len(indices) + 1):
            if end == len(indices) or sub[end]["_commit_lsn"] != sub[start]["_commit_lsn"]:
                self._transaction(indices[start:end])
                start = end

    def _transaction(self, indices: list[int]) -> None:
        state = _Keys()
        victim: _Source = None
        previous: int | None = None
        for i in indices:
            r, k = self.row[i], self.keys[i]
            versions = state.versions(k)
            if r["_op"] == "d":
                victim = self._victim(r, k, versions, k not in state.pre_gone)
                if isinstance(victim, _Pre):
                    state.pre_gone.add(k)
                elif victim is not None:
                    versions.remove(victim)
                state.deleted[k] = i
            elif r["_op"] == "u" and previous is not None and self._pairs(previous, i):
                versions.append(i)  # a move-in: its row left the victim's key
                self.source[i] = victim
            elif r["_op"] == "u":  # replaces the newest version, or the row before
                self.source[i] = versions.pop() if versions else state.consume(k)
                versions.append(i)
            else:
                versions.append(i)
                self.source[i] = None
            previous = i
        first = self.row[indices[0]]
        for k in state.order:
            if state.live[k]:
                self._emit(state.live[k][-1], first["_commit_lsn"])
            elif k in state.pre_gone:
                self.emitted.append(state.deleted[k])

    def _pairs(self, d: int, u: int) -> bool:
        a, b = self.row[d], self.row[u]
        return bool(a["_op"] == "d" and a["_lsn"] == b["_lsn"] and a["_seq"] + 1 == b["_seq"])

    def _victim(self, r: dict[str, Any], k: tuple[Any, ...], versions: list[int],
                pre_live: bool) -> _Source:
        """The version a delete removes (see the module docstring)."""
        if any(r[c] is not None for c in self.others):  # a full old row
            values = tuple(r[c] for c in self.others)
            for v in versions:
                if tuple(self.row[v][c] for c in self.others) == values:
                    return v
            if pre_live:
                return _Pre(k)
            return versions[0] if versions else None
        if versions:
            return versions[-1]
        return _Pre(k) if pre_live else None

    def _emit(self, i: int, commit_lsn: int) -> None:
        self.emitted.append(i)
        unchanged = self.row[i]["_unchanged"] or []
        still: list[str] = []
        for name in unchanged:
            outcome = self._chase(i, name)
            if outcome is _SAME:
                still.append(name)
            elif isinstance(outcome, _Pre):
                self.pending.append((i, name, outcome.key, commit_lsn))
            else:
                self.values[(i, name)] = outcome[0]
        if still != list(unchanged):
            self.values[(i, "_unchanged")] = still

    def _chase(self, i: int, name: str) -> Any:
        """Where the unchanged value ``name`` of version ``i`` lives: ``(value,)``, ``_SAME``
        (the row its own key had before: the ordinary fill finds it), or the ``_Pre`` of
        another key (its earlier change in the chunk, or its staged row)."""
        own = self.keys[i]
        while True:
            r = self.row[i]
            if name not in (r["_unchanged"] or []):
                return (r[name],)
            source = self.source.get(i)
            if source is None:
                return (None,)
            if isinstance(source, int):
                i = source
                continue
            return _SAME if source.key == own else source


_SAME = object()


def _override(table: pa.Table, values: dict[tuple[int, str], Any]) -> pa.Table:
    """``table`` with the cells ``values`` ((row, column) → value) replaced; "_unchanged"
    entries also drop the column names they no longer list."""
    by_column: dict[str, list[tuple[int, Any]]] = {}
    for (row, name), value in values.items():
        by_column.setdefault(name, []).append((row, value))
    for name, cells in by_column.items():
        column = table[name].combine_chunks()
        rows, new = zip(*sorted(cells, key=lambda c: c[0]), strict=True)
        index = list(range(table.num_rows))
        for j, row in enumerate(rows):
            index[row] = table.num_rows + j
        merged = pa.concat_arrays([column, pa.array(list(new), column.type)])
        table = table.set_column(table.schema.get_field_index(name), name,
                                 merged.take(pa.array(index, pa.int64())))
    return table
