"""Prometheus metrics of a running ``cdc stream`` (``--metrics-port``).

Counted where the work is cheap to count: per flushed batch, not per change,
so the decode loop stays untouched.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from cdc.errors import ConfigError

REGISTRY = CollectorRegistry(auto_describe=True)

CHANGES = Counter("cdc_changes_written", "Changes written to raw, by table and op",
                  ["table", "op"], registry=REGISTRY)
RAW_BYTES = Counter("cdc_raw_bytes_written", "Parquet bytes written to raw, by table",
                    ["table"], registry=REGISTRY)
BATCHES = Counter("cdc_batches_written", "Raw files written, by table", ["table"],
                  registry=REGISTRY)
FLUSH_SECONDS = Histogram("cdc_flush_seconds", "Time to encode and durably write one raw file",
                          registry=REGISTRY,
                          buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
TRANSACTIONS = Counter("cdc_transactions", "Source transactions received", registry=REGISTRY)
ACKED_LSN = Gauge("cdc_acknowledged_lsn", "LSN last acknowledged to the slot",
                  registry=REGISTRY)
SERVER_LSN = Gauge("cdc_server_lsn", "Server WAL position last reported to us",
                   registry=REGISTRY)
LAG_BYTES = Gauge("cdc_lag_bytes", "Server WAL position minus the acknowledged LSN",
                  registry=REGISTRY)
LAG_SECONDS = Gauge("cdc_lag_seconds", "Now minus the commit time of the last transaction "
                    "received (0 when idle)", registry=REGISTRY)
COMPACTION_RUNS = Counter("cdc_compaction_runs", "Compaction runs, by table", ["table"],
                          registry=REGISTRY)
COMPACTION_FAILURES = Counter("cdc_compaction_failures", "Table compactions that failed (the "
                              "other tables went on), by table", ["table"], registry=REGISTRY)
COMPACTION_SECONDS = Histogram("cdc_compaction_seconds", "Duration of one table's compaction",
                               registry=REGISTRY,
                               buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
ERRORS = Counter("cdc_errors", "Errors by kind (exception class)", ["kind"], registry=REGISTRY)


def serve(port: int, addr: str = "0.0.0.0") -> None:  # noqa: S104 - scraped from outside
    """Serve /metrics in a background thread."""
    try:
        start_http_server(port, addr=addr, registry=REGISTRY)
    except (OSError, OverflowError) as exc:
        raise ConfigError(f"cannot serve metrics on port {port}: {exc}",
                          fix="choose a free port with --metrics-port / CDC_METRICS_PORT") from exc
