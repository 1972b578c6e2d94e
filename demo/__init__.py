"""The cdc demo: a media-retail shop whose sales stream into a parquet lake.

``python -m demo`` (or ``make demo``) starts a throwaway PostgreSQL cluster,
loads and seeds the ``media_retail`` database, runs ``cdc stream`` against it
while generating sales traffic, stops the streamer and prints what landed in
the lake next to the source's own row counts.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


class DemoFailure(Exception):
    """The demo found something wrong; the message says what."""


def lake_args(lake: str | Path) -> list[str]:
    """``--lake`` for a cdc command, with ``--s3-endpoint`` (from CDC_S3_ENDPOINT) on S3."""
    endpoint = os.environ.get("CDC_S3_ENDPOINT", "")
    s3 = str(lake).startswith("s3://") and endpoint
    return ["--lake", str(lake), *(["--s3-endpoint", endpoint] if s3 else [])]


def open_demo_lake(lake: str | Path) -> Any:
    """The demo's lake through cdc's own Lake (local folder or s3://)."""
    from cdc.lake.store import open_lake

    return open_lake(str(lake), s3_endpoint=os.environ.get("CDC_S3_ENDPOINT", ""))
