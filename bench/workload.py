"""What the benchmarks share: the bench table, its rows, the server to run on."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass


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


def narrow_schema_sql(table: str) -> str:
    """The common shape of OLTP fact tables: integers, a decimal, short text, a timestamp."""
    return f"""
CREATE TABLE {table} (
    id bigserial PRIMARY KEY,
    customer_id integer,
    store_id integer,
    amount numeric(10,2),
    qty integer,
    status text,
    created_at timestamptz
)
"""


def narrow_insert_sql(table: str) -> str:
    return f"""
INSERT INTO {table} (customer_id, store_id, amount, qty, status, created_at)
SELECT mod(g, 100003)::integer,
       mod(g, 97)::integer,
       mod(g, 100000) / 100.0,
       mod(g, 1000)::integer,
       'st-' || mod(g, 7),
       timestamptz '2024-01-01 00:00:00+00' + g * interval '1 second'
FROM generate_series(1, %(rows)s) AS g
"""


@dataclass(frozen=True)
class Shape:
    """A benchmark table: its DDL, its bulk INSERT, an UPDATE of ``%(updates)s`` rows by id,
    and a one-row INSERT of id ``{id}`` and one-row UPDATE of id ``{id}`` (PL/pgSQL)."""

    name: str
    schema: str
    insert: str
    update: str
    insert_one: str
    update_one: str
    deletes: int  # default --deletes of the streaming benchmark
    small_tx: int  # default --small-tx of the streaming benchmark


def shape(name: str, table: str) -> Shape:
    """``wide`` (jsonb payload, the server's output functions dominate) or ``narrow``."""
    if name == "wide":
        return Shape(
            "wide", schema_sql(table), insert_sql(table),
            f"UPDATE {table} SET price = price + 1, qty = qty + 1, active = NOT active, "
            f"name = name || '-u' WHERE id <= %(updates)s",
            f"INSERT INTO {table} VALUES ({{id}}, 'small-' || {{i}}, 1.50, {{i}}, now(), true, "
            f"jsonb_build_object('small', {{i}}))",
            f"UPDATE {table} SET qty = qty + 1, name = 'small-upd-' || {{i}} WHERE id = {{id}}",
            deletes=50_000, small_tx=5_000)
    if name == "narrow":
        return Shape(
            "narrow", narrow_schema_sql(table), narrow_insert_sql(table),
            f"UPDATE {table} SET amount = amount + 1, qty = qty + 1 WHERE id <= %(updates)s",
            f"INSERT INTO {table} VALUES ({{id}}, {{i}}, 1, 1.50, {{i}}, 'small', now())",
            f"UPDATE {table} SET qty = qty + 1, status = 'upd' WHERE id = {{id}}",
            deletes=67_000, small_tx=0)
    raise ValueError(f"unknown shape {name!r}: wide or narrow")


SHAPES = ("narrow", "wide")


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
