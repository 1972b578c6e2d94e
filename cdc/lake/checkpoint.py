"""Durable stream progress: the LSN up to which everything is in raw.

One small JSON document per slot under ``<lake>/_cdc/checkpoints/``. It is
written before the LSN is acknowledged to the slot, and it never moves
backwards: a save below the stored position keeps the stored position.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime

from cdc import faults
from cdc.errors import CheckpointError
from cdc.events import Lsn, format_lsn
from cdc.lake.store import Lake


class CheckpointStore:
    def __init__(self, lake: Lake, slot: str) -> None:
        self.lake = lake
        self.key = f"_cdc/checkpoints/{slot}.json"
        self._lsn: Lsn | None = None
        self._loaded = False

    def load(self) -> Lsn | None:
        """The stored LSN, or None before the first checkpoint."""
        if not self._loaded:
            data = self.lake.read_bytes(self.key)
            if data is not None:
                try:
                    self._lsn = int(json.loads(data)["lsn"])
                except (ValueError, KeyError, TypeError) as exc:
                    raise CheckpointError(
                        f"checkpoint {self.key} in {self.lake.uri} is unreadable: {exc}",
                        fix="restore it from a backup, or delete it together with the slot "
                        "to start over",
                    ) from exc
            self._loaded = True
        return self._lsn

    def save(self, lsn: Lsn) -> Lsn:
        """Record ``lsn`` durably unless the stored position is already at or past it."""
        current = self.load()
        if current is not None and lsn <= current:
            return current
        doc = {"lsn": lsn, "lsn_text": format_lsn(lsn),
               "written_at": datetime.now(UTC).isoformat()}
        faults.hit("checkpoint.before_save", lsn=lsn)
        self.lake.write_bytes(self.key, json.dumps(doc).encode())
        faults.hit("checkpoint.after_save", lsn=lsn)
        self._lsn = lsn
        faults.hit("checkpoint.after_save", lsn=lsn)
        return lsn
