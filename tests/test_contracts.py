"""Schema contracts: checked on every Relation and snapshot; fail, quarantine or evolve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import structlog
from conftest import SourceDb, with_settings
from rawlake import prepare, raw_files, read_raw, stream_until_caught_up

from cdc.config import Settings
from cdc.decoding.pgtypes import INT8, TEXT, column_type
from cdc.errors import ConfigError, ContractError
from cdc.events import UNCHANGED, Column, Relation
from cdc.lake.contracts import (
    REASON_COLUMN,
    Contract,
    Contracts,
    Violation,
    load_contracts,
    normalize_type,
    parse_contract,
    rejected_key,
)
from cdc.lake.store import LocalLake
from cdc.snapshot.consistent import ConsistentSnapshot
from cdc.stream.batcher import Batch, TableBuffer

RELATION = Relation(1, "public", "t", "d", (Column("id", INT8, -1, True),
                                            Column("name", TEXT, -1, False)))


def contract_dir(tmp_path: Path, table: str, text: str) -> Path:
    folder = tmp_path / "contracts"
    folder.mkdir(exist_ok=True)
    (folder / f"{table}.toml").write_text(text)
    return folder


def under_contract(settings: Settings, tmp_path: Path, text: str) -> Settings:
    """The settings with ``text`` as the contract of public.t."""
    return with_settings(settings, contracts=str(contract_dir(tmp_path, "public.t", text)))


def contracts(policy: str, **columns: tuple[str | None, bool]) -> Contracts:
    doc: dict[str, Any] = {"policy": policy, "columns": {
        name: ({"type": t} if t else {}) | {"nullable": n} for name, (t, n) in columns.items()}}
    return Contracts({"public.t": parse_contract("public.t", doc)})


def batch_of(rows: list[tuple[str, tuple[object, ...] | None]]) -> Batch:
    buffer = TableBuffer(RELATION, {})
    for seq, (op, row) in enumerate(rows):
        buffer.append(op, row, 100 + seq, 200, seq, 7, 0)  # type: ignore[arg-type]
    return buffer.cut()


def read_rejected(lake_dir: Path, table: str) -> list[dict[str, Any]]:
    return read_raw(lake_dir, f"_rejected/{table}")


class TestChecker:
    def test_type_names_are_normalised_to_the_raw_pg_type_spelling(self) -> None:
        """Aliases and spacing do not matter: int4 is integer, decimal(10, 2) is numeric."""
        assert normalize_type("INT4") == "integer"
        assert normalize_type("decimal(10, 2)") == "numeric(10,2)"
        assert normalize_type("timestamptz") == "timestamp with time zone"
        assert normalize_type("Timestamp  With Time Zone") == "timestamp with time zone"
        assert normalize_type("int[]") == "integer[]"
        assert normalize_type("varchar") == "character varying"

    def test_missing_extra_and_retyped_columns_are_violations_naming_everything(self) -> None:
        """Each violation names table, column, expected and found."""
        contract = parse_contract("public.t", {"columns": {
            "id": {"type": "int8"}, "qty": {"type": "integer"}, "gone": {"type": "text"}}})
        found = [("id", "bigint"), ("qty", "bigint"), ("extra", "text")]
        assert contract.policy == "fail"
        assert contract.violations(found) == [
            Violation("public.t", "qty", "integer", "bigint"),
            Violation("public.t", "gone", "text", "no such column"),
            Violation("public.t", "extra", "no such column", "text"),
        ]
        assert str(contract.violations(found)[0]) == (
            "public.t: column qty: expected integer, found bigint")
        assert contract.violations([("id", "bigint"), ("qty", "integer"),
                                    ("gone", "text")]) == []

    @pytest.mark.parametrize("doc", [
        {"policy": "ignore", "columns": {"id": {"type": "integer"}}},
        {"columns": {}},
        {"policy": "fail"},
        {"columns": {"id": {"type": "integer", "default": 1}}},
        {"columns": {"id": {"nullable": "no"}}},
        {"columns": {"id": {"type": "integer"}}, "owner": "x"},
    ])
    def test_a_malformed_contract_is_a_config_error(self, doc: dict[str, Any]) -> None:
        """Unknown policy, no columns, unknown or mistyped keys: refused at start."""
        with pytest.raises(ConfigError, match=r"contract public\.t"):
            parse_contract("public.t", doc)

    def test_the_loader_reads_one_file_per_table_and_refuses_bad_names(
            self, tmp_path: Path) -> None:
        """<schema>.<table>.toml per table; no folder setting: no contracts."""
        folder = contract_dir(tmp_path, "public.t", 'policy = "evolve"\n'
                              '[columns.id]\ntype = "bigint"\nnullable = false\n')
        loaded = load_contracts(str(folder))
        assert loaded == {"public.t": Contract(
            "public.t", "evolve", (parse_contract("public.t", {"columns": {"id": {
                "type": "bigint", "nullable": False}}}).columns), str(folder / "public.t.toml"))}
        assert load_contracts("") == {}
        with pytest.raises(ConfigError, match="does not exist"):
            load_contracts(str(tmp_path / "nowhere"))
        (folder / "t.toml").write_text('[columns.id]\ntype = "bigint"\n')
        with pytest.raises(ConfigError, match=r"<schema>\.<table>\.toml"):
            load_contracts(str(folder))

    def test_schema_check_raises_under_fail_and_only_reports_otherwise(self) -> None:
        """fail: ContractError (exit code 7); quarantine, evolve: the violations."""
        types = [column_type(c.type_oid, c.type_modifier) for c in RELATION.columns]
        with pytest.raises(ContractError, match=r"public\.t: column id: expected integer, "
                           r"found bigint") as err:
            contracts("fail", id=("integer", True), name=("text", True)).check_schema(
                RELATION, types)
        assert err.value.exit_code == 7
        for policy in ("quarantine", "evolve"):
            assert contracts(policy, id=("integer", True), name=("text", True)).check_schema(
                RELATION, types) == [Violation("public.t", "id", "integer", "bigint")]
        assert Contracts().check_schema(RELATION, types) == []

    def test_quarantine_splits_null_rows_but_not_deletes_truncates_or_unchanged_toast(
            self) -> None:
        """Only inserts, updates and snapshot reads must carry a non-nullable value."""
        batch = batch_of([("c", ("1", "a")), ("c", ("2", None)), ("d", ("1", None)),
                          ("u", ("3", UNCHANGED)), ("u", ("4", None)), ("t", None)])
        accepted, rejected = contracts("quarantine", id=("bigint", False),
                                       name=("text", False)).split(batch)
        assert accepted is not None
        assert rejected is not None
        assert [(r["_op"], r["id"]) for r in accepted.table.to_pylist()] == [
            ("c", 1), ("d", 1), ("u", 3), ("t", None)]
        assert [(r["id"], r[REASON_COLUMN]) for r in rejected.table.to_pylist()] == [
            (2, "column name: expected NOT NULL, found NULL"),
            (4, "column name: expected NOT NULL, found NULL")]
        assert rejected.first_seq == accepted.first_seq == batch.first_seq
        assert rejected_key(rejected, "2026-01-01").startswith(
            "raw/_rejected/public.t/load_date=2026-01-01/")

    def test_nullability_under_fail_raises_and_under_evolve_passes(self) -> None:
        """fail names table, column, expected and found; evolve writes the batch as it is."""
        batch = batch_of([("c", ("1", None))])
        with pytest.raises(ContractError, match=r"public\.t: 1 rows: column name: expected NOT "
                           "NULL, found NULL"):
            contracts("fail", id=("bigint", True), name=(None, False)).split(batch)
        with structlog.testing.capture_logs() as logs:
            assert contracts("evolve", id=("bigint", True), name=(None, False)).split(
                batch) == (batch, None)
        assert [e["event"] for e in logs] == ["contract_drift"]
        assert Contracts().split(batch) == (batch, None)

    def test_quarantine_sends_every_row_of_an_off_contract_schema(self) -> None:
        """While the schema breaks the contract, all the table's rows go to _rejected."""
        batch = batch_of([("c", ("1", "a"))])
        accepted, rejected = contracts("quarantine", id=("integer", True)).split(batch)
        assert accepted is None
        assert rejected is not None
        assert rejected.table.column(REASON_COLUMN).to_pylist() == [
            "schema: public.t: column id: expected integer, found bigint; "
            "public.t: column name: expected no such column, found text"]


class TestStream:
    def test_fail_stops_before_acknowledging_the_offending_transaction(
        self, source: SourceDb, settings: Settings, lake_dir: Path, tmp_path: Path
    ) -> None:
        """A bigint where the contract says integer: ContractError, nothing written or acked."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, n bigint)")
        checked = under_contract(settings, tmp_path, 'policy = "fail"\n[columns.id]\n'
                                 'type = "integer"\n[columns.n]\ntype = "integer"\n')
        prepare(checked)
        source.execute("INSERT INTO t VALUES (1, 10)")
        after = source.current_lsn()

        with pytest.raises(ContractError, match=r"public\.t: column n: expected integer, "
                           r"found bigint"):
            stream_until_caught_up(checked)

        assert (source.slot_confirmed_lsn() or 0) < after
        assert raw_files(lake_dir, "public.t") == []
        with pytest.raises(ContractError):  # a restart meets the same contract
            stream_until_caught_up(checked)

    def test_quarantine_puts_null_rows_in_rejected_and_streams_on(
        self, source: SourceDb, settings: Settings, lake_dir: Path, tmp_path: Path
    ) -> None:
        """NULL in a non-nullable column: those rows in raw/_rejected with _reason, acked."""
        from cdc.staged.files import raw_tables

        source.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        checked = under_contract(settings, tmp_path, 'policy = "quarantine"\n[columns.id]\n'
                                 'type = "integer"\nnullable = false\n[columns.name]\n'
                                 'type = "text"\nnullable = false\n')
        prepare(checked)
        source.execute("INSERT INTO t VALUES (1, 'a'), (2, NULL), (3, 'c')")
        source.execute("DELETE FROM t WHERE id = 1")
        after = source.current_lsn()

        stream_until_caught_up(checked)

        assert [(r["_op"], r["id"]) for r in read_raw(lake_dir, "public.t")] == [
            ("c", 1), ("c", 3), ("d", 1)]
        rejected = read_rejected(lake_dir, "public.t")
        assert [(r["_op"], r["id"], r["name"], r[REASON_COLUMN]) for r in rejected] == [
            ("c", 2, None, "column name: expected NOT NULL, found NULL")]
        schema = pq.read_schema(raw_files(lake_dir, "_rejected/public.t")[0])
        assert schema.field("id").metadata[b"pg_type"] == b"integer"
        assert schema.field(REASON_COLUMN).type == pa.string()
        assert (source.slot_confirmed_lsn() or 0) >= after  # durable in _rejected: acked
        assert raw_tables(LocalLake(lake_dir)) == ["public.t"]  # compaction skips _rejected

    def test_evolve_lets_a_new_column_through_with_a_drift_warning(
        self, source: SourceDb, settings: Settings, lake_dir: Path, tmp_path: Path
    ) -> None:
        """ADD COLUMN mid-stream under evolve: the stream goes on; the new file has it."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY)")
        checked = under_contract(settings, tmp_path, 'policy = "evolve"\n[columns.id]\n'
                                 'type = "integer"\nnullable = false\n')
        prepare(checked)
        source.execute("INSERT INTO t VALUES (1)")
        source.execute("ALTER TABLE t ADD COLUMN note text")
        source.execute("INSERT INTO t VALUES (2, 'new')")

        with structlog.testing.capture_logs() as logs:
            stream_until_caught_up(checked)

        files = raw_files(lake_dir, "public.t")
        assert len(files) == 2
        assert "note" in pq.read_schema(files[1]).names
        assert [(r["id"], r.get("note")) for r in read_raw(lake_dir, "public.t")] == [
            (1, None), (2, "new")]
        drift = [e for e in logs if e["event"] == "contract_drift"]
        assert drift
        assert "column note: expected no such column, found text" in drift[0]["violations"]
        assert read_rejected(lake_dir, "public.t") == []


class TestSnapshot:
    def test_a_failing_contract_stops_the_snapshot_before_it_creates_the_slot(
        self, source: SourceDb, settings: Settings, lake_dir: Path, tmp_path: Path
    ) -> None:
        """Checked before copying: ContractError, no slot, no rows."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, n bigint)")
        source.execute("INSERT INTO t VALUES (1, 1)")
        checked = under_contract(settings, tmp_path, '[columns.id]\ntype = "integer"\n'
                                 '[columns.n]\ntype = "integer"\n')

        with pytest.raises(ContractError, match=r"public\.t: column n: expected integer, "
                           r"found bigint"):
            ConsistentSnapshot(checked, LocalLake(checked.lake)).run()

        assert source.slot_confirmed_lsn() is None
        assert raw_files(lake_dir, "public.t") == []

    def test_quarantine_routes_null_rows_of_the_snapshot_to_rejected(
        self, source: SourceDb, settings: Settings, lake_dir: Path, tmp_path: Path
    ) -> None:
        """Snapshot reads are checked like inserts."""
        source.execute("CREATE TABLE t (id int PRIMARY KEY, name text)")
        source.execute("INSERT INTO t VALUES (1, 'a'), (2, NULL)")
        checked = under_contract(settings, tmp_path, 'policy = "quarantine"\n[columns.id]\n'
                                 'type = "integer"\n[columns.name]\ntype = "text"\n'
                                 'nullable = false\n')

        ConsistentSnapshot(checked, LocalLake(checked.lake)).run()

        assert [(r["_op"], r["id"]) for r in read_raw(lake_dir, "public.t")] == [("r", 1)]
        assert [(r["_op"], r["id"]) for r in read_rejected(lake_dir, "public.t")] == [("r", 2)]
