"""cdc: stream a live PostgreSQL database into an analytics lake."""

import os

# Arrow's allocator, chosen before pyarrow is first imported (it reads this once): jemalloc
# hands freed memory back to the system where pyarrow's default, mimalloc, keeps it, which
# lowers compaction's peak (100k changes into 1M rows: staged 463 -> 407 MB, history
# 526 -> 460 MB; docs/benchmarks.md). A value the user set wins.
os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "jemalloc")

__version__ = "0.1.0"
