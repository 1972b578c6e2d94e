"""atheris fuzz target for the compiled pgoutput decoder (run by test_decoders.py, slow).

    python tests/fuzz_native.py -max_total_time=60

Each input is a short stream of messages: the first byte picks the message type (a row
change of a described relation most of the time), the rest is the message body. Every
input must decode or raise DecodeError; any other exception, a crash or a hang is a
finding. The extension is not compiled with coverage instrumentation, so atheris is
guided by the Python code around it and otherwise mutates blindly.
"""

from __future__ import annotations

import contextlib
import struct
import sys
from dataclasses import dataclass

import atheris

with atheris.instrument_imports():
    from cdc.decoding import _native
    from cdc.errors import ConversionError, DecodeError
    from cdc.events import Column, Relation
    from cdc.stream.batcher import Batcher, FlushLimits, NativeTableBuffer

OID = 16384
#: text, then types the binary reader decodes (numeric, timestamptz, bytea): 'b' values too
RELATION = Relation(OID, "public", "t", "f", tuple(
    Column(f"c{i}", oid, -1, i == 0) for i, oid in enumerate((25, 1700, 1184, 17))))
TYPES = b"IIIUUUDDBCRTOYM"


@dataclass
class Counter:
    changes: int = 0


def test_one_input(data: bytes) -> None:
    batcher = Batcher(FlushLimits(10**9, 10**15, 1e9), buffer_type=NativeTableBuffer)
    decoder = _native.NativeDecoder(batcher, {OID: RELATION}, Counter())
    fdp = atheris.FuzzedDataProvider(data)
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        kind = TYPES[fdp.ConsumeIntInRange(0, len(TYPES) - 1)]
        oid = OID if fdp.ConsumeBool() else fdp.ConsumeIntInRange(0, 2**32 - 1)
        body = fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 200))
        message = bytes([kind]) + (struct.pack("!I", oid) if kind in b"IUD" else b"") + body
        with contextlib.suppress(DecodeError):
            decoder.feed(message, 0x1000)
    for buffer in batcher.detach_all():
        with contextlib.suppress(ConversionError):  # a timestamp past Arrow's int64 range
            buffer.cut()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
