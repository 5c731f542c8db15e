"""Storage: SQLAlchemy Core schema, engines for SQLite and Postgres, the queue, anomaly-map encoding."""

from .db import StoreError, check_schema, make_engine, open_store, upgrade, utcnow
from .maps import decode_map, encode_map, mask_at
from .schema import images, metadata, model_versions, results, reviews, sources, thresholds

__all__ = ["StoreError", "check_schema", "decode_map", "encode_map", "images", "make_engine", "mask_at",
           "metadata", "model_versions", "open_store", "results", "reviews", "sources", "thresholds",
           "upgrade", "utcnow"]
