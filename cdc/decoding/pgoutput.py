"""pgoutput (protocol version 1) message bytes → change events. Pure: no I/O.

Message layouts follow "Logical Replication Message Formats" in the
PostgreSQL documentation. Integers are big-endian; strings are
NUL-terminated; timestamps are microseconds since 2000-01-01 UTC, which we
turn into microseconds since the Unix epoch.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from cdc.errors import DecodeError
from cdc.events import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Event,
    Insert,
    Message,
    Origin,
    Relation,
    Row,
    Truncate,
    TypeInfo,
    Update,
    Value,
)

#: microseconds between the Unix epoch and the PostgreSQL epoch (2000-01-01)
PG_EPOCH_OFFSET_US = 946_684_800_000_000

_begin = struct.Struct("!QqI")
_commit = struct.Struct("!BQQq")
_uint64 = struct.Struct("!Q")
_int32 = struct.Struct("!i")
_uint32 = struct.Struct("!I")
_int16 = struct.Struct("!h")
_column_tail = struct.Struct("!Ii")
_truncate_head = struct.Struct("!iB")
_message_head = struct.Struct("!BQ")

TRUNCATE_CASCADE = 1
TRUNCATE_RESTART_IDENTITY = 2
MESSAGE_TRANSACTIONAL = 1
COLUMN_IS_KEY = 1

_unpack_int16 = _int16.unpack_from
_unpack_int32 = _int32.unpack_from
_unpack_uint32 = _uint32.unpack_from


def _cstring(buf: bytes, pos: int) -> tuple[str, int]:
    end = buf.index(0, pos)
    return buf[pos:end].decode("utf-8"), end + 1


def decode_tuple(buf: bytes, pos: int) -> tuple[Row, int]:
    """Decode TupleData at ``pos``; return the row and the position after it.

    A binary value is returned as its bytes (``cdc.decoding.binary`` reads it)."""
    (ncols,) = _unpack_int16(buf, pos)
    if ncols < 0:
        raise ValueError(f"negative column count {ncols}")
    pos += 2
    end = len(buf)
    values: list[Value] = []
    append = values.append
    for _ in range(ncols):
        kind = buf[pos]
        pos += 1
        if kind == 0x74:  # 't' text
            (length,) = _unpack_int32(buf, pos)
            pos += 4
            if length < 0 or pos + length > end:
                raise ValueError(f"text value of {length} bytes overruns the message")
            append(buf[pos : pos + length].decode("utf-8"))
            pos += length
        elif kind == 0x62:  # 'b' binary (binary 'true'): decoded against the column's type
            (length,) = _unpack_int32(buf, pos)
            pos += 4
            if length < 0 or pos + length > end:
                raise ValueError(f"binary value of {length} bytes overruns the message")
            append(bytes(buf[pos : pos + length]))
            pos += length
        elif kind == 0x6E:  # 'n' null
            append(None)
        elif kind == 0x75:  # 'u' unchanged TOASTed value
            append(UNCHANGED)
        else:
            raise DecodeError(
                f"pgoutput tuple column kind {chr(kind)!r} is not supported",
                fix="report this as a bug with the server version",
            )
    return tuple(values), pos


def _decode_begin(buf: bytes) -> Begin:
    final_lsn, ts, xid = _begin.unpack_from(buf, 1)
    return Begin(final_lsn, ts + PG_EPOCH_OFFSET_US, xid)


def _decode_commit(buf: bytes) -> Commit:
    flags, commit_lsn, end_lsn, ts = _commit.unpack_from(buf, 1)
    return Commit(flags, commit_lsn, end_lsn, ts + PG_EPOCH_OFFSET_US)


def _decode_origin(buf: bytes) -> Origin:
    (lsn,) = _uint64.unpack_from(buf, 1)
    name, _ = _cstring(buf, 9)
    return Origin(lsn, name)


def _decode_relation(buf: bytes) -> Relation:
    (oid,) = _unpack_uint32(buf, 1)
    schema, pos = _cstring(buf, 5)
    name, pos = _cstring(buf, pos)
    replica_identity = chr(buf[pos])
    (ncols,) = _unpack_int16(buf, pos + 1)
    pos += 3
    columns = []
    for _ in range(ncols):
        flags = buf[pos]
        col_name, pos = _cstring(buf, pos + 1)
        type_oid, typmod = _column_tail.unpack_from(buf, pos)
        pos += 8
        columns.append(Column(col_name, type_oid, typmod, bool(flags & COLUMN_IS_KEY)))
    return Relation(oid, schema, name, replica_identity, tuple(columns))


def _decode_type(buf: bytes) -> TypeInfo:
    (oid,) = _unpack_uint32(buf, 1)
    schema, pos = _cstring(buf, 5)
    name, _ = _cstring(buf, pos)
    return TypeInfo(oid, schema, name)


def _decode_insert(buf: bytes) -> Insert:
    (oid,) = _unpack_uint32(buf, 1)
    if buf[5] != 0x4E:  # 'N'
        raise DecodeError(f"Insert without a new tuple (marker {buf[5]:#x})",
                          fix="report this as a bug with the server version")
    row, _ = decode_tuple(buf, 6)
    return Insert(oid, row)


def _decode_update(buf: bytes) -> Update:
    (oid,) = _unpack_uint32(buf, 1)
    marker = buf[5]
    old: Row | None = None
    old_is_key = False
    pos = 6
    if marker in (0x4B, 0x4F):  # 'K' old key, 'O' old tuple
        old, pos = decode_tuple(buf, 6)
        old_is_key = marker == 0x4B
        marker = buf[pos]
        pos += 1
    if marker != 0x4E:
        raise DecodeError(f"Update without a new tuple (marker {marker:#x})",
                          fix="report this as a bug with the server version")
    new, _ = decode_tuple(buf, pos)
    return Update(oid, new, old, old_is_key)


def _decode_delete(buf: bytes) -> Delete:
    (oid,) = _unpack_uint32(buf, 1)
    marker = buf[5]
    if marker not in (0x4B, 0x4F):
        raise DecodeError(f"Delete without an old key or tuple (marker {marker:#x})",
                          fix="report this as a bug with the server version")
    old, _ = decode_tuple(buf, 6)
    return Delete(oid, old, marker == 0x4B)


def _decode_truncate(buf: bytes) -> Truncate:
    nrels, options = _truncate_head.unpack_from(buf, 1)
    oids = struct.unpack_from(f"!{nrels}I", buf, 6)
    return Truncate(
        tuple(oids), bool(options & TRUNCATE_CASCADE), bool(options & TRUNCATE_RESTART_IDENTITY)
    )


def _decode_message(buf: bytes) -> Message:
    flags, lsn = _message_head.unpack_from(buf, 1)
    prefix, pos = _cstring(buf, 10)
    (length,) = _unpack_int32(buf, pos)
    if length < 0 or pos + 4 + length > len(buf):
        raise ValueError(f"message content of {length} bytes overruns the message")
    content = bytes(buf[pos + 4 : pos + 4 + length])
    return Message(bool(flags & MESSAGE_TRANSACTIONAL), lsn, prefix, content)


_DECODERS: dict[int, Callable[[bytes], Event]] = {
    ord("B"): _decode_begin,
    ord("C"): _decode_commit,
    ord("O"): _decode_origin,
    ord("R"): _decode_relation,
    ord("Y"): _decode_type,
    ord("I"): _decode_insert,
    ord("U"): _decode_update,
    ord("D"): _decode_delete,
    ord("T"): _decode_truncate,
    ord("M"): _decode_message,
}


def decode(buf: bytes) -> Event:
    """Decode one pgoutput message (the payload of an XLogData frame)."""
    if not buf:
        raise DecodeError("empty pgoutput message", fix="report this as a bug")
    decoder = _DECODERS.get(buf[0])
    if decoder is None:
        raise DecodeError(
            f"unknown pgoutput message type {chr(buf[0])!r}",
            fix="cdc reads pgoutput protocol version 1 without streaming; check the slot's plugin",
        )
    try:
        return decoder(buf)
    except (struct.error, IndexError, ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"malformed pgoutput {chr(buf[0])!r} message: {exc}",
                          fix="report this as a bug with the server version") from exc
