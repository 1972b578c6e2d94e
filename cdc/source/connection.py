"""Connections to the source and the one place psycopg errors become cdc errors.

Every psycopg error is translated into the cdc exception tree here and nowhere else,
and the DSN is only ever shown through ``describe`` (never its password).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import quote

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.errors import (
    CdcError,
    ConnectionLost,
    SlotBusy,
    SourceError,
    first_line,
)
from cdc.log import redact_libpq, scrub

#: session settings that make the server's text output what pgtypes parses
SESSION_OPTIONS = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres " \
                  "-c extra_float_digits=3 -c bytea_output=hex"

def describe(dsn: str) -> str:
    """The DSN as safe to log: host, port, database and user, never the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "<unparsable DSN>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    return (f"{params.get('user') or '(default user)'}@{host}:{params.get('port') or 5432}"
            f"/{params.get('dbname') or '(default db)'}")


def without_password(text: str, dsn: str) -> str:
    """``text`` with the DSN's password (as written and percent-decoded) replaced by ***."""
    secrets = set()
    with contextlib.suppress(psycopg.ProgrammingError):
        password = conninfo_to_dict(dsn).get("password")
        if password:
            secrets |= {str(password), quote(str(password)), quote(str(password), safe="")}
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return scrub(text)


def translate(exc: psycopg.Error, dsn: str) -> CdcError:  # noqa: PLR0911  the one translation table: a return per error
    """Map a psycopg error to a cdc error with a fix (never quoting the DSN's password)."""
    text = first_line(exc)
    text = without_password(text, dsn)
    if isinstance(exc, psycopg.ProgrammingError) and "connection" in text.lower():
        text = redact_libpq(text)  # a conninfo error quotes the bad token back
    where = describe(dsn)
    if isinstance(exc, pgerrors.InsufficientPrivilege) or "replication role" in text:
        return SourceError(f"{where}: {text}",
                           fix="grant the role replication rights: ALTER ROLE <user> REPLICATION "
                           "(and allow it in pg_hba.conf)")
    if "wal_level" in text:
        return SourceError(f"{where}: {text}",
                           fix="set wal_level = logical in postgresql.conf and restart the server")
    if "replication slots are in use" in text or "max_wal_senders" in text:
        return SourceError(f"{where}: {text}",
                           fix="drop a slot nothing uses (SELECT slot_name, active FROM "
                           "pg_replication_slots; SELECT pg_drop_replication_slot('<name>')) "
                           "or raise max_replication_slots / max_wal_senders and restart the "
                           "server; cdc needs one more for a moment to re-read a table")
    if isinstance(exc, pgerrors.ObjectInUse):
        return SlotBusy(f"{where}: {text}",
                         fix="another consumer is reading this slot; stop it or use another --slot")
    if isinstance(exc, psycopg.OperationalError):
        if "password authentication failed" in text or "no password supplied" in text:
            return SourceError(f"cannot log in to {where}: {text}",
                               fix="check the user and password in --dsn / CDC_DSN")
        if "does not exist" in text and "database" in text:
            return SourceError(f"{where}: {text}", fix="check the database name in --dsn")
        return ConnectionLost(f"cannot reach PostgreSQL at {where}: {text}",
                              fix="check that the server is running and --dsn host/port are "
                              "right")
    return SourceError(f"{where}: {text}", fix="see the server's message")


@contextmanager
def translated(dsn: str) -> Iterator[None]:
    try:
        yield
    except psycopg.Error as exc:
        raise translate(exc, dsn) from exc


#: libpq settings cdc adds unless the DSN sets them: a connect timeout, and TCP keepalives
#: so a peer that vanished is noticed in about a minute even while nothing is sent
DEFAULTS = {"connect_timeout": "10", "keepalives": "1", "keepalives_idle": "30",
            "keepalives_interval": "10", "keepalives_count": "3"}


def conninfo(dsn: str, *, replication: bool = False) -> str:
    """The DSN with cdc's session settings added, never overwriting the user's.

    The user's ``options`` (hosted PostgreSQL routes by them, e.g. ``endpoint=...``) come
    first and cdc's ``-c`` settings after them (they must hold for parsing), and a given
    ``application_name`` is kept.
    """
    params = conninfo_to_dict(dsn)
    user_options = str(params.get("options") or "").strip()
    kwargs: dict[str, object] = {
        "options": f"{user_options} {SESSION_OPTIONS}" if user_options else SESSION_OPTIONS,
        # on a SQL_ASCII database psycopg would otherwise return text as bytes
        # (SHOW wal_level gave b'logical')
        "client_encoding": "utf8"}
    if not params.get("application_name"):
        kwargs["application_name"] = "cdc"
    for name, value in DEFAULTS.items():
        if name not in params:
            kwargs[name] = value
    if replication:
        kwargs["replication"] = "database"
    return make_conninfo(dsn, **kwargs)  # type: ignore[arg-type]


def connect(dsn: str, *, replication: bool = False) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection with the session settings cdc relies on."""
    with translated(dsn):
        return psycopg.connect(conninfo(dsn, replication=replication), autocommit=True)


