"""Create the ``media_retail`` schema and fill it with deterministic sample data.

All values come from one ``random.Random(seed)`` and a fixed epoch, so a given
seed always produces the same rows; they are loaded with ``COPY``.
"""

from __future__ import annotations

import random
import uuid
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from importlib import resources

import psycopg
from psycopg import sql
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

#: the demo's tables, in foreign-key order (parents first)
TABLES = ("genre", "media_type", "artist", "album", "track",
          "employee", "customer", "invoice", "invoice_line")

EPOCH = datetime(2023, 1, 1, tzinfo=UTC)
PRICES = (Decimal("0.99"), Decimal("1.29"), Decimal("1.99"))

GENRES = ("Rock", "Jazz", "Metal", "Alternative", "Blues", "Latin", "Reggae", "Pop",
          "Soundtrack", "Classical", "Electronica", "Hip Hop", "World", "Folk")
MEDIA_TYPES = (("MPEG audio file", False), ("AAC audio file", False),
               ("Protected AAC audio file", False), ("FLAC audio file", True),
               ("Purchased AAC audio file", False))
COUNTRIES = (("Lisbon", "Portugal"), ("Berlin", "Germany"), ("Oslo", "Norway"),
             ("Prague", "Czech Republic"), ("Toronto", "Canada"), ("Austin", "USA"),
             ("Seattle", "USA"), ("São Paulo", "Brazil"), ("Paris", "France"),
             ("Dublin", "Ireland"), ("Sydney", "Australia"), ("Bangalore", "India"),
             ("Santiago", "Chile"), ("Stockholm", "Sweden"), ("Kraków", "Poland"))
FIRST = ("Ana", "Luís", "Maja", "Tomás", "Helena", "Erik", "Aoife", "Camille", "Rahul",
         "Leonie", "Mark", "Frank", "Julia", "Diego", "Ingrid", "Kenji", "Zoe", "Emma")
LAST = ("Gonçalves", "Köhler", "Hansen", "Novák", "Murray", "Silva", "Bernard", "Sharma",
        "Schneider", "Philips", "Harris", "Rojas", "Larsen", "Tanaka", "Walsh", "Kowalska")
WORDS = ("night", "river", "electric", "velvet", "harbor", "echo", "stone", "golden",
         "midnight", "fire", "blue", "shadow", "paper", "city", "wild", "silent", "neon",
         "summer", "ghost", "heart", "road", "iron", "glass", "thunder", "garden", "moon",
         "highway", "ocean", "crimson", "northern", "lights", "dust", "rain", "machine")

# sizes: a few thousand rows in all
N_ARTISTS = 120
N_CUSTOMERS = 400
N_INVOICES = 900

#: customer columns a sign-up fills (customer_id comes from the identity)
CUSTOMER_COLUMNS = ("external_id", "first_name", "last_name", "company", "city",
                    "country", "email", "support_rep_id", "preferences")

Row = tuple[object, ...]


@dataclass
class TableData:
    columns: tuple[str, ...]
    rows: list[Row] = field(default_factory=list)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _title(rng: random.Random, n: int) -> str:
    return _words(rng, n).title()


def _person(rng: random.Random) -> tuple[str, str]:
    return rng.choice(FIRST), rng.choice(LAST)


def _email(first: str, last: str, n: int, domain: str) -> str:
    ascii_name = f"{first}.{last}".encode("ascii", "ignore").decode().lower()
    return f"{ascii_name}{n}@{domain}"


def _catalog(rng: random.Random, data: dict[str, TableData]) -> None:
    for name in GENRES:
        data["genre"].rows.append((len(data["genre"].rows) + 1, name))
    for name, lossless in MEDIA_TYPES:
        data["media_type"].rows.append((len(data["media_type"].rows) + 1, name, lossless))
    for artist_id in range(1, N_ARTISTS + 1):
        country = rng.choice(COUNTRIES)[1] if rng.random() < 0.8 else None
        data["artist"].rows.append((artist_id, f"The {_title(rng, 2)}", country))
        for _ in range(rng.randint(1, 4)):
            album_id = len(data["album"].rows) + 1
            released = date(1965, 1, 1) + timedelta(days=rng.randrange(60 * 365))
            data["album"].rows.append((album_id, artist_id, _title(rng, rng.randint(1, 4)),
                                       released, rng.randbytes(rng.randint(48, 160))))
            _tracks(rng, data["track"], album_id)


def _tracks(rng: random.Random, tracks: TableData, album_id: int) -> None:
    genre_id = rng.randint(1, len(GENRES))
    media_type_id = rng.randint(1, len(MEDIA_TYPES))
    price = rng.choice(PRICES)
    for _ in range(rng.randint(6, 12)):
        millis = rng.randint(90_000, 420_000)
        composer = " & ".join(" ".join(_person(rng)) for _ in range(rng.randint(1, 2)))
        # ~5% of tracks carry long lyrics, stored out of line (TOAST)
        lyrics = _words(rng, 3000) if rng.random() < 0.05 else _words(rng, rng.randint(0, 40))
        tracks.rows.append((len(tracks.rows) + 1, album_id, genre_id, media_type_id,
                            _title(rng, rng.randint(1, 3)),
                            composer if rng.random() < 0.7 else None,
                            millis, millis * 32 + rng.randint(0, 99_999), price,
                            rng.random() < 0.12, lyrics or None))


def _people(rng: random.Random, data: dict[str, TableData]) -> None:
    titles = ("General Manager", "Sales Manager", "Sales Manager") + ("Sales Support Agent",) * 5
    for employee_id, title in enumerate(titles, start=1):
        first, last = _person(rng)
        reports_to = None if employee_id == 1 else (1 if employee_id <= 3 else rng.randint(2, 3))
        born = date(1958, 1, 1) + timedelta(days=rng.randrange(35 * 365))
        hired = date(2012, 1, 1) + timedelta(days=rng.randrange(10 * 365))
        city, country = rng.choice(COUNTRIES)
        data["employee"].rows.append((employee_id, last, first, title, reports_to, born, hired,
                                      city, country, _email(first, last, employee_id,
                                                            "media-retail.example")))
    for customer_id in range(1, N_CUSTOMERS + 1):
        data["customer"].rows.append((customer_id, *customer_values(rng, customer_id)))


def customer_values(rng: random.Random, serial: int) -> Row:
    """One customer's ``CUSTOMER_COLUMNS``; the traffic generator signs customers up with it."""
    first, last = _person(rng)
    city, country = rng.choice(COUNTRIES)
    company = f"{_title(rng, 1)} {rng.choice(('Ltd', 'GmbH', 'Inc.', 'S.A.'))}"
    preferences = {"newsletter": rng.random() < 0.6,
                   "format": rng.choice(("mp3", "aac", "flac")),
                   "favorite_genres": rng.sample(GENRES, rng.randint(0, 3))}
    return (uuid.UUID(int=rng.getrandbits(128), version=4), first, last,
            company if rng.random() < 0.25 else None, city, country,
            _email(first, last, serial, "mail.example"), rng.randint(4, 8),
            Jsonb(preferences))


def _sales(rng: random.Random, data: dict[str, TableData]) -> None:
    prices = [row[8] for row in data["track"].rows]  # track_id is index + 1
    customers = data["customer"].rows
    for invoice_id in range(1, N_INVOICES + 1):
        customer = rng.choice(customers)
        total = Decimal(0)
        for index in rng.sample(range(len(prices)), rng.randint(1, 5)):
            price, quantity = prices[index], 1 if rng.random() < 0.9 else 2
            assert isinstance(price, Decimal)
            total += price * quantity
            data["invoice_line"].rows.append((len(data["invoice_line"].rows) + 1, invoice_id,
                                              index + 1, price, quantity))
        when = EPOCH + timedelta(seconds=rng.randrange(2 * 365 * 86400))
        data["invoice"].rows.append((invoice_id, customer[0], when, customer[5], customer[6],
                                     total))


def generate(seed: int) -> dict[str, TableData]:
    """All seed rows, by table, for ``seed``."""
    rng = random.Random(seed)
    data = {
        "genre": TableData(("genre_id", "name")),
        "media_type": TableData(("media_type_id", "name", "lossless")),
        "artist": TableData(("artist_id", "name", "country")),
        "album": TableData(("album_id", "artist_id", "title", "release_date",
                            "cover_thumbnail")),
        "track": TableData(("track_id", "album_id", "genre_id", "media_type_id", "name",
                            "composer", "milliseconds", "bytes", "unit_price", "explicit",
                            "lyrics")),
        "employee": TableData(("employee_id", "last_name", "first_name", "title", "reports_to",
                               "birth_date", "hire_date", "city", "country", "email")),
        "customer": TableData(("customer_id", *CUSTOMER_COLUMNS)),
        "invoice": TableData(("invoice_id", "customer_id", "invoice_date", "billing_city",
                              "billing_country", "total")),
        "invoice_line": TableData(("invoice_line_id", "invoice_id", "track_id", "unit_price",
                                   "quantity")),
    }
    _catalog(rng, data)
    _people(rng, data)
    _sales(rng, data)
    return data



def load(conn: psycopg.Connection[TupleRow], seed: int) -> dict[str, int]:
    """Create the schema in ``conn``'s database and seed it; return rows per table."""
    schema = resources.files("demo").joinpath("media_retail.sql").read_text(encoding="utf-8")
    data = generate(seed)
    with conn.transaction():
        conn.execute(schema.encode())
        for table in TABLES:
            columns = data[table].columns
            copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
                sql.Identifier("public", table), sql.SQL(", ").join(map(sql.Identifier, columns)))
            with conn.cursor() as cur, cur.copy(copy) as sink:
                for row in data[table].rows:
                    sink.write_row(row)
            # rows were loaded with explicit ids: move each identity past them
            conn.execute(sql.SQL("SELECT setval(pg_get_serial_sequence({}, {}), max({})) FROM {}")
                         .format(sql.Literal(f"public.{table}"), sql.Literal(columns[0]),
                                 sql.Identifier(columns[0]), sql.Identifier("public", table)))
    conn.execute("ANALYZE")
    return {table: len(data[table].rows) for table in TABLES}
