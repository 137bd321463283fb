"""Data-side configuration: where the raw data is, how to aggregate it, how to load it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class AggregationConfig:
    """User-level aggregation (paper 3.1, 3.3.1); durations in seconds."""

    window_seconds: int = 86400  # exposures of one user in one window form one sample
    # R actions come from [window_start - lookback, window_end). None: the dataset.yaml extra
    # `recommended_realtime_lookback_seconds` if present (e.g. 0 when the R sequence repeats the
    # H sequence), else one window.
    realtime_lookback_seconds: Optional[int] = None
    # A user-window with more exposures is split into consecutive (by ts) samples of at most this
    # many, each with the window's H and R; None keeps whole windows. Bounds T tokens per sample.
    max_exposures_per_sample: Optional[int] = None
    num_partitions: int = 8  # users are hash-partitioned into this many shards
    num_workers: int = 2  # parallel processes over partitions
    skip_bad_rows: bool = False  # count and report contract-breaking rows instead of failing
    read_batch_rows: int = 65536  # rows per record batch when streaming raw Parquet files
    output_row_group_size: int = 1024  # samples per row group of an output shard
    progress: bool = True  # tqdm progress bars (read rows, built partitions) on stderr
    start_method: str = ""  # worker processes: fork | spawn | forkserver; "" = fork on Linux


@dataclass
class LoaderConfig:
    """Sharded, shuffling, resumable loading of aggregated shards (see docs/LOADER.md)."""

    batch_size: int = 64  # samples (user x window) per batch, per rank
    shuffle_buffer: int = 1024  # 0 disables shuffling
    num_workers: int = 0  # DataLoader worker processes
    prefetch_factor: int = 2
    seed: int = 0
    pin_memory: bool = True  # only takes effect when CUDA is available
    index_cache_dir: Optional[str] = None  # caches the per-split pre-scan (path or fsspec URL)


@dataclass
class DataConfig:
    raw: str = ""  # root of a raw-contract dataset (path or fsspec URL)
    cache_dir: str = "data/cache"  # aggregated shards of data.raw are cached here
    eval_after: Optional[int] = None  # exposures with ts >= eval_after are the test set
    valid_after: Optional[int] = None  # exposures in [valid_after, eval_after) are validation
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
