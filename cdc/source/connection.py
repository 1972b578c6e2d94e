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
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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


def connect(dsn: str, *, replication: bool = False) -> psycopg.Connection[tuple[object, ...]]:
    """An autocommit connection with the session settings cdc relies on."""
    # client_encoding: on a SQL_ASCII database psycopg would otherwise return text as bytes
    # (SHOW wal_level gave b'logical')
    kwargs: dict[str, object] = {"options": SESSION_OPTIONS, "application_name": "cdc",
                                 "client_encoding": "utf8"}
    if replication:
        kwargs["replication"] = "database"
    with translated(dsn):
        params = conninfo_to_dict(dsn)
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = 10
        return psycopg.connect(make_conninfo(dsn, **kwargs), autocommit=True)  # type: ignore[arg-type]


