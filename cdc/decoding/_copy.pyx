# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The compiled binary COPY parser: CopyData messages → Arrow-layout column buffers.

Mirrors :class:`cdc.decoding.copy_binary.PureCopyParser` (the reference: its docstring
gives the format and the rules; the differential tests hold both to the same columns and
errors). A row's fields are first read through the bounds-checked reader
(``_reader.pxd``) and checked with the pgoutput binary path's ``binary_valid``
(``_binary.pxd``), then appended, so a malformed row leaves nothing behind.

``read_libpq`` drains a COPY in progress on a libpq connection without a Python call
per row: it calls libpq's ``PQgetCopyData`` in non-blocking mode, parses every row the
connection has buffered while holding the GIL, and releases the GIL only while it waits
for the socket (one wait per network read, not per row).
"""

from cpython.buffer cimport (
    PyBUF_SIMPLE, PyBuffer_FillInfo, PyBuffer_Release, PyObject_GetBuffer,
)
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport INT64_MAX, INT64_MIN, int16_t, int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.errno cimport EINTR, errno
from libc.string cimport memcmp, memcpy, memset

from cdc.decoding._binary cimport be, binary_render, binary_valid
from cdc.decoding._buffers cimport Growable, grow, put
from cdc.decoding._reader cimport Reader, read_bytes, read_i16, read_i32, read_u32, reader_init

import pyarrow as pa

from cdc.decoding.copy_binary import (
    invalid_value, malformed, out_of_range, too_much_text,
)

cdef extern from "poll.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd* fds, unsigned long nfds, int timeout)
    enum:
        POLLIN

cdef enum:
    LAYOUT_TEXT = 0
    LAYOUT_INT = 1
    LAYOUT_FLOAT = 2
    LAYOUT_BOOL = 3
    LAYOUT_BYTES = 4
    LAYOUT_DATE = 5
    LAYOUT_TIMESTAMP = 6
    LAYOUT_TIME = 7
    CODEC_FLOAT4 = 6
    OFFSET_LIMIT = 0x7FFFFFFF
    FLAG_OIDS = 0x10000
    PG_EPOCH_DAYS = 10957

cdef extern from *:
    """
    #define CDC_PG_EPOCH_US 946684800000000LL
    #define CDC_COPY_SIGNATURE "PGCOPY\\n\\377\\r\\n"
    typedef int (*cdc_getcopydata_fn)(void*, char**, int);
    typedef void (*cdc_freemem_fn)(void*);
    typedef int (*cdc_consumeinput_fn)(void*);
    typedef int (*cdc_socket_fn)(const void*);
    """
    const int64_t PG_EPOCH_US "CDC_PG_EPOCH_US"
    const char* COPY_SIGNATURE "CDC_COPY_SIGNATURE"  # 10 bytes and the terminating NUL: 11
    ctypedef int (*getcopydata_fn "cdc_getcopydata_fn")(void*, char**, int) nogil
    ctypedef void (*freemem_fn "cdc_freemem_fn")(void*) nogil
    ctypedef int (*consumeinput_fn "cdc_consumeinput_fn")(void*) nogil
    ctypedef int (*socket_fn "cdc_socket_fn")(const void*) nogil


cdef class _Owned:
    """A column buffer's memory handed to Arrow without a copy; freed with the array."""

    cdef char* data
    cdef Py_ssize_t length

    def __getbuffer__(self, Py_buffer* view, int flags):
        PyBuffer_FillInfo(view, self, self.data, self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer* view):
        pass

    def __dealloc__(self):
        PyMem_Free(self.data)


cdef object owned(Growable* g):
    """``g``'s bytes as an Arrow buffer that owns them; ``g`` is left empty."""
    cdef _Owned o
    if g.data == NULL:  # never written (no rows): Arrow wants a real, empty buffer
        return pa.py_buffer(b"")
    o = _Owned()
    o.data = g.data
    o.length = g.length
    g.data = NULL
    g.length = g.capacity = 0
    return pa.py_buffer(o)


cdef struct Field:
    const unsigned char* data
    int32_t length  # -1: NULL


cdef class CopyParser:
    """One chunk's binary COPY: feed its CopyData messages, then ``finish()`` the columns."""

    cdef readonly Py_ssize_t nrows
    cdef Py_ssize_t ncols
    cdef uint8_t* codecs
    cdef uint8_t* layouts
    cdef uint8_t* widths  # bytes per value of fixed-width layouts
    cdef Growable* data
    cdef Growable* offsets
    cdef Growable* validity
    cdef Py_ssize_t* nulls
    cdef Field* fields
    cdef bint header_done, trailer_seen, finished
    cdef str table
    cdef tuple names, types

    def __cinit__(self, str table, names, codecs, layouts, types):
        cdef Py_ssize_t i, n
        self.table = table
        self.names = tuple(names)
        self.types = tuple(types)
        self.ncols = len(self.names)
        n = max(self.ncols, 1)
        self.codecs = <uint8_t*>PyMem_Malloc(n)
        self.layouts = <uint8_t*>PyMem_Malloc(n)
        self.widths = <uint8_t*>PyMem_Malloc(n)
        self.data = <Growable*>PyMem_Malloc(n * sizeof(Growable))
        self.offsets = <Growable*>PyMem_Malloc(n * sizeof(Growable))
        self.validity = <Growable*>PyMem_Malloc(n * sizeof(Growable))
        self.nulls = <Py_ssize_t*>PyMem_Malloc(n * sizeof(Py_ssize_t))
        self.fields = <Field*>PyMem_Malloc(n * sizeof(Field))
        if not (self.codecs and self.layouts and self.widths and self.data and self.offsets
                and self.validity and self.nulls and self.fields):
            raise MemoryError()
        memset(self.data, 0, n * sizeof(Growable))
        memset(self.offsets, 0, n * sizeof(Growable))
        memset(self.validity, 0, n * sizeof(Growable))
        memset(self.nulls, 0, n * sizeof(Py_ssize_t))
        for i in range(self.ncols):
            self.codecs[i] = codecs[i]
            self.layouts[i] = layouts[i]
            self.widths[i] = self.types[i].bit_width // 8 if self.layouts[i] in (
                LAYOUT_INT, LAYOUT_FLOAT, LAYOUT_DATE, LAYOUT_TIMESTAMP, LAYOUT_TIME) else 0
            if self.layouts[i] == LAYOUT_TEXT or self.layouts[i] == LAYOUT_BYTES:
                put(&self.offsets[i], b"\0\0\0\0", 4)

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.data != NULL and self.offsets != NULL and self.validity != NULL:
            for i in range(self.ncols):
                PyMem_Free(self.data[i].data)
                PyMem_Free(self.offsets[i].data)
                PyMem_Free(self.validity[i].data)
        PyMem_Free(self.codecs)
        PyMem_Free(self.layouts)
        PyMem_Free(self.widths)
        PyMem_Free(self.data)
        PyMem_Free(self.offsets)
        PyMem_Free(self.validity)
        PyMem_Free(self.nulls)
        PyMem_Free(self.fields)

    def feed(self, message):
        """One CopyData message (any bytes-like object)."""
        cdef Py_buffer view
        PyObject_GetBuffer(message, &view, PyBUF_SIMPLE)
        try:
            self._feed(<const unsigned char*>view.buf, view.len)
        finally:
            PyBuffer_Release(&view)

    cdef int _feed(self, const unsigned char* buf, Py_ssize_t n) except -1:
        cdef Reader r
        cdef uint32_t flags
        cdef int32_t extension
        reader_init(&r, buf, n, 0)
        if not self.header_done:
            if n < 11 or memcmp(buf, COPY_SIGNATURE, 11) != 0:
                raise malformed(self.table, "no binary COPY signature")
            r.pos = 11
            flags = read_u32(&r)
            extension = read_i32(&r)
            if r.bad or extension < 0 or read_bytes(&r, extension) == NULL:
                raise malformed(self.table, "a header cut short")
            if flags & FLAG_OIDS:
                raise malformed(self.table, "rows with OIDs")
            self.header_done = True
        while r.pos < r.len:
            if self.trailer_seen:
                raise malformed(self.table, "data after the end marker")
            self._row(&r)
        return 0

    cdef int _row(self, Reader* r) except -1:
        cdef int count
        cdef Py_ssize_t i
        cdef int32_t length
        cdef int64_t us
        cdef Field* f
        if r.len - r.pos < 2:
            raise malformed(self.table, "a row cut short")
        count = read_i16(r)
        if count == -1:
            self.trailer_seen = True
            return 0
        if count != self.ncols:
            raise malformed(self.table, f"a row of {count} fields for {self.ncols} columns")
        for i in range(self.ncols):
            f = &self.fields[i]
            length = read_i32(r)
            f.length = length
            if r.bad:
                raise malformed(self.table, "a row cut short")
            if length == -1:
                continue
            f.data = read_bytes(r, length)
            if f.data == NULL:  # also a negative length other than -1
                raise malformed(self.table, "a row cut short")
        for i in range(self.ncols):
            f = &self.fields[i]
            if f.length == -1:
                continue
            if not binary_valid(self.codecs[i], f.data, f.length):
                raise invalid_value(self.table, self.names[i], self.codecs[i])
            if self.layouts[i] == LAYOUT_TIMESTAMP:
                us = <int64_t>be(f.data, 8)
                if us != INT64_MIN and us != INT64_MAX and us >= INT64_MAX - PG_EPOCH_US:
                    raise out_of_range(self.table, self.names[i])
        for i in range(self.ncols):
            self._value(i, &self.fields[i])
        self.nrows += 1
        return 0

    cdef inline int _value(self, Py_ssize_t i, Field* f) except -1:
        cdef Growable* v = &self.validity[i]
        cdef Growable* d = &self.data[i]
        cdef Py_ssize_t byte = self.nrows >> 3
        cdef uint8_t layout = self.layouts[i]
        cdef uint8_t width = self.widths[i]
        cdef uint64_t raw
        cdef int32_t end, days
        cdef int64_t us
        cdef float f4
        cdef double f8
        if byte >= v.length:
            put(v, b"\0", 1)
            if layout == LAYOUT_BOOL:
                put(d, b"\0", 1)
        if f.length == -1:
            self.nulls[i] += 1
            if width:
                grow(d, width)
                memset(d.data + d.length, 0, width)
                d.length += width
        else:
            v.data[byte] |= <char>(1 << (self.nrows & 7))
            if layout == LAYOUT_TEXT:
                binary_render(self.codecs[i], f.data, f.length, d)
            elif layout == LAYOUT_BYTES:
                put(d, f.data, f.length)
            elif layout == LAYOUT_BOOL:
                if f.data[0]:
                    d.data[byte] |= <char>(1 << (self.nrows & 7))
            else:
                raw = be(f.data, width)
                grow(d, 8)
                if layout == LAYOUT_INT or layout == LAYOUT_TIME:
                    if width == 2:
                        (<int16_t*>(d.data + d.length))[0] = <int16_t>raw
                    elif width == 4:
                        (<int32_t*>(d.data + d.length))[0] = <int32_t>raw
                    else:
                        (<int64_t*>(d.data + d.length))[0] = <int64_t>raw
                elif layout == LAYOUT_FLOAT:
                    if width == 4:
                        (<uint32_t*>(d.data + d.length))[0] = <uint32_t>raw
                        memcpy(&f4, d.data + d.length, 4)
                        if f4 != f4:  # the canonical NaN, as the text cast gives
                            (<uint32_t*>(d.data + d.length))[0] = 0x7FC00000
                    else:
                        (<uint64_t*>(d.data + d.length))[0] = raw
                        memcpy(&f8, d.data + d.length, 8)
                        if f8 != f8:
                            (<uint64_t*>(d.data + d.length))[0] = 0x7FF8000000000000
                elif layout == LAYOUT_DATE:
                    days = <int32_t>raw
                    if days == -2147483648:
                        days = -2147483647
                    elif days != 2147483647:
                        days += PG_EPOCH_DAYS
                    (<int32_t*>(d.data + d.length))[0] = days
                else:  # LAYOUT_TIMESTAMP, range checked
                    us = <int64_t>raw
                    if us == INT64_MIN:
                        us = -INT64_MAX
                    elif us != INT64_MAX:
                        us += PG_EPOCH_US
                    (<int64_t*>(d.data + d.length))[0] = us
                d.length += width
        if layout == LAYOUT_TEXT or layout == LAYOUT_BYTES:
            if d.length > OFFSET_LIMIT:
                raise too_much_text(self.table, self.names[i])
            end = <int32_t>d.length
            put(&self.offsets[i], &end, 4)
        return 0

    def read_libpq(self, size_t pgconn, size_t getcopydata, size_t freemem,
                   size_t consumeinput, size_t socket):
        """Drain the COPY in progress on ``pgconn`` (libpq functions given by address):
        -1 when it ended (fetch its result next), -2 when libpq failed (its error message
        says why)."""
        cdef getcopydata_fn get = <getcopydata_fn>getcopydata
        cdef freemem_fn free_ = <freemem_fn>freemem
        cdef consumeinput_fn consume = <consumeinput_fn>consumeinput
        cdef void* conn = <void*>pgconn
        cdef pollfd waiting
        cdef char* buf = NULL
        cdef int n, ok
        cdef bint interrupted
        waiting.fd = (<socket_fn>socket)(conn)
        waiting.events = POLLIN
        while True:
            n = get(conn, &buf, 1)
            if n > 0:
                try:
                    self._feed(<const unsigned char*>buf, n)
                finally:
                    free_(buf)
                continue
            if n < 0:
                return n
            with nogil:  # nothing buffered: wait for the socket, then read what came
                waiting.revents = 0
                ok = poll(&waiting, 1, -1)
                interrupted = ok < 0 and errno == EINTR
                ok = ok >= 0 and consume(conn) == 1
            if interrupted:
                PyErr_CheckSignals()  # a signal handler's exception (Ctrl-C) ends the read
            elif not ok:
                return -2

    def finish(self):
        """The columns as Arrow arrays; DecodeError when the end marker never came."""
        cdef Py_ssize_t i, n = self.nrows
        if not self.trailer_seen:
            raise malformed(self.table, "the end marker is missing")
        if self.finished:
            raise ValueError("the columns were already taken")
        self.finished = True
        columns = []
        for i in range(self.ncols):
            nulls = self.nulls[i]
            validity = owned(&self.validity[i]) if nulls else None
            kind = self.types[i]
            if self.layouts[i] == LAYOUT_TEXT or self.layouts[i] == LAYOUT_BYTES:
                buffers = [validity, owned(&self.offsets[i]), owned(&self.data[i])]
            else:
                buffers = [validity, owned(&self.data[i])]
            columns.append(pa.Array.from_buffers(kind, n, buffers, nulls))
        return columns
