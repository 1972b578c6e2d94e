"""Named fault points: armed only on request, fire where and when they are told to."""

from __future__ import annotations

import pytest

from cdc import faults


class TestFaultPoints:
    def test_an_unarmed_point_does_nothing(self) -> None:
        """A hit on an unarmed point returns without effect."""
        faults.hit("raw.after_write", table="public.t")

    def test_an_armed_point_runs_its_action_with_the_context(self) -> None:
        """The armed action sees the point's name and its context."""
        seen: list[tuple[str, dict[str, object]]] = []
        with faults.armed("checkpoint.before_save", lambda p, c: seen.append((p, c))):
            faults.hit("checkpoint.before_save", lsn=42)
        faults.hit("checkpoint.before_save", lsn=43)
        assert seen == [("checkpoint.before_save", {"lsn": 42})]

    def test_an_unknown_point_is_refused(self) -> None:
        """A typo in a point's name fails loudly instead of never firing."""
        with pytest.raises(ValueError, match="unknown fault point"):
            faults.parse("raw.after_wrte=raise")

    def test_the_env_format_fires_on_the_nth_hit_only(self) -> None:
        """``raise@2`` raises on the second hit, not the first or third."""
        action = faults.parse("raw.before_write=raise@2")["raw.before_write"]
        with faults.armed("raw.before_write", action):
            faults.hit("raw.before_write")
            with pytest.raises(faults.InjectedFault):
                faults.hit("raw.before_write")
            faults.hit("raw.before_write")
