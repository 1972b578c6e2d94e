"""Connections to the source and the one place psycopg errors become cdc errors.

Every psycopg error is translated into the cdc exception tree here and nowhere else,
and the DSN is only ever shown through ``describe`` (never its password).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from cdc.errors import (
    CdcError,
    ConnectionLost,
    SlotBusy,
    SourceError,
)

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


def translate(exc: psycopg.Error, dsn: str) -> CdcError:  # noqa: PLR0911  the one translation table: a return per error
    """Map a psycopg error to a cdc error with a fix (never quoting the DSN's password)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
    kwargs: dict[str, object] = {"options": SESSION_OPTIONS, "application_name": "cdc"}
    if replication:
        kwargs["replication"] = "database"
    with translated(dsn):
        params = conninfo_to_dict(dsn)
        if "connect_timeout" not in params:
            kwargs["connect_timeout"] = 10
        return psycopg.connect(make_conninfo(dsn, **kwargs), autocommit=True)  # type: ignore[arg-type]


