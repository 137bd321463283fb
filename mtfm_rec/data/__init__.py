"""Data: raw contract -> user-level aggregation -> Parquet shards -> loader -> Batch."""
