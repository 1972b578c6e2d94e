"""What a history table holds for the keys a chunk of changes touches (reads only)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable


def current_versions(dt: DeltaTable, changes: pa.Table, key: tuple[str, ...],
                     toasted: list[str]) -> pa.Table:
    """Key, ``_valid_from_lsn`` and TOAST-able columns of the current versions the
    changes may close (the filter's key ranges let files outside them be skipped)."""
    dataset = dt.to_pyarrow_dataset()
    wanted = [*key, "_valid_from_lsn",
              *(c for c in toasted if c in dataset.schema.names and c not in key)]
    where = pc.field("_is_current")
    if not pc.any(pc.equal(changes["_op"], "t")).as_py():
        where = where & _of_keys(changes, key)
    return dataset.to_table(columns=wanted, filter=where)


def ended_versions(dt: DeltaTable, changes: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """Key and ``_valid_to_lsn`` of the changed keys' closed versions that end at or
    after the changes' first commit LSN: none unless a rerun redoes a chunk whose file
    groups were partly committed (``versions.plan_versions`` skips by them; files whose
    statistics end earlier are not read)."""
    first = pc.min(changes["_commit_lsn"])
    where = (~pc.field("_is_current") & (pc.field("_valid_to_lsn") >= first)
             & _of_keys(changes, key))
    return dt.to_pyarrow_dataset().to_table(columns=[*key, "_valid_to_lsn"], filter=where)


def _of_keys(changes: pa.Table, key: tuple[str, ...]) -> pc.Expression:
    """A filter for the rows of the keys ``changes`` touch (truncates aside): each key
    column's range (files outside it are skipped by their statistics) and values."""
    keyed = changes.filter(pc.invert(pc.equal(changes["_op"], "t")))
    where = pc.scalar(True)
    for k in key:
        values = pc.unique(keyed[k])
        bounds = pc.min_max(values)
        where = where & ((pc.field(k) >= bounds["min"]) & (pc.field(k) <= bounds["max"])
                         & pc.field(k).isin(values))
    return where
