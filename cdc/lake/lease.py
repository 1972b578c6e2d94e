"""Leases: one writer per staged (or history) table at a time, across processes and hosts.

A lease is a sequence of small JSON records ``_cdc/leases/<name>/<token>.json``; the holder
is whoever wrote the highest token. Taking a lease writes token ``n + 1`` with put-if-absent
(local: a hard link, which fails when the file exists; S3: a conditional PUT
``If-None-Match: *``), so of two takers exactly one wins. That is allowed only while record
``n`` is released or expired (``expires_at``, wall-clock seconds; hosts' clocks must agree
to well within the lease's ``ttl``), or its holder provably died: the record names the
holder process (``cdc.owner``), and a taker on the same machine (same boot and pid
namespace) whose holder's pid is gone or reused takes it at once (kill -9), not a term
later. The holder renews its record every ``ttl / 3`` from a background thread and
releases it when done.

Fencing: a writer calls :meth:`Lease.fence` right before its commit. It fails (``LeaseLost``)
when the last successful renewal is older than ``ttl - margin`` (the process may have been
paused, so others may consider the lease expired) or when a higher token exists (someone
took over). What remains is a pause between ``fence`` and the commit request itself that
outlasts ``margin``; the commit's own guard (the watermark recorded in the Delta table,
re-read on the same open table) narrows that further.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import structlog

from cdc.errors import LakeError, LeaseLost
from cdc.lake.store import Lake
from cdc.owner import gone, this_process

log = structlog.get_logger("cdc.lake.lease")

PREFIX = "_cdc/leases/"
#: the fix of a commit refused because another writer moved the table meanwhile
RIVAL_FIX = ("nothing to repair: run cdc compact again (compactors take a lease per table; "
             "this means one lost it while paused)")
DEFAULT_TTL = 60.0


@dataclass(frozen=True)
class LeaseRecord:
    """One token of a lease as stored."""

    token: int
    holder: str
    purpose: str
    expires_at: float  # unix seconds; 0 once released
    owner: dict[str, str] | None = None  # the holder process (``cdc.owner``)

    @property
    def released(self) -> bool:
        return self.expires_at == 0

    def live(self, now: float) -> bool:
        """Unexpired, and its holder not provably gone (killed on this machine)."""
        return self.expires_at > now and not gone(self.owner)

    def describe(self) -> str:
        left = max(self.expires_at - time.time(), 0)
        return f"{self.purpose} ({self.holder}, token {self.token}, expires in {left:.0f} s)"

    def to_json(self) -> bytes:
        return json.dumps({"token": self.token, "holder": self.holder, "purpose": self.purpose,
                           "expires_at": self.expires_at, "owner": self.owner}).encode()

    @classmethod
    def from_json(cls, data: bytes) -> LeaseRecord:
        doc = json.loads(data)
        owner = doc.get("owner")
        return cls(int(doc["token"]), str(doc["holder"]), str(doc.get("purpose", "")),
                   float(doc["expires_at"]),
                   {str(k): str(v) for k, v in owner.items()} if isinstance(owner, dict) else None)


def lease_key(name: str, token: int) -> str:
    return f"{PREFIX}{name}/{token:012d}.json"


def holder_id() -> str:
    """This process, as other processes see it in a lease record."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class Lease:
    """A held lease; renewed in the background until released."""

    def __init__(self, lake: Lake, name: str, record: LeaseRecord, ttl: float) -> None:
        self.lake, self.name, self.record, self.ttl = lake, name, record, ttl
        self.margin = ttl / 4
        self.renewed = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, daemon=True,
                                        name=f"lease {name}")
        self._thread.start()

    @property
    def token(self) -> int:
        return self.record.token

    def renew(self) -> None:
        """Push the expiry out by ``ttl`` (unless the lease was lost meanwhile)."""
        started = time.monotonic()
        if self._newer() is not None:
            return  # lost: fence() says so; never re-create a record others replaced
        self.record = LeaseRecord(self.token, self.record.holder, self.record.purpose,
                                  time.time() + self.ttl, self.record.owner)
        self.lake.write_bytes(lease_key(self.name, self.token), self.record.to_json())
        self.renewed = started

    def fence(self) -> None:
        """Raise LeaseLost unless this process still holds the lease and may commit now."""
        age = time.monotonic() - self.renewed
        if age > self.ttl - self.margin:
            raise LeaseLost(f"lease {self.name} (token {self.token}) was last renewed {age:.0f} s "
                            f"ago, beyond its {self.ttl:.0f} s term less a {self.margin:.0f} s "
                            "margin: another writer may hold it now, so nothing was committed",
                            fix="nothing to repair; the next run continues (if this repeats, "
                            "the process is being paused or the lake is slow: raise the lease "
                            "term)")
        newer = self._newer()
        if newer is not None:
            raise LeaseLost(f"lease {self.name} (token {self.token}) was taken over by "
                            f"{newer.describe()}, so nothing was committed",
                            fix="nothing to repair: the other writer continues")

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        if self._newer() is None:
            released = LeaseRecord(self.token, self.record.holder, self.record.purpose, 0,
                                   self.record.owner)
            self.lake.write_bytes(lease_key(self.name, self.token), released.to_json())

    def _newer(self) -> LeaseRecord | None:
        top = _top(self.lake, self.name)
        return top if top is not None and top.token > self.token else None

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LakeError as exc:  # fence() refuses once renewals stop succeeding
                log.warning("lease_renewal_failed", lease=self.name, error=str(exc))


def _tokens(lake: Lake, name: str) -> list[int]:
    prefix = f"{PREFIX}{name}/"
    tokens = []
    for key in lake.list(prefix):
        stem = key[len(prefix):].removesuffix(".json")
        if stem.isdigit():
            tokens.append(int(stem))
    return sorted(tokens)


def _top(lake: Lake, name: str) -> LeaseRecord | None:
    tokens = _tokens(lake, name)
    if not tokens:
        return None
    data = lake.read_bytes(lease_key(name, tokens[-1]))
    if data is None:  # deleted as stale just now: someone newer exists
        return _top(lake, name)
    return LeaseRecord.from_json(data)


def current(lake: Lake, name: str) -> LeaseRecord | None:
    """The lease's live record, or None when nobody holds it."""
    top = _top(lake, name)
    return top if top is not None and top.live(time.time()) else None


def try_acquire(lake: Lake, name: str, purpose: str, *,
                ttl: float = DEFAULT_TTL) -> Lease | LeaseRecord:
    """The lease, or the live record of whoever holds it."""
    top = _top(lake, name)
    if top is not None and top.live(time.time()):
        return top
    token = (top.token if top is not None else 0) + 1
    record = LeaseRecord(token, holder_id(), purpose, time.time() + ttl, this_process())
    if not lake.write_if_absent(lease_key(name, token), record.to_json()):
        rival = _top(lake, name)
        return rival if rival is not None else record  # deleted already: treat as held
    for old in _tokens(lake, name):
        if old < token:
            lake.delete(lease_key(name, old))
    return Lease(lake, name, record, ttl)


def acquire(lake: Lake, name: str, purpose: str, *, ttl: float = DEFAULT_TTL,
            wait: bool = True, poll: float = 0.5) -> Lease | LeaseRecord:
    """The lease; waiting while another holder has it (``wait``), else its record."""
    said = False
    while True:
        got = try_acquire(lake, name, purpose, ttl=ttl)
        if isinstance(got, Lease) or not wait:
            return got
        if not said:
            log.info("lease_waiting", lease=name, held_by=got.describe())
            said = True
        time.sleep(min(poll, max(got.expires_at - time.time(), 0.01)))
