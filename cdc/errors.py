"""The one exception tree of cdc.

Every error says what happened and how to fix it: ``str(err)`` is a single
line an operator can act on. Driver and SDK errors are translated into these
in one place each (``replication.translate``, the lake backends) with
``raise ... from``. ``exit_code`` is what ``cdc`` exits with.
"""

from __future__ import annotations


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none): one line for
    messages and logs."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class CdcError(Exception):
    """Base of every error cdc raises on purpose."""

    exit_code = 1
    #: transient errors are retried by the stream loop (with backoff); others stop it
    transient = False

    def __init__(self, message: str, *, fix: str = "") -> None:
        self.message = message
        self.fix = fix
        super().__init__(message)

    def __str__(self) -> str:
        return f"{self.message}; {self.fix}" if self.fix else self.message


class ConfigError(CdcError):
    """Invalid configuration: a flag, env var or config-file key."""

    exit_code = 2


class SetupError(CdcError):
    """The environment is missing something cdc needs (binaries, users)."""

    exit_code = 3


class SourceError(CdcError):
    """The PostgreSQL source is misconfigured or refused us."""

    exit_code = 4


class ConnectionLost(SourceError):
    """The server went away or could not be reached; worth retrying."""

    transient = True


class BinaryRefused(ConnectionLost):
    """A binary session met a column cdc cannot decode in binary: reconnect in text."""


class SlotError(SourceError):
    """The replication slot is missing, in use, of the wrong kind, or ahead of us."""


def new_generation_fix(slot: str) -> str:
    """The way back from a slot that lost changes the lake needs, as commands to run.

    ``tests/test_gaps.py`` runs them word for word (plus the connection options).
    """
    return (f"cdc slot drop --slot {slot}, then cdc snapshot --slot {slot} (a new snapshot "
            "generation: every staged table is rebuilt as of its start), then cdc stream")


class SlotBusy(SlotError):
    """Another connection holds the slot; after a reconnect, often our own dropped one."""

    transient = True


class PublicationError(SourceError):
    """The publication is missing, empty, or names tables that do not exist."""


class DecodeError(CdcError):
    """A replication message we could not decode; nothing past it is acknowledged."""

    exit_code = 5


class ConversionError(CdcError):
    """A value we could not convert to its column's type; nothing past it is acknowledged."""

    exit_code = 5


class LakeError(CdcError):
    """The lake cannot be read or written."""

    exit_code = 6


class CheckpointError(LakeError):
    """A checkpoint is unreadable or would move backwards."""


class RawFileUnreadable(LakeError):
    """A raw parquet file is listed but cannot be read (permissions, a truncated upload)."""

    def __init__(self, key: str, cause: BaseException) -> None:
        super().__init__(f"raw file {key} is unreadable: {_first_line(cause)}",
                         fix="check the lake's permissions, or move the broken file out of raw/")


class StagedTableUnreadable(LakeError):
    """A staged Delta table cannot be opened or its log read."""

    def __init__(self, uri: str, cause: BaseException) -> None:
        super().__init__(f"staged table {uri} is unreadable: {_first_line(cause)}",
                         fix="check the lake's permissions; if the table is damaged, delete "
                         "its folder and run cdc compact, which rebuilds it from raw")


class HistoryTableUnreadable(LakeError):
    """A history (SCD2) Delta table cannot be opened or its log read."""

    def __init__(self, uri: str, cause: BaseException) -> None:
        super().__init__(f"history table {uri} is unreadable: {_first_line(cause)}",
                         fix="check the lake's permissions; if the table is damaged, delete "
                         "its folder and run cdc compact, which rebuilds it from raw")


def _first_line(cause: BaseException) -> str:
    return (str(cause).splitlines() or [type(cause).__name__])[0]


class CompactionError(LakeError):
    """Raw changes cannot be merged into a staged Delta table (types, keys, a rival compactor)."""


class ContractError(CdcError):
    """A table breaks its schema contract under policy ``fail``; nothing past it is acknowledged."""

    exit_code = 7


class LeaseLost(LakeError):
    """A writer's lease expired or was taken over before it committed; it committed nothing."""


class ResyncBusy(LakeError):
    """Another resync (or a stream's backfill) of the same table runs: one at a time, since
    the first to finish would release the compaction hold the other still needs."""
