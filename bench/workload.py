"""What the benchmarks share: the bench table, its rows, the server to run on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


def schema_sql(table: str) -> str:
    """A table of the everyday column types (key, text, numeric, timestamps, jsonb)."""
    return f"""
CREATE TABLE {table} (
    id bigint PRIMARY KEY,
    name text,
    price numeric(10,2),
    qty integer,
    created_at timestamptz,
    active boolean,
    payload jsonb
)
"""


def insert_sql(table: str) -> str:
    """INSERT of ``%(rows)s`` generated rows (one statement, one transaction)."""
    return f"""
INSERT INTO {table}
SELECT g,
       'name-' || g,
       mod(g, 100000) / 100.0,
       mod(g, 1000)::integer,
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second',
       mod(g, 2) = 0,
       jsonb_build_object('id', g, 'tag', 'tag-' || mod(g, 17), 'score', mod(g, 101))
FROM generate_series(1, %(rows)s) AS g
"""


@contextlib.contextmanager
def server(dsn: str | None) -> Iterator[str]:
    """The DSN of the server to use: ``dsn`` as given, or a throwaway LocalCluster."""
    if dsn:
        yield dsn
        return
    from cdc.sandbox import LocalCluster

    with LocalCluster() as cluster:
        yield cluster.dsn()


def rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0
