"""pgoutput messages → rows in per-table column buffers, and control events.

Two implementations behind one :class:`Decoder` protocol: :class:`PureDecoder` here (the
reference, and the fallback) and ``cdc.decoding._native.NativeDecoder``, compiled from
Cython, which parses a row message and appends its values straight into Arrow-layout
column buffers (offsets, data, validity) without making a Python object per value.
:func:`native_decoder_class` says which one runs: the compiled one when it was built and
``CDC_PURE_PYTHON`` is not set, the pure one otherwise (with a warning when the extension
is missing).

Both decoders do the same per message: a row change (Insert, Update, Delete) is appended
to its table's buffer and ``feed`` returns None; any other message is returned as its
event (Begin also starts the transaction whose commit LSN, xid, time and change order
the rows carry). Malformed messages raise the same DecodeError from both.
"""

from __future__ import annotations

import importlib
import os
import struct
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from cdc.decoding.binary import text_row
from cdc.decoding.pgoutput import decode, decode_tuple
from cdc.errors import DecodeError
from cdc.events import (
    UNCHANGED,
    Begin,
    Delete,
    Event,
    Insert,
    Lsn,
    Relation,
    Row,
    Update,
    update_rows,
)

#: buffered memory per value, added to the message size (a Python str and a list slot,
#: CPython 3.11, 64-bit); both decoders count it, so both cut files at the same changes
VALUE_OVERHEAD = 57

_NEW_TUPLE = b"N"
#: an XLogData frame: 'w', WAL start (the message's LSN), WAL end, send time, then the message
XLOGDATA_HEADER = 25
_xlogdata_lsn = struct.Struct("!Q")


class TableColumns(Protocol):
    """One table's buffered changes (``cdc.stream.batcher.TableBuffer``)."""

    def append(  # noqa: PLR0913, PLR0917  once per change: no per-change object
        self, op: str, row: Row | None, lsn: Lsn, commit_lsn: Lsn, seq: int, xid: int, ts: int
    ) -> None: ...


class Buffers(Protocol):
    """What a decoder needs of the batcher: a buffer per table, and counting what it added."""

    @property
    def buffers(self) -> Mapping[int, Any]: ...

    def buffer_for(self, relation: Relation) -> Any: ...

    def count(self, rows: int, nbytes: int) -> None: ...


class ChangeCounter(Protocol):
    changes: int


class Decoder(Protocol):
    """pgoutput messages → rows in the batcher's buffers, and control events."""

    seq: int

    def feed(self, payload: bytes, lsn: Lsn) -> Event | None:
        """Decode one message; a row change is buffered (None), anything else returned."""

    def feed_frame(self, frame: bytes | memoryview) -> Event | None:
        """:meth:`feed` the message of one XLogData frame at the frame's WAL start."""

    def begin(self, commit_lsn: Lsn, xid: int, commit_ts: int) -> None:
        """Start a transaction: the rows that follow carry these and count ``seq`` from 0."""

    def append(self, oid: int, op: str, row: Row | None, lsn: Lsn, nbytes: int) -> None:
        """Buffer one change given as values (truncates; wal2json's events)."""


def short_frame(nbytes: int) -> DecodeError:
    return DecodeError(f"XLogData frame of {nbytes} bytes, shorter than its header",
                       fix="report this as a bug with the server version")


def unknown_relation(oid: int) -> DecodeError:
    return DecodeError(f"pgoutput row change for relation {oid} before its Relation message",
                       fix="report this as a bug with the server version")


def column_count(relation: Relation, ncols: int) -> DecodeError:
    return DecodeError(
        f"pgoutput tuple of {relation.qualified_name} has {ncols} columns, its Relation "
        f"message {len(relation.columns)}", fix="report this as a bug with the server version")


def unchanged_outside_update(relation: Relation, op: str) -> DecodeError:
    kind = {"c": "an insert", "d": "a delete"}.get(op, op)
    return DecodeError(
        f"pgoutput sent an unchanged-TOAST marker in {kind} of {relation.qualified_name}",
        fix="report this as a bug with the server version")


#: the raw layer stores LSNs and commit times as int64
_INT64_MAX = 2**63 - 1


def check_begin(commit_lsn: Lsn, commit_ts: int) -> None:
    """A transaction whose commit LSN or time raw cannot store is refused at its Begin."""
    if not (0 <= commit_lsn <= _INT64_MAX and -_INT64_MAX <= commit_ts <= _INT64_MAX):
        raise DecodeError(f"pgoutput Begin with commit LSN {commit_lsn} and time {commit_ts}: "
                          "past the int64 columns of the raw layer",
                          fix="report this as a bug with the server version")


def check_binary(relation: Relation, *tuples: Row | None) -> None:
    """Every binary value of ``tuples`` (old first) is well formed, or DecodeError.

    Both decoders check every tuple of a message before buffering any, and compare key
    values (REPLICA IDENTITY FULL) as the server sent them, binary or text."""
    for row in tuples:
        if row is not None:
            text_row(relation, row)


def checked_rows(relation: Relation, rows: Iterable[tuple[str, Row]]) -> list[tuple[str, Row]]:
    """``rows`` after the checks both decoders make before buffering anything."""
    checked = list(rows)
    for op, row in checked:
        if op != "u" and UNCHANGED in row:
            raise unchanged_outside_update(relation, op)
    return checked


class PureDecoder:
    """The reference decoder: :func:`cdc.decoding.pgoutput.decode`, then the table's buffer."""

    def __init__(self, batcher: Buffers, relations: Mapping[int, Relation],
                 stats: ChangeCounter) -> None:
        self.batcher = batcher
        self.relations = relations
        self.stats = stats
        self.commit_lsn: Lsn = 0
        self.xid = 0
        self.commit_ts = 0
        self.seq = 0

    def begin(self, commit_lsn: Lsn, xid: int, commit_ts: int) -> None:
        check_begin(commit_lsn, commit_ts)
        self.commit_lsn, self.xid, self.commit_ts, self.seq = commit_lsn, xid, commit_ts, 0

    def _relation(self, oid: int, *tuples: Row | None) -> Relation:
        relation = self.relations.get(oid)
        if relation is None:
            raise unknown_relation(oid)
        for row in tuples:
            if row is not None and len(row) != len(relation.columns):
                raise column_count(relation, len(row))
        return relation

    def feed_frame(self, frame: bytes | memoryview) -> Event | None:
        if len(frame) < XLOGDATA_HEADER:
            raise short_frame(len(frame))
        (lsn,) = _xlogdata_lsn.unpack_from(frame, 1)
        return self.feed(bytes(frame[XLOGDATA_HEADER:]), lsn)

    def feed(self, payload: bytes, lsn: Lsn) -> Event | None:
        if payload[:1] == b"I" and payload[5:6] == _NEW_TUPLE:
            # the common case without an event object (decode() says why a bad one is bad)
            try:
                row, _ = decode_tuple(payload, 6)
            except Exception:
                decode(payload)
                raise
            oid = int.from_bytes(payload[1:5])
            relation = self._relation(oid, row)
            row = text_row(relation, row)
            self._add(relation, checked_rows(relation, [("c", row)]), lsn, len(payload))
            return None
        event = decode(payload)
        t = type(event)
        if t is Update:
            upd: Update = event  # type: ignore[assignment]
            relation = self._relation(upd.relation_oid, upd.new, upd.old)
            check_binary(relation, upd.old, upd.new)
            rows = checked_rows(relation, update_rows(relation, upd))
        elif t is Delete:
            dele: Delete = event  # type: ignore[assignment]
            relation = self._relation(dele.relation_oid, dele.old)
            check_binary(relation, dele.old)
            rows = checked_rows(relation, [("d", dele.old)])
        elif t is Insert:  # an insert the fast path above did not take: not well formed
            ins: Insert = event  # type: ignore[assignment]
            relation = self._relation(ins.relation_oid, ins.new)
            check_binary(relation, ins.new)
            rows = checked_rows(relation, [("c", ins.new)])
        else:
            if t is Begin:
                begin: Begin = event  # type: ignore[assignment]
                self.begin(begin.final_lsn, begin.xid, begin.commit_ts)
            return event
        self._add(relation, rows, lsn, len(payload))
        return None

    def _add(self, relation: Relation, rows: Sequence[tuple[str, Row | None]], lsn: Lsn,
             nbytes: int) -> None:
        buffer = self.batcher.buffers.get(relation.oid) or self.batcher.buffer_for(relation)
        for op, values in rows:
            row = None if values is None else text_row(relation, values)
            buffer.append(op, row, lsn, self.commit_lsn, self.seq, self.xid, self.commit_ts)
            self.seq += 1
        self.stats.changes += len(rows)
        self.batcher.count(len(rows), len(rows) * (nbytes + VALUE_OVERHEAD
                                                   * len(relation.columns)))

    def append(self, oid: int, op: str, row: Row | None, lsn: Lsn, nbytes: int) -> None:
        self._add(self.relations[oid], [(op, row)], lsn, nbytes)


def native_module(name: str = "_native") -> Any | None:
    """The compiled decoder module (``_native`` for pgoutput, ``_copy`` for the snapshot's
    binary COPY), or None (pure Python chosen, or the extension missing)."""
    if os.environ.get("CDC_PURE_PYTHON", "") not in ("", "0"):
        return None
    try:
        return importlib.import_module(f"cdc.decoding.{name}")
    except ImportError as exc:
        warnings.warn(f"cdc's compiled decoder is not built ({exc}); decoding in pure Python, "
                      "about 3x slower: reinstall with `pip install -e .` (needs a C compiler "
                      "and the Python headers), or set CDC_PURE_PYTHON=1 to silence this",
                      RuntimeWarning, stacklevel=2)
        return None
