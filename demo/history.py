"""After compaction: a customer's and a repriced track's history, from the history tables."""

from __future__ import annotations

from pathlib import Path

import duckdb

from cdc.ops.query import duckdb_views
from demo import DemoFailure, open_demo_lake

CUSTOMER = """
SELECT city, country, email, strftime(_valid_from, '%H:%M:%S.%g') AS valid_from,
       strftime(_valid_to, '%H:%M:%S.%g') AS valid_to, _ended_by AS ended_by
FROM history_public.customer WHERE customer_id = ? ORDER BY _valid_from_lsn
"""
TRACK = """
SELECT unit_price, _op AS op, strftime(_valid_from, '%H:%M:%S.%g') AS valid_from,
       strftime(_valid_to, '%H:%M:%S.%g') AS valid_to, _ended_by AS ended_by
FROM history_public.track WHERE track_id = ? ORDER BY _valid_from_lsn
"""
#: a type-2 join: each invoice line with the track's price valid when its invoice committed
PRICE_THEN = """
SELECT count(*) AS lines,
       count(*) FILTER (WHERE il.unit_price = t.unit_price) AS at_the_price_valid_then,
       count(*) FILTER (WHERE il.unit_price = now.unit_price) AS at_todays_price
FROM public.invoice_line il
JOIN history_public.track t ON t.track_id = il.track_id
 AND t._valid_from <= il._commit_ts AND (il._commit_ts < t._valid_to OR t._valid_to IS NULL)
JOIN public.track now ON now.track_id = il.track_id
"""


def most_changed(con: duckdb.DuckDBPyConnection, table: str, key: str, column: str) -> int:
    """The key whose ``column`` took the most distinct values in ``table``'s history."""
    row = con.execute(
        f"SELECT {key} FROM history_public.{table} GROUP BY 1 "
        f"ORDER BY count(DISTINCT {column}) DESC, count(*) DESC, 1 LIMIT 1").fetchall()
    if not row:
        raise DemoFailure(f"history_public.{table} is empty")
    return int(row[0][0])


def run(lake: str | Path) -> list[str]:
    """Print the two histories and the type-2 join; return problems (current != staged)."""
    con = duckdb_views(open_demo_lake(lake))
    problems = []
    for table in ("customer", "track", "invoice", "invoice_line"):
        [(current,)] = con.execute(f"SELECT count(*) FROM history_public.{table} "
                                   "WHERE _is_current").fetchall()
        [(staged,)] = con.execute(f"SELECT count(*) FROM public.{table}").fetchall()
        if current != staged:
            problems.append(f"history of {table} has {current} current rows, staged {staged}")
    customer = most_changed(con, "customer", "customer_id", "city")
    print(f"\ncustomer {customer}'s address and email history (history_public.customer, "
          "times UTC):")
    print(con.sql(CUSTOMER, params=[customer]))
    track = most_changed(con, "track", "track_id", "unit_price")
    print(f"track {track}'s price history (history_public.track):")
    print(con.sql(TRACK, params=[track]))
    print("invoice lines joined to the track version valid when the invoice was written:")
    print(con.sql(PRICE_THEN))
    return problems
