"""Every setting's ``--help`` text, in one place: ``options.option`` builds each command's
typer option from it (the flag from ``config.flag_name``), so a setting reads the same on
every command that takes it. Each text names the setting's CDC_* variable and its default."""

from __future__ import annotations

HELP: dict[str, str] = {
    "dsn": (
        "Source database, e.g. postgresql://user@host:5432/db (env: CDC_DSN)"),
    "lake": (
        "Lake root: a local folder or s3://bucket/prefix (env: CDC_LAKE; default: ./lake)"),
    "s3_endpoint": (
        "S3-compatible endpoint for an s3:// lake, e.g. http://127.0.0.1:9000 for MinIO; "
        "plain HTTP only when named here (env: CDC_S3_ENDPOINT, else AWS_ENDPOINT_URL; "
        "default: AWS S3)"),
    "s3_max_attempts": (
        "Attempts per S3 request (adaptive retries) before the command stops with a lake "
        "error (env: CDC_S3_MAX_ATTEMPTS; default: 10)"),
    "slot": (
        "Replication slot name (env: CDC_SLOT; default: cdc)"),
    "publication": (
        "Publication name; created when missing (env: CDC_PUBLICATION; default: cdc)"),
    "tables": (
        "Comma-separated schema.table list for a new publication (default: every table that "
        "qualifies, see cdc check; new ones are added as they appear) (env: CDC_TABLES)"),
    "exclude_tables": (
        "Comma-separated schema.table list cdc leaves out of the publication it manages "
        "(quote names with dots or capitals: '\"Sales.EU\".\"Orders\"') (env: "
        "CDC_EXCLUDE_TABLES)"),
    "keyless_tables": (
        "Tables without a usable replica identity (no primary key, a DEFERRABLE key, REPLICA "
        "IDENTITY NOTHING): refuse them (publishing their updates would make the "
        "application's UPDATE/DELETE fail), or insert-only: publish only their inserts and "
        "truncates, for append-only tables (env: CDC_KEYLESS_TABLES; default: refuse)"),
    "plugin": (
        "Output plugin (env: CDC_PLUGIN; default: pgoutput)"),
    "binary": (
        "pgoutput's binary transfer (PostgreSQL 14+): auto uses it when cdc decodes every "
        "published column's type in binary exactly (else text, saying which columns keep it "
        "in text); on the same, but warns when it cannot; off: always text (env: CDC_BINARY; "
        "default: off: measured no faster, see the README)"),
    "flush_rows": (
        "Flush when this many changes are buffered (env: CDC_FLUSH_ROWS; default: 200000)"),
    "flush_bytes": (
        "Flush when the buffered changes take about this much memory, e.g. 64MB (env: "
        "CDC_FLUSH_BYTES; default: 128MiB)"),
    "flush_seconds": (
        "Flush when the oldest buffered change is this old, e.g. 10s (env: "
        "CDC_FLUSH_SECONDS; default: 10s)"),
    "status_seconds": (
        "Send the server a status update (acknowledgement) this often, e.g. 10s (env: "
        "CDC_STATUS_SECONDS; default: 10s)"),
    "progress_seconds": (
        "Log a progress line this often (env: CDC_PROGRESS_SECONDS; default: 10s)"),
    "max_backoff_seconds": (
        "Longest wait between reconnection attempts (env: CDC_MAX_BACKOFF_SECONDS; default: "
        "30s)"),
    "silence_seconds": (
        "Give the replication connection up and reconnect after this long without any "
        "message from the server (a stalled network path); 0: the server's "
        "wal_sender_timeout (env: CDC_SILENCE_SECONDS; default: 0)"),
    "slot_busy_seconds": (
        "Stop (exit 4) when the slot stays held by another consumer this long (env: "
        "CDC_SLOT_BUSY_SECONDS; default: 5m)"),
    "heartbeat_seconds": (
        "When idle, write a logical message this often so a quiet database's slot keeps "
        "advancing; 0 disables (env: CDC_HEARTBEAT_SECONDS; default: 60s)"),
    "compact_every": (
        "Compact raw into the staged Delta tables this often, in the background; 0 disables "
        "(env: CDC_COMPACT_EVERY; default: 60s)"),
    "until_caught_up": (
        "Drain the slot up to the WAL position at start, flush, acknowledge and exit 0, for "
        "cron-style runs (env: CDC_UNTIL_CAUGHT_UP; default: off)"),
    "table_sync_seconds": (
        "Without --tables: add tables created meanwhile that qualify to the publication this "
        "often while streaming; 0: only at start (env: CDC_TABLE_SYNC_SECONDS; default: 60s)"),
    "backfill_new_tables": (
        "Re-read a table that joins the publication while the lake follows the slot (table "
        "sync, a restart, a longer --tables list), so the rows it held before reach the "
        "lake; off: only its changes from then on (env: CDC_BACKFILL_NEW_TABLES; default: "
        "on)"),
    "metrics_port": (
        "Serve Prometheus metrics on this port (env: CDC_METRICS_PORT; default: off)"),
    "publish_via_partition_root": (
        "For a publication cdc creates: publish partitions' changes as changes of their "
        "partitioned table, so they land under the parent (env: "
        "CDC_PUBLISH_VIA_PARTITION_ROOT; default: on, PostgreSQL 13+)"),
    "contracts": (
        "Folder of schema contracts, one <schema>.<table>.toml per checked table (columns, "
        "types, nullability; policy fail, quarantine or evolve) (env: CDC_CONTRACTS; "
        "default: none)"),
    "unconvertible": (
        "A value that cannot be stored exactly (NaN in numeric(p,s), a multi-dimensional "
        "array): fail stops without acknowledging it; quarantine writes its batch to "
        "raw/_rejected, holds compaction of the table and goes on, until you fix the column "
        "and run cdc resync --tables (env: CDC_UNCONVERTIBLE; default: fail)"),
    "keys": (
        "Key of a table without a primary key, schema.table=col1,col2 (repeatable; env: "
        "CDC_KEYS, ;-separated); without one such a table is staged as an append of its "
        "inserts"),
    "snapshot_mode": (
        "consistent: every published table at one instant, tied to a new slot so `cdc "
        "stream` continues exactly where it ends. updated_at: rows whose updated_at column "
        "passed the stored watermark (cannot see deletes, and sees only the last version of "
        "a row between runs) (env: CDC_SNAPSHOT_MODE; default: consistent)"),
    "workers": (
        "Parallel COPY connections (env: CDC_WORKERS; default: 2)"),
    "chunk_rows": (
        "Rows per chunk (primary-key or CTID range) and per raw file (env: CDC_CHUNK_ROWS; "
        "default: 500000)"),
    "updated_at_column": (
        "updated_at mode: the change-time column of every table (env: CDC_UPDATED_AT_COLUMN; "
        "default: updated_at)"),
    "updated_at": (
        "updated_at mode: per-table column, schema.table=column (repeatable; env: "
        "CDC_UPDATED_AT, comma-separated)"),
    "updated_at_lookback": (
        "updated_at mode: also re-read rows whose updated_at is at most this long before the "
        "previous run's start, e.g. 10m: more than your longest transaction, so a row "
        "committed late is not missed (env: CDC_UPDATED_AT_LOOKBACK; default: 5m; 0: off)"),
    "resync_chunk_rows": (
        "Rows per chunk of a re-read (cdc resync, and cdc stream's backfill of a table that "
        "joins the publication) (env: CDC_RESYNC_CHUNK_ROWS; default: 100000)"),
    "resync_wait_seconds": (
        "How long a re-read waits for the stream's checkpoint to pass a chunk, e.g. 5m (env: "
        "CDC_RESYNC_WAIT_SECONDS; default: 5m)"),
    "history": (
        "on or off: maintain <lake>/history/<schema>.<table>/, every committed version of "
        "each row of a keyed table (SCD2), beside its staged table (env: CDC_HISTORY; "
        "default: on)"),
    "optimize_every": (
        "OPTIMIZE (compact small files) and VACUUM a staged table every N commits; 0: never "
        "(env: CDC_OPTIMIZE_EVERY; default: 10)"),
    "lease_seconds": (
        "Term of a staged table's single-writer compaction lease; a killed compactor holds a "
        "table at most this long (env: CDC_LEASE_SECONDS; default: 60s)"),
    "vacuum_retention_hours": (
        "VACUUM after OPTIMIZE deletes files removed longer ago than this (env: "
        "CDC_VACUUM_RETENTION_HOURS; default: 168)"),
    "maintain_before": (
        "Consolidate raw files of days before this UTC date, YYYY-MM-DD, at most yesterday "
        "(env: CDC_MAINTAIN_BEFORE; required)"),
    "retention_days": (
        "Also delete raw files older than N days whose changes are all staged (env: "
        "CDC_RETENTION_DAYS; default: keep raw forever)"),
    "status_json": (
        "Print JSON for machines (env: CDC_STATUS_JSON; default: off)"),
    "max_lag_bytes": (
        "Exit 1 when the slot's unacknowledged WAL exceeds this, e.g. 1GB (env: "
        "CDC_MAX_LAG_BYTES; default: not checked)"),
    "max_lag_seconds": (
        "Exit 1 when the stream is further behind the source than this, e.g. 5m (env: "
        "CDC_MAX_LAG_SECONDS; default: not checked)"),
    "max_compaction_lag_seconds": (
        "Exit 1 when a staged table is further behind raw than this, e.g. 15m (env: "
        "CDC_MAX_COMPACTION_LAG_SECONDS; default: not checked)"),
    "check_json": (
        "Print JSON for machines (env: CDC_CHECK_JSON; default: off)"),
    "check_strict": (
        "Exit 1 on warnings too (env: CDC_CHECK_STRICT; default: off)"),
    "keep_publication": (
        "Leave the publication even when cdc created it (env: CDC_KEEP_PUBLICATION; default: "
        "off)"),
    "query_format": (
        "table (DuckDB's rendering), csv (with a header) or json (one object per line) (env: "
        "CDC_QUERY_FORMAT; default: table)"),
    "as_of": (
        "Run the query as of this time (ISO 8601, UTC unless a zone is given, e.g. "
        "2026-11-30T12:00:00Z): each <schema>.<table> is that table as it was then, from its "
        "history (env: CDC_AS_OF)"),
    "as_of_lsn": (
        "Like --as-of, right after the source commit at this LSN, e.g. 0/1A2B3C (exact: "
        "commit times can tie, LSNs cannot) (env: CDC_AS_OF_LSN)"),
    "athena_database": (
        "Athena (Glue) database the tables go into (env: CDC_ATHENA_DATABASE; default: cdc)"),
    "athena_location": (
        "Where the lake is in S3, s3://bucket/prefix (env: CDC_ATHENA_LOCATION; default: "
        "--lake when it is an s3:// lake)"),
    "log_format": (
        "console or json (env: CDC_LOG_FORMAT; default: console)"),
    "log_level": (
        "debug, info, warning, error (env: CDC_LOG_LEVEL; default: info)"),
}

#: ``cdc compact --tables`` picks tables of the lake, not of the publication
COMPACT_TABLES = ("Comma-separated schema.table list to compact (env: CDC_TABLES; default: "
                  "every table in raw)")
