"""Sales traffic against the ``media_retail`` database.

Each transaction is one business event: a sale (an invoice and its lines), an
album repriced, a customer's details edited, an invoice voided (its lines and
itself deleted) or a sign-up (a new customer and their first invoice). The
generator counts every row it changes by table and operation, which is exactly
what the lake must receive.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from demo.seed import COUNTRIES, CUSTOMER_COLUMNS, PRICES, customer_values

Connection = psycopg.Connection[TupleRow]
#: rows changed, by (table, operation) with operations as in the lake: c, u, d
Changes = Counter[tuple[str, str]]


@dataclass
class TrafficReport:
    transactions: int = 0
    seconds: float = 0.0
    #: how many transactions of each kind (sale, reprice, ...)
    kinds: Counter[str] = field(default_factory=Counter)
    changes: Changes = field(default_factory=Counter)
    #: WAL insert position right after the last commit
    end_lsn: str = ""

    def made_in(self, table: str) -> Counter[str]:
        """Rows changed in ``table`` by operation."""
        return Counter({op: n for (t, op), n in self.changes.items() if t == table})


class SalesTraffic:
    """Business events on one connection; each method is one transaction."""

    def __init__(self, conn: Connection, rng: random.Random) -> None:
        self.conn = conn
        self.rng = rng
        self.changes: Changes = Counter()
        self.prices: dict[int, Decimal] = dict(
            conn.execute("SELECT track_id, unit_price FROM public.track").fetchall())
        self.track_ids = sorted(self.prices)
        self.album_ids = [r[0] for r in conn.execute("SELECT album_id FROM public.album")]
        self.customer_ids = [r[0] for r in conn.execute("SELECT customer_id FROM public.customer")]
        self.invoice_ids = [r[0] for r in conn.execute("SELECT invoice_id FROM public.invoice")]
        self.signups = 0

    def _invoice(self, customer_id: int) -> None:
        """Insert an invoice with 1-5 lines (inside the caller's transaction)."""
        lines = [(track_id, self.prices[track_id], 1 if self.rng.random() < 0.9 else 2)
                 for track_id in self.rng.sample(self.track_ids, self.rng.randint(1, 5))]
        total = sum((price * quantity for _, price, quantity in lines), Decimal(0))
        row = self.conn.execute(
            "INSERT INTO public.invoice (customer_id, invoice_date, billing_city,"
            " billing_country, total)"
            " SELECT customer_id, now(), city, country, %s FROM public.customer"
            " WHERE customer_id = %s RETURNING invoice_id", (total, customer_id)).fetchone()
        assert row is not None
        invoice_id: int = row[0]
        with self.conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO public.invoice_line (invoice_id, track_id, unit_price, quantity)"
                " VALUES (%s, %s, %s, %s)", [(invoice_id, *line) for line in lines])
        self.invoice_ids.append(invoice_id)
        self.changes["invoice", "c"] += 1
        self.changes["invoice_line", "c"] += len(lines)

    def sale(self) -> None:
        with self.conn.transaction():
            self._invoice(self.rng.choice(self.customer_ids))

    def reprice(self) -> None:
        """Every track of one album gets a new price."""
        price = self.rng.choice(PRICES)
        with self.conn.transaction():
            rows = self.conn.execute(
                "UPDATE public.track SET unit_price = %s WHERE album_id = %s RETURNING track_id",
                (price, self.rng.choice(self.album_ids))).fetchall()
        self.prices.update((track_id, price) for (track_id,) in rows)
        self.changes["track", "u"] += len(rows)

    def edit_customer(self) -> None:
        """Merge new preferences into the jsonb column, change the email, or move house."""
        # half the edits go to ten regulars: the demo then shows a customer's long history
        regulars = self.customer_ids[:10] if self.rng.random() < 0.5 else self.customer_ids
        customer_id = self.rng.choice(regulars)
        with self.conn.transaction():
            choice = self.rng.random()
            if choice < 0.4:
                city, country = self.rng.choice(COUNTRIES)
                cur = self.conn.execute(
                    "UPDATE public.customer SET city = %s, country = %s"
                    " WHERE customer_id = %s", (city, country, customer_id))
            elif choice < 0.7:
                preferences = {"format": self.rng.choice(("mp3", "aac", "flac")),
                               "newsletter": self.rng.random() < 0.5}
                cur = self.conn.execute(
                    "UPDATE public.customer SET preferences = preferences || %s"
                    " WHERE customer_id = %s", (Jsonb(preferences), customer_id))
            else:
                email = f"moved.{self.rng.randrange(10**6)}@mail.example"
                cur = self.conn.execute(
                    "UPDATE public.customer SET email = %s WHERE customer_id = %s",
                    (email, customer_id))
        self.changes["customer", "u"] += cur.rowcount

    def void_invoice(self) -> None:
        """Delete a random invoice and its lines."""
        if not self.invoice_ids:
            return
        i = self.rng.randrange(len(self.invoice_ids))
        invoice_id = self.invoice_ids[i]
        self.invoice_ids[i] = self.invoice_ids[-1]
        self.invoice_ids.pop()
        with self.conn.transaction():
            for table in ("invoice_line", "invoice"):
                cur = self.conn.execute(
                    sql.SQL("DELETE FROM {} WHERE invoice_id = %s").format(
                        sql.Identifier("public", table)), (invoice_id,))
                self.changes[table, "d"] += cur.rowcount

    def sign_up(self) -> None:
        """A new customer and their first purchase, in one transaction."""
        self.signups += 1
        values = customer_values(self.rng, 100_000 + self.signups)
        insert = sql.SQL("INSERT INTO public.customer ({}) VALUES ({}) RETURNING customer_id")
        with self.conn.transaction():
            row = self.conn.execute(insert.format(
                sql.SQL(", ").join(map(sql.Identifier, CUSTOMER_COLUMNS)),
                sql.SQL(", ").join(sql.Placeholder() * len(CUSTOMER_COLUMNS))), values).fetchone()
            assert row is not None
            self.changes["customer", "c"] += 1
            self._invoice(row[0])
        self.customer_ids.append(row[0])


def run(dsn: str, *, seconds: float, seed: int, rate: float,
        progress_every: float = 5.0) -> TrafficReport:
    """Run sales traffic for ``seconds`` at about ``rate`` transactions/s (0: flat out)."""
    report = TrafficReport()
    with psycopg.connect(dsn, autocommit=True) as conn:
        traffic = SalesTraffic(conn, random.Random(seed))
        events: dict[str, Callable[[], None]] = {
            "sale": traffic.sale, "reprice": traffic.reprice,
            "edit_customer": traffic.edit_customer, "void_invoice": traffic.void_invoice,
            "sign_up": traffic.sign_up}
        weights = {"sale": 70, "reprice": 6, "edit_customer": 14, "void_invoice": 5,
                   "sign_up": 5}
        start = time.monotonic()
        next_progress = start + progress_every
        while (now := time.monotonic()) - start < seconds:
            if now >= next_progress:
                _progress(now - start, report.transactions, traffic.changes)
                next_progress += progress_every
            kind = traffic.rng.choices(list(weights), weights=list(weights.values()))[0]
            events[kind]()
            report.kinds[kind] += 1
            report.transactions += 1
            if rate > 0:
                time.sleep(max(0.0, start + report.transactions / rate - time.monotonic()))
        report.seconds = time.monotonic() - start
        report.changes = traffic.changes
        row = conn.execute("SELECT pg_current_wal_insert_lsn()::text").fetchone()
        assert row is not None
        report.end_lsn = row[0]
    _progress(report.seconds, report.transactions, report.changes)
    return report


def _progress(elapsed: float, transactions: int, changes: Changes) -> None:
    print(f"  {elapsed:5.1f}s  {transactions:6d} transactions, "
          f"{sum(changes.values()):6d} row changes", flush=True)
