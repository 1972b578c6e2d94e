# cython: language_level=3
"""A bounds-checked reader over one message (after asyncpg's ``pgproto/frb.pxd``).

Every read checks the requested length against what remains. A read past the end
reads nothing, returns 0 (or NULL) and sets ``bad``, which stays set: the caller
checks ``bad`` once after a run of reads and turns it into a DecodeError. Nothing
is ever read past ``len``.
"""

from libc.stdint cimport int16_t, int32_t, uint8_t, uint32_t, uint64_t


cdef struct Reader:
    const unsigned char* buf
    Py_ssize_t len
    Py_ssize_t pos
    bint bad


cdef inline void reader_init(Reader* r, const unsigned char* buf, Py_ssize_t n,
                             Py_ssize_t pos) noexcept nogil:
    r.buf = buf
    r.len = n
    r.pos = pos
    r.bad = pos > n


cdef inline bint reader_check(Reader* r, Py_ssize_t n) noexcept nogil:
    """True when ``n`` more bytes can be read; otherwise mark the reader bad."""
    if n < 0 or r.bad or r.len - r.pos < n:
        r.bad = True
        r.pos = r.len
        return False
    return True


cdef inline uint8_t read_u8(Reader* r) noexcept nogil:
    if not reader_check(r, 1):
        return 0
    r.pos += 1
    return r.buf[r.pos - 1]


cdef inline int16_t read_i16(Reader* r) noexcept nogil:
    cdef const unsigned char* p
    if not reader_check(r, 2):
        return 0
    p = r.buf + r.pos
    r.pos += 2
    return <int16_t>((<uint32_t>p[0] << 8) | p[1])


cdef inline uint32_t read_u32(Reader* r) noexcept nogil:
    cdef const unsigned char* p
    if not reader_check(r, 4):
        return 0
    p = r.buf + r.pos
    r.pos += 4
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline int32_t read_i32(Reader* r) noexcept nogil:
    return <int32_t>read_u32(r)


cdef inline uint64_t read_u64(Reader* r) noexcept nogil:
    cdef uint64_t hi = read_u32(r)
    return (hi << 32) | read_u32(r)


cdef inline const unsigned char* read_bytes(Reader* r, Py_ssize_t n) noexcept nogil:
    """A pointer to the next ``n`` bytes (valid while the message lives), or NULL."""
    if not reader_check(r, n):
        return NULL
    r.pos += n
    return r.buf + r.pos - n
