"""Offline decoder benchmark: both pgoutput decoders on the same synthetic frames.

    python bench/decode.py                 # 200,000 narrow inserts and 100,000 updates

No server: XLogData frames of the narrow shape (bench/workload.py) are built in memory
and fed to each decoder through the session's call (``feed_frame``), then the buffers
are cut into raw Arrow tables. Prints CPU µs per change for both stages and checks that
both decoders produced equal tables.
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


def frames(inserts: int, updates: int) -> list[bytes]:
    def frame(i: int, message: bytes) -> bytes:
        return b"w" + struct.pack("!QQq", 0x1000 + i, 0, 0) + message

    out = [frame(i, insert_msg(1, tuple_data(str(i), str(i % 100003), str(i % 97), "12.50",
                                             str(i % 1000), f"st-{i % 7}",
                                             "2024-01-01 00:00:01+00")))
           for i in range(inserts)]
    out += [frame(inserts + i, update_msg(1, tuple_data(str(i), "1", "2", "13.50", "8",
                                                        UNCHANGED, "2024-01-02 00:00:00+00")))
            for i in range(updates)]
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
    args = p.parse_args(argv)
    data = frames(args.inserts, args.updates)
    results = {kind: run(kind, data) for kind in ("native", "pure")}
    n = len(data)
    for kind, (feed_s, cut_s, _) in results.items():
        print(f"{kind:7s} feed {feed_s / n * 1e6:5.2f} µs/change   cut + convert "
              f"{cut_s / n * 1e6:5.2f} µs/change")
    same = all(a.equals(b) for a, b in zip(results["native"][2], results["pure"][2],
                                           strict=True))
    print("tables equal" if same else "TABLES DIFFER")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
