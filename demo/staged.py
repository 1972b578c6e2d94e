"""The demo's last act: compact raw into staged Delta tables and query them with DuckDB."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import duckdb
import psycopg
from deltalake import DeltaTable
from psycopg import sql
from psycopg.rows import TupleRow

from cdc.lake.layout import staged_key
from demo import DemoFailure, lake_args, open_demo_lake

COMPARED = ("invoice", "invoice_line", "customer", "track")
REVENUE_BY_GENRE = """
SELECT g.name AS genre, sum(il.unit_price * il.quantity) AS revenue, count(*) AS lines
FROM invoice_line il
JOIN track t ON t.track_id = il.track_id
JOIN genre g ON g.genre_id = t.genre_id
GROUP BY g.name ORDER BY revenue DESC LIMIT 5
"""


def compact(lake: str | Path, slot: str) -> str:
    """Run ``cdc compact``; return its output."""
    cmd = [sys.executable, "-m", "cdc", "compact", *lake_args(lake), "--slot", slot,
           "--log-level", "warning"]
    result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                            check=False)
    if result.returncode != 0:
        raise DemoFailure(f"cdc compact exited {result.returncode}:\n{result.stderr[-2000:]}")
    return result.stderr.strip()


def staged_table(lake: str | Path, table: str) -> DeltaTable:
    uri, storage_options = open_demo_lake(lake).delta_location(staged_key(f"public.{table}"))
    return DeltaTable(uri, storage_options=storage_options)


def compare_counts(lake: str | Path, conn: psycopg.Connection[TupleRow]) -> list[str]:
    """Print staged next to source row counts; return the tables that differ."""
    differ = []
    print(f"{'table':<16}{'staged rows':>12}{'source rows':>12}")
    for table in COMPARED:
        staged = staged_table(lake, table).to_pyarrow_dataset().count_rows()
        row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
            sql.Identifier("public", table))).fetchone()
        source = int(row[0]) if row else 0
        print(f"{table:<16}{staged:>12}{source:>12}")
        if staged != source:
            differ.append(f"staged {table} has {staged} rows, source {source}")
    return differ


def revenue_by_genre(lake: str | Path) -> str:
    """DuckDB over the staged Delta tables, offline (no extension download)."""
    db = duckdb.connect()
    for table in ("invoice_line", "track", "genre"):
        db.register(table, staged_table(lake, table).to_pyarrow_dataset())
    return str(db.sql(REVENUE_BY_GENRE))


def run(lake: str | Path, slot: str, conn: psycopg.Connection[TupleRow]) -> list[str]:
    print("\ncdc compact:\n  " + compact(lake, slot).replace("\n", "\n  "), flush=True)
    print()
    problems = compare_counts(lake, conn)
    print("\nrevenue by genre, DuckDB over the staged Delta tables:")
    print(revenue_by_genre(lake))
    return problems
