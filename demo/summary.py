"""What landed in the lake's raw layer, table by table, next to the source.

Reads ``<lake>/raw/<schema>.<table>/load_date=*/*.parquet`` (DESIGN.md §2)
through cdc's Lake (a local folder or ``s3://``, endpoint from CDC_S3_ENDPOINT)
and counts rows by ``_op``. Works on an empty or missing lake. Run alone as
``python -m demo.summary [LAKE]``.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from psycopg import sql
from psycopg.rows import TupleRow

from demo import open_demo_lake

OPS = {"c": "insert", "u": "update", "d": "delete", "t": "truncate", "r": "snapshot"}
#: the operations the demo's traffic generator counts
TRAFFIC_OPS = ("c", "u", "d")


@dataclass
class TableSummary:
    name: str  # schema.table, as in the lake
    files: int = 0
    rows: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    #: rows whose _unchanged lists a column (a TOASTed value not resent)
    unchanged_toast: int = 0
    source_rows: int | None = None
    #: rows the traffic changed, by op (None: not known)
    made: Counter[str] | None = None


def _read_file(path: pa.BufferReader, into: TableSummary) -> None:
    names = set(pq.read_schema(path).names)
    columns = [c for c in ("_op", "_unchanged") if c in names]
    path.seek(0)
    table = pq.read_table(path, columns=columns)
    into.files += 1
    into.rows += table.num_rows
    if "_op" in names:
        for item in pc.value_counts(table["_op"]).to_pylist():
            into.ops[item["values"] or "?"] += item["counts"]
    if "_unchanged" in names and table.num_rows:
        lengths = pc.list_value_length(table["_unchanged"])
        into.unchanged_toast += pc.sum(pc.greater(lengths, 0)).as_py() or 0


def read_lake(lake: str | Path, tables: Iterable[str]) -> list[TableSummary]:
    """One summary per ``schema.table`` in ``tables`` plus any other table found in raw/."""
    store = open_demo_lake(lake)
    files: dict[str, list[str]] = {}
    for key in store.list("raw/"):
        parts = key.split("/")
        if len(parts) == 4 and parts[2].startswith("load_date=") and key.endswith(".parquet"):
            files.setdefault(parts[1], []).append(key)
    names = list(tables)
    names += sorted(name for name in files if name not in names)
    summaries = []
    for name in names:
        summary = TableSummary(name)
        for key in files.get(name, []):
            data = store.read_bytes(key)
            if data is not None:
                _read_file(pa.BufferReader(data), summary)
        summaries.append(summary)
    return summaries


def count_source(conn: psycopg.Connection[TupleRow], summaries: Iterable[TableSummary],
                 tables: Sequence[str]) -> None:
    """Fill ``source_rows`` for the summaries of ``tables`` (``schema.table`` names)."""
    for summary in summaries:
        if summary.name in tables:
            schema, table = summary.name.split(".", 1)
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(schema, table))
            row = conn.execute(query).fetchone()
            summary.source_rows = int(row[0]) if row else None


def render(summaries: Sequence[TableSummary]) -> str:
    """A plain-text table with a totals line."""
    traffic = any(s.made is not None for s in summaries)
    source = any(s.source_rows is not None for s in summaries)
    header = ["table", "files", "rows", *(OPS[op] for op in OPS), "toast*"]
    header += ["expected"] * traffic + ["source rows"] * source
    body = []
    for s in summaries:
        cells = [s.name, s.files, s.rows, *(s.ops[op] for op in OPS), s.unchanged_toast]
        if traffic:
            cells.append("-" if s.made is None else sum(s.made.values()))
        if source:
            cells.append("-" if s.source_rows is None else s.source_rows)
        body.append([str(c) for c in cells])
    totals = ["total"] + [
        str(sum(int(row[i]) for row in body if row[i] != "-")) for i in range(1, len(header))]
    widths = [max(len(r[i]) for r in [header, *body, totals]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join([cells[0].ljust(widths[0])] +
                         [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)])

    rule = "  ".join("-" * w for w in widths)
    text = [line(header), rule, *(line(r) for r in body), rule, line(totals)]
    text.append("* toast: updates that carried an unchanged TOASTed column (_unchanged)")
    if traffic:
        text.append("  expected: rows seeded before the snapshot plus row changes the traffic made")
    return "\n".join(text)


def compare(summaries: Iterable[TableSummary]) -> tuple[list[str], list[str]]:
    """(missing, extra): lake rows by table and op that differ from the traffic made."""
    missing, extra = [], []
    for s in summaries:
        if s.made is None:
            continue
        for op in TRAFFIC_OPS:
            made, landed = s.made[op], s.ops[op]
            if landed < made:
                missing.append(f"{s.name}: {made - landed} of {made} {OPS[op]}s missing")
            elif landed > made:
                extra.append(f"{s.name}: {landed - made} more {OPS[op]}s than made "
                             f"({landed} vs {made})")
    return missing, extra


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    lake = args[0] if args else "lake"
    print(f"lake {lake if lake.startswith('s3://') else Path(lake).resolve()}")
    print(render(read_lake(lake, [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
