"""A point in the source's past for ``cdc query --as-of`` / ``--as-of-lsn``.

Right after the commit at an LSN (exact: (``_commit_lsn``) orders every commit) or at a
time (commit times can tie and follow the source's clock). A history version is valid at
the point when it was created at or before it and not yet superseded then.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from cdc.errors import ConfigError
from cdc.events import Lsn, parse_lsn


@dataclass(frozen=True)
class AsOf:
    """Right after the source commit at ``lsn``, or at ``time`` (one of the two)."""

    lsn: Lsn | None = None
    time: dt.datetime | None = None

    def versions(self) -> str:
        """SQL condition on a history table: the versions valid at this point."""
        if self.lsn is not None:
            at = str(int(self.lsn))
            return f"_valid_from_lsn <= {at} AND (_valid_to_lsn IS NULL OR {at} < _valid_to_lsn)"
        at = self._time()
        return f"_valid_from <= {at} AND (_valid_to IS NULL OR {at} < _valid_to)"

    def appended(self) -> str:
        """SQL condition on an append-only (keyless) staged table: rows committed by then."""
        if self.lsn is not None:
            return f"_commit_lsn <= {int(self.lsn)}"
        return f"_commit_ts <= {self._time()}"

    def _time(self) -> str:
        assert self.time is not None
        at = self.time if self.time.tzinfo else self.time.replace(tzinfo=dt.UTC)
        return f"TIMESTAMPTZ '{at.astimezone(dt.UTC).isoformat()}'"  # a datetime's own text


def parse_as_of(time: str | None, lsn: str | None) -> AsOf | None:
    """``--as-of`` (ISO 8601, UTC unless it names a zone) / ``--as-of-lsn`` (``0/1A2B3C``)."""
    if time is not None and lsn is not None:
        raise ConfigError("--as-of and --as-of-lsn were both given", fix="pass only one of them")
    if lsn is not None:
        try:
            return AsOf(lsn=parse_lsn(lsn))
        except ValueError as exc:
            raise ConfigError(f"--as-of-lsn {lsn!r} is not an LSN",
                              fix="write it as PostgreSQL does, e.g. 0/1A2B3C") from exc
    if time is not None:
        try:
            return AsOf(time=dt.datetime.fromisoformat(time))
        except ValueError as exc:
            raise ConfigError(f"--as-of {time!r} is not a time",
                              fix="write it in ISO 8601, e.g. 2026-11-30T12:00:00Z") from exc
    return None
