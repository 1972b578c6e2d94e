"""Binary transfer: both decoders turn each type's binary send format into the server's text.

The oracle is the server itself: ``<type>send(value)`` gives the bytes pgoutput sends under
``binary 'true'`` and ``format('%s', value)`` the text its output function sends otherwise
(the session's ``DateStyle=ISO``, ``TimeZone=UTC``, ``bytea_output=hex``). The reference
(``cdc.decoding.binary.text_of``) and the compiled decoder (fed Insert messages) must give
that text; floats, whose text cdc writes as ``%.17g``, must give the same float. The
differential tests then hold the compiled decoder to the reference on generated binary
values, valid and malformed.
"""

from __future__ import annotations

import math
import os
import struct
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import structlog
from conftest import SourceDb, with_settings
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rawlake import raw_files, read_raw, stream_until_caught_up
from test_decoders import NATIVE, harness
from test_pgoutput import begin_msg, delete_msg, insert_msg, relation_msg, update_msg
from test_types import COLUMNS, FAR, _create

from cdc.config import Settings
from cdc.decoding import pgtypes as t
from cdc.decoding.binary import CODECS, Codec, text_of

OID = 16384

#: type → (SQL type, its send function, a strategy of values passed as text)
_INT8 = st.integers(-(2**63), 2**63 - 1)


def _numeric_text() -> st.SearchStrategy[str]:
    finite = st.builds(lambda sign, digits, exp: f"{sign}{digits}e{exp}",
                       st.sampled_from(["", "-"]), st.integers(0, 10**40), st.integers(-60, 60))
    scaled = st.builds(lambda d, s: f"{d:.{s}f}",
                       st.decimals(-(10**12), 10**12, allow_nan=False, places=6),
                       st.integers(0, 30))
    return st.one_of(finite, scaled, st.sampled_from(
        ["NaN", "Infinity", "-Infinity", "0", "0.000", "-0.5", "1e-300", "12345678.90000"]))


_DAYS = st.integers(-2_451_545, 2_145_031_948)
_US = st.integers(-211_813_488_000_000_000, 9_223_371_331_199_999_999)

TYPES: dict[int, tuple[str, str, st.SearchStrategy[str]]] = {
    t.BOOL: ("boolean", "boolsend", st.sampled_from(["t", "f"])),
    t.INT2: ("smallint", "int2send", st.integers(-(2**15), 2**15 - 1).map(str)),
    t.INT4: ("integer", "int4send", st.integers(-(2**31), 2**31 - 1).map(str)),
    t.INT8: ("bigint", "int8send", _INT8.map(str)),
    t.OID: ("oid", "oidsend", st.integers(0, 2**32 - 1).map(str)),
    t.FLOAT4: ("real", "float4send", st.floats(width=32).map(
        lambda f: "NaN" if math.isnan(f) else repr(f).replace("inf", "Infinity"))),
    t.FLOAT8: ("double precision", "float8send", st.floats().map(
        lambda f: "NaN" if math.isnan(f) else repr(f).replace("inf", "Infinity"))),
    t.NUMERIC: ("numeric", "numeric_send", _numeric_text()),
    t.TEXT: ("text", "textsend", st.text(st.characters(codec="utf-8", exclude_characters="\0"))),
    t.VARCHAR: ("varchar", "varcharsend", st.text(st.characters(codec="utf-8",
                                                                exclude_characters="\0"))),
    t.BPCHAR: ("char(3)", "bpcharsend", st.text("ab é", max_size=3)),
    t.NAME: ("name", "namesend", st.text("abc_9", max_size=20)),
    t.JSON: ("json", "json_send", st.sampled_from(['{"a": [1, 2.50]}', "[]", '"x"', " 1 "])),
    t.JSONB: ("jsonb", "jsonb_send", st.sampled_from(
        ['{"b": 1, "a": {"c": "d,e"}}', "[]", '"✓"', "null", "1.500"])),
    t.BYTEA: ("bytea", "byteasend", st.binary(max_size=40).map(lambda b: "\\x" + b.hex())),
    t.UUID: ("uuid", "uuid_send", st.uuids().map(str)),
    t.DATE: ("date", "date_send", st.one_of(
        _DAYS.map(lambda d: f"epoch+{d}"), st.sampled_from(["infinity", "-infinity"]))),
    t.TIME: ("time", "time_send", st.one_of(
        st.integers(0, 86_400_000_000 - 1).map(lambda us: f"us+{us}"), st.just("24:00:00"))),
    t.TIMESTAMP: ("timestamp", "timestamp_send", st.one_of(
        _US.map(lambda us: f"us+{us}"), st.sampled_from(["infinity", "-infinity"]))),
    t.TIMESTAMPTZ: ("timestamptz", "timestamptz_send", st.one_of(
        _US.map(lambda us: f"us+{us}"), st.sampled_from(["infinity", "-infinity"]))),
}


def _expr(pg_type: str, value: str) -> tuple[str, Any]:
    """SQL for one value (``epoch+days``, ``us+micros`` are offsets from 2000-01-01)."""
    if value.startswith("epoch+"):
        return "(date '2000-01-01' + %s::int)", int(value[6:])
    if value.startswith("us+"):
        us = int(value[3:])
        days, rest = divmod(us, 86_400_000_000)
        base = {"time": "time '00:00'", "timestamp": "timestamp '2000-01-01'",
                "timestamptz": "timestamptz '2000-01-01 00:00+00'"}[pg_type]
        return (f"({base} + (%s || ' days')::interval + (%s || ' microseconds')::interval)"
                f"::{pg_type}", (days, rest))
    return f"%s::{pg_type}", value


def server_pairs(source: SourceDb, type_oid: int, values: list[str]) -> list[tuple[bytes, str]]:
    """(send bytes, output text) of each value, from the server."""
    pg_type, send, _ = TYPES[type_oid]
    out = []
    with source.connect() as conn:
        conn.execute("SET bytea_output = hex")
        for value in values:
            expr, params = _expr(pg_type, value)
            args = params if isinstance(params, tuple) else (params,)
            sent, text = conn.execute(f"SELECT {send}(v), format('%%s', v) FROM (SELECT {expr} "
                                      "AS v) s", args).fetchone()  # type: ignore[misc]
            out.append((bytes(sent), text))
    return out


def native_texts(type_oid: int, values: list[bytes]) -> list[str | None]:
    """The compiled decoder's text of each binary value (one Insert message each)."""
    h = harness("native")
    h.feed(begin_msg(0x5000, 1_000_000, 7))
    h.feed(relation_msg(OID, "public", "b", "d", [(1, "v", type_oid, -1)]))
    for value in values:
        assert h.feed(insert_msg(OID, b"\x00\x01b" + struct.pack("!i", len(value)) + value)) \
            is None
    columns = h.batcher.buffers[OID].core.take()[0]
    return columns[0].to_pylist()  # type: ignore[no-any-return]


def _same(type_oid: int, got: str | None, want: str) -> bool:
    if type_oid in (t.FLOAT4, t.FLOAT8) and got is not None:
        fmt = "!f" if type_oid == t.FLOAT4 else "!d"
        return struct.pack(fmt, float(got)) == struct.pack(fmt, float(want)) or \
            (math.isnan(float(got)) and math.isnan(float(want)))
    return got == want


@pytest.mark.parametrize("type_oid", sorted(TYPES), ids=lambda o: TYPES[o][0])
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_binary_values_read_as_the_text_the_server_sends(
        source: SourceDb, type_oid: int, data: st.DataObject) -> None:
    """Each supported type: the reference and the compiled decoder give the server's text."""
    values = data.draw(st.lists(TYPES[type_oid][2], min_size=1, max_size=8))
    pairs = server_pairs(source, type_oid, values)
    codec = CODECS[type_oid]
    for sent, want in pairs:
        assert _same(type_oid, text_of(codec, sent), want), (sent, want, text_of(codec, sent))
    if NATIVE is not None:
        for (sent, want), got in zip(pairs, native_texts(type_oid, [s for s, _ in pairs]),
                                     strict=True):
            assert _same(type_oid, got, want), (sent, want, got)


def test_far_dates_and_timestamps_read_as_the_servers_text(source: SourceDb) -> None:
    """BC years, five- and six-digit years, the first and last day each type holds."""
    cases = {
        t.DATE: ["4714-11-24 BC", "0044-03-15 BC", "0001-12-31 BC", "10000-01-01",
                 "5874897-12-31", "0001-01-01"],
        t.TIMESTAMP: ["4714-11-24 00:00:00 BC", "0044-03-15 12:00:00.5 BC",
                      "294276-12-31 23:59:59.999999", "10000-01-01 00:00:00"],
        t.TIMESTAMPTZ: ["4714-11-24 00:00:00+00 BC", "0001-12-31 23:59:59.999999+00 BC",
                        "294276-12-31 23:59:59.999999+00", "1999-12-31 23:59:59.000001+00"],
    }
    for type_oid, values in cases.items():
        pairs = server_pairs(source, type_oid, values)
        natives = native_texts(type_oid, [s for s, _ in pairs]) if NATIVE is not None \
            else [want for _, want in pairs]
        for (sent, want), native in zip(pairs, natives, strict=True):
            assert text_of(CODECS[type_oid], sent) == want == native


def test_unconstrained_numeric_keeps_its_exact_scale() -> None:
    """numeric_send carries the display scale: 1.50 stays 1.50, 1e-20 its 20 decimals."""
    two = struct.pack("!HhHH", 2, 0, 0, 2) + struct.pack("!HH", 1, 5000)
    assert text_of(Codec.NUMERIC, two) == "1.50"
    tiny = struct.pack("!HhHH", 1, -5, 0x4000, 20) + struct.pack("!H", 1)
    assert text_of(Codec.NUMERIC, tiny) == "-0.00000000000000000001"


@pytest.mark.parametrize(("codec", "data"), [
    (Codec.INT4, b"\x00\x01"), (Codec.NUMERIC, struct.pack("!HhHH", 1, 0, 0, 0) + b"\x27\x10"),
    (Codec.NUMERIC, struct.pack("!HhHH", 0, 0, 0x1234, 0)), (Codec.JSONB, b"\x02{}"),
    (Codec.TEXT, b"\xff"), (Codec.DATE, struct.pack("!i", 2_145_031_949)),
    (Codec.TIME, struct.pack("!q", 86_400_000_001)),
    (Codec.TIMESTAMP, struct.pack("!q", -211_813_488_000_000_001)), (Codec.NONE, b"x"),
], ids=lambda v: getattr(v, "name", None))
def test_a_value_its_receive_function_would_reject_is_malformed(codec: Codec,
                                                                data: bytes) -> None:
    assert text_of(codec, data) is None


# --------------------------------------------------------------------------- differential

def _numeric_bytes() -> st.SearchStrategy[bytes]:
    """numeric_send's layout, mostly well formed: digit count, weight, sign, scale, digits."""
    return st.integers(0, 5).flatmap(lambda n: st.builds(
        lambda weight, sign, dscale, digits: struct.pack("!HhHH", n, weight, sign, dscale)
        + struct.pack(f"!{n}H", *digits),
        st.integers(-6, 6), st.sampled_from([0, 0x4000, 0xC000, 0xD000, 0xF000, 0x1234]),
        st.sampled_from([0, 1, 2, 5, 13, 0x3FFF, 0x4000]),
        st.lists(st.sampled_from([0, 1, 42, 9999, 10000]), min_size=n, max_size=n)))


def _packed(fmt: str, low: int, high: int) -> st.SearchStrategy[bytes]:
    return st.integers(low, high).map(lambda v: struct.pack(fmt, v))


#: codec → well-formed (mostly) binary values; random bytes are mixed in by ``binary_value``
VALID: dict[int, st.SearchStrategy[bytes]] = {
    t.BOOL: st.binary(min_size=1, max_size=1), t.INT2: st.binary(min_size=2, max_size=2),
    t.INT4: st.binary(min_size=4, max_size=4), t.INT8: st.binary(min_size=8, max_size=8),
    t.OID: st.binary(min_size=4, max_size=4), t.FLOAT4: st.binary(min_size=4, max_size=4),
    t.FLOAT8: st.binary(min_size=8, max_size=8), t.NUMERIC: _numeric_bytes(),
    t.TEXT: st.text(max_size=6).map(str.encode), t.JSONB: st.text(max_size=6).map(
        lambda s: b"\x01" + s.encode()), t.BYTEA: st.binary(max_size=6),
    t.UUID: st.binary(min_size=16, max_size=16),
    t.DATE: _packed("!i", -(2**31), 2**31 - 1),
    t.TIME: _packed("!q", -1, 86_400_000_001),
    t.TIMESTAMP: _packed("!q", -(2**63), 2**63 - 1),
    t.TIMESTAMPTZ: _packed("!q", -211_813_488_000_000_001, 9_223_371_331_200_000_000),
}
_COLUMN_TYPES = [*VALID, t.INTERVAL]  # interval: no binary decoder


def binary_value(type_oid: int) -> st.SearchStrategy[bytes]:
    """One TupleData column: binary (valid or random bytes), text, null or unchanged."""
    data = st.one_of(VALID.get(type_oid, st.binary(max_size=16)), st.binary(max_size=10))
    return st.one_of(
        data.map(lambda b: b"b" + struct.pack("!i", len(b)) + b), data.map(lambda b: b"b" + b),
        st.sampled_from([b"n", b"u", b"t\x00\x00\x00\x011"]))


@st.composite
def binary_stream(draw: st.DrawFn) -> list[bytes]:
    """Begin, a relation of random column types, then row messages of binary values."""
    types = draw(st.lists(st.sampled_from(_COLUMN_TYPES), min_size=1, max_size=4))
    identity = draw(st.sampled_from("df"))
    keys = draw(st.sets(st.integers(0, len(types) - 1), max_size=2))
    columns = [(1 if i in keys else 0, f"c{i}", oid, -1) for i, oid in enumerate(types)]
    messages = [begin_msg(0x5000, 1_000_000, 7),
                relation_msg(OID, "public", "b", identity, columns)]

    def row() -> bytes:
        return struct.pack("!h", len(types)) + b"".join(draw(binary_value(o)) for o in types)

    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from("IIUUD"))
        if kind == "I":
            msg = insert_msg(OID, row())
        elif kind == "U":
            old_kind = draw(st.sampled_from([b"", b"K", b"O"]))
            msg = update_msg(OID, row(), old=row() if old_kind else None, old_kind=old_kind)
        else:
            msg = delete_msg(OID, draw(st.sampled_from([b"K", b"O"])), row())
        if draw(st.integers(0, 7)) == 0:
            msg = msg[:draw(st.integers(0, len(msg) - 1))]
        messages.append(msg)
    return messages


def _outcome(kind: str, messages: list[bytes]) -> Any:
    h = harness(kind)
    events = [h.feed(m) for m in messages]
    try:
        batches = [b.table for b in h.batches()]
    except Exception as exc:
        batches = [repr(exc)]
    return events, (h.stats.changes, h.batcher.rows, h.batcher.bytes, h.decoder.seq), batches


@settings(max_examples=int(os.environ.get("CDC_DIFF_EXAMPLES", "400")), deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(binary_stream())
def test_compiled_decoder_matches_the_reference_on_binary_values(messages: list[bytes]) -> None:
    """Binary values of every supported type (and of one without a decoder), valid and
    malformed, in inserts, updates (old keys, full old tuples) and deletes: the same events,
    DecodeErrors, counts and raw batches from both decoders."""
    if NATIVE is None:
        pytest.skip("the compiled decoder is not built")
    pure, native = _outcome("pure", messages), _outcome("native", messages)
    assert native[0] == pure[0]
    assert native[1] == pure[1]
    assert len(native[2]) == len(pure[2])
    for got, want in zip(native[2], pure[2], strict=True):
        assert got == want if isinstance(want, str) else got.equals(want, check_metadata=True)


# --------------------------------------------------------------------------- streaming

#: the every-type table's columns whose types have a binary decoder
_BINARY_TYPES = {"smallint", "integer", "bigint", "numeric", "real", "double precision", "text",
                 "varchar", "char", "bytea", "boolean", "date", "timestamp", "timestamptz",
                 "time", "uuid", "json", "jsonb"}
BINARY_COLUMNS = {name: spec for name, spec in COLUMNS.items()
                  if not spec[0].endswith("[]") and spec[0].split("(")[0] in _BINARY_TYPES}
BINARY_FAR = {name: FAR[name] for name in ("d", "ts", "tstz")}


def _files(run: Settings, table: str) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in raw_files(Path(run.lake), f"public.{table}")}


def test_every_supported_type_lands_the_same_raw_files_with_and_without_binary(
    source: SourceDb, settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inserts, updates (one with an unchanged TOASTed value, one of the key) and deletes of
    every type cdc decodes in binary, edge values and far dates included: a binary session
    (either decoder) writes the same raw files, byte for byte, as a text session."""
    assert len(BINARY_COLUMNS) == 20  # every supported type of the table
    _create(source, "typed", BINARY_COLUMNS)
    _create(source, "far", BINARY_FAR)
    source.execute("ALTER TABLE typed ADD COLUMN big text")
    runs = {mode: with_settings(settings, slot=f"i14_{mode}".replace("-", "_"),
                                lake=str(tmp_path / mode), binary=mode.split("-")[0])
            for mode in ("off", "on", "on-pure")}
    for run in runs.values():
        stream_until_caught_up(run)  # creates the slot: all see the same changes
    for table, spec in (("typed", BINARY_COLUMNS), ("far", BINARY_FAR)):
        names = ", ".join(f'"{n}"' for n in spec)
        big = (", (SELECT string_agg(md5(g::text || id::text), '') FROM "
               "generate_series(1, 300) g)") if table == "typed" else ""
        source.execute(f"INSERT INTO {table} SELECT id + 100, {names}{big} FROM {table}")
        source.execute(f"UPDATE {table} SET id = id + 1000 WHERE id = 101")
        source.execute(f"DELETE FROM {table} WHERE id = 102")
    source.execute("UPDATE typed SET i2 = 7 WHERE id > 100")  # big: unchanged TOAST
    stats = {}
    for mode, run in runs.items():
        monkeypatch.setenv("CDC_PURE_PYTHON", "1" if mode.endswith("pure") else "0")
        stats[mode] = stream_until_caught_up(run)
    assert [s.binary_sessions for s in stats.values()] == [0, 1, 1]
    for table in ("typed", "far"):
        files = {mode: _files(run, table) for mode, run in runs.items()}
        assert files["off"], table
        assert files["on"] == files["off"], table  # the same files, byte for byte
        assert files["on-pure"] == files["off"], table
    raw = pa.concat_tables(pq.read_table(f) for f in raw_files(Path(runs["on"].lake),
                                                               "public.typed"))
    assert pc.sum(pc.is_valid(raw["_unchanged"])).as_py() > 0  # the TOAST case was hit


def test_a_published_column_without_a_binary_decoder_keeps_the_session_in_text(
    source: SourceDb, settings: Settings
) -> None:
    """--binary on with an interval column: the session streams in text, and says which
    column made it so."""
    source.execute("CREATE TABLE spans (id int PRIMARY KEY, n numeric, iv interval)")
    run = with_settings(settings, slot="i14_refused", binary="on")
    stream_until_caught_up(run)
    source.execute("INSERT INTO spans VALUES (1, 1.50, '1 day 02:00'), (2, NULL, '-1 mons')")
    with structlog.testing.capture_logs() as logs:
        stats = stream_until_caught_up(run)
    assert stats.binary_sessions == 0
    off = [e for e in logs if e["event"] == "binary_transfer_off"]
    assert off
    assert off[0]["text_columns"] == ["public.spans.iv (interval)"]
    assert off[0]["log_level"] == "warning"
    rows = read_raw(Path(run.lake), "public.spans")
    assert [(r["id"], r["n"], r["iv"]) for r in rows] == [(1, "1.50", "1 day 02:00:00"),
                                                          (2, None, "-1 mons")]


def test_a_table_version_without_a_binary_decoder_mid_stream_reconnects_in_text_losing_nothing(
    source: SourceDb, settings: Settings, tmp_path: Path
) -> None:
    """The WAL holds a version of a table with an interval column that the catalog no longer
    has (added, used, dropped): the binary session meets it in a Relation message, reconnects
    in text from its checkpoint, and lands every change exactly as a text session does."""
    source.execute("CREATE TABLE moving (id int PRIMARY KEY, v text)")
    runs = {mode: with_settings(settings, slot=f"i14_moving_{mode}", lake=str(tmp_path / mode),
                                binary=mode) for mode in ("off", "on")}
    for run in runs.values():
        stream_until_caught_up(run)
    source.execute("INSERT INTO moving VALUES (1, 'a')")
    source.execute("ALTER TABLE moving ADD COLUMN iv interval")
    source.execute("INSERT INTO moving VALUES (2, 'b', '3 days')")
    source.execute("ALTER TABLE moving DROP COLUMN iv")
    source.execute("INSERT INTO moving VALUES (3, 'c')")
    text = stream_until_caught_up(runs["off"])
    with structlog.testing.capture_logs() as logs:
        binary = stream_until_caught_up(runs["on"])
    assert (text.binary_sessions, binary.binary_sessions, binary.reconnects) == (0, 1, 1)
    assert any(e["event"] == "reconnecting_in_text" and "public.moving.iv (interval)"
               in e["error"] for e in logs)
    rows = read_raw(Path(runs["on"].lake), "public.moving")
    assert [(r["id"], r["v"], r.get("iv")) for r in rows] == [
        (1, "a", None), (2, "b", "3 days"), (3, "c", None)]
    assert _files(runs["on"], "moving") == _files(runs["off"], "moving")
