"""Compaction runs over a lake: every table, each under its single-writer lease.

``compact_lake`` compacts every table (or the ones named) up to the slot's checkpoint, a
failing table recorded and the others going on; ``compact_table`` runs one table's
compaction (``staged/compactor.py``) and its history under the table's lease; and
``CompactionLoop`` runs ``compact_lake`` beside the stream, on a background thread.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import structlog

from cdc.errors import CdcError, ConfigError
from cdc.events import Lsn
from cdc.lake import lease
from cdc.lake.columns import lake_column
from cdc.lake.layout import segment_of, staged_key
from cdc.lake.store import Lake
from cdc.names import parse_table_list, parse_table_name
from cdc.staged.bounds import lake_bound, table_bound
from cdc.staged.compactor import CompactOptions, TableCompactor, TableResult
from cdc.staged.failures import clear_failure, record_failure
from cdc.staged.files import list_raw, newest_file, raw_tables, record_floor
from cdc.staged.renames import earlier_names, find_renames, move_renamed

log = structlog.get_logger("cdc.staged.compactor")


def parse_keys(values: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``["public.t=a,b"]`` → ``{"public.t": ("a", "b")}``."""
    keys: dict[str, tuple[str, ...]] = {}
    for value in values:
        table, sep, cols = value.partition("=")
        columns = tuple(c.strip() for c in cols.split(",") if c.strip())
        if not sep or "." not in table or not columns:
            raise ConfigError(f"--key {value!r} is not schema.table=col1,col2",
                              fix="write e.g. --key public.events=id or --key s.t=a,b")
        keys[table.strip()] = columns
    return keys


def compact_lake(lake: Lake, slot: str, tables: Sequence[str] = (),
                 keys: Mapping[str, tuple[str, ...]] | None = None, *,
                 options: CompactOptions | None = None,
                 history: bool = True) -> list[TableResult]:
    """Compact every table (or ``tables``) up to the slot's checkpoint; safe beside streaming.

    Without a stream checkpoint the bound is the last finished ``cdc snapshot --mode
    updated_at`` run (``staged/bounds.py``). Returns one result per table; an empty list
    when there is neither yet. With ``history``, each keyed table's history
    (``cdc.history``) follows its staged table. A table that fails does not stop the
    others: its result carries the error, which is also recorded in the lake for ``cdc
    status`` (``cdc.staged.failures``) until it compacts.
    """
    bound = lake_bound(lake, slot)  # before listing: files below it exist
    if bound is None:
        log.info("nothing_to_compact", reason="no checkpoint yet", slot=slot, lake=lake.uri)
        return []
    options = options or CompactOptions()
    results = []
    folders = raw_tables(lake)
    renamed = find_renames(lake, folders)  # ALTER TABLE ... RENAME TO (staged/renames.py)
    move_renamed(lake, renamed, options.purpose)
    wanted = [segment_of(n) for n in parse_table_list(tables)]  # names → lake segments
    by_segment = {segment_of(parse_table_name(k)): tuple(lake_column(c) for c in v)
                  for k, v in (keys or {}).items()}
    for table in dict.fromkeys(renamed.get(t, t) for t in wanted or folders):
        try:
            result = compact_table(lake, table, table_bound(lake, table, bound),
                                   key=by_segment.get(table), options=options, history=history,
                                   earlier=earlier_names(renamed, table))
        except CdcError as exc:
            log.warning("compaction_table_failed", table=table, error=str(exc))
            record_failure(lake, table, exc)
            results.append(TableResult(table, 0, 0, None, None, 0.0, error=str(exc),
                                       exit_code=exc.exit_code))
            continue
        if not result.held_by:
            clear_failure(lake, table)
        results.append(result)
    return results


def compact_table(  # noqa: PLR0913  the table, its bound and its settings
    lake: Lake, table: str, bound: Lsn, *, key: tuple[str, ...] | None,
    options: CompactOptions, history: bool = True, earlier: list[str] | None = None,
) -> TableResult:
    """One table, under its single-writer lease (``cdc.lake.lease``): wait for a rival
    holder or skip the table (``options.wait``); the commit is fenced by the lease. Its
    history follows under the same lease (same bound, its own watermark and floor).
    ``earlier``: the table's raw folders under earlier names (``staged/renames.py``); a
    resync's hold is in ``bound`` already (``staged/bounds.py``)."""
    name = staged_key(table)
    got = lease.try_acquire(lake, name, options.purpose, ttl=options.lease_seconds)
    if not isinstance(got, lease.Lease) and options.wait:
        log.warning("compaction_waiting", table=table, held_by=got.describe())
        got = lease.acquire(lake, name, options.purpose, ttl=options.lease_seconds)
    if not isinstance(got, lease.Lease):
        log.info("compaction_skipped", table=table, held_by=got.describe())
        return TableResult(table, 0, 0, None, None, 0.0, held_by=got.describe())
    try:
        result = TableCompactor(lake, table, key, options, got.fence,
                                 earlier=earlier).run(bound)
        if history:  # cdc/history/writer.py
            from cdc.history.writer import compact_history, history_watermark, keyed

            got.fence()
            watermark = history_watermark(lake, table)
            if watermark is None and not keyed(lake, newest_file(lake, table), key):
                return result  # keyless: no history (and no listing of all its raw files)
            listing = list_raw(lake, table, watermark, consumer="history",
                               folders=earlier or ())
            done = compact_history(lake, table, listing.files, bound, key=key, options=options,
                                  fence=got.fence)
            if done is not None and done.watermark is not None:
                record_floor(lake, table, done.watermark, listing, options.today())
        return result
    finally:
        got.release()


#: chunk limits of the compaction inside ``cdc stream`` (``cdc compact``: CompactOptions')
BACKGROUND_ROWS, BACKGROUND_BYTES = 200_000, 64 * 2**20


class CompactionLoop:
    """Runs ``compact_lake`` every ``interval`` seconds on a background thread.

    The stream keeps reading meanwhile: compaction only reads raw files below the
    checkpoint and writes staged tables, so the two never wait on each other. A failed
    run is logged and retried at the next interval; the stream is not stopped by it.
    """

    def __init__(self, lake: Lake, slot: str, interval: float,
                 keys: Mapping[str, tuple[str, ...]] | None = None, *,
                 history: bool = True, lease_seconds: float = lease.DEFAULT_TTL) -> None:
        self.lake = lake
        self.history = history
        self.slot = slot
        self.interval = interval
        self.keys = keys
        # beside `cdc compact` (or a second stream): skip a table another one holds; in
        # smaller chunks than `cdc compact`, as the stream's buffers share the process
        self.options = CompactOptions(wait=False, purpose="cdc stream --compact-every",
                                      lease_seconds=lease_seconds, chunk_rows=BACKGROUND_ROWS,
                                      chunk_bytes=BACKGROUND_BYTES)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="compaction", daemon=True)

    def start(self) -> CompactionLoop:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join()

    def _run(self) -> None:
        from cdc.ops import metrics

        while not self.stopping.wait(self.interval):
            try:
                for result in compact_lake(self.lake, self.slot, keys=self.keys,
                                           history=self.history, options=self.options):
                    if result.error:
                        metrics.COMPACTION_FAILURES.labels(result.table).inc()
                        continue
                    metrics.COMPACTION_RUNS.labels(result.table).inc()
                    metrics.COMPACTION_SECONDS.observe(result.seconds)
            except CdcError as exc:
                metrics.ERRORS.labels(type(exc).__name__).inc()
                log.warning("compaction_failed", error=str(exc))
            except Exception as exc:  # a compaction bug must not kill the stream
                metrics.ERRORS.labels(type(exc).__name__).inc()
                log.exception("compaction_crashed", error=str(exc))
