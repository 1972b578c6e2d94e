"""Offline decoder benchmark: both pgoutput decoders on the same synthetic frames.

    python bench/decode.py                 # 200,000 narrow inserts and 100,000 updates
    python bench/decode.py --format both   # the same changes as text and as binary values

No server: XLogData frames of the narrow shape (bench/workload.py) are built in memory
and fed to each decoder through the session's call (``feed_frame``), then the buffers
are cut into raw Arrow tables. Prints CPU µs per change for both stages and checks that
both decoders produced equal tables (and, with ``--format both``, that text and binary
frames of the same changes give equal tables).
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from test_pgoutput import insert_msg, tuple_data, update_msg

from cdc.decoding.core import Decoder, PureDecoder
from cdc.events import UNCHANGED, Column, Relation
from cdc.stream.batcher import Batcher, FlushLimits, NativeTableBuffer

COLUMNS = [("id", 20), ("customer_id", 23), ("store_id", 23), ("amount", 1700), ("qty", 23),
           ("status", 25), ("created_at", 1184)]
RELATION = Relation(1, "public", "bench", "d", tuple(
    Column(name, oid, 655366 if oid == 1700 else -1, name == "id") for name, oid in COLUMNS))


@dataclass
class Counter:
    changes: int = 0


#: 2024-01-01 00:00:01+00 and 2024-01-02 00:00:00+00 in µs since 2000-01-01 (timestamptz_send)
_TS1, _TS2 = 757_382_401_000_000, 757_468_800_000_000


def _b(data: bytes) -> bytes:
    return b"b" + struct.pack("!i", len(data)) + data


def _numeric(units: int, cents: int) -> bytes:  # numeric_send of units.cents, scale 2
    return struct.pack("!HhHHHH", 2, 0, 0, 2, units, cents * 100)


def binary_tuple(*values: bytes | object) -> bytes:
    """TupleData of binary values (bytes) and unchanged markers."""
    return struct.pack("!h", len(values)) + b"".join(
        _b(v) if isinstance(v, bytes) else b"u" for v in values)


def frames(inserts: int, updates: int, *, binary: bool = False) -> list[bytes]:
    def frame(i: int, message: bytes) -> bytes:
        return b"w" + struct.pack("!QQq", 0x1000 + i, 0, 0) + message

    if binary:
        def insert(i: int) -> bytes:
            return binary_tuple(struct.pack("!q", i), struct.pack("!i", i % 100003),
                                struct.pack("!i", i % 97), _numeric(12, 50),
                                struct.pack("!i", i % 1000), f"st-{i % 7}".encode(),
                                struct.pack("!q", _TS1))

        def update(i: int) -> bytes:
            return binary_tuple(struct.pack("!q", i), struct.pack("!i", 1), struct.pack("!i", 2),
                                _numeric(13, 50), struct.pack("!i", 8), UNCHANGED,
                                struct.pack("!q", _TS2))
    else:
        def insert(i: int) -> bytes:
            return tuple_data(str(i), str(i % 100003), str(i % 97), "12.50", str(i % 1000),
                              f"st-{i % 7}", "2024-01-01 00:00:01+00")

        def update(i: int) -> bytes:
            return tuple_data(str(i), "1", "2", "13.50", "8", UNCHANGED,
                              "2024-01-02 00:00:00+00")

    out = [frame(i, insert_msg(1, insert(i))) for i in range(inserts)]
    out += [frame(inserts + i, update_msg(1, update(i))) for i in range(updates)]
    return out


def run(kind: str, data: Sequence[bytes]) -> tuple[float, float, list[object]]:
    batcher = Batcher(FlushLimits(10**9, 10**15, 1e9))
    decoder: Decoder
    if kind == "native":
        from cdc.decoding import _native  # type: ignore[attr-defined]
        batcher.buffer_type = NativeTableBuffer
        decoder = _native.NativeDecoder(batcher, {1: RELATION}, Counter())
    else:
        decoder = PureDecoder(batcher, {1: RELATION}, Counter())
    decoder.begin(0x5000, 1, 0)
    started = time.process_time()
    for f in data:
        decoder.feed_frame(f)
    fed = time.process_time()
    tables = [buffer.cut().table for buffer in batcher.detach_all()]
    return fed - started, time.process_time() - fed, tables


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="both pgoutput decoders on synthetic frames")
    p.add_argument("--inserts", type=int, default=200_000)
    p.add_argument("--updates", type=int, default=100_000)
    p.add_argument("--format", choices=["text", "binary", "both"], default="text",
                   help="the values' format in the frames (pgoutput's binary 'true')")
    args = p.parse_args(argv)
    formats = ["text", "binary"] if args.format == "both" else [args.format]
    results = {}
    for fmt in formats:
        data = frames(args.inserts, args.updates, binary=fmt == "binary")
        for kind in ("native", "pure"):
            results[f"{kind} {fmt}"] = run(kind, data)
    n = args.inserts + args.updates
    for kind, (feed_s, cut_s, _) in results.items():
        print(f"{kind:14s} feed {feed_s / n * 1e6:5.2f} µs/change   cut + convert "
              f"{cut_s / n * 1e6:5.2f} µs/change")
    first = next(iter(results.values()))[2]
    same = all(len(r[2]) == len(first) and all(a.equals(b) for a, b in zip(r[2], first,
                                                                            strict=True))
               for r in results.values())
    print("tables equal" if same else "TABLES DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
