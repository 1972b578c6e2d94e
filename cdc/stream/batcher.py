"""Per-table column buffers and the flush rules.

Changes are appended column-wise and converted to Arrow only when the batch is
cut, so the hot loop does no per-value conversion: by the compiled decoder into
Arrow-layout buffers (:class:`NativeTableBuffer`), by the pure-Python one into one
Python list per column (:class:`TableBuffer`). A batch is cut when the buffered rows
or bytes reach their limits or the oldest buffered change is older than the
time limit, whichever comes first; a transaction larger than the limits is cut
into several batches, so memory is bounded by the flush settings, not by
transaction size.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from cdc.decoding.binary import CODECS, Codec
from cdc.decoding.core import ChangeCounter, Decoder, PureDecoder, native_module
from cdc.decoding.pgtypes import ColumnType, PgType, TypeFacts, column_type, convert_column
from cdc.errors import ConversionError
from cdc.events import UNCHANGED, Lsn, Relation, Row
from cdc.lake.columns import lake_column

#: metadata columns of every raw file, after the source columns (DESIGN.md section 2)
META_SCHEMA = pa.schema(
    [
        ("_op", pa.string()),
        ("_lsn", pa.int64()),
        ("_commit_lsn", pa.int64()),
        ("_seq", pa.int64()),
        ("_xid", pa.int64()),
        ("_commit_ts", pa.timestamp("us", tz="UTC")),
        ("_unchanged", pa.list_(pa.string())),
    ]
)


@dataclass(frozen=True)
class FlushLimits:
    rows: int
    bytes: int
    seconds: float


@dataclass
class Batch:
    """A cut batch of one table, ready for the raw sink."""

    relation: Relation
    table: pa.Table
    first_commit_lsn: Lsn  # (first_commit_lsn, first_seq) is the batch's first change
    last_commit_lsn: Lsn
    first_seq: int
    label: str | None = None  # names the file instead of first_seq (snapshot chunks)
    #: why the batch holds its source values as text, for raw/_rejected (None: it does not)
    unconvertible: str | None = None
    #: columns holding one value in every row (a snapshot chunk's LSNs, xid and time)
    constant: tuple[str, ...] = ()

    @property
    def qualified_name(self) -> str:
        return self.relation.qualified_name


class TableBuffer:
    """Buffered changes of one table, one list per column."""

    def __init__(self, relation: Relation, type_names: dict[int, str],
                 type_facts: TypeFacts | None = None,
                 column_facts: Mapping[str, Mapping[str, str]] | None = None,
                 quarantine: bool = False) -> None:
        self.relation = relation
        self.column_facts = column_facts
        #: a value that cannot be converted: a batch of text values for raw/_rejected
        self.quarantine = quarantine
        self.types: list[ColumnType] = [
            column_type(c.type_oid, c.type_modifier, type_names.get(c.type_oid), type_facts)
            for c in relation.columns
        ]
        self._clear()

    def _clear(self) -> None:
        self.columns: list[list[str | None]] = [[] for _ in self.relation.columns]
        self.ops: list[str] = []
        self.lsns: list[int] = []
        self.commit_lsns: list[int] = []
        self.seqs: list[int] = []
        self.xids: list[int] = []
        self.commit_ts: list[int] = []
        self.unchanged: list[list[str] | None] = []

    def __len__(self) -> int:
        return len(self.ops)

    def append(  # noqa: PLR0913, PLR0917  once per change: no per-change object
        self, op: str, row: Row | None, lsn: Lsn, commit_lsn: Lsn, seq: int, xid: int, ts: int
    ) -> None:
        unchanged: list[str] | None = None
        if row is None:  # truncate: no source values
            for col in self.columns:
                col.append(None)
        elif op == "u" and UNCHANGED in row:
            unchanged = []
            for col, value, meta in zip(self.columns, row, self.relation.columns, strict=True):
                if value is UNCHANGED:
                    unchanged.append(lake_column(meta.name))
                    col.append(None)
                else:
                    col.append(value)  # type: ignore[arg-type]
        else:
            for col, value in zip(self.columns, row, strict=True):
                col.append(value)  # type: ignore[arg-type]
        self.ops.append(op)
        self.lsns.append(lsn)
        self.commit_lsns.append(commit_lsn)
        self.seqs.append(seq)
        self.xids.append(xid)
        self.commit_ts.append(ts)
        self.unchanged.append(unchanged)

    def cut(self) -> Batch:
        """Convert the buffered columns to Arrow and empty the buffer."""
        n = len(self.ops)
        columns: Sequence[Sequence[str | None] | pa.Array | pa.ChunkedArray] = self.columns
        table, why = self._table(
            columns,
            ops=pa.array(self.ops, pa.string()),
            lsns=pa.array(self.lsns, pa.int64()),
            commit_lsns=pa.array(self.commit_lsns, pa.int64()),
            seqs=pa.array(self.seqs, pa.int64()),
            xids=pa.array(self.xids, pa.int64()),
            commit_ts=pa.array(self.commit_ts, pa.int64()),
            unchanged=pa.array(self.unchanged, pa.list_(pa.string())) if any(self.unchanged)
            else pa.nulls(n, pa.list_(pa.string())),
        )
        batch = Batch(self.relation, table, self.commit_lsns[0], self.commit_lsns[-1],
                      self.seqs[0], unconvertible=why)
        self._clear()
        return batch

    def _table(self, columns: Sequence[Sequence[str | None] | pa.Array | pa.ChunkedArray],
               **meta: pa.Array) -> tuple[pa.Table, str | None]:
        """The raw table of the text ``columns``, and None. A value that cannot be converted
        raises ConversionError, or with ``quarantine`` gives the text values and why (the
        batch goes to raw/_rejected)."""
        try:
            return raw_table(self.relation, self.types, columns, **meta,
                             column_facts=self.column_facts), None
        except ConversionError as exc:
            if not self.quarantine:
                raise
            text = [ColumnType(t.pg_type, pa.string(), _as_text) for t in self.types]
            return raw_table(self.relation, text, columns, **meta,
                             column_facts=self.column_facts), str(exc)


class NativeTableBuffer(TableBuffer):
    """Buffered changes of one table in the compiled decoder's Arrow-layout buffers."""

    def __init__(self, relation: Relation, type_names: dict[int, str],
                 type_facts: TypeFacts | None = None,
                 column_facts: Mapping[str, Mapping[str, str]] | None = None,
                 quarantine: bool = False) -> None:
        native = importlib.import_module("cdc.decoding._native")
        # names as the lake holds them: for _unchanged (cdc.lake.columns)
        self.core: Any = native.ColumnBuffer(tuple(lake_column(c.name) for c in relation.columns),
                                             tuple(c.is_key for c in relation.columns),
                                             tuple(int(CODECS.get(c.type_oid, Codec.NONE))
                                                   for c in relation.columns))
        super().__init__(relation, type_names, type_facts, column_facts, quarantine)

    def _clear(self) -> None:
        pass  # take() empties the core

    def __len__(self) -> int:
        return len(self.core)

    def append(  # noqa: PLR0913, PLR0917  once per change: no per-change object
        self, op: str, row: Row | None, lsn: Lsn, commit_lsn: Lsn, seq: int, xid: int, ts: int
    ) -> None:
        self.core.append(op, row, lsn, commit_lsn, seq, xid, ts)

    def cut(self) -> Batch:
        columns, ops, lsns, commit_lsns, seqs, xids, commit_ts, unchanged = self.core.take()
        table, why = self._table(columns, ops=ops, lsns=lsns, commit_lsns=commit_lsns,
                                 seqs=seqs, xids=xids, commit_ts=commit_ts, unchanged=unchanged)
        n = len(ops)
        return Batch(self.relation, table, commit_lsns[0].as_py(),
                     commit_lsns[n - 1].as_py(), seqs[0].as_py(), unconvertible=why)


def _as_text(values: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    return values


def relation_schema(relation: Relation, types: Sequence[ColumnType],
                    column_facts: Mapping[str, Mapping[str, str]] | None = None) -> pa.Schema:
    """Source columns (typed, ``pg_type`` in the field metadata, and the catalog's
    ``pg_relid`` / ``pg_attnum`` / ``pg_missing`` where known) plus the metadata columns."""
    facts = column_facts or {}
    fields = [  # a column named like cdc's own lands renamed (cdc.lake.columns)
        pa.field(lake_column(c.name), t.arrow_type, metadata={
            "pg_type": t.pg_type, "pg_key": "1" if c.is_key else "0", "pg_name": c.name,
            **facts.get(c.name, {})})
        for c, t in zip(relation.columns, types, strict=True)
    ]
    metadata = {"cdc_table": relation.qualified_name, "cdc_schema": relation.schema,
                "cdc_name": relation.name,
                "cdc_key": ",".join(lake_column(k) for k in relation.key_columns)}
    return pa.schema([*fields, *META_SCHEMA], metadata=metadata)


def raw_table(  # noqa: PLR0913  a keyword per metadata column of the raw layout
    relation: Relation, types: Sequence[ColumnType],
    text_columns: Sequence[Sequence[str | None] | pa.Array | pa.ChunkedArray], *,
    ops: pa.Array, lsns: pa.Array, commit_lsns: pa.Array, seqs: pa.Array, xids: pa.Array,
    commit_ts: pa.Array, unchanged: pa.Array,
    column_facts: Mapping[str, Mapping[str, str]] | None = None,
) -> pa.Table:
    """A raw-layer table from text columns and metadata arrays (stream and snapshot share it)."""
    name = relation.qualified_name
    arrays = [
        convert_column(values, ctype, table=name, column=meta.name)
        for values, ctype, meta in zip(text_columns, types, relation.columns, strict=True)
    ]
    arrays += [ops, lsns, commit_lsns, seqs, xids,
               commit_ts.cast(pa.timestamp("us", tz="UTC")), unchanged]
    return pa.Table.from_arrays(arrays, schema=relation_schema(relation, types, column_facts))


@dataclass
class Batcher:
    """All table buffers of the stream and the flush rules over them."""

    limits: FlushLimits
    buffers: dict[int, TableBuffer] = field(default_factory=dict)
    #: NativeTableBuffer when the compiled decoder feeds this batcher (see decoder_for)
    buffer_type: type[TableBuffer] = TableBuffer
    type_names: dict[int, str] = field(default_factory=dict)
    #: catalog facts of the non-built-in column types (domains, arrays, enums)
    type_facts: dict[int, PgType] = field(default_factory=dict)
    #: per relation OID: attribute numbers and ADD COLUMN defaults (catalog.column_facts)
    column_facts: dict[int, dict[str, dict[str, str]]] = field(default_factory=dict)
    quarantine: bool = False  # unconvertible values: a text batch for raw/_rejected
    rows: int = 0
    bytes: int = 0
    oldest: float | None = None
    #: True while detached buffers are still being written (``FlushWriter.pending``)
    writing: Callable[[], bool] = field(default=lambda: False)

    def buffer_for(self, relation: Relation) -> TableBuffer:
        buf = self.buffers.get(relation.oid)
        if buf is None:
            buf = self.buffers[relation.oid] = self.buffer_type(
                relation, self.type_names, self.type_facts, self.column_facts.get(relation.oid),
                self.quarantine)
        return buf

    def count(self, rows: int, nbytes: int) -> None:
        """``rows`` changes of ``nbytes`` were appended to the buffers."""
        self.rows += rows
        self.bytes += nbytes
        if self.oldest is None:
            self.oldest = time.monotonic()

    @property
    def empty(self) -> bool:
        """Nothing in flight: no buffered change, none detached and not yet durable."""
        return self.rows == 0 and not self.writing()

    def due(self, now: float | None = None) -> bool:
        """True when the buffered changes must be flushed."""
        if self.rows == 0:
            return False
        if self.rows >= self.limits.rows or self.bytes >= self.limits.bytes:
            return True
        now = time.monotonic() if now is None else now
        return self.oldest is not None and now - self.oldest >= self.limits.seconds

    def detach(self, oid: int) -> list[TableBuffer]:
        """Take one table's buffer out (before its schema changes), to be cut elsewhere."""
        buf = self.buffers.pop(oid, None)
        if buf is None or len(buf) == 0:
            return []
        self.rows -= len(buf)
        if self.rows == 0:
            self.bytes = 0
            self.oldest = None
        return [buf]

    def detach_all(self) -> list[TableBuffer]:
        """Take every non-empty buffer out; the batcher is empty, new changes go to new
        buffers while these are cut and written (``FlushWriter``)."""
        buffers = [b for b in self.buffers.values() if len(b)]
        self.buffers.clear()  # the decoders hold this dict: keep it
        self.rows = self.bytes = 0
        self.oldest = None
        return buffers


def decoder_for(batcher: Batcher, relations: Mapping[int, Relation],
                stats: ChangeCounter) -> Decoder:
    """The pgoutput decoder feeding ``batcher``: the compiled one when it is built (and
    ``CDC_PURE_PYTHON`` is not set), else the pure-Python reference."""
    native = native_module()
    if native is None:
        return PureDecoder(batcher, relations, stats)
    batcher.buffer_type = NativeTableBuffer
    decoder: Decoder = native.NativeDecoder(batcher, relations, stats)
    return decoder
