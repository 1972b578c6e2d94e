"""The publication cdc streams from: checked, created with an explicit table list, kept up.

cdc never creates ``FOR ALL TABLES``: that publishes updates and deletes of every table the
application creates later, and the application's own UPDATE/DELETE on such a table fails
when it has no usable replica identity. Instead (invariant 8):

- without ``--tables`` the publication's list is *managed*: every user table that qualifies
  (logged, usable replica identity, no column named like cdc's metadata) is in it, and tables
  created since are added at each ``stream``/``snapshot``/``slot create``; the others are left
  out and reported (``cdc check`` lists them with the fix);
- ``--keyless-tables insert-only`` puts tables without a usable replica identity into a
  companion publication ``<publication>_inserts`` that publishes only inserts and truncates
  (for append-only tables): their UPDATE/DELETE keep working and are not captured;
- the publications cdc creates carry a ``COMMENT`` saying so; ``cdc slot drop`` drops those
  and leaves any other;
- a table that joins a publication while the lake follows the slot had rows before it joined
  (pgoutput filters by membership as it decodes): a :class:`Joining` is told before the
  ``ALTER PUBLICATION ... ADD TABLE`` commits (the stream records a backfill durably) and after.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import psycopg
import structlog
from psycopg import sql

from cdc.config import Settings
from cdc.errors import CdcError, PublicationError, SourceError, first_line
from cdc.names import TableName
from cdc.source.catalog import SideConnection
from cdc.source.connection import translated
from cdc.source.preflight import (
    CDC_COMMENT,
    CDC_MANAGED,
    Finding,
    Plan,
    PublicationFacts,
    load_catalog,
    plan_publication,
    publication_facts,
    server_findings,
)

log = structlog.get_logger("cdc.source.publication")


INSERTS = "insert, truncate"  # what the companion of keyless (append-only) tables publishes


def inserts_name(publication: str) -> str:
    """The companion publication for insert-only (keyless) tables."""
    return f"{publication[:55]}_inserts"


class Joining(Protocol):
    """Told about tables joining a publication (the stream's backfill, ``snapshot/backfill.py``)."""

    def before_add(self, tables: Sequence[TableName], *, insert_only: bool) -> None:
        """Before the statement that adds them commits: record what they will need."""

    def added(self, tables: Sequence[TableName]) -> None:
        """After it committed: their changes flow from now on."""


class PreflightError(SourceError):
    """Problems found before cdc touches the source; one line each."""

    def __init__(self, findings: Sequence[Finding]) -> None:
        self.findings = list(findings)
        super().__init__("\n".join(f.text() for f in self.findings))


@dataclass
class Report:
    findings: list[Finding]
    plan: Plan

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    def to_dict(self) -> dict[str, Any]:
        return {"ok": not self.errors, "problems": [f.to_dict() for f in self.findings],
                "tables": [t.name.display() for t in self.plan.cover],
                "insert_only": [t.name.display() for t in self.plan.insert_only]}


def check(conn: psycopg.Connection[Any], s: Settings) -> Report:
    """Every finding for the server, the slot and the tables the publication would cover."""
    found = server_findings(conn, s.dsn, s.slot)
    catalog = load_catalog(conn, s.dsn)
    publication = publication_facts(conn, s.dsn, s.publication)
    plan = plan_publication(catalog, publication, tables=s.tables, exclude=s.exclude_tables,
                            keyless=s.keyless_tables,
                            companion=publication_facts(conn, s.dsn, inserts_name(s.publication)))
    if publication is not None and not plan.cover:
        found.append(Finding("empty_publication", "error", f"publication {s.publication}",
                             f"publication '{s.publication}' publishes no tables",
                             f"add tables: ALTER PUBLICATION {s.publication} ADD TABLE "
                             "<schema.table>, or create tables first", blocks=True))
    elif (publication is None and not plan.add and not plan.insert_only
          and not any(f.blocks for f in plan.findings)):
        found.append(Finding("empty_publication", "error", f"publication {s.publication}",
                             "no table qualifies for the publication",
                             "create tables first, or fix the tables listed above", blocks=True))
    return Report(found + plan.findings, plan)


def prepare(conn: psycopg.Connection[Any], s: Settings,
            joining: Joining | None = None) -> list[str]:
    """Check, then create or extend the publication(s); the names to stream from.

    Blocking findings raise :class:`PreflightError` before anything is created; the other
    findings are logged as warnings. ``joining`` hears of every table added.
    """
    report = check(conn, s)
    blocking = [f for f in report.findings if f.blocks]
    if blocking:
        raise PreflightError(blocking)
    for finding in report.findings:
        log.warning("preflight", check=finding.check, subject=finding.subject,
                    problem=finding.message, fix=finding.fix)
    plan = report.plan
    managed = not s.tables
    added = [t.name for t in plan.add]
    _apply(conn, s, _Target(s.publication, plan.publication), added, managed=managed,
           joining=joining)
    companion = publication_facts(conn, s.dsn, inserts_name(s.publication))
    if plan.insert_only or (companion is None and s.keyless_tables == "insert-only"):
        # created even empty, so the stream names it from the start and a keyless table
        # created later can join it while the stream runs
        inserts = [t.name for t in plan.insert_only]
        _apply(conn, s, _Target(inserts_name(s.publication), companion, INSERTS), inserts,
               managed=managed, joining=joining)
        added += inserts
        companion = companion or publication_facts(conn, s.dsn, inserts_name(s.publication))
    if joining is not None and added:
        joining.added(added)
    return [s.publication] + ([inserts_name(s.publication)] if companion is not None else [])


#: how long one table sync may take on the side connection before it is given up (a stalled
#: network path answers nothing; the stream loop waits for the sync)
SYNC_SECONDS = 30.0


class TableKeeper:
    """Adds the tables created while the stream runs to the publication cdc manages.

    Every ``interval`` seconds (on the side connection) the publication is planned again
    as at start; qualifying new tables are added (``lock_timeout`` 5 s, so a migration
    holding a lock is never queued behind), the others are logged once each. Failures only
    log: keeping the table list must never stop the stream.
    """

    def __init__(self, side: SideConnection, settings: Settings,
                 joining: Joining | None = None) -> None:
        self.side = side
        self.settings = settings
        self.joining = joining
        self.interval = settings.table_sync_seconds if not settings.tables else 0.0
        self.next = time.monotonic() + self.interval
        self.reported: set[tuple[str, str]] = set()

    def maybe_sync(self) -> tuple[list[TableName], list[TableName]]:
        """The tables added now (their changes flow from now on), and those added for inserts
        only."""
        if self.interval <= 0 or time.monotonic() < self.next:
            return [], []
        self.next = time.monotonic() + self.interval
        s = self.settings
        try:
            with self.side.bounded(SYNC_SECONDS) as conn:
                report = check(conn, s)
                plan = report.plan
                if plan.publication is None or not plan.publication.managed:
                    return [], []
                for f in report.findings:
                    if (f.check, f.subject) not in self.reported:
                        self.reported.add((f.check, f.subject))
                        log.warning("preflight", check=f.check, subject=f.subject,
                                    problem=f.message, fix=f.fix)
                companion = publication_facts(conn, s.dsn, inserts_name(s.publication))
                with conn.transaction():
                    conn.execute("SET LOCAL lock_timeout = '5s'")
                    _apply(conn, s, _Target(s.publication, plan.publication),
                           [t.name for t in plan.add], managed=True, joining=self.joining)
                    if companion is not None:
                        _apply(conn, s, _Target(companion.name, companion, INSERTS),
                               [t.name for t in plan.insert_only], managed=True,
                               joining=self.joining)
        except (CdcError, psycopg.Error) as exc:
            log.warning("table_sync_failed", error=first_line(exc),
                        fix="check the role's rights on the publication; cdc retries")
            self.side.close()
            return [], []
        added = [t.name for t in plan.add]
        inserts = [t.name for t in plan.insert_only] if companion is not None else []
        if self.joining is not None and (added or inserts):
            self.joining.added(added + inserts)
        return added, inserts


@dataclass(frozen=True)
class _Target:
    """A publication to create (``existing`` None) or extend, and what it publishes."""

    name: str
    existing: PublicationFacts | None
    publish: str | None = None  # None: everything (insert, update, delete, truncate)


def _apply(conn: psycopg.Connection[Any], s: Settings, target: _Target, add: list[TableName],
           *, managed: bool, joining: Joining | None = None) -> None:
    name, existing, publish = target.name, target.existing, target.publish
    idents = sql.SQL(", ").join(sql.Identifier(t.schema, t.table) for t in add)
    if existing is None:
        options: list[sql.Composable] = (
            [sql.SQL("publish = {}").format(sql.Literal(publish))] if publish else [])
        if s.publish_via_partition_root and conn.info.server_version >= 130000:
            options.append(sql.SQL("publish_via_partition_root = true"))
        stmt = sql.SQL("CREATE PUBLICATION {}").format(sql.Identifier(name))
        if add:
            stmt = sql.SQL("{} FOR TABLE {}").format(stmt, idents)
        if options:
            stmt = sql.SQL("{} WITH ({})").format(stmt, sql.SQL(", ").join(options))
        comment = (f"{CDC_MANAGED} (new tables that qualify are added at start)" if managed
                   else f"{CDC_COMMENT} for --tables")
        statements = [stmt, sql.SQL("COMMENT ON PUBLICATION {} IS {}").format(
            sql.Identifier(name), sql.Literal(comment))]
        what = "could not be created"
    elif add:
        statements = [sql.SQL("ALTER PUBLICATION {} ADD TABLE {}").format(
            sql.Identifier(name), idents)]
        what = "could not be extended"
    else:
        return
    if joining is not None and add:
        joining.before_add(add, insert_only=publish == INSERTS)
    try:
        with conn.transaction():
            for statement in statements:
                conn.execute(statement)
    except psycopg.Error as exc:
        raise PublicationError(
            f"publication {name!r} {'does not exist and ' if existing is None else ''}{what}: "
            f"{first_line(exc)}",
            fix=f"run as a superuser or the tables' owner: {statements[0].as_string(conn)}",
        ) from exc
    _added(target, add, joining)


def _added(target: _Target, add: list[TableName], joining: Joining | None) -> None:
    """Log what was created or added, and what becomes of the rows the tables held before."""
    if target.existing is None:
        log.info("publication_created", publication=target.name, tables=len(add),
                 publish=target.publish or "insert, update, delete, truncate")
        if joining is None:
            return  # a new publication on a new slot: cdc snapshot reads its tables
    for table in add:
        if joining is not None:
            log.info("table_added_to_publication", publication=target.name,
                     table=table.display(),
                     note="cdc stream backfills the rows it held before (cdc status shows it)")
        else:
            log.warning("table_added_to_publication", publication=target.name,
                        table=table.display(),
                        note="rows it held before now are not in the lake: cdc resync --tables "
                        f"{table.option()} while cdc stream runs backfills them")


def drop(conn: psycopg.Connection[Any], dsn: str, publication: str) -> list[str]:
    """Drop the publications cdc created; one sentence per publication, dropped or left."""
    said = []
    for name in (publication, inserts_name(publication)):
        facts = publication_facts(conn, dsn, name)
        if facts is None:
            continue
        if facts.created_by_cdc:
            with translated(dsn):
                conn.execute(sql.SQL("DROP PUBLICATION {}").format(sql.Identifier(name)))
            said.append(f"publication {name} dropped (cdc created it)")
        else:
            said.append(f"publication {name} left in place (cdc did not create it; drop it "
                        f"with DROP PUBLICATION {name} when nothing else uses it)")
    return said
