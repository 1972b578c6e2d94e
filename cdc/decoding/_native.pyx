# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled pgoutput row decoder: message bytes → Arrow-layout column buffers.

Mirrors :class:`cdc.decoding.core.PureDecoder` (the reference; the differential tests
hold both to the same batches and errors). A row message is parsed in two passes: first
every value's span is read through the bounds-checked reader (``_reader.pxd``) and
checked (UTF-8 included), then the values are appended to the table's column buffers,
so a malformed message never leaves half a row behind. A malformed message is handed
to the pure decoder, which raises the DecodeError that says what is wrong with it.
Control messages (Begin, Commit, Relation, ...) are rare and decoded by the pure code.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from cdc.decoding._binary cimport binary_render, binary_valid
from cdc.decoding._buffers cimport Growable, grow, int64s, put, put_i64, take_buffer, utf8_valid
from cdc.decoding._reader cimport (
    Reader, read_bytes, read_i16, read_i32, read_u8, read_u32, read_u64, reader_init,
)

import pyarrow as pa

from cdc.decoding.core import (
    VALUE_OVERHEAD, check_begin, check_binary, column_count, short_frame,
    unchanged_outside_update, unknown_relation,
)
from cdc.decoding.pgoutput import decode
from cdc.errors import DecodeError
from cdc.events import UNCHANGED, Begin

cdef enum:
    MAX_COLUMNS = 32767  # pgoutput's column count is an Int16
    KIND_BINARY = 0x62  # 'b'
    KIND_NULL = 0x6E  # 'n'
    KIND_TEXT = 0x74  # 't'
    KIND_UNCHANGED = 0x75  # 'u'
    OFFSET_LIMIT = 0x7FFFFFFF  # Arrow string offsets are int32
    XLOGDATA_HEADER = 25  # 'w', WAL start, WAL end, send time (core.XLOGDATA_HEADER)


cdef struct Span:
    uint8_t kind
    const unsigned char* data
    int32_t length


cdef bint read_tuple(Reader* r, Span* spans, int* ncols) noexcept nogil:
    """Read TupleData into ``spans``; False when malformed (the reader is then bad)."""
    cdef int n = read_i16(r)
    cdef int i
    cdef uint8_t kind
    cdef int32_t length
    if r.bad or n < 0:
        r.bad = True
        return False
    for i in range(n):
        kind = read_u8(r)
        spans[i].kind = kind
        if kind == KIND_TEXT or kind == KIND_BINARY:
            length = read_i32(r)
            spans[i].length = length
            spans[i].data = read_bytes(r, length)
            if spans[i].data == NULL or (kind == KIND_TEXT
                                         and not utf8_valid(spans[i].data, length)):
                r.bad = True
                return False
        elif kind != KIND_NULL and kind != KIND_UNCHANGED:
            r.bad = True  # also a read past the end (kind 0)
            return False
    ncols[0] = n
    return True


cdef inline bint same_value(Span* a, Span* b) noexcept nogil:
    if a.kind != b.kind:
        return False
    if a.kind != KIND_TEXT and a.kind != KIND_BINARY:
        return True
    return a.length == b.length and memcmp(a.data, b.data, a.length) == 0


cdef class ColumnBuffer:
    """One table's buffered changes in Arrow's layout: per column offsets, data, validity."""

    cdef readonly Py_ssize_t ncols
    cdef readonly Py_ssize_t nrows
    cdef Growable* offsets
    cdef Growable* data
    cdef Growable* validity
    cdef Py_ssize_t* nulls
    cdef uint8_t* is_key
    cdef uint8_t* codecs  # how each column's binary values are read (binary.Codec)
    cdef Growable ops, lsns, commit_lsns, seqs, xids, commit_ts
    # updates with unchanged TOAST values, as int32s: row, count, the columns' indexes ...
    cdef Growable unchanged
    cdef Py_ssize_t unchanged_rows
    cdef Py_ssize_t last_unchanged  # where the last row's entry starts (in int32s)
    cdef tuple names

    def __cinit__(self, tuple names, tuple is_key, tuple codecs=()):
        cdef Py_ssize_t i
        self.ncols = len(names)
        self.names = names
        n = max(self.ncols, 1)
        self.offsets = <Growable*>PyMem_Malloc(n * sizeof(Growable))
        self.data = <Growable*>PyMem_Malloc(n * sizeof(Growable))
        self.validity = <Growable*>PyMem_Malloc(n * sizeof(Growable))
        self.nulls = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t))
        self.is_key = <uint8_t*>PyMem_Malloc(n)
        self.codecs = <uint8_t*>PyMem_Malloc(n)
        if not (self.offsets and self.data and self.validity and self.nulls and self.is_key
                and self.codecs):
            raise MemoryError()
        memset(self.offsets, 0, n * sizeof(Growable))
        memset(self.data, 0, n * sizeof(Growable))
        memset(self.validity, 0, n * sizeof(Growable))
        for i in range(self.ncols):
            self.is_key[i] = 1 if is_key[i] else 0
            self.codecs[i] = codecs[i] if i < len(codecs) else 0
        self._reset()

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.offsets != NULL:
            for i in range(self.ncols):
                PyMem_Free(self.offsets[i].data)
                PyMem_Free(self.data[i].data)
                PyMem_Free(self.validity[i].data)
        PyMem_Free(self.ops.data)
        PyMem_Free(self.lsns.data)
        PyMem_Free(self.commit_lsns.data)
        PyMem_Free(self.seqs.data)
        PyMem_Free(self.xids.data)
        PyMem_Free(self.commit_ts.data)
        PyMem_Free(self.unchanged.data)
        PyMem_Free(self.offsets)
        PyMem_Free(self.data)
        PyMem_Free(self.validity)
        PyMem_Free(self.nulls)
        PyMem_Free(self.is_key)
        PyMem_Free(self.codecs)

    cdef int _reset(self) except -1:
        cdef Py_ssize_t i
        cdef int32_t zero = 0
        self.nrows = 0
        self.unchanged.length = 0
        self.unchanged_rows = 0
        for i in range(self.ncols):
            self.offsets[i].length = 0
            self.data[i].length = 0
            self.validity[i].length = 0
            self.nulls[i] = 0
            put(&self.offsets[i], &zero, 4)
        return 0

    def __len__(self):
        return self.nrows

    cdef inline int _value(self, Py_ssize_t i, const unsigned char* src, Py_ssize_t n,
                           bint valid, bint binary=False) except -1:
        cdef Growable* v = &self.validity[i]
        cdef Growable* d = &self.data[i]
        cdef int32_t end
        cdef Py_ssize_t before
        cdef Py_ssize_t byte = self.nrows >> 3
        if byte >= v.length:
            if v.length >= v.capacity:
                grow(v, 1)
            v.data[v.length] = 0
            v.length += 1
        if valid:
            if d.length + n > OFFSET_LIMIT:
                raise DecodeError(f"more than 2 GiB of text in column {self.names[i]!r} of "
                                  "one batch", fix="lower --flush-bytes (the default is 128MiB)")
            v.data[byte] |= <char>(1 << (self.nrows & 7))
            if binary:
                before = d.length
                binary_render(self.codecs[i], src, n, d)
                if d.length > OFFSET_LIMIT:  # undone: the buffer stays as it was
                    d.length = before
                    v.data[byte] &= <char>~(1 << (self.nrows & 7))
                    raise DecodeError(f"more than 2 GiB of text in column {self.names[i]!r} "
                                      "of one batch",
                                      fix="lower --flush-bytes (the default is 128MiB)")
            elif n:
                put(d, src, n)
        else:
            self.nulls[i] += 1
        end = <int32_t>d.length
        return put(&self.offsets[i], &end, 4)

    cdef int _meta(self, char op, int64_t lsn, int64_t commit_lsn, int64_t seq, int64_t xid,
                   int64_t ts) except -1:
        put(&self.ops, &op, 1)
        put_i64(&self.lsns, lsn)
        put_i64(&self.commit_lsns, commit_lsn)
        put_i64(&self.seqs, seq)
        put_i64(&self.xids, xid)
        put_i64(&self.commit_ts, ts)
        self.nrows += 1
        return 0

    cdef int _unchanged(self, int32_t column) except -1:
        """Column ``column`` of the row being added is an unchanged TOAST value."""
        cdef int32_t head[2]
        if self.unchanged_rows == 0 or (<int32_t*>self.unchanged.data)[self.last_unchanged] \
                != self.nrows:
            self.last_unchanged = self.unchanged.length // 4
            head[0] = <int32_t>self.nrows
            head[1] = 0
            put(&self.unchanged, head, 8)
            self.unchanged_rows += 1
        (<int32_t*>self.unchanged.data)[self.last_unchanged + 1] += 1
        return put(&self.unchanged, &column, 4)

    cdef int add_spans(self, char op, Span* spans, int64_t lsn, int64_t commit_lsn,
                       int64_t seq, int64_t xid, int64_t ts) except -1:
        cdef Py_ssize_t i
        for i in range(self.ncols):
            if spans[i].kind == KIND_TEXT:
                self._value(i, spans[i].data, spans[i].length, True)
            elif spans[i].kind == KIND_BINARY:
                self._value(i, spans[i].data, spans[i].length, True, True)
            else:
                if spans[i].kind == KIND_UNCHANGED:
                    self._unchanged(<int32_t>i)
                self._value(i, NULL, 0, False)
        return self._meta(op, lsn, commit_lsn, seq, xid, ts)

    def append(self, str op, row, int64_t lsn, int64_t commit_lsn, int64_t seq, int64_t xid,
               int64_t ts):
        """Buffer one change given as values (str, None or UNCHANGED; None row: truncate)."""
        cdef Py_ssize_t i
        cdef bytes text
        if row is not None and len(row) != self.ncols:
            raise ValueError(f"row of {len(row)} values for {self.ncols} columns")
        encoded = [None if row is None or not isinstance(v, str) else (<str>v).encode("utf-8")
                   for v in (row if row is not None else ())]
        for i in range(len(encoded)):  # checked before anything is appended
            value = row[i]
            if encoded[i] is None and value is not None and not (value is UNCHANGED
                                                                 and op == "u"):
                raise TypeError(f"value {value!r} of {op!r} change in column "
                                f"{self.names[i]!r} is not text")
        for i in range(self.ncols):
            value = None if row is None else row[i]
            if value is None:
                self._value(i, NULL, 0, False)
            elif value is UNCHANGED and op == "u":
                self._unchanged(<int32_t>i)
                self._value(i, NULL, 0, False)
            else:
                text = encoded[i]
                self._value(i, <const unsigned char*>PyBytes_AS_STRING(text),
                            PyBytes_GET_SIZE(text), True)
        return self._meta(ord(op), lsn, commit_lsn, seq, xid, ts)

    cdef object _take_unchanged(self, Py_ssize_t n):
        """The ``_unchanged`` column: list<string>, NULL where no value was unchanged."""
        cdef Growable offsets, validity, indexes
        cdef int32_t* entries = <int32_t*>self.unchanged.data
        cdef Py_ssize_t nentries = self.unchanged.length // 4
        cdef Py_ssize_t pos = 0, row = 0, target, k
        cdef int32_t total = 0
        if self.unchanged_rows == 0:
            return pa.nulls(n, pa.list_(pa.string()))
        memset(&offsets, 0, sizeof(Growable))
        memset(&validity, 0, sizeof(Growable))
        memset(&indexes, 0, sizeof(Growable))
        try:
            grow(&offsets, 4 * (n + 1))
            grow(&validity, (n + 7) // 8)
            memset(validity.data, 0, (n + 7) // 8)
            (<int32_t*>offsets.data)[0] = 0
            while pos < nentries:
                target = entries[pos]
                k = entries[pos + 1]
                while row < target:
                    (<int32_t*>offsets.data)[row + 1] = total
                    row += 1
                validity.data[target >> 3] |= <char>(1 << (target & 7))
                put(&indexes, &entries[pos + 2], 4 * k)
                total += <int32_t>k
                (<int32_t*>offsets.data)[target + 1] = total
                row = target + 1
                pos += 2 + k
            while row < n:
                (<int32_t*>offsets.data)[row + 1] = total
                row += 1
            offsets.length = 4 * (n + 1)
            validity.length = (n + 7) // 8
            names = pa.array(self.names, pa.string()).take(
                pa.Array.from_buffers(pa.int32(), total, [None, take_buffer(&indexes)], 0))
            return pa.Array.from_buffers(
                pa.list_(pa.string()), n, [take_buffer(&validity), take_buffer(&offsets)],
                n - self.unchanged_rows, children=[names])
        finally:
            PyMem_Free(offsets.data)
            PyMem_Free(validity.data)
            PyMem_Free(indexes.data)

    def take(self):
        """(text columns, ops, lsns, commit_lsns, seqs, xids, commit_ts, unchanged) as Arrow
        arrays, and the buffer emptied."""
        cdef Py_ssize_t i, n = self.nrows
        cdef Growable op_offsets
        cdef int32_t k
        columns = []
        for i in range(self.ncols):
            nulls = self.nulls[i]
            validity = take_buffer(&self.validity[i]) if nulls else None
            if not nulls:
                self.validity[i].length = 0
            columns.append(pa.Array.from_buffers(
                pa.string(), n, [validity, take_buffer(&self.offsets[i]),
                                 take_buffer(&self.data[i])], nulls))
        op_offsets.data = NULL
        op_offsets.length = op_offsets.capacity = 0
        try:
            grow(&op_offsets, 4 * (n + 1))
            for k in range(n + 1):
                (<int32_t*>op_offsets.data)[k] = k
            op_offsets.length = 4 * (n + 1)
            ops = pa.Array.from_buffers(pa.string(), n, [None, take_buffer(&op_offsets),
                                                          take_buffer(&self.ops)], 0)
        finally:
            PyMem_Free(op_offsets.data)
        ints = [int64s(&self.lsns, n), int64s(&self.commit_lsns, n), int64s(&self.seqs, n),
                int64s(&self.xids, n), int64s(&self.commit_ts, n)]
        unchanged = self._take_unchanged(n)
        self._reset()
        return (columns, ops, *ints, unchanged)


cdef class NativeDecoder:
    """The compiled :class:`cdc.decoding.core.Decoder`; feeds ``ColumnBuffer`` cores."""

    cdef object batcher
    cdef dict buffers
    cdef object relations
    cdef object stats
    cdef object count
    cdef public int64_t commit_lsn, xid, commit_ts, seq
    cdef Span* new_spans
    cdef Span* old_spans

    def __cinit__(self, batcher, relations, stats):
        self.batcher = batcher
        self.buffers = batcher.buffers
        self.relations = relations
        self.stats = stats
        self.count = batcher.count
        self.new_spans = <Span*>PyMem_Malloc(MAX_COLUMNS * sizeof(Span))
        self.old_spans = <Span*>PyMem_Malloc(MAX_COLUMNS * sizeof(Span))
        if self.new_spans == NULL or self.old_spans == NULL:
            raise MemoryError()

    def __dealloc__(self):
        PyMem_Free(self.new_spans)
        PyMem_Free(self.old_spans)

    def begin(self, commit_lsn, int64_t xid, commit_ts):
        check_begin(commit_lsn, commit_ts)
        self.commit_lsn = <int64_t>commit_lsn
        self.xid = xid
        self.commit_ts = commit_ts
        self.seq = 0

    def feed_frame(self, frame):
        """Decode the pgoutput message of one XLogData frame (any bytes-like object)."""
        cdef Py_buffer view
        cdef Reader r
        cdef uint64_t lsn
        cdef uint8_t kind
        PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE)
        try:
            if view.len < XLOGDATA_HEADER:
                raise short_frame(view.len)
            reader_init(&r, <const unsigned char*>view.buf, view.len, 1)
            lsn = read_u64(&r)
            kind = r.buf[XLOGDATA_HEADER] if view.len > XLOGDATA_HEADER else 0
            if (kind == 0x49 or kind == 0x55 or kind == 0x44) and self._row(
                    r.buf + XLOGDATA_HEADER, view.len - XLOGDATA_HEADER, kind, <int64_t>lsn):
                return None
            payload = PyBytes_FromStringAndSize(<const char*>r.buf + XLOGDATA_HEADER,
                                                view.len - XLOGDATA_HEADER)
        finally:
            PyBuffer_Release(&view)
        return self._message(payload, kind, lsn)

    def feed(self, bytes payload, uint64_t lsn):
        cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
        cdef uint8_t kind = <uint8_t>PyBytes_AS_STRING(payload)[0] if n else 0
        if (kind == 0x49 or kind == 0x55 or kind == 0x44) and self._row(
                <const unsigned char*>PyBytes_AS_STRING(payload), n, kind, <int64_t>lsn):
            return None
        return self._message(payload, kind, lsn)

    cdef bint _binary_ok(self, ColumnBuffer core, Span* spans, Py_ssize_t ncols) noexcept:
        cdef Py_ssize_t i
        for i in range(ncols):
            if spans[i].kind == KIND_BINARY and not binary_valid(
                    core.codecs[i], spans[i].data, spans[i].length):
                return False
        return True

    cdef object _message(self, bytes payload, uint8_t kind, uint64_t lsn):
        """A message the row path did not take: a control message, or a malformed one."""
        if kind == 0x49 or kind == 0x55 or kind == 0x44:  # 'I' 'U' 'D'
            event = decode(payload)  # says what is malformed
            buffer = self.buffers.get(event.relation_oid)
            relation = (buffer.relation if buffer is not None
                        else self.relations.get(event.relation_oid))
            if relation is not None:  # a binary value: binary.py says what is wrong with it
                check_binary(relation, getattr(event, "old", None),
                             getattr(event, "new", None))
            raise DecodeError(f"malformed pgoutput {chr(kind)!r} message",
                              fix="report this as a bug with the server version")
        event = decode(payload)
        if kind == 0x42:  # 'B'
            begin = <object>event
            self.begin(begin.final_lsn, begin.xid, begin.commit_ts)
        return event

    cdef bint _row(self, const unsigned char* buf, Py_ssize_t n, uint8_t kind,
                   int64_t lsn) except -1:
        """Buffer one row message; False when it is malformed (nothing buffered then)."""
        cdef Reader r
        cdef uint32_t oid
        cdef uint8_t marker
        cdef int nnew = 0, nold = 0
        cdef bint has_old = False, old_is_key = False, has_new = False
        cdef bint key_changed = False
        cdef Py_ssize_t i, ncols
        cdef ColumnBuffer core
        cdef int rows
        reader_init(&r, buf, n, 1)
        oid = read_u32(&r)
        marker = read_u8(&r)
        if kind == 0x49:  # Insert: 'N' new tuple
            if marker != 0x4E or not read_tuple(&r, self.new_spans, &nnew):
                return False
            has_new = True
        elif kind == 0x55:  # Update: ['K' key | 'O' old tuple] 'N' new tuple
            if marker == 0x4B or marker == 0x4F:
                if not read_tuple(&r, self.old_spans, &nold):
                    return False
                has_old = True
                old_is_key = marker == 0x4B
                marker = read_u8(&r)
            if marker != 0x4E or not read_tuple(&r, self.new_spans, &nnew):
                return False
            has_new = True
        else:  # Delete: 'K' key | 'O' old tuple
            if (marker != 0x4B and marker != 0x4F) or not read_tuple(&r, self.old_spans, &nold):
                return False
            has_old = True
            old_is_key = marker == 0x4B
        if r.bad:
            return False

        buffer = self.buffers.get(oid)
        if buffer is None:
            relation = self.relations.get(oid)
            if relation is None:
                raise unknown_relation(oid)
            ncols = len(relation.columns)
        else:
            relation = buffer.relation
            ncols = (<ColumnBuffer>buffer.core).ncols
        if has_new and nnew != ncols:
            raise column_count(relation, nnew)
        if has_old and nold != ncols:
            raise column_count(relation, nold)
        if buffer is None:
            buffer = self.batcher.buffer_for(relation)
        core = buffer.core
        if not ((not has_old or self._binary_ok(core, self.old_spans, ncols))
                and (not has_new or self._binary_ok(core, self.new_spans, ncols))):
            if len(core) == 0:  # made for this row: leave no trace of it
                del self.buffers[oid]
            return False

        if kind == 0x55 and has_old and not old_is_key:
            # REPLICA IDENTITY FULL: unchanged TOAST values come from the old tuple, and
            # the key columns tell whether the key changed
            for i in range(ncols):
                if self.new_spans[i].kind == KIND_UNCHANGED:
                    self.new_spans[i] = self.old_spans[i]
                if core.is_key[i] and not same_value(&self.old_spans[i], &self.new_spans[i]):
                    key_changed = True
        # an unchanged marker is only valid in the new tuple of an update
        if kind == 0x49 or (has_old and (kind == 0x44 or old_is_key or key_changed)):
            for i in range(ncols):
                if (self.new_spans[i].kind if kind == 0x49 else self.old_spans[i].kind) \
                        == KIND_UNCHANGED:
                    if len(core) == 0:  # made for this row: leave no trace of it
                        del self.buffers[oid]
                    raise unchanged_outside_update(relation, "c" if kind == 0x49 else "d")

        rows = 0
        if kind == 0x49:
            core.add_spans(b"c", self.new_spans, lsn, self.commit_lsn, self.seq, self.xid,
                           self.commit_ts)
            rows = 1
        else:
            if kind == 0x44 or old_is_key or key_changed:
                core.add_spans(b"d", self.old_spans, lsn, self.commit_lsn, self.seq,
                               self.xid, self.commit_ts)
                rows = 1
            if kind == 0x55:
                core.add_spans(b"u", self.new_spans, lsn, self.commit_lsn, self.seq + rows,
                               self.xid, self.commit_ts)
                rows += 1
        self.seq += rows
        self.stats.changes += rows
        self.count(rows, rows * (n + VALUE_OVERHEAD * ncols))
        return True

    def append(self, oid, str op, row, uint64_t lsn, Py_ssize_t nbytes):
        """Buffer one change given as values (truncates; wal2json's events)."""
        relation = self.relations[oid]
        buffer = self.buffers.get(oid)
        if buffer is None:
            buffer = self.batcher.buffer_for(relation)
        buffer.append(op, row, <int64_t>lsn, self.commit_lsn, self.seq, self.xid,
                      self.commit_ts)
        self.seq += 1
        self.stats.changes += 1
        self.count(1, nbytes + VALUE_OVERHEAD * len(relation.columns))
