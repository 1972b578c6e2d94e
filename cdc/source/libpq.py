"""The libpq that psycopg runs on, for the compiled COPY reader (``decoding/_copy.pyx``).

psycopg 3.3 reads a COPY one row per Python call (``Copy.read``: ~0.5 µs of CPU a row,
docs/benchmarks.md); the compiled reader calls libpq's ``PQgetCopyData`` itself on the
connection's own ``PGconn`` (``pgconn.pgconn_ptr``). That pointer is only valid with the
very library psycopg loaded (another libpq build may lay out ``PGconn`` differently), so
the functions are looked up in *that* library: the one psycopg's ctypes wrapper opened
(``psycopg.pq`` implementation ``python``), or the libpq loaded from psycopg's own
directory (``binary``: the wheel's ``psycopg_binary.libs``) or, for the ``c``
implementation, the system's libpq that it links. Anything else: None, and the reader
falls back to psycopg's ``Copy`` (correct, slower).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from dataclasses import dataclass
from pathlib import Path

import psycopg

_FUNCTIONS = ("PQgetCopyData", "PQfreemem", "PQconsumeInput", "PQsocket")


@dataclass(frozen=True)
class LibpqFunctions:
    """Addresses of the libpq functions ``CopyParser.read_libpq`` takes."""

    get_copy_data: int
    freemem: int
    consume_input: int
    socket: int


def _loaded_paths() -> list[str]:
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    return sorted({line.split()[-1] for line in maps.splitlines()
                   if "/libpq" in line and line.split()[-1].startswith("/")})


def _library() -> ctypes.CDLL | None:
    impl = psycopg.pq.__impl__
    if impl == "python":
        from psycopg.pq import _pq_ctypes

        lib: ctypes.CDLL = _pq_ctypes.pq  # type: ignore[attr-defined]
        return lib
    loaded = _loaded_paths()
    if impl == "binary":
        import psycopg_binary

        libs = str(Path(psycopg_binary.__file__).parent.parent / "psycopg_binary.libs")
        candidates = [p for p in loaded if p.startswith(libs)]
    else:  # "c": linked against the system libpq
        name = ctypes.util.find_library("pq")
        candidates = [p for p in loaded if name and Path(p).name.startswith(name)]
    if len(candidates) != 1:
        return None
    return ctypes.CDLL(candidates[0])  # already loaded: the same library, not a new copy


@functools.cache
def functions() -> LibpqFunctions | None:
    """psycopg's libpq functions by address, or None where they cannot be found safely."""
    try:
        lib = _library()
        if lib is None:
            return None
        addresses = [ctypes.cast(getattr(lib, name), ctypes.c_void_p).value
                     for name in _FUNCTIONS]
    except (ImportError, OSError, AttributeError):
        return None
    if not all(addresses):
        return None
    return LibpqFunctions(*(int(a) for a in addresses if a is not None))
