"""cdc: stream a live PostgreSQL database into an analytics lake."""

__version__ = "0.1.0"
