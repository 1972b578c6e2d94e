"""Which process owns something, and whether it is provably gone.

A record of the owner (host, boot, pid namespace, pid and the pid's start time) lets another
process on the same machine tell that the owner died (kill -9 leaves no release behind)
without waiting for a term to expire. Only there: on another host, another boot or in
another pid namespace a pid means nothing, so such an owner is never taken for gone.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path


def this_process() -> dict[str, str]:
    """This process's owner record."""
    return {"host": socket.gethostname(), "boot": _boot_id(), "namespace": _namespace(),
            "pid": str(os.getpid()), "start": process_start(os.getpid()) or ""}


def gone(owner: Mapping[str, object] | None) -> bool:
    """The owner process is provably gone: same host, boot and pid namespace as this one,
    and its pid no longer runs or runs a later process (started at another time)."""
    if not owner:
        return False
    here = this_process()
    if "boot" in owner and not here["boot"]:  # no boot id to compare by: never guessed
        return False
    same = ("host", "namespace", "boot") if "boot" in owner else ("host", "namespace")
    if any(str(owner.get(k, "")) != here[k] for k in same):  # (records from before boot ids)
        return False
    try:
        pid = int(str(owner["pid"]))
    except (KeyError, ValueError):
        return False
    start = process_start(pid)
    return start is None or (start != "" and start != str(owner.get("start", "")))


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot: tells a reused pid apart), ""
    where /proc does not tell, None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]  # field 22, starttime
    except FileNotFoundError:
        return None if Path("/proc/self/stat").exists() else _signalable(pid)
    except (OSError, IndexError):
        return _signalable(pid)


def _signalable(pid: int) -> str | None:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return ""
    return ""


def _namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")  # pids mean something only inside it
    except OSError:
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
