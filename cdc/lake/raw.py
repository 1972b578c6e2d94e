"""Batches → parquet files in the raw layer.

``raw/<schema>.<table>/load_date=YYYY-MM-DD/<first_lsn>-<last_lsn>-<first_seq>.parquet``
where the LSNs are the commit LSNs of the batch's first and last change, as 16
hex digits, so names sort in log order (commit LSNs grow along the stream;
change LSNs of concurrent transactions interleave). (commit LSN, ``_seq``)
identifies a change, so the name is fixed by the batch's first change: a
replayed batch that starts at the same change replaces its earlier copy
instead of adding one.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq

from cdc import faults
from cdc.lake.layout import RAW, raw_key, table_segment
from cdc.lake.store import Lake
from cdc.stream.batcher import Batch

ROW_GROUP_ROWS = 1_000_000


def file_key(batch: Batch, load_date: str, *, prefix: str = RAW) -> str:
    relation = batch.relation
    return raw_key(table_segment(relation.schema, relation.name), load_date, batch.first_commit_lsn,
                   batch.last_commit_lsn, batch.label or batch.first_seq, prefix=prefix)


def encode(table: pa.Table, constant: Sequence[str] = ()) -> bytes:
    """A raw parquet file; ``constant``: columns of one value (a snapshot's LSNs, xid and
    time), dictionary-encoded too, which is cheaper than compressing them plainly."""
    # dictionary encoding only where it pays: on numbers and timestamps (keys, LSNs, _seq:
    # mostly distinct) trying it and falling back doubled the encoding CPU of a raw file;
    # zstd alone makes smaller files there (docs/benchmarks.md, snapshot)
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_ROWS,
                   use_dictionary=[*strings, *constant])
    return bytes(sink.getvalue())


class RawSink:
    """Writes batches durably into the raw layout."""

    def __init__(self, lake: Lake) -> None:
        self.lake = lake

    def write(self, batch: Batch) -> tuple[str, int]:
        """Write the batch durably; its key and size in bytes."""
        key = file_key(batch, datetime.now(UTC).strftime("%Y-%m-%d"))
        data = encode(batch.table, batch.constant)
        faults.hit("raw.before_write", key=key)
        self.lake.write_bytes(key, data)
        faults.hit("raw.after_write", key=key)
        return key, len(data)
