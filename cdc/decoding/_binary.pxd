# cython: language_level=3
"""Binary column values → their text form, written into a column buffer.

The compiled twin of ``cdc/decoding/binary.py`` (the reference: its docstring gives the
rules, and the codec numbers below are its ``Codec``). ``binary_valid`` decides whether a
value is well formed exactly as the reference does (a malformed one is then handed to the
reference, which raises the DecodeError); ``binary_render`` appends the text of a valid
value. Every read stays inside ``n`` bytes.
"""

from libc.stdint cimport (
    INT64_MAX, INT64_MIN, int16_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t,
)
from libc.stdio cimport snprintf
from libc.string cimport memcpy

from cdc.decoding._buffers cimport Growable, grow, put, utf8_valid


cdef enum:
    CODEC_NONE = 0
    CODEC_BOOL = 1
    CODEC_INT2 = 2
    CODEC_INT4 = 3
    CODEC_INT8 = 4
    CODEC_OID = 5
    CODEC_FLOAT4 = 6
    CODEC_FLOAT8 = 7
    CODEC_NUMERIC = 8
    CODEC_TEXT = 9
    CODEC_BYTEA = 10
    CODEC_UUID = 11
    CODEC_JSONB = 12
    CODEC_DATE = 13
    CODEC_TIME = 14
    CODEC_TIMESTAMP = 15
    CODEC_TIMESTAMPTZ = 16

cdef enum:
    NUMERIC_POS = 0x0000
    NUMERIC_NEG = 0x4000
    NUMERIC_NAN = 0xC000
    NUMERIC_PINF = 0xD000
    NUMERIC_NINF = 0xF000
    NUMERIC_DSCALE_MAX = 0x3FFF
    PG_EPOCH_DAYS = 10957
    DATE_MIN = -2451545
    DATE_END = 2145031949

cdef extern from *:
    """
    #define CDC_USECS_PER_DAY 86400000000LL
    #define CDC_TIMESTAMP_MIN (-211813488000000000LL)
    #define CDC_TIMESTAMP_END 9223371331200000000LL
    #define CDC_HEX "0123456789abcdef"
    """
    const int64_t USECS_PER_DAY "CDC_USECS_PER_DAY"
    const int64_t TIMESTAMP_MIN "CDC_TIMESTAMP_MIN"
    const int64_t TIMESTAMP_END "CDC_TIMESTAMP_END"
    const char* HEX "CDC_HEX"


cdef inline uint64_t be(const unsigned char* p, int n) noexcept nogil:
    cdef uint64_t v = 0
    cdef int i
    for i in range(n):
        v = (v << 8) | p[i]
    return v


cdef inline int64_t floordiv(int64_t a, int64_t b) noexcept nogil:
    """Floor of a / b for b > 0, whether or not the includer compiles with cdivision."""
    if a >= 0:
        return a // b
    return -((-(a + 1)) // b) - 1


cdef inline void civil(int64_t days, int64_t* year, int* month, int* day) noexcept nogil:
    """Days since 1970-01-01 → astronomical year, month, day (``binary._civil``)."""
    cdef int64_t z = days + 719468
    cdef int64_t era = floordiv(z, 146097)
    cdef int64_t doe = z - era * 146097
    cdef int64_t yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    cdef int64_t doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    cdef int64_t mp = (5 * doy + 2) // 153
    day[0] = <int>(doy - (153 * mp + 2) // 5 + 1)
    month[0] = <int>(mp + 3 if mp < 10 else mp - 9)
    year[0] = yoe + era * 400 + (1 if month[0] <= 2 else 0)


cdef inline bint binary_valid(uint8_t codec, const unsigned char* p, Py_ssize_t n) noexcept nogil:
    """True when ``binary.text_of`` gives a text for this value."""
    cdef Py_ssize_t ndigits, i
    cdef uint16_t sign, dscale
    cdef int64_t v
    if codec == CODEC_BOOL:
        return n == 1
    if codec == CODEC_INT2:
        return n == 2
    if codec == CODEC_INT4 or codec == CODEC_OID or codec == CODEC_FLOAT4:
        return n == 4
    if codec == CODEC_INT8 or codec == CODEC_FLOAT8:
        return n == 8
    if codec == CODEC_UUID:
        return n == 16
    if codec == CODEC_TEXT:
        return utf8_valid(p, n)
    if codec == CODEC_JSONB:
        return n >= 1 and p[0] == 1 and utf8_valid(p + 1, n - 1)
    if codec == CODEC_BYTEA:
        return True
    if codec == CODEC_NUMERIC:
        if n < 8:
            return False
        ndigits = <Py_ssize_t>be(p, 2)
        sign = <uint16_t>be(p + 4, 2)
        dscale = <uint16_t>be(p + 6, 2)
        if n != 8 + 2 * ndigits or dscale > NUMERIC_DSCALE_MAX:
            return False
        if sign == NUMERIC_NAN or sign == NUMERIC_PINF or sign == NUMERIC_NINF:
            return True
        if sign != NUMERIC_POS and sign != NUMERIC_NEG:
            return False
        for i in range(ndigits):
            if be(p + 8 + 2 * i, 2) > 9999:
                return False
        return True
    if codec == CODEC_DATE:
        if n != 4:
            return False
        v = <int32_t>be(p, 4)
        return v == -2147483648 or v == 2147483647 or DATE_MIN <= v < DATE_END
    if codec == CODEC_TIME:
        if n != 8:
            return False
        v = <int64_t>be(p, 8)
        return 0 <= v <= USECS_PER_DAY
    if codec == CODEC_TIMESTAMP or codec == CODEC_TIMESTAMPTZ:
        if n != 8:
            return False
        v = <int64_t>be(p, 8)
        return (v == INT64_MIN or v == INT64_MAX
                or TIMESTAMP_MIN <= v < TIMESTAMP_END)
    return False


cdef inline int put_str(Growable* out, const char* s) except -1:
    cdef Py_ssize_t n = 0
    while s[n]:
        n += 1
    return put(out, s, n)


cdef inline int put_int(Growable* out, int64_t v, int width) except -1:
    """Decimal digits of ``v``, zero-padded to ``width`` (snprintf costs ~0.1 µs a call)."""
    cdef char buf[24]
    cdef int n = 0
    cdef uint64_t u = <uint64_t>(-(v + 1)) + 1 if v < 0 else <uint64_t>v
    while u or n == 0:
        buf[23 - n] = <char>(48 + u % 10)
        u //= 10
        n += 1
    while n < width:
        buf[23 - n] = b'0'
        n += 1
    if v < 0:
        buf[23 - n] = b'-'
        n += 1
    return put(out, buf + 24 - n, n)


cdef inline int put_float(Growable* out, double d, int digits) except -1:
    cdef char buf[40]
    cdef int n
    if d != d:
        return put(out, b"NaN", 3)
    if d == float("inf"):
        return put(out, b"Infinity", 8)
    if d == float("-inf"):
        return put(out, b"-Infinity", 9)
    n = snprintf(buf, sizeof(buf), b"%.*g", digits, d)
    return put(out, buf, n)


cdef inline int put_digits4(char* c, uint16_t dig) noexcept nogil:
    c[0] = <char>(48 + dig // 1000)
    c[1] = <char>(48 + dig // 100 % 10)
    c[2] = <char>(48 + dig // 10 % 10)
    c[3] = <char>(48 + dig % 10)
    return 4


cdef inline int put_numeric(Growable* out, const unsigned char* p) except -1:
    """``get_str_from_var`` (``binary._numeric_text``) of a valid value."""
    cdef Py_ssize_t ndigits = <Py_ssize_t>be(p, 2)
    cdef Py_ssize_t weight = <int16_t>be(p + 2, 2)
    cdef uint16_t sign = <uint16_t>be(p + 4, 2)
    cdef Py_ssize_t dscale = <Py_ssize_t>be(p + 6, 2)
    cdef Py_ssize_t d, i, size
    cdef uint16_t dig
    cdef char first[4]
    cdef char* c
    cdef int k
    if sign == NUMERIC_NAN:
        return put(out, b"NaN", 3)
    if sign == NUMERIC_PINF:
        return put(out, b"Infinity", 8)
    if sign == NUMERIC_NINF:
        return put(out, b"-Infinity", 9)
    size = 1 + (4 * (weight + 1) if weight >= 0 else 1) + 1 + dscale + 4
    grow(out, size)
    c = out.data + out.length
    if sign == NUMERIC_NEG:
        c[0] = b'-'
        c += 1
    if weight < 0:
        c[0] = b'0'
        c += 1
        d = weight + 1
    else:
        for d in range(weight + 1):
            dig = <uint16_t>be(p + 8 + 2 * d, 2) if d < ndigits else 0
            if d == 0:  # the first group without its leading zeros
                put_digits4(first, dig)
                k = 0
                while k < 3 and first[k] == b'0':
                    k += 1
                while k < 4:
                    c[0] = first[k]
                    c += 1
                    k += 1
            else:
                c += put_digits4(c, dig)
        d = weight + 1
    if dscale > 0:
        c[0] = b'.'
        c += 1
        i = 0
        while i < dscale:
            dig = <uint16_t>be(p + 8 + 2 * d, 2) if 0 <= d < ndigits else 0
            put_digits4(c + i, dig)  # may write up to 3 bytes past dscale: room was made
            i += 4
            d += 1
        c += dscale
    out.length = c - out.data
    return 0


cdef inline int two(char* c, int v) noexcept nogil:
    c[0] = <char>(48 + v // 10)
    c[1] = <char>(48 + v % 10)
    return 2


cdef inline bint put_date(Growable* out, int64_t pg_days) except -1:
    """YYYY-MM-DD of a date (years 1 BC and before as their BC number, without " BC");
    True for those BC years."""
    cdef int64_t year
    cdef int month, day
    cdef char tail[6]
    civil(pg_days + PG_EPOCH_DAYS, &year, &month, &day)
    put_int(out, year if year > 0 else 1 - year, 4)
    tail[0] = b'-'
    two(tail + 1, month)
    tail[3] = b'-'
    two(tail + 4, day)
    put(out, tail, 6)
    return year <= 0


cdef inline int put_time(Growable* out, int64_t us) except -1:
    cdef char buf[16]
    cdef int n = 8, k
    cdef int64_t seconds = us // 1000000
    cdef int64_t fraction = us % 1000000
    two(buf, <int>(seconds // 3600))
    buf[2] = b':'
    two(buf + 3, <int>(seconds // 60 % 60))
    buf[5] = b':'
    two(buf + 6, <int>(seconds % 60))
    if fraction:
        buf[8] = b'.'
        for k in range(6):
            buf[14 - k] = <char>(48 + fraction % 10)
            fraction //= 10
        n = 15
        while buf[n - 1] == b'0':
            n -= 1
    return put(out, buf, n)


cdef inline int put_timestamp(Growable* out, int64_t us, bint tz) except -1:
    cdef int64_t days
    cdef bint bc
    if us == INT64_MIN:
        return put(out, b"-infinity", 9)
    if us == INT64_MAX:
        return put(out, b"infinity", 8)
    days = floordiv(us, USECS_PER_DAY)
    bc = put_date(out, days)
    put(out, b" ", 1)
    put_time(out, us - days * USECS_PER_DAY)
    if tz:
        put(out, b"+00", 3)
    if bc:
        put(out, b" BC", 3)
    return 0


cdef inline int binary_render(uint8_t codec, const unsigned char* p, Py_ssize_t n,
                              Growable* out) except -1:
    """Append the text of a value ``binary_valid`` accepted."""
    cdef int k
    cdef Py_ssize_t i
    cdef uint32_t u32
    cdef uint64_t u64
    cdef float f
    cdef double dbl
    if codec == CODEC_TEXT:
        return put(out, p, n)
    if codec == CODEC_JSONB:
        return put(out, p + 1, n - 1)
    if codec == CODEC_BOOL:
        return put(out, b"t" if p[0] else b"f", 1)
    if codec == CODEC_INT2:
        return put_int(out, <int16_t>be(p, 2), 1)
    if codec == CODEC_INT4:
        return put_int(out, <int32_t>be(p, 4), 1)
    if codec == CODEC_OID:
        return put_int(out, <int64_t>be(p, 4), 1)
    if codec == CODEC_INT8:
        return put_int(out, <int64_t>be(p, 8), 1)
    if codec == CODEC_FLOAT4:
        u32 = <uint32_t>be(p, 4)
        memcpy(&f, &u32, 4)
        return put_float(out, <double>f, 9)
    if codec == CODEC_FLOAT8:
        u64 = be(p, 8)
        memcpy(&dbl, &u64, 8)
        return put_float(out, dbl, 17)
    if codec == CODEC_NUMERIC:
        return put_numeric(out, p)
    if codec == CODEC_BYTEA:
        grow(out, 2 + 2 * n)
        out.data[out.length] = b'\\'
        out.data[out.length + 1] = b'x'
        for i in range(n):
            out.data[out.length + 2 + 2 * i] = HEX[p[i] >> 4]
            out.data[out.length + 3 + 2 * i] = HEX[p[i] & 15]
        out.length += 2 + 2 * n
        return 0
    if codec == CODEC_UUID:
        grow(out, 36)
        k = 0
        for i in range(16):
            if i == 4 or i == 6 or i == 8 or i == 10:
                out.data[out.length + k] = b'-'
                k += 1
            out.data[out.length + k] = HEX[p[i] >> 4]
            out.data[out.length + k + 1] = HEX[p[i] & 15]
            k += 2
        out.length += 36
        return 0
    if codec == CODEC_DATE:
        k = <int32_t>be(p, 4)
        if k == -2147483648:
            return put(out, b"-infinity", 9)
        if k == 2147483647:
            return put(out, b"infinity", 8)
        if put_date(out, k):
            put(out, b" BC", 3)
        return 0
    if codec == CODEC_TIME:
        return put_time(out, <int64_t>be(p, 8))
    if codec == CODEC_TIMESTAMP or codec == CODEC_TIMESTAMPTZ:
        return put_timestamp(out, <int64_t>be(p, 8), codec == CODEC_TIMESTAMPTZ)
    return 0
