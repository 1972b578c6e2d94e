"""Named fault points: places where tests crash, fail or stall the pipeline on purpose.

A stage calls ``faults.hit("raw.after_write", table=...)`` at each step whose failure
matters (before/after a raw file is durable, a checkpoint save, a status update, a
snapshot chunk, a Delta commit). Nothing is armed in production, so a hit is one dict
truth test. Tests arm a point in-process with :func:`armed`, or in a child process with
the ``CDC_FAULTS`` environment variable::

    CDC_FAULTS="raw.after_write=kill@3,checkpoint.before_save=raise"

``kill`` ends the process with SIGKILL (what kill -9 does), ``raise`` raises
:class:`InjectedFault`, ``sleep:<seconds>`` stalls; ``@N`` fires on the N-th hit only
(default: every hit).
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

#: every point a stage may hit; arming an unknown name is an error (typos fail loudly)
POINTS = frozenset({
    "raw.before_write", "raw.after_write",
    "checkpoint.before_save", "checkpoint.after_save",
    "status.before_send", "status.after_send",
    "snapshot.after_chunk", "resync.after_chunk",
    "staged.before_commit", "staged.after_commit", "staged.after_maintenance",
    "history.before_commit", "history.after_commit",
    "maintain.after_write",
})

Action = Callable[[str, dict[str, Any]], None]


class InjectedFault(RuntimeError):  # not an error of the product
    """Raised by a point armed with ``raise``."""


_armed: dict[str, Action] = {}


def hit(point: str, **context: Any) -> None:
    """Run the action armed at ``point``, if any (free when nothing is armed)."""
    if _armed:
        action = _armed.get(point)
        if action is not None:
            action(point, context)


@contextmanager
def armed(point: str, action: Action) -> Iterator[None]:
    """Arm ``point`` with ``action`` for the duration of the block (tests)."""
    _check(point)
    previous = _armed.get(point)
    _armed[point] = action
    try:
        yield
    finally:
        if previous is None:
            _armed.pop(point, None)
        else:
            _armed[point] = previous


def _check(point: str) -> None:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; known: {', '.join(sorted(POINTS))}")


def _kill(point: str, context: dict[str, Any]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _raise(point: str, context: dict[str, Any]) -> None:
    raise InjectedFault(f"fault injected at {point} {context}")


def _nth(action: Action, n: int) -> Action:
    count = 0

    def fire(point: str, context: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        if count == n:
            action(point, context)

    return fire


def _sleep(seconds: float) -> Action:
    def stall(point: str, context: dict[str, Any]) -> None:
        time.sleep(seconds)

    return stall


def parse(spec: str) -> dict[str, Action]:
    """``point=action[@n],...`` → armed actions (the ``CDC_FAULTS`` format)."""
    result: dict[str, Action] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        point, _, what = item.partition("=")
        _check(point)
        what, _, nth = what.partition("@")
        action: Action
        if what == "kill":
            action = _kill
        elif what == "raise":
            action = _raise
        elif what.startswith("sleep:"):
            action = _sleep(float(what.removeprefix("sleep:")))
        else:
            raise ValueError(f"unknown fault action {what!r} (kill, raise, sleep:<seconds>)")
        result[point] = _nth(action, int(nth)) if nth else action
    return result


_armed.update(parse(os.environ.get("CDC_FAULTS", "")))
