"""Pure event helpers: how an Update becomes raw rows."""

from __future__ import annotations

from cdc.events import UNCHANGED, Column, Relation, Update, update_rows, with_key

RELATION = Relation(1, "public", "t", "d", (Column("id", 23, -1, True), Column("v", 25, -1, False),
                                            Column("body", 25, -1, False)))


class TestUpdateRows:
    def test_update_without_old_tuple_is_one_update_row(self) -> None:
        """The common case: one 'u' row with the new values."""
        assert update_rows(RELATION, Update(1, ("1", "a", "b"))) == [("u", ("1", "a", "b"))]

    def test_old_key_tuple_means_the_key_changed(self) -> None:
        """'K': a delete of the old key precedes the update."""
        update = Update(1, ("2", "a", UNCHANGED), ("1", None, None), old_is_key=True)
        assert update_rows(RELATION, update) == [("d", ("1", None, None)),
                                                 ("u", ("2", "a", UNCHANGED))]

    def test_full_old_tuple_fills_unchanged_toast_values(self) -> None:
        """'O' (REPLICA IDENTITY FULL): the old row supplies values not sent again."""
        update = Update(1, ("1", "new", UNCHANGED), ("1", "old", "big"), old_is_key=False)
        assert update_rows(RELATION, update) == [("u", ("1", "new", "big"))]

    def test_full_old_tuple_with_another_key_deletes_the_old_key(self) -> None:
        """'O' with a different key value: delete, then update."""
        update = Update(1, ("5", "a", "b"), ("1", "a", "b"), old_is_key=False)
        assert update_rows(RELATION, update) == [("d", ("1", "a", "b")), ("u", ("5", "a", "b"))]

    def test_with_key_flags_exactly_the_named_columns(self) -> None:
        """Under FULL every column arrives flagged; the primary key replaces the flags."""
        all_flagged = with_key(RELATION, ["id", "v", "body"])
        assert with_key(all_flagged, ["id"]).key_columns == ("id",)
