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


class ExportRuns:
    """Progress of ``cdc snapshot --mode updated_at`` runs (``_cdc/watermarks/runs.json``).

    A run's rows are ordered by its LSN (``_commit_lsn``): ``started`` is the newest run's,
    ``done`` the newest finished one's. Compaction of a lake without a stream checkpoint
    applies rows up to ``done``; a new run orders after every started one, so a run that
    crashed is never given the same position as the next.
    """

    KEY = "_cdc/watermarks/runs.json"

    def __init__(self, lake: Lake) -> None:
        self.lake = lake

    def load(self) -> tuple[Lsn | None, Lsn | None]:
        """(started, done) LSNs; None where there is none yet."""
        data = self.lake.read_bytes(self.KEY)
        if data is None:
            return None, None
        try:
            doc = json.loads(data)
            started, done = doc.get("started"), doc.get("done")
            return (None if started is None else int(started),
                    None if done is None else int(done))
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{self.KEY} in {self.lake.uri} is unreadable: {exc}",
                                  fix="restore it from a backup, or delete it: the next "
                                  "updated_at run then orders by the WAL position") from exc

    def start(self, current: Lsn) -> Lsn:
        """The position of a new run: the server's, but after every run started before."""
        started, done = self.load()
        lsn = max(current, (started or 0) + 1)
        self._save(lsn, done)
        return lsn

    def finish(self, lsn: Lsn) -> None:
        self._save(lsn, lsn)

    def _save(self, started: Lsn, done: Lsn | None) -> None:
        self.lake.write_bytes(self.KEY, json.dumps({"started": started, "done": done,
                                                    "written_at": datetime.now(UTC).isoformat()
                                                    }).encode())


class ResyncHold:
    """While ``cdc resync`` re-reads a table, compaction of it stops below ``hold``
    (``_cdc/resync/<table>.json``): the resync's rows land at positions the stream's
    checkpoint may already have passed, and a watermark past them would skip them.
    """

    def __init__(self, lake: Lake, table: str) -> None:
        self.lake = lake
        self.key = f"_cdc/resync/{table}.json"

    def load(self) -> Lsn | None:
        """The position compaction must stay below, or None when no resync runs."""
        data = self.lake.read_bytes(self.key)
        if data is None:
            return None
        try:
            doc = json.loads(data)
            return None if doc.get("hold") is None else int(doc["hold"])
        except (ValueError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{self.key} in {self.lake.uri} is unreadable: {exc}",
                                  fix="run cdc resync for the table again") from exc

    def hold(self, lsn: Lsn) -> None:
        self._save(lsn)

    def hold_at_most(self, lsn: Lsn) -> None:
        """Hold below ``lsn`` unless already held lower."""
        current = self.load()
        if current is None or lsn < current:
            self._save(lsn)

    def release(self) -> None:
        self._save(None)

    def _save(self, lsn: Lsn | None) -> None:
        doc = {"hold": lsn, "written_at": datetime.now(UTC).isoformat()}
        self.lake.write_bytes(self.key, json.dumps(doc).encode())
