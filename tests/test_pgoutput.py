"""Unit tests for cdc.decoding.pgoutput: pgoutput protocol v1 (text format) bytes → events.

Messages are built by hand below, following "Logical Replication Message
Formats" in the PostgreSQL documentation: big-endian integers, NUL-terminated
strings, timestamps in microseconds since 2000-01-01 UTC.
"""

from __future__ import annotations

import contextlib
import struct
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cdc.decoding.pgoutput import PG_EPOCH_OFFSET_US, decode
from cdc.errors import DecodeError
from cdc.events import (
    UNCHANGED,
    Begin,
    Column,
    Commit,
    Delete,
    Insert,
    Message,
    Origin,
    Relation,
    Truncate,
    TypeInfo,
    Update,
    Value,
    format_lsn,
    parse_lsn,
)

# --------------------------------------------------------------------------- builders

PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
UNIX_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
US = timedelta(microseconds=1)

#: 2024-01-02T03:04:05.123456Z in both epochs
SAMPLE_TIME = datetime(2024, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
SAMPLE_PG_US = 757_479_845_123_456
SAMPLE_UNIX_US = 1_704_164_645_123_456


def pg_us(moment: datetime) -> int:
    """Microseconds since the PostgreSQL epoch, as the server sends timestamps."""
    return (moment - PG_EPOCH) // US


def unix_us(moment: datetime) -> int:
    """Microseconds since the Unix epoch, as the decoder reports timestamps."""
    return (moment - UNIX_EPOCH) // US


def cstr(text: str) -> bytes:
    """A NUL-terminated UTF-8 string."""
    return text.encode("utf-8") + b"\x00"


def column_value(value: Value) -> bytes:
    """One TupleData column: 't' text, 'n' null or 'u' unchanged TOAST."""
    if value is None:
        return b"n"
    if value is UNCHANGED:
        return b"u"
    assert isinstance(value, str)
    data = value.encode("utf-8")
    return b"t" + struct.pack("!i", len(data)) + data


def tuple_data(*values: Value) -> bytes:
    """TupleData: Int16 column count, then one column value per column."""
    return struct.pack("!h", len(values)) + b"".join(column_value(v) for v in values)


def begin_msg(final_lsn: int, ts_pg_us: int, xid: int) -> bytes:
    return b"B" + struct.pack("!QqI", final_lsn, ts_pg_us, xid)


def commit_msg(commit_lsn: int, end_lsn: int, ts_pg_us: int, flags: int = 0) -> bytes:
    return b"C" + struct.pack("!BQQq", flags, commit_lsn, end_lsn, ts_pg_us)


def origin_msg(commit_lsn: int, name: str) -> bytes:
    return b"O" + struct.pack("!Q", commit_lsn) + cstr(name)


def relation_msg(
    oid: int,
    schema: str,
    name: str,
    replica_identity: str,
    columns: list[tuple[int, str, int, int]],
) -> bytes:
    """Relation; each column is (flags, name, type oid, type modifier)."""
    body = struct.pack("!I", oid) + cstr(schema) + cstr(name)
    body += replica_identity.encode("ascii") + struct.pack("!h", len(columns))
    for flags, col_name, type_oid, typmod in columns:
        body += struct.pack("!B", flags) + cstr(col_name) + struct.pack("!Ii", type_oid, typmod)
    return b"R" + body


def type_msg(oid: int, schema: str, name: str) -> bytes:
    return b"Y" + struct.pack("!I", oid) + cstr(schema) + cstr(name)


def insert_msg(oid: int, new: bytes) -> bytes:
    return b"I" + struct.pack("!I", oid) + b"N" + new


def update_msg(oid: int, new: bytes, *, old: bytes | None = None, old_kind: bytes = b"") -> bytes:
    """Update; ``old_kind`` is b'K' (old key) or b'O' (old tuple) when ``old`` is given."""
    head = b"U" + struct.pack("!I", oid)
    if old is not None:
        head += old_kind + old
    return head + b"N" + new


def delete_msg(oid: int, old_kind: bytes, old: bytes) -> bytes:
    return b"D" + struct.pack("!I", oid) + old_kind + old


def truncate_msg(oids: list[int], options: int = 0) -> bytes:
    return b"T" + struct.pack("!iB", len(oids), options) + struct.pack(f"!{len(oids)}I", *oids)


def message_msg(transactional: bool, lsn: int, prefix: str, content: bytes) -> bytes:
    return (
        b"M"
        + struct.pack("!BQ", int(transactional), lsn)
        + cstr(prefix)
        + struct.pack("!i", len(content))
        + content
    )


# --------------------------------------------------------------------------- strategies

#: column text: any Unicode except surrogates (which UTF-8 cannot carry)
texts = st.text(alphabet=st.characters(exclude_categories=("Cs",)))
values = st.one_of(texts, st.none(), st.just(UNCHANGED))
#: identifiers: NUL-terminated on the wire, so no NUL
names = st.text(alphabet=st.characters(exclude_categories=("Cs",), exclude_characters="\x00"))
rows = st.lists(values, max_size=40).map(tuple)
oids = st.integers(min_value=0, max_value=2**32 - 1)
lsns = st.integers(min_value=0, max_value=2**64 - 1)


# --------------------------------------------------------------------------- tests


class TestBuilders:
    def test_sample_timestamp_constants_agree_with_datetime_arithmetic(self) -> None:
        """The hard-coded sample timestamps are the same instant in both epochs."""
        assert pg_us(SAMPLE_TIME) == SAMPLE_PG_US
        assert unix_us(SAMPLE_TIME) == SAMPLE_UNIX_US
        assert SAMPLE_UNIX_US - SAMPLE_PG_US == PG_EPOCH_OFFSET_US

    def test_tuple_data_builder_matches_the_documented_layout(self) -> None:
        """The tuple builder writes Int16 count, then 't'+Int32 length+bytes, 'n' and 'u'."""
        assert tuple_data("ab", None, UNCHANGED) == b"\x00\x03t\x00\x00\x00\x02abnu"


class TestBegin:
    def test_begin_carries_final_lsn_xid_and_unix_commit_time(self) -> None:
        """Begin decodes its final LSN, xid and converts the commit time to the Unix epoch."""
        event = decode(begin_msg(0x16B3748, SAMPLE_PG_US, 735))
        assert event == Begin(final_lsn=0x16B3748, commit_ts=SAMPLE_UNIX_US, xid=735)

    def test_begin_accepts_the_largest_lsn_and_xid(self) -> None:
        """Unsigned 64-bit LSNs and 32-bit xids at their maxima decode without sign errors."""
        event = decode(begin_msg(2**64 - 1, 0, 2**32 - 1))
        assert event == Begin(final_lsn=2**64 - 1, commit_ts=PG_EPOCH_OFFSET_US, xid=2**32 - 1)

    def test_begin_before_the_postgres_epoch_gives_a_smaller_unix_time(self) -> None:
        """A negative PostgreSQL timestamp (before 2000) is a valid earlier instant."""
        moment = datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
        event = decode(begin_msg(1, pg_us(moment), 1))
        assert isinstance(event, Begin)
        assert event.commit_ts == unix_us(moment) == PG_EPOCH_OFFSET_US - 1

    def test_begin_at_the_postgres_epoch_is_the_offset_constant(self) -> None:
        """Timestamp zero on the wire means 2000-01-01T00:00:00Z."""
        event = decode(begin_msg(1, 0, 1))
        assert isinstance(event, Begin)
        assert event.commit_ts == unix_us(PG_EPOCH) == 946_684_800_000_000

    def test_truncated_begin_raises_decode_error(self) -> None:
        """A Begin missing its xid bytes is reported as a DecodeError."""
        with pytest.raises(DecodeError, match="malformed pgoutput 'B' message"):
            decode(begin_msg(1, 2, 3)[:-1])


class TestCommit:
    def test_commit_carries_flags_lsns_and_unix_commit_time(self) -> None:
        """Commit decodes flags, commit LSN, end LSN and a 2024-01-02T03:04:05.123456Z time."""
        event = decode(commit_msg(0x16B3748, 0x16B3778, SAMPLE_PG_US))
        assert event == Commit(
            flags=0, commit_lsn=0x16B3748, end_lsn=0x16B3778, commit_ts=SAMPLE_UNIX_US
        )
        assert isinstance(event, Commit)
        assert event.commit_ts == unix_us(SAMPLE_TIME)

    def test_commit_passes_through_nonzero_flags(self) -> None:
        """The (currently unused) flags byte is kept as is."""
        event = decode(commit_msg(1, 2, 3, flags=0xFF))
        assert isinstance(event, Commit)
        assert event.flags == 0xFF

    def test_commit_lsns_above_32_bits_keep_both_halves(self) -> None:
        """An LSN such as 1A/FF is decoded with its high word intact."""
        event = decode(commit_msg(parse_lsn("1A/FF"), parse_lsn("1A/120"), SAMPLE_PG_US))
        assert isinstance(event, Commit)
        assert format_lsn(event.commit_lsn) == "1A/FF"
        assert format_lsn(event.end_lsn) == "1A/120"

    def test_truncated_commit_raises_decode_error(self) -> None:
        """A Commit cut short inside its timestamp is reported as a DecodeError."""
        with pytest.raises(DecodeError, match="'C'"):
            decode(commit_msg(1, 2, 3)[:20])


class TestOrigin:
    def test_origin_carries_commit_lsn_and_name(self) -> None:
        """Origin decodes the origin's commit LSN and its name."""
        assert decode(origin_msg(0xABCDEF, "node_a")) == Origin(0xABCDEF, "node_a")

    def test_origin_name_may_be_multibyte_utf8(self) -> None:
        """A non-ASCII origin name is decoded from UTF-8."""
        assert decode(origin_msg(7, "nœud-東京")) == Origin(7, "nœud-東京")

    def test_origin_without_terminating_nul_raises_decode_error(self) -> None:
        """An origin name with no NUL terminator is a DecodeError, not a ValueError."""
        with pytest.raises(DecodeError, match="'O'"):
            decode(origin_msg(7, "node")[:-1])


class TestRelation:
    def test_relation_carries_names_identity_and_columns(self) -> None:
        """Relation decodes oid, schema, name, replica identity and every column field."""
        message = relation_msg(
            16384,
            "public",
            "orders",
            "d",
            [(1, "id", 23, -1), (0, "note", 1043, 104), (0, "total", 1700, 655366)],
        )
        assert decode(message) == Relation(
            oid=16384,
            schema="public",
            name="orders",
            replica_identity="d",
            columns=(
                Column("id", 23, -1, True),
                Column("note", 1043, 104, False),
                Column("total", 1700, 655366, False),
            ),
        )

    def test_relation_key_flags_mark_only_key_columns(self) -> None:
        """Columns whose flag has bit 1 set are key columns, in order; others are not."""
        message = relation_msg(
            1, "s", "t", "i", [(0, "a", 25, -1), (1, "b", 23, -1), (1, "c", 20, -1)]
        )
        event = decode(message)
        assert isinstance(event, Relation)
        assert [c.is_key for c in event.columns] == [False, True, True]
        assert event.key_columns == ("b", "c")
        assert event.qualified_name == "s.t"

    def test_relation_key_flag_ignores_other_flag_bits(self) -> None:
        """Only bit 1 of the column flags means 'part of the key'."""
        message = relation_msg(1, "s", "t", "d", [(0xFE, "a", 25, -1), (0xFF, "b", 25, -1)])
        event = decode(message)
        assert isinstance(event, Relation)
        assert [c.is_key for c in event.columns] == [False, True]

    @pytest.mark.parametrize("identity", ["d", "n", "f", "i"])
    def test_relation_keeps_each_replica_identity_letter(self, identity: str) -> None:
        """Each replica identity setting (default, nothing, full, index) is kept as its letter."""
        event = decode(relation_msg(1, "s", "t", identity, [(0, "a", 25, -1)]))
        assert isinstance(event, Relation)
        assert event.replica_identity == identity

    def test_relation_in_pg_catalog_has_an_empty_schema(self) -> None:
        """The server sends an empty namespace for pg_catalog; it decodes as ''."""
        event = decode(relation_msg(1, "", "t", "d", []))
        assert event == Relation(1, "", "t", "d", ())

    def test_relation_with_no_columns_has_an_empty_column_tuple(self) -> None:
        """A zero-column table decodes to an empty columns tuple."""
        event = decode(relation_msg(2**32 - 1, "s", "empty", "n", []))
        assert event == Relation(2**32 - 1, "s", "empty", "n", ())

    def test_relation_names_may_be_multibyte_utf8(self) -> None:
        """Schema, table and column names are decoded from UTF-8."""
        event = decode(relation_msg(5, "schéma", "表", "d", [(1, "ключ", 23, -1)]))
        assert event == Relation(5, "schéma", "表", "d", (Column("ключ", 23, -1, True),))

    def test_truncated_relation_raises_decode_error(self) -> None:
        """A Relation cut inside its last column's type modifier is a DecodeError."""
        message = relation_msg(1, "s", "t", "d", [(0, "a", 25, -1)])
        with pytest.raises(DecodeError, match="'R'"):
            decode(message[:-2])

    def test_relation_claiming_more_columns_than_sent_raises_decode_error(self) -> None:
        """A column count larger than the columns present is a DecodeError."""
        message = bytearray(relation_msg(1, "s", "t", "d", [(0, "a", 25, -1)]))
        count_at = 1 + 4 + len(cstr("s")) + len(cstr("t")) + 1
        message[count_at : count_at + 2] = struct.pack("!h", 2)
        with pytest.raises(DecodeError):
            decode(bytes(message))

    def test_relation_name_with_invalid_utf8_raises_decode_error(self) -> None:
        """Bytes that are not UTF-8 in a name are a DecodeError, not a UnicodeDecodeError."""
        message = b"R" + struct.pack("!I", 1) + b"\xff\xfe\x00t\x00d" + struct.pack("!h", 0)
        with pytest.raises(DecodeError, match="'R'"):
            decode(message)

    @given(
        oid=oids,
        schema=names,
        columns=st.lists(
            st.tuples(
                st.integers(0, 255),
                names.filter(bool),
                oids,
                st.integers(-(2**31), 2**31 - 1),
            ),
            max_size=20,
        ),
    )
    def test_any_relation_round_trips(
        self, oid: int, schema: str, columns: list[tuple[int, str, int, int]]
    ) -> None:
        """Any well-formed Relation message decodes back to the fields it was built from."""
        event = decode(relation_msg(oid, schema, "t", "f", columns))
        assert event == Relation(
            oid,
            schema,
            "t",
            "f",
            tuple(Column(name, t, m, bool(f & 1)) for f, name, t, m in columns),
        )


class TestType:
    def test_type_carries_oid_schema_and_name(self) -> None:
        """Type decodes the type's oid, namespace and name."""
        assert decode(type_msg(70000, "public", "mood")) == TypeInfo(70000, "public", "mood")

    def test_type_in_pg_catalog_has_an_empty_schema(self) -> None:
        """An empty namespace (pg_catalog) decodes as ''."""
        assert decode(type_msg(16, "", "bool")) == TypeInfo(16, "", "bool")

    def test_type_without_name_terminator_raises_decode_error(self) -> None:
        """A Type message whose name lacks its NUL is a DecodeError."""
        with pytest.raises(DecodeError, match="'Y'"):
            decode(type_msg(1, "public", "mood")[:-1])


class TestInsert:
    def test_insert_carries_relation_oid_and_new_row(self) -> None:
        """Insert decodes the relation oid and the new row's text values."""
        event = decode(insert_msg(16384, tuple_data("1", "hello", "3.14")))
        assert event == Insert(16384, ("1", "hello", "3.14"))

    def test_insert_null_column_is_none(self) -> None:
        """A 'n' column decodes as None, distinct from an empty string."""
        event = decode(insert_msg(1, tuple_data("1", None, "")))
        assert event == Insert(1, ("1", None, ""))
        assert isinstance(event, Insert)
        assert event.new[1] is None
        assert event.new[2] == ""

    def test_insert_empty_string_is_kept(self) -> None:
        """A text column of length zero decodes as ''."""
        assert decode(insert_msg(1, tuple_data(""))) == Insert(1, ("",))

    def test_insert_with_zero_columns_has_an_empty_row(self) -> None:
        """A tuple with no columns decodes as an empty row."""
        assert decode(insert_msg(1, tuple_data())) == Insert(1, ())

    def test_insert_multibyte_utf8_text_is_decoded(self) -> None:
        """Length prefixes count bytes, so multi-byte UTF-8 text decodes intact."""
        row = ("héllo", "日本語テキスト", "emoji 🎉🐘", "Ω≈ç√∫")
        assert decode(insert_msg(1, tuple_data(*row))) == Insert(1, row)

    def test_insert_text_may_contain_separator_like_bytes(self) -> None:
        """Text with tabs, newlines, quotes and backslashes is taken verbatim."""
        row = ('a\tb\nc "d" \\e', "{1,2,3}", '{"k": [1, null]}')
        assert decode(insert_msg(1, tuple_data(*row))) == Insert(1, row)

    def test_insert_long_text_value_of_100_kb_is_decoded_whole(self) -> None:
        """A 100 kB NUL-free text value is decoded completely."""
        long_text = ("abcdefghij" * 10_240) + "é"
        assert len(long_text.encode("utf-8")) > 100_000
        event = decode(insert_msg(1, tuple_data("1", long_text, "tail")))
        assert event == Insert(1, ("1", long_text, "tail"))

    def test_insert_unchanged_marker_is_the_unchanged_singleton(self) -> None:
        """A 'u' column decodes as the UNCHANGED singleton."""
        event = decode(insert_msg(1, tuple_data("1", UNCHANGED)))
        assert isinstance(event, Insert)
        assert event.new[1] is UNCHANGED

    def test_insert_without_new_tuple_marker_raises_decode_error(self) -> None:
        """An Insert whose tuple marker is not 'N' is a DecodeError."""
        message = b"I" + struct.pack("!I", 1) + b"K" + tuple_data("1")
        with pytest.raises(DecodeError, match="Insert without a new tuple"):
            decode(message)

    def test_insert_with_binary_column_keeps_its_bytes(self) -> None:
        """A binary ('b') column is returned as its bytes (cdc.decoding.binary reads them)."""
        message = insert_msg(1, struct.pack("!h", 1) + b"b" + struct.pack("!i", 4) + b"\x00" * 4)
        event = decode(message)
        assert isinstance(event, Insert)
        assert event.new == (b"\x00" * 4,)

    def test_insert_with_unknown_column_kind_raises_decode_error(self) -> None:
        """Any column kind other than t, n, u is a DecodeError."""
        message = insert_msg(1, struct.pack("!h", 1) + b"x")
        with pytest.raises(DecodeError, match="'x'"):
            decode(message)

    def test_insert_with_fewer_columns_than_counted_raises_decode_error(self) -> None:
        """A column count larger than the columns present is a DecodeError, not IndexError."""
        message = insert_msg(1, struct.pack("!h", 3) + column_value("a") + column_value(None))
        with pytest.raises(DecodeError, match="'I'"):
            decode(message)

    def test_insert_cut_inside_a_length_prefix_raises_decode_error(self) -> None:
        """A text column cut inside its Int32 length is a DecodeError, not struct.error."""
        message = insert_msg(1, struct.pack("!h", 1) + b"t\x00\x00")
        with pytest.raises(DecodeError, match="'I'"):
            decode(message)

    def test_insert_cut_before_the_tuple_marker_raises_decode_error(self) -> None:
        """An Insert that ends right after the relation oid is a DecodeError."""
        with pytest.raises(DecodeError, match="'I'"):
            decode(b"I" + struct.pack("!I", 1))

    def test_insert_with_invalid_utf8_text_raises_decode_error(self) -> None:
        """Column bytes that are not UTF-8 are a DecodeError, not UnicodeDecodeError."""
        message = insert_msg(1, struct.pack("!h", 1) + b"t" + struct.pack("!i", 2) + b"\xc3\x28")
        with pytest.raises(DecodeError, match="'I'"):
            decode(message)

    def test_insert_text_longer_than_the_message_raises_decode_error(self) -> None:
        """A text column claiming more bytes than the message holds is a DecodeError."""
        message = insert_msg(1, struct.pack("!h", 1) + b"t" + struct.pack("!i", 10) + b"abc")
        with pytest.raises(DecodeError):
            decode(message)

    def test_insert_text_with_negative_length_raises_decode_error(self) -> None:
        """A text column with a negative length is malformed and is a DecodeError."""
        message = insert_msg(1, struct.pack("!h", 1) + b"t" + struct.pack("!i", -1))
        with pytest.raises(DecodeError):
            decode(message)

    def test_insert_with_negative_column_count_raises_decode_error(self) -> None:
        """A tuple with a negative Int16 column count is malformed and is a DecodeError."""
        message = insert_msg(1, struct.pack("!h", -1))
        with pytest.raises(DecodeError):
            decode(message)

    @given(row=rows, oid=oids)
    def test_any_row_round_trips_through_insert(self, row: tuple[Value, ...], oid: int) -> None:
        """Any row of text, NULL and UNCHANGED values decodes back to itself."""
        event = decode(insert_msg(oid, tuple_data(*row)))
        assert event == Insert(oid, row)
        assert isinstance(event, Insert)
        for decoded, original in zip(event.new, row, strict=True):
            if original is None or original is UNCHANGED:
                assert decoded is original


class TestUpdate:
    def test_update_without_old_tuple_carries_only_new_row(self) -> None:
        """An Update with just 'N' has no old row and old_is_key False."""
        event = decode(update_msg(16384, tuple_data("1", "new")))
        assert event == Update(16384, ("1", "new"), None, False)

    def test_update_with_old_key_carries_only_key_columns(self) -> None:
        """A 'K' Update holds the old key (other columns NULL) and old_is_key True."""
        event = decode(
            update_msg(7, tuple_data("2", "b"), old=tuple_data("1", None), old_kind=b"K")
        )
        assert event == Update(7, new=("2", "b"), old=("1", None), old_is_key=True)

    def test_update_with_old_tuple_carries_the_full_old_row(self) -> None:
        """An 'O' Update (REPLICA IDENTITY FULL) holds the whole old row, old_is_key False."""
        event = decode(
            update_msg(7, tuple_data("1", "after"), old=tuple_data("1", "before"), old_kind=b"O")
        )
        assert event == Update(7, new=("1", "after"), old=("1", "before"), old_is_key=False)

    def test_update_unchanged_toast_value_is_unchanged(self) -> None:
        """An unchanged TOASTed column ('u') in the new row decodes as UNCHANGED."""
        event = decode(update_msg(1, tuple_data("1", UNCHANGED, None)))
        assert isinstance(event, Update)
        assert event.new == ("1", UNCHANGED, None)
        assert event.new[1] is UNCHANGED

    def test_update_old_and_new_rows_keep_their_own_values(self) -> None:
        """Old and new tuples of different widths and kinds decode independently."""
        event = decode(
            update_msg(
                3,
                tuple_data("ü", "", UNCHANGED),
                old=tuple_data("ä", None, "x" * 1000),
                old_kind=b"O",
            )
        )
        assert event == Update(3, ("ü", "", UNCHANGED), ("ä", None, "x" * 1000), False)

    def test_update_with_unknown_marker_raises_decode_error(self) -> None:
        """An Update whose first marker is not K, O or N is a DecodeError."""
        message = b"U" + struct.pack("!I", 1) + b"X" + tuple_data("1")
        with pytest.raises(DecodeError, match="Update without a new tuple"):
            decode(message)

    def test_update_with_old_key_but_no_new_tuple_raises_decode_error(self) -> None:
        """An Update whose old key is followed by something other than 'N' is a DecodeError."""
        message = b"U" + struct.pack("!I", 1) + b"K" + tuple_data("1") + b"K" + tuple_data("2")
        with pytest.raises(DecodeError, match="Update without a new tuple"):
            decode(message)

    def test_update_ending_after_old_tuple_raises_decode_error(self) -> None:
        """An Update that stops after its old tuple is a DecodeError, not IndexError."""
        message = b"U" + struct.pack("!I", 1) + b"O" + tuple_data("1")
        with pytest.raises(DecodeError, match="'U'"):
            decode(message)

    def test_update_with_a_binary_value_overrunning_the_message_is_a_decode_error(
            self) -> None:
        """A binary column in an Update's old tuple whose length runs past the message."""
        old = struct.pack("!h", 1) + b"b" + struct.pack("!i", 2) + b"\x01"
        with pytest.raises(DecodeError, match="overruns"):
            decode(update_msg(1, tuple_data("1"), old=old, old_kind=b"O")[:-len(
                tuple_data("1")) - 1])

    @given(
        new=rows,
        old=st.one_of(st.none(), rows),
        old_kind=st.sampled_from([b"K", b"O"]),
        oid=oids,
    )
    def test_any_update_round_trips(
        self, new: tuple[Value, ...], old: tuple[Value, ...] | None, old_kind: bytes, oid: int
    ) -> None:
        """Any new row, with or without an old key or tuple, decodes back to itself."""
        old_bytes = None if old is None else tuple_data(*old)
        event = decode(update_msg(oid, tuple_data(*new), old=old_bytes, old_kind=old_kind))
        assert event == Update(oid, new, old, old is not None and old_kind == b"K")


class TestDelete:
    def test_delete_with_old_key_carries_key_and_old_is_key(self) -> None:
        """A 'K' Delete holds the old key columns and old_is_key True."""
        event = decode(delete_msg(16384, b"K", tuple_data("42", None, None)))
        assert event == Delete(16384, ("42", None, None), old_is_key=True)

    def test_delete_with_old_tuple_carries_full_row(self) -> None:
        """An 'O' Delete (REPLICA IDENTITY FULL) holds the whole old row, old_is_key False."""
        event = decode(delete_msg(16384, b"O", tuple_data("42", "gone", "")))
        assert event == Delete(16384, ("42", "gone", ""), old_is_key=False)

    def test_delete_old_tuple_may_hold_unchanged_values(self) -> None:
        """UNCHANGED in a deleted row's old tuple decodes as the singleton."""
        event = decode(delete_msg(1, b"O", tuple_data("1", UNCHANGED)))
        assert isinstance(event, Delete)
        assert event.old[1] is UNCHANGED

    def test_delete_without_old_marker_raises_decode_error(self) -> None:
        """A Delete whose marker is 'N' (or anything but K/O) is a DecodeError."""
        with pytest.raises(DecodeError, match="Delete without an old key or tuple"):
            decode(delete_msg(1, b"N", tuple_data("1")))

    def test_truncated_delete_raises_decode_error(self) -> None:
        """A Delete cut inside its tuple's column count is a DecodeError."""
        with pytest.raises(DecodeError, match="'D'"):
            decode(delete_msg(1, b"K", tuple_data("12345"))[:7])

    def test_delete_cut_before_marker_raises_decode_error(self) -> None:
        """A Delete ending right after its oid is a DecodeError, not IndexError."""
        with pytest.raises(DecodeError, match="'D'"):
            decode(b"D" + struct.pack("!I", 1))

    @given(row=rows, old_kind=st.sampled_from([b"K", b"O"]), oid=oids)
    def test_any_delete_round_trips(
        self, row: tuple[Value, ...], old_kind: bytes, oid: int
    ) -> None:
        """Any old row decodes back to itself with the right old_is_key."""
        event = decode(delete_msg(oid, old_kind, tuple_data(*row)))
        assert event == Delete(oid, row, old_kind == b"K")


class TestTruncate:
    def test_truncate_without_options_lists_relations(self) -> None:
        """A Truncate with options 0 lists its relation oids, no cascade, no restart."""
        event = decode(truncate_msg([16384, 16390]))
        assert event == Truncate((16384, 16390), cascade=False, restart_identity=False)

    def test_truncate_cascade_bit_sets_cascade(self) -> None:
        """Option bit 1 means CASCADE."""
        event = decode(truncate_msg([1], options=1))
        assert event == Truncate((1,), cascade=True, restart_identity=False)

    def test_truncate_restart_identity_bit_sets_restart_identity(self) -> None:
        """Option bit 2 means RESTART IDENTITY."""
        event = decode(truncate_msg([1], options=2))
        assert event == Truncate((1,), cascade=False, restart_identity=True)

    def test_truncate_with_both_bits_sets_both_options(self) -> None:
        """Options 3 means CASCADE and RESTART IDENTITY."""
        event = decode(truncate_msg([1, 2, 3], options=3))
        assert event == Truncate((1, 2, 3), cascade=True, restart_identity=True)

    def test_truncate_oids_are_unsigned(self) -> None:
        """Relation oids above 2**31 decode as positive numbers."""
        event = decode(truncate_msg([2**32 - 1, 2**31]))
        assert isinstance(event, Truncate)
        assert event.relation_oids == (2**32 - 1, 2**31)

    def test_truncate_with_missing_oids_raises_decode_error(self) -> None:
        """A Truncate claiming more relations than it carries is a DecodeError."""
        message = b"T" + struct.pack("!iB", 3, 0) + struct.pack("!2I", 1, 2)
        with pytest.raises(DecodeError, match="'T'"):
            decode(message)

    def test_truncate_with_negative_relation_count_raises_decode_error(self) -> None:
        """A negative relation count is a DecodeError."""
        with pytest.raises(DecodeError, match="'T'"):
            decode(b"T" + struct.pack("!iB", -1, 0))


class TestMessage:
    def test_transactional_message_carries_lsn_prefix_and_content(self) -> None:
        """A transactional logical message decodes flag, LSN, prefix and raw content."""
        event = decode(message_msg(True, 0x16B3748, "app/audit", b'{"who": "me"}'))
        assert event == Message(True, 0x16B3748, "app/audit", b'{"who": "me"}')

    def test_non_transactional_message_is_not_transactional(self) -> None:
        """Flags 0 means a non-transactional message."""
        event = decode(message_msg(False, 9, "heartbeat", b""))
        assert event == Message(False, 9, "heartbeat", b"")

    def test_message_content_is_raw_bytes_including_nuls(self) -> None:
        """Content is Byte(n), not text: NULs and non-UTF-8 bytes are kept as bytes."""
        content = b"\x00\xff\x00binary\xc3"
        event = decode(message_msg(True, 1, "p", content))
        assert isinstance(event, Message)
        assert event.content == content
        assert type(event.content) is bytes

    def test_message_prefix_may_be_multibyte_utf8(self) -> None:
        """A non-ASCII prefix decodes from UTF-8."""
        event = decode(message_msg(False, 1, "préfixe/日本", b"x"))
        assert isinstance(event, Message)
        assert event.prefix == "préfixe/日本"

    def test_message_cut_inside_its_length_raises_decode_error(self) -> None:
        """A Message ending inside its content length is a DecodeError."""
        message = b"M" + struct.pack("!BQ", 1, 1) + cstr("p") + b"\x00\x00"
        with pytest.raises(DecodeError, match="'M'"):
            decode(message)

    def test_message_content_shorter_than_declared_raises_decode_error(self) -> None:
        """Content with fewer bytes than its length says is a DecodeError."""
        message = message_msg(True, 1, "p", b"abcdef")[:-3]
        with pytest.raises(DecodeError):
            decode(message)

    @given(transactional=st.booleans(), lsn=lsns, content=st.binary(max_size=200))
    def test_any_message_round_trips(self, transactional: bool, lsn: int, content: bytes) -> None:
        """Any flag, LSN and content decode back to themselves."""
        event = decode(message_msg(transactional, lsn, "prefix", content))
        assert event == Message(transactional, lsn, "prefix", content)


class TestDecodeDispatch:
    def test_empty_message_raises_decode_error(self) -> None:
        """Zero bytes are a DecodeError."""
        with pytest.raises(DecodeError, match="empty pgoutput message"):
            decode(b"")

    @pytest.mark.parametrize("kind", [b"S", b"E", b"A", b"c", b"P", b"K", b"r", b"\x00", b"\xff"])
    def test_unknown_message_type_raises_decode_error(self, kind: bytes) -> None:
        """Streaming, two-phase and unknown type bytes are a DecodeError."""
        with pytest.raises(DecodeError, match="unknown pgoutput message type") as info:
            decode(kind + b"\x00" * 32)
        assert info.value.fix

    @pytest.mark.parametrize("kind", [b"B", b"C", b"O", b"R", b"Y", b"I", b"U", b"D", b"T", b"M"])
    def test_bare_type_byte_raises_decode_error(self, kind: bytes) -> None:
        """Every known type byte with no body is a DecodeError, never struct.error/IndexError."""
        with pytest.raises(DecodeError, match="malformed pgoutput") as info:
            decode(kind)
        assert info.value.__cause__ is not None

    @pytest.mark.parametrize(
        "message",
        [
            begin_msg(1, SAMPLE_PG_US, 2),
            commit_msg(1, 2, SAMPLE_PG_US),
            origin_msg(1, "o"),
            relation_msg(1, "s", "t", "d", [(1, "a", 23, -1), (0, "b", 25, -1)]),
            type_msg(1, "s", "t"),
            insert_msg(1, tuple_data("1", None, UNCHANGED, "é")),
            update_msg(1, tuple_data("1"), old=tuple_data("0"), old_kind=b"K"),
            delete_msg(1, b"O", tuple_data("1", "x")),
            truncate_msg([1, 2], options=3),
            message_msg(True, 1, "p", b"body"),
        ],
        ids=["B", "C", "O", "R", "Y", "I", "U", "D", "T", "M"],
    )
    def test_every_proper_prefix_of_a_message_never_leaks_low_level_errors(
        self, message: bytes
    ) -> None:
        """Cutting any valid message short gives a DecodeError or an event, never a raw error."""
        decode(message)  # the whole message is valid
        for cut in range(len(message)):
            with contextlib.suppress(DecodeError):
                decode(message[:cut])

    @given(data=st.binary(max_size=64))
    def test_arbitrary_bytes_give_an_event_or_decode_error(self, data: bytes) -> None:
        """Random bytes never raise anything but DecodeError."""
        with contextlib.suppress(DecodeError):
            decode(data)


class TestLsn:
    @pytest.mark.parametrize(
        ("text", "value"),
        [
            ("0/0", 0),
            ("0/16B3748", 0x16B3748),
            ("1A/FF", (0x1A << 32) | 0xFF),
            ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
            ("1/0", 2**32),
        ],
    )
    def test_format_and_parse_lsn_agree_with_postgres_notation(self, text: str, value: int) -> None:
        """Known LSNs format to Postgres' hi/lo hex notation and parse back."""
        assert format_lsn(value) == text
        assert parse_lsn(text) == value

    def test_parse_lsn_accepts_lowercase_and_surrounding_whitespace(self) -> None:
        """Lower-case hex and surrounding whitespace parse like the canonical form."""
        assert parse_lsn("  1a/ff\n") == parse_lsn("1A/FF")

    @pytest.mark.parametrize("text", ["", "16B3748", "0-16B3748", "x/1", "0/zz"])
    def test_parse_lsn_rejects_text_that_is_not_an_lsn(self, text: str) -> None:
        """Text without a slash or with non-hex halves raises ValueError."""
        with pytest.raises(ValueError, match=r"LSN|invalid literal"):
            parse_lsn(text)

    @given(lsn=lsns)
    def test_any_lsn_round_trips_through_text(self, lsn: int) -> None:
        """format_lsn then parse_lsn gives back every 64-bit LSN."""
        text = format_lsn(lsn)
        assert parse_lsn(text) == lsn
        assert text == text.upper()
        hi, lo = text.split("/")
        assert int(hi, 16) < 2**32
        assert int(lo, 16) < 2**32
