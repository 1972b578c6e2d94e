"""Raw changes → SCD2 versions: pure Arrow, no I/O (``writer.py`` reads and commits).

A version is the state a key had at the commit of one transaction, valid until the commit
of the next transaction that changed the key (``_valid_to``), or current (NULL). Changes
to a key inside one transaction collapse into its state at commit: no other transaction
saw the intermediate ones. A delete closes the version (``_ended_by = 'd'``), a truncate
closes every open one (``'t'``), a later change that leaves the key alive supersedes it
(``'u'``: an update, a re-insert in the same transaction, a re-read by a snapshot). A
primary-key change lands in raw as a delete of the old key and an update of the new one:
the old key's version ends (``'d'``), the new key's opens (``_op = 'u'``).

Everything is vectorised over one table of events sorted by (key, ``_commit_lsn``,
``_seq``): the current versions of the touched keys (as events before the slice), the
changes, and one delete-like event per key alive at each truncate. No loop runs per row;
one runs per truncate in the slice (rare).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from cdc.staged.merge import check_key, row_numbers, run_starts

#: columns a history table adds to the source columns
HISTORY_META = ("_valid_from", "_valid_to", "_valid_from_lsn", "_valid_to_lsn", "_is_current",
                "_op", "_ended_by")
#: what closing a version sets
END = ("_valid_to", "_valid_to_lsn", "_ended_by")
#: raw metadata columns (not source columns)
RAW_META = ("_op", "_lsn", "_commit_lsn", "_seq", "_xid", "_commit_ts", "_unchanged")
_EXISTING = "x"  # the op of a current version taken in as an event before the slice
_ENDED = "e"  # the op of a closed version's end taken in as an event (dropped once used)
_MIN = -(2**63)
_DEAD = pa.array(["d", "t"])


@dataclass(frozen=True)
class Plan:
    """What one slice of changes does to a history table."""

    closes: pa.Table  # key columns + END: current versions the slice ends
    opened: pa.Table  # new versions: source columns + HISTORY_META (some already closed)


def plan_versions(changes: pa.Table, key: Sequence[str], current: pa.Table,
                  table: str, ended: pa.Table | None = None) -> Plan:
    """The versions ``changes`` open and the current versions they close.

    ``changes``: whole transactions of raw rows, deduplicated and in (``_commit_lsn``,
    ``_seq``) order (``staged.merge.dedupe``), source columns as the history table holds
    them. ``current``: the current versions of the keys the changes touch (of every key when
    they contain a truncate) with key columns, ``_valid_from_lsn`` and any source columns an
    unchanged TOAST value may need. A change at or before the commit of its key's current
    version, or at or before the end of one of its closed versions (``ended``: key columns
    and ``_valid_to_lsn``, those ending at or after the slice's first commit LSN suffice),
    is skipped: applied already. A key the slice deleted has no current version left, so
    only its closed version's end tells that a redone change of it is in.
    """
    key = list(key)
    source = [c for c in changes.column_names if c not in RAW_META]
    truncates = pc.equal(changes["_op"], "t")
    rows = changes.filter(pc.invert(truncates))
    check_key(rows, key, table)
    existing = _existing(current, key, [c for c in source if c in current.column_names])
    parts = [existing, rows.select([*source, "_op", "_commit_lsn", "_seq", "_commit_ts",
                                    "_unchanged"])]
    if ended is not None and ended.num_rows:
        parts.append(_ends_of(ended, key))
    for index in pc.indices_nonzero(truncates).to_pylist():
        parts.append(_truncated_keys(changes, index, existing, key))
    events = pa.concat_tables(parts, promote_options="default").sort_by(
        [*((k, "ascending") for k in key), ("_commit_lsn", "ascending"), ("_seq", "ascending")])
    events = _fill_unchanged(_alive_at_truncates(_not_applied(events, key), key), key)
    at_commit = events.filter(_ends(run_starts(events, [*key, "_commit_lsn"])))
    return _versions(at_commit, key, source)


def _existing(current: pa.Table, key: list[str], columns: list[str]) -> pa.Table:
    """Current versions as events ordered before every change of the slice."""
    n = current.num_rows
    taken = current.select([*key, *(c for c in columns if c not in key)])
    return (taken.append_column("_op", pa.repeat(pa.scalar(_EXISTING), n))
            .append_column("_commit_lsn", current["_valid_from_lsn"])
            .append_column("_seq", pa.repeat(pa.scalar(_MIN, pa.int64()), n)))


def _ends_of(ended: pa.Table, key: list[str]) -> pa.Table:
    """Closed versions' ends as events at their ``_valid_to_lsn``, before that LSN's changes."""
    n = ended.num_rows
    return (ended.select(key).append_column("_op", pa.repeat(pa.scalar(_ENDED), n))
            .append_column("_commit_lsn", ended["_valid_to_lsn"])
            .append_column("_seq", pa.repeat(pa.scalar(_MIN, pa.int64()), n)))


def _truncated_keys(changes: pa.Table, index: int, existing: pa.Table,
                    key: list[str]) -> pa.Table:
    """One ``t`` event, at the truncate's place, for every key that may be alive there."""
    before = changes.slice(0, index)
    before = before.filter(pc.invert(pc.equal(before["_op"], "t")))
    keys = pa.concat_tables([existing.select(key), before.select(key)],
                            promote_options="default").group_by(key).aggregate([])
    n, at = keys.num_rows, changes.slice(index, 1)
    for name in ("_commit_lsn", "_seq", "_commit_ts"):
        keys = keys.append_column(name, pa.repeat(at[name][0], n))
    return keys.append_column("_op", pa.repeat(pa.scalar("t"), n))


def _not_applied(events: pa.Table, key: list[str]) -> pa.Table:
    """Drop changes at or before the latest mark of their key (its current version's
    commit or a closed version's end): applied already (a backfill redone after a crash
    between the commits of its parts, or a chunk redone after a crash between its file
    groups' commits: then a mark may be later than changes of the chunk, which sort before
    it). The ends (``_ENDED``) go; the current versions stay.

    Events are in LSN order within a key, so a change is applied exactly when a mark of its
    key sorts after it or at its LSN: the nearest mark after it (filled backward) or the
    nearest before it (filled forward, equal LSN) tells, never across keys (MIN at a key's
    first and last event when they are not marks).
    """
    existing = pc.equal(events["_op"], _EXISTING)
    mark = pc.is_in(events["_op"], value_set=pa.array([_EXISTING, _ENDED]))
    if not pc.any(mark).as_py():
        return events
    lsn = events["_commit_lsn"]
    start = run_starts(events, key)
    low, none = pa.scalar(_MIN, pa.int64()), pa.scalar(None, pa.int64())
    ahead = pc.fill_null_forward(pc.if_else(mark, lsn, pc.if_else(start, low, none)))
    behind = pc.fill_null_backward(pc.if_else(mark, lsn, pc.if_else(_ends(start), low, none)))
    applied = pc.less_equal(lsn, pc.max_element_wise(ahead, behind))
    return events.filter(pc.or_(existing, pc.invert(pc.or_(mark, applied))))


def _alive_at_truncates(events: pa.Table, key: list[str]) -> pa.Table:
    """Drop the ``t`` events of keys already deleted (or never seen) before the truncate."""
    truncate = pc.equal(events["_op"], "t")
    if not pc.any(truncate).as_py():
        return events
    start = run_starts(events, key)
    previous = pa.concat_arrays([pa.array([None], pa.string()),
                                 events["_op"].combine_chunks().slice(0, events.num_rows - 1)])
    dead = pc.or_(start, pc.is_in(previous, value_set=_DEAD))
    return events.filter(pc.invert(pc.and_(truncate, dead)))


def _fill_unchanged(events: pa.Table, key: list[str]) -> pa.Table:
    """Unchanged TOAST values taken from the key's previous event (its earlier state).

    The first event of a key has nothing before it: a value unchanged there stays NULL
    (an update that also changed the key, see the README's known gaps).
    """
    order = row_numbers(events.num_rows)
    start = run_starts(events, key)
    unchanged = events["_unchanged"].combine_chunks()
    flat, parents = pc.list_flatten(unchanged), pc.list_parent_indices(unchanged)
    for name in pc.unique(flat).to_pylist():
        if name not in events.column_names:
            continue
        marked = pc.is_in(order, value_set=parents.filter(pc.equal(flat, name)))
        holder = pc.if_else(pc.and_(marked, pc.invert(start)), pa.scalar(None, pa.int64()),
                            order)
        index = events.schema.get_field_index(name)
        events = events.set_column(index, name, events[name].take(pc.fill_null_forward(holder)))
    return events


def _ends(start: pa.Array) -> pa.Array:
    """True where the next row starts a new group (the last row of each group)."""
    return pa.concat_arrays([start.slice(1), pa.array([True])]) if len(start) else start


def _versions(states: pa.Table, key: list[str], source: list[str]) -> Plan:
    """Each key's state at each commit → the versions it opens and the ones it closes."""
    n = states.num_rows
    op = states["_op"]
    has_next = pc.invert(_ends(run_starts(states, key)))
    following = pc.if_else(has_next, pc.add(row_numbers(n), 1), pa.scalar(None, pa.int64()))
    nxt = states.select(["_op", "_commit_lsn", "_commit_ts"]).take(following)
    alive = pc.invert(pc.is_in(op, value_set=_DEAD))
    ended_by = pc.if_else(pc.is_in(nxt["_op"], value_set=_DEAD), nxt["_op"],
                          pc.if_else(pc.is_valid(nxt["_op"]), pa.scalar("u"),
                                     pa.scalar(None, pa.string())))
    end = {"_valid_to": nxt["_commit_ts"], "_valid_to_lsn": nxt["_commit_lsn"],
           "_ended_by": ended_by}
    existing = pc.equal(op, _EXISTING)
    closes = pa.table({**{k: states[k] for k in key}, **end}).filter(
        pc.and_(existing, has_next))
    meta = {"_valid_from": states["_commit_ts"], "_valid_from_lsn": states["_commit_lsn"],
            "_is_current": pc.invert(has_next), "_op": op, **end}
    opened = pa.table({**{c: states[c] for c in source},
                       **{m: meta[m] for m in HISTORY_META}})
    return Plan(closes, opened.filter(pc.and_(alive, pc.invert(existing))))
