"""structlog set-up: console lines by default, JSON with ``--log-format json``.

A processor scrubs passwords from every string a log line carries, whatever
the caller put in it (DSNs in error messages included): invariant 7.
"""

from __future__ import annotations

import io
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

_SECRETS = [
    (re.compile(r"(postgres(?:ql)?://[^:/@\s]+:)[^@\s]+@"), r"\1***@"),
    (re.compile(r"(password\s*=\s*)('[^']*'|\S+)", re.IGNORECASE), r"\1***"),
]


_QUOTED = re.compile(r'"[^"]*"')


def scrub(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


def redact_libpq(message: str) -> str:
    """A libpq/psycopg conninfo error without the token it quotes back (it may be the
    password: ``invalid percent-encoded token: "…"``, ``unexpected spaces found in "…"``)."""
    return scrub(_QUOTED.sub('"***"', message))


def redact_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ``***`` (``***`` alone when unparsable)."""
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except ProgrammingError:
        return "***"
    if "password" in params:
        params["password"] = "***"  # noqa: S105 - the mask, not a password
    return make_conninfo("", **params)


class SecretStr(str):
    """A string whose ``repr`` (what tracebacks with locals print) never shows a password."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact_dsn(str(self)))


def _scrub_event(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = scrub(value)
    return event


def _plain_traceback(sio: TextIO, exc_info: Any) -> None:
    """A traceback without local variables (the default rich one prints every frame's, a
    DSN or an S3 secret among them: invariant 7), scrubbed like every log line."""
    buffer = io.StringIO()
    structlog.dev.plain_traceback(buffer, exc_info)
    sio.write(scrub(buffer.getvalue()))


def configure(fmt: str = "console", level: str = "info") -> None:
    json = fmt == "json"
    renderer: Any = (structlog.processors.JSONRenderer() if json
                     else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty(),
                                                        exception_formatter=_plain_traceback))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            *([structlog.processors.format_exc_info] if json else []),  # no locals either
            _scrub_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level.upper(), logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,
    )
