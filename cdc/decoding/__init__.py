"""Bytes to changes, purely: pgoutput and wal2json messages into events, and PostgreSQL
text output into typed Arrow columns. Nothing here does I/O."""
