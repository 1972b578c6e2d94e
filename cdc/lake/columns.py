"""Source column names in the lake: exact, except those that look like cdc's own columns.

Raw rows carry metadata columns (``_op``, ``_lsn``, ``_commit_lsn``, ``_seq``, ``_xid``,
``_commit_ts``, ``_unchanged``), raw is partitioned by ``load_date``, rejected rows carry
``_reason`` and compaction uses ``__cdc_*`` helper columns. A source column whose name is one
of those, with any number of extra leading underscores, lands with one more leading
underscore: ``_op`` → ``__op``, ``__op`` → ``___op``, ``load_date`` → ``_load_date``. Every
other name lands unchanged. The mapping is injective and :func:`source_column` reverses it;
the field metadata also records the source name (``pg_name``).
"""

from __future__ import annotations

_CORES = frozenset({"op", "lsn", "commit_lsn", "seq", "xid", "commit_ts", "unchanged",
                    "reason"})


def _reserved_family(name: str) -> bool:
    core = name.lstrip("_")
    leading = len(name) - len(core)
    return ((core in _CORES and leading >= 1) or core == "load_date"
            or (core.startswith("cdc_") and leading >= 2))


def lake_column(name: str) -> str:
    """The lake's name for source column ``name``."""
    return f"_{name}" if _reserved_family(name) else name


def source_column(name: str) -> str:
    """The source name of lake column ``name`` (the inverse of :func:`lake_column`)."""
    if _reserved_family(name) and _reserved_family(name[1:]) and name.startswith("_"):
        return name[1:]
    return name
