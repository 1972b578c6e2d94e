"""``cdc check``: what would break the source, or be lost, before cdc touches anything.

Every finding names its subject and the fix. ``error`` findings stop ``stream``,
``snapshot`` and ``slot create`` before they create or extend a publication
(invariant 8: a table without a usable replica identity is never published for
updates and deletes); ``warning`` findings are logged and let them go on.
The checks only read the catalog.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg

from cdc.errors import new_generation_fix
from cdc.lake.columns import lake_column
from cdc.names import TableName, parse_table_list
from cdc.source.connection import translated

#: columns cdc adds to every raw row, and the raw partition column (cdc.lake.columns)
METADATA_COLUMNS = ("_op", "_lsn", "_commit_lsn", "_seq", "_xid", "_commit_ts", "_unchanged",
                    "load_date", "_reason")
KEYLESS_POLICIES = ("refuse", "insert-only")

_TABLES = """
SELECT c.oid::int, n.nspname::text, c.relname::text, c.relkind::text, c.relpersistence::text,
       c.relreplident::text, c.relispartition,
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary
               AND i.indimmediate),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary
               AND NOT i.indimmediate),
       EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisreplident),
       ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid
             AND a.attnum > 0 AND NOT a.attisdropped AND a.attgenerated <> '' ORDER BY a.attnum),
       ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = c.oid
             AND a.attnum > 0 AND NOT a.attisdropped AND a.attname = ANY(%s) ORDER BY a.attnum),
       CASE WHEN c.relkind = 'p' THEN ARRAY(SELECT t.relid::int FROM pg_partition_tree(c.oid) t
            WHERE t.isleaf) ELSE '{}'::int[] END
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema'
  AND n.nspname NOT LIKE 'pg\\_%%'
ORDER BY 2, 3
"""


@dataclass(frozen=True)
class Finding:
    """One problem: its check, level (``error`` or ``warning``), subject, message and fix."""

    check: str
    level: str
    subject: str
    message: str
    fix: str
    #: stops stream/snapshot/slot create before they touch the publication
    blocks: bool = False

    def text(self) -> str:
        return f"{self.subject}: {self.message}; fix: {self.fix}"

    def line(self) -> str:
        return f"{self.level}: {self.text()}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


@dataclass(frozen=True)
class TableFacts:
    """What the catalog says about one table, as far as publishing it goes."""

    oid: int
    name: TableName
    kind: str  # r: table, p: partitioned
    persistence: str  # p: permanent, u: unlogged, t: temporary
    replident: str  # d: default (primary key), f: full, i: index, n: nothing
    is_partition: bool
    has_pk: bool
    deferrable_pk: bool
    identity_index: bool
    generated: tuple[str, ...]
    metadata_named: tuple[str, ...]
    leaves: tuple[int, ...] = ()

    def identity_problem(self) -> str | None:
        """Why an UPDATE/DELETE on this (non-partitioned) table fails once it is published
        for them, or None when its replica identity is usable."""
        if self.replident == "f" or (self.replident == "i" and self.identity_index):
            return None
        if self.replident == "n":
            return "its REPLICA IDENTITY is NOTHING"
        if self.replident == "i":
            return "its replica identity index is gone"
        if self.has_pk:
            return None
        if self.deferrable_pk:
            return "its only key is DEFERRABLE, which cannot be a replica identity"
        return "it has no primary key and REPLICA IDENTITY DEFAULT"


@dataclass
class Catalog:
    """Every user table, by oid and by name."""

    tables: dict[int, TableFacts] = field(default_factory=dict)

    def by_name(self) -> dict[TableName, TableFacts]:
        return {t.name: t for t in self.tables.values()}

    def identity_problems(self, table: TableFacts) -> list[tuple[TableFacts, str]]:
        """(table or partition, why) for every relation whose UPDATE/DELETE would fail."""
        if table.kind != "p":
            problem = table.identity_problem()
            return [(table, problem)] if problem else []
        result = []
        for oid in table.leaves:
            leaf = self.tables.get(oid)
            problem = leaf.identity_problem() if leaf else None
            if leaf is not None and problem:
                result.append((leaf, f"it is a partition of {table.name.display()} and "
                               f"{problem.removeprefix('it ').replace('its ', 'its own ')}"))
        return result


def load_catalog(conn: psycopg.Connection[Any], dsn: str) -> Catalog:
    with translated(dsn):
        rows = conn.execute(_TABLES, (list(METADATA_COLUMNS),)).fetchall()
    catalog = Catalog()
    for r in rows:
        catalog.tables[int(r[0])] = TableFacts(
            int(r[0]), TableName(str(r[1]), str(r[2])), str(r[3]), str(r[4]), str(r[5]),
            bool(r[6]), bool(r[7]), bool(r[8]), bool(r[9]), tuple(r[10]), tuple(r[11]),
            tuple(int(x) for x in r[12]))
    return catalog


def identity_fix(table: TableName, *, keyless_option: bool = True,
                 parent: TableName | None = None) -> str:
    ident = table.sql()
    text = (f"ALTER TABLE {ident} REPLICA IDENTITY FULL, or give it a unique index on NOT NULL "
            f"columns and ALTER TABLE {ident} REPLICA IDENTITY USING INDEX <index>, or leave "
            f"it out with --exclude-tables {(parent or table).option()}")
    if keyless_option:
        text += (", or, for an append-only table, --keyless-tables insert-only (its updates and "
                 "deletes are then not published)")
    return text


@dataclass(frozen=True)
class PublicationFacts:
    name: str
    all_tables: bool
    via_root: bool
    comment: str
    tables: tuple[TableName, ...]

    @property
    def created_by_cdc(self) -> bool:
        return self.comment.startswith(CDC_COMMENT)

    @property
    def managed(self) -> bool:
        """cdc keeps its table list: every user table that qualifies, added at start."""
        return self.comment.startswith(CDC_MANAGED)


CDC_COMMENT = "created by cdc"
CDC_MANAGED = "created by cdc; table list managed by cdc"


def publication_facts(conn: psycopg.Connection[Any], dsn: str,
                      name: str) -> PublicationFacts | None:
    with translated(dsn):
        row = conn.execute(
            "SELECT p.puballtables, p.pubviaroot, coalesce(obj_description(p.oid, "
            "'pg_publication'), '') FROM pg_publication p WHERE p.pubname = %s",
            (name,)).fetchone()
        if row is None:
            return None
        tables = conn.execute(
            "SELECT schemaname::text, tablename::text FROM pg_publication_tables "
            "WHERE pubname = %s ORDER BY 1, 2", (name,)).fetchall()
    return PublicationFacts(name, bool(row[0]), bool(row[1]), str(row[2]),
                            tuple(TableName(str(s), str(t)) for s, t in tables))


# -- the checks --------------------------------------------------------------------------------


def server_findings(conn: psycopg.Connection[Any], dsn: str, slot: str) -> list[Finding]:
    """wal_level, free slots and senders, the REPLICATION privilege, WAL retention limits."""
    with translated(dsn):
        row = conn.execute(
            "SELECT current_setting('wal_level'), current_setting('max_replication_slots')::int,"
            " (SELECT count(*) FROM pg_replication_slots)::int,"
            " current_setting('max_wal_senders')::int,"
            " (SELECT count(*) FROM pg_stat_replication)::int,"
            " (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),"
            " current_setting('max_slot_wal_keep_size'),"
            " (SELECT wal_status FROM pg_replication_slots WHERE slot_name = %s),"
            " EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = %s)",
            (slot, slot)).fetchone()
    assert row is not None
    level, max_slots, slots, max_senders, senders, replication, keep, wal_status, exists = row
    found: list[Finding] = []
    if level != "logical":
        found.append(Finding("wal_level", "error", "server", f"wal_level is {level!r}, logical "
                             "replication needs 'logical'", "set wal_level = logical in "
                             "postgresql.conf and restart "
                             "the server", blocks=True))
    if not exists and slots >= max_slots:
        found.append(Finding("free_slots", "error", "server", f"all {max_slots} replication slots "
                             "are in use", "drop an unused slot (SELECT pg_drop_replication_slot"
                             "('<name>')) or raise max_replication_slots and restart", blocks=True))
    if senders >= max_senders:
        found.append(Finding("free_senders", "error", "server", f"all {max_senders} WAL senders "
                             "are busy", "stop an idle replication client or raise "
                             "max_wal_senders and restart", blocks=True))
    if not replication:
        found.append(Finding("replication_privilege", "error", "server", "the user may not "
                             "replicate", "ALTER ROLE <user> REPLICATION (and allow a replication"
                             " connection to this database in pg_hba.conf)", blocks=True))
    if str(keep) == "-1":
        found.append(Finding("max_slot_wal_keep_size", "warning", "server",
                             "max_slot_wal_keep_size is unlimited: a stopped cdc makes the server "
                             "keep WAL until its disk is full", "ALTER SYSTEM SET "
                             "max_slot_wal_keep_size = '50GB' (beyond it the slot is invalidated "
                             "and needs a new snapshot) and SELECT pg_reload_conf()"))
    if wal_status == "lost":
        found.append(Finding("wal_status", "error", f"slot {slot}", "the server removed WAL the "
                             "slot needs (wal_status lost)", new_generation_fix(slot), blocks=True))
    elif wal_status == "unreserved":
        found.append(Finding("wal_status", "warning", f"slot {slot}", "the slot is about to lose "
                             "WAL it needs (wal_status unreserved)", "let cdc stream catch up "
                             "now, or raise max_slot_wal_keep_size"))
    return found


@dataclass
class Plan:
    """The publication cdc would stream from: its tables, and what it must add."""

    publication: PublicationFacts | None
    cover: list[TableFacts]  # every table the publication publishes (or would)
    add: list[TableFacts]  # tables cdc adds to its (managed or new) publication
    insert_only: list[TableFacts]  # keyless tables published for inserts only
    findings: list[Finding]


def plan_publication(catalog: Catalog, publication: PublicationFacts | None, *,
                     tables: Sequence[str], exclude: Sequence[str], keyless: str = "refuse",
                     companion: PublicationFacts | None = None) -> Plan:
    """What a publication would cover, checked table by table.

    cdc creates publications with an explicit table list (never FOR ALL TABLES, which
    publishes updates and deletes of every table the application creates later). Without
    ``--tables`` the list is managed: at each start, user tables created since are added when
    they qualify; the others are reported and left out, so they never break the application.
    """
    names = catalog.by_name()
    wanted = parse_table_list(tables)
    excluded = set(parse_table_list(exclude))
    found: list[Finding] = []
    for name in [*wanted, *excluded]:
        if name not in names:
            option = "--tables" if name in wanted else "--exclude-tables"
            found.append(Finding("tables", "error", name.display(),
                                 f"table {name.display()} named in {option} does not exist",
                                 f"check the {option} list (schema.table, comma-separated; "
                                 'quote names with dots: "Sales.EU"."Orders")', blocks=True))
    published = set(publication.tables) if publication else set()
    existing = [names[n] for n in sorted(published) if n in names]
    inserts = [names[n] for n in (companion.tables if companion else ()) if n in names]
    published |= {t.name for t in inserts}
    explicit = bool(wanted) or (publication is not None and not publication.managed)
    if publication is not None and publication.all_tables:
        existing = [t for t in catalog.tables.values()
                    if not t.is_partition and t.persistence == "p"]
    if explicit and publication is None:
        candidates = [names[n] for n in wanted if n in names and n not in excluded]
    elif explicit:
        candidates = []
    else:  # managed: every user table not yet published
        candidates = [t for t in catalog.tables.values()
                      if not t.is_partition and t.name not in published
                      and t.name not in excluded]
    add, insert_only = _sort_candidates(catalog, candidates, found, keyless=keyless,
                                        explicit=explicit, new=publication is None)
    pub = publication.name if publication else ""
    for table in existing:
        for rel, why in catalog.identity_problems(table):
            found.append(Finding("replica_identity", "error", rel.name.display(),
                                 f"published for updates and deletes, but {why}: the "
                                 "application's UPDATE and DELETE on it fail now",
                                 f"ALTER TABLE {rel.name.sql()} REPLICA IDENTITY FULL, or "
                                 f"ALTER PUBLICATION {pub} DROP TABLE {table.name.sql()}",
                                 blocks=True))
    cover = [*existing, *inserts, *add, *insert_only]
    found += _table_findings(catalog, cover, publication)
    return Plan(publication, cover, add, insert_only, found)


def _sort_candidates(catalog: Catalog, candidates: list[TableFacts], found: list[Finding], *,
                     keyless: str, explicit: bool, new: bool
                     ) -> tuple[list[TableFacts], list[TableFacts]]:
    """(tables to publish, keyless tables to publish for inserts only); a finding for each
    of the others (blocking when the list is explicit or the publication new)."""
    add, insert_only = [], []
    for table in candidates:
        reason = _left_out(table)
        problems = catalog.identity_problems(table)
        if reason:
            check, why, fix = reason
            found.append(Finding(check, "error" if explicit else "warning",
                                 table.name.display(), f"left out of the publication: {why}",
                                 fix, blocks=explicit))
        elif problems and keyless == "insert-only":
            insert_only.append(table)
        elif problems:
            found += [Finding("replica_identity", "error", rel.name.display(),
                              "not published: an UPDATE or DELETE on it would fail once it is, "
                              f"because {why}", identity_fix(rel.name, parent=table.name),
                              blocks=new or explicit) for rel, why in problems]
        else:
            add.append(table)
    return add, insert_only


def _left_out(table: TableFacts) -> tuple[str, str, str] | None:
    """(check, why, fix) when cdc does not publish a table at all."""
    if table.persistence != "p":
        return ("unlogged", "UNLOGGED: its changes are never written to the WAL, so they can "
                "never be replicated", f"ALTER TABLE {table.name.sql()} SET LOGGED, or leave it "
                f"out with --exclude-tables {table.name.option()}")
    return None


def _table_findings(catalog: Catalog, cover: Iterable[TableFacts],
                    publication: PublicationFacts | None) -> list[Finding]:
    found = []
    for table in cover:
        relations = [table, *(catalog.tables[o] for o in table.leaves if o in catalog.tables)]
        generated = sorted({c for r in relations for c in r.generated})
        if generated:
            found.append(Finding(
                "generated_columns", "warning", table.name.display(),
                f"generated column(s) {', '.join(generated)} are never sent by pgoutput on "
                "PostgreSQL 15, so they are missing from raw and staged",
                "compute them downstream from the columns they derive from (cdc query / your "
                "models), or make them plain columns filled by a trigger"))
        if table.metadata_named:
            renamed = ", ".join(f"{c} as {lake_column(c)}" for c in table.metadata_named)
            found.append(Finding(
                "metadata_columns", "warning", table.name.display(),
                f"column(s) named like cdc's metadata land renamed: {renamed}",
                "nothing to do (the renaming is reversible, see the README's Column names); "
                f"or rename them at the source: ALTER TABLE {table.name.sql()} RENAME COLUMN "
                "..."))
        if table.kind == "p" and publication is not None and not publication.via_root:
            found.append(Finding(
                "partitioned", "warning", table.name.display(),
                "partitioned, but the publication does not publish_via_partition_root: each "
                "partition lands under its own name",
                f"ALTER PUBLICATION {publication.name} SET (publish_via_partition_root = true)"))
    if publication is not None and publication.all_tables:
        found.append(Finding(
            "all_tables", "warning", f"publication {publication.name}",
            "FOR ALL TABLES also publishes updates and deletes of every table created later, "
            "with or without a replica identity",
            f"DROP PUBLICATION {publication.name}; cdc then creates one with an explicit, "
            "checked table list"))
    return found


