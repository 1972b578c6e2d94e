"""The staged table's side of key moves and column DDL in a chunk (issue 12).

- ``resolve_moves``: a transaction that moves keys (swaps, rotations, moves through a freed
  key) is replayed to its net change per key (``staged/moves.py``), before the last change
  per key is taken; a moved row's unchanged TOAST values come from its old key's staged row
  (read as a merge reads them, ``staged/target.py``).
- ``evolve``: a RENAME COLUMN or ADD COLUMN ... DEFAULT rewrites the staged table once
  (``staged/evolve.py``), before the chunk's commit; the watermark stays, so a crash after
  it changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

from cdc.staged.evolve import evolved, evolves
from cdc.staged.merge import KEEP
from cdc.staged.moves import COLUMNS, fill_borrowed, plan_moves
from cdc.staged.target import staged_rows


def resolve_moves(dt: DeltaTable | None, rows: pa.Table, key: tuple[str, ...]) -> pa.Table:
    """``rows`` with key moves resolved to their net change per key; ``dt`` None when the
    staged table is empty for them (none yet, or a truncate in the chunk)."""
    moves = plan_moves(rows, key)
    staged = None
    if moves.borrow is not None and dt is not None:
        names = sorted({n for ns in moves.borrow[COLUMNS].to_pylist() for n in ns})
        staged = staged_rows(dt.to_pyarrow_dataset(), moves.borrow, key,
                             [KEEP + n for n in names])
    return fill_borrowed(moves.rows, moves.borrow, key, staged)


def evolve(dt: DeltaTable, newest: pa.Schema, uri: str, storage: dict[str, str] | None,  # noqa: PLR0917
           file_bytes: int, guard: Callable[[], None]) -> DeltaTable:
    """``dt``, rewritten once when ``newest`` renames or adds a column with a default;
    ``guard`` right before the commit (the compactor's lease and watermark check)."""
    if not evolves(pa.schema(dt.schema().to_arrow()), newest):
        return dt
    rewritten = evolved(dt.to_pyarrow_table(), newest)
    guard()
    write_deltalake(uri, rewritten, mode="overwrite", schema_mode="overwrite",
                    storage_options=storage, target_file_size=file_bytes)
    return DeltaTable(uri, storage_options=storage)
