"""Chunk planning for a consistent snapshot: each table split into chunks of about N rows.

Tables are split into CTID block ranges (over the largest leaf of a partitioned table):
the server reads each with a TID range scan, sequentially. Key ranges of an integer
primary key were the first choice, but the planner reads a 10 % key range with an index
scan, which cost the server 20-25 % more CPU per row than the TID range scan
(docs/benchmarks.md, 2026-12-02 session 3); they remain for servers before PostgreSQL 14,
which have no TID range scan. The row and page estimates come from ``pg_class``, scaled by
the current size like the planner does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from cdc.decoding.pgtypes import INT2, INT4, INT8
from cdc.events import Lsn, Relation

_INTEGER_TYPES = {INT2, INT4, INT8}
#: the first server version with TID range scans (``ctid >= ... AND ctid < ...``)
TID_RANGE_SCANS = 140000


@dataclass
class TablePlan:
    """One table's chunks (JSON-able bounds) and which are done."""

    name: str
    chunks: list[dict[str, Any]]
    estimated_rows: int
    done: dict[str, int] = field(default_factory=dict)  # chunk index → rows
    #: where a table re-read whole on resume was read (None: the consistent point)
    point: Lsn | None = None


def plan_table(conn: psycopg.Connection[Any], relation: Relation, chunk_rows: int) -> TablePlan:
    """Split a table into chunks of about ``chunk_rows`` rows."""
    table = sql.Identifier(relation.schema, relation.name)
    estimated, pages = _estimate(conn, table)
    if estimated < 0:  # never analyzed: count (cheap next to copying it)
        count = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()
        estimated = int(count[0]) if count else 0
    nchunks = max(1, math.ceil(estimated / chunk_rows))
    name = relation.qualified_name
    if nchunks == 1:
        return TablePlan(name, [{"kind": "all"}], estimated)
    keys = [c for c in relation.columns if c.is_key]
    if (len(keys) == 1 and keys[0].type_oid in _INTEGER_TYPES
            and conn.info.server_version < TID_RANGE_SCANS):
        column = sql.Identifier(keys[0].name)
        lo_hi = conn.execute(sql.SQL("SELECT min({}), max({}) FROM {}").format(
            column, column, table)).fetchone()
        lo, hi = int(lo_hi[0] or 0), int(lo_hi[1] or 0)  # type: ignore[index]
        step = max(1, math.ceil((hi - lo + 1) / nchunks))
        edges = [lo + i * step for i in range(1, nchunks)]
        bounds = [None, *edges, None]
        chunks = [{"kind": "pk", "column": keys[0].name, "lo": bounds[i], "hi": bounds[i + 1]}
                  for i in range(nchunks)]
        return TablePlan(name, chunks, estimated)
    step = max(1, math.ceil(pages / nchunks))
    edges = [i * step for i in range(1, nchunks)]
    bounds = [None, *edges, None]
    return TablePlan(name, [{"kind": "ctid", "lo": bounds[i], "hi": bounds[i + 1]}
                            for i in range(nchunks)], estimated)


_SIZES = (
    "SELECT coalesce(sum(greatest(c.reltuples, 0)), 0)::float8, coalesce(sum(c.relpages), 0), "
    "coalesce(sum(pg_relation_size(c.oid)), 0) / current_setting('block_size')::int, "
    "coalesce(max(pg_relation_size(c.oid)), 0) / current_setting('block_size')::int, "
    "bool_or(c.reltuples >= 0 AND c.relpages > 0) "
    "FROM pg_class c WHERE c.relkind <> 'p' AND (c.oid = %(t)s::regclass OR c.oid IN "
    "(SELECT relid FROM pg_partition_tree(%(t)s::regclass) WHERE isleaf))")


def _estimate(conn: psycopg.Connection[Any], table: sql.Identifier) -> tuple[int, int]:
    """(estimated rows, pages of the largest leaf), or rows -1 when never analyzed.

    Over the leaves of a partitioned table (the parent has no pages of its own), and scaled
    by the current size like the planner does, so stale ``reltuples`` (a table that grew
    since its last ANALYZE) do not give one huge chunk. CTID ranges apply to each leaf, so
    they span the largest leaf's pages.
    """
    row = conn.execute(_SIZES, {"t": table.as_string(conn)}).fetchone()
    if row is None or not row[4]:
        pages = int(row[3]) if row is not None else 0
        return -1, max(pages, 1)
    tuples, relpages, pages_now, largest = float(row[0]), int(row[1]), int(row[2]), int(row[3])
    density = tuples / relpages if relpages else 0.0
    return math.ceil(density * max(pages_now, relpages)), max(largest, 1)
