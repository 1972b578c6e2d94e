"""Operating and reading the lake: status and lag, Prometheus metrics, DuckDB queries and
Athena DDL."""
