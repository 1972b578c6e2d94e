"""Backfills into raw: the consistent snapshot tied to the slot, chunk planning, the COPY
readers, and the ``updated_at`` incremental export."""
