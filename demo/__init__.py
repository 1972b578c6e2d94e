"""The cdc demo: a media-retail shop whose sales stream into a parquet lake.

``python -m demo`` (or ``make demo``) starts a throwaway PostgreSQL cluster,
loads and seeds the ``media_retail`` database, runs ``cdc stream`` against it
while generating sales traffic, stops the streamer and prints what landed in
the lake next to the source's own row counts.
"""

from __future__ import annotations


class DemoFailure(Exception):
    """The demo found something wrong; the message says what."""
