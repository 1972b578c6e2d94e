# cython: language_level=3
"""Growable byte buffers (the column buffers' storage) and strict UTF-8 validation.

A ``Growable`` is malloc'd memory that doubles when full; ``take_buffer`` copies it into
an Arrow buffer and empties it. Included by ``_native.pyx`` at compile time.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Realloc
from libc.stdint cimport int64_t
from libc.string cimport memcpy

import pyarrow as pa


cdef struct Growable:
    char* data
    Py_ssize_t length
    Py_ssize_t capacity


cdef inline int grow(Growable* g, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = g.length + extra
    cdef Py_ssize_t capacity
    cdef char* data
    if need <= g.capacity:
        return 0
    capacity = max(need, g.capacity * 2, 256)
    data = <char*>PyMem_Realloc(g.data, capacity)
    if data == NULL:
        raise MemoryError()
    g.data = data
    g.capacity = capacity
    return 0


cdef inline int put(Growable* g, const void* src, Py_ssize_t n) except -1:
    if g.length + n > g.capacity:
        grow(g, n)
    memcpy(g.data + g.length, src, n)
    g.length += n
    return 0


cdef inline int put_i64(Growable* g, int64_t value) except -1:
    return put(g, &value, 8)


cdef inline object take_buffer(Growable* g):
    buf = pa.py_buffer(PyBytes_FromStringAndSize(g.data, g.length))
    g.length = 0
    return buf


cdef inline object int64s(Growable* g, Py_ssize_t n):
    return pa.Array.from_buffers(pa.int64(), n, [None, take_buffer(g)], 0)


cdef inline bint utf8_valid(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 as Python decodes it: no overlongs, surrogates or values past U+10FFFF."""
    cdef Py_ssize_t i = 0
    cdef unsigned char c, c1
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
        elif c < 0xC2:
            return False
        elif c < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return False
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80:
                return False
            if (c == 0xE0 and c1 < 0xA0) or (c == 0xED and c1 >= 0xA0):
                return False
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return False
            c1 = s[i + 1]
            if (c1 & 0xC0) != 0x80 or (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return False
            if (c == 0xF0 and c1 < 0x90) or (c == 0xF4 and c1 >= 0x90):
                return False
            i += 4
        else:
            return False
    return True
