"""Data-side configuration: where the raw data is, how to aggregate it, how to load it."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Tuple, Union

# Upper bound of window_seconds and realtime_lookback_seconds (68 years): far below 2**62 ticks
# in any time unit of the contract, the bound under which window arithmetic on ts in the
# reader's safe range [-2**62, 2**62) cannot overflow int64 (mtfm_rec.data.reader). A lookback
# from dataset.yaml is checked with the window in ticks by the aggregation.
MAX_DURATION_SECONDS = 2**31
StartMethod = Literal["", "fork", "spawn", "forkserver"]  # "" = fork on Linux, spawn elsewhere
START_METHODS: Tuple[str, ...] = typing.get_args(StartMethod)
Engine = Literal["local", "spark"]  # spark: mtfm_rec.data.aggregate_spark, the same output
ENGINES: Tuple[str, ...] = typing.get_args(Engine)


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
    # When a real-time sequence would hold more than max_len actions before an exposure, that
    # exposure opens a new sample keeping this fraction of max_len most recent actions
    # (mtfm_rec.data.realtime_split): in (0, 1]; 1 = every exposure sees exactly its last
    # max_len (as serving does), smaller = fewer samples for busy windows.
    realtime_split_keep: float = 0.5
    num_partitions: int = 8  # users are hash-partitioned into this many shards
    num_workers: int = 2  # parallel processes over partitions
    skip_bad_rows: bool = False  # count and report contract-breaking rows instead of failing
    read_batch_rows: int = 65536  # rows per record batch when streaming raw Parquet files
    output_row_group_size: int = 1024  # samples per row group of an output shard
    progress: bool = True  # tqdm progress bars (read rows, built partitions) on stderr
    start_method: StartMethod = ""  # worker processes: fork | spawn | forkserver; "" = fork on Linux
    # Who builds the samples: this machine's processes, or an Apache Spark application
    # (mtfm_rec.data.aggregate_spark). Byte-identical outputs, so none of the three below is
    # fingerprinted: a cache built by either engine serves both.
    engine: Engine = "local"
    # engine=spark: the master (yarn, k8s://..., local[8]); None: spark-submit's, else local[*]
    spark_master: Optional[str] = None
    # engine=spark: spark.* settings of the session (values passed as text)
    spark_conf: Dict[str, Union[str, int, float, bool]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuses values aggregation cannot run with, naming the key and the rule.

        Raises:
            ValueError: (a ``ConfigError`` when built by ``mtfm_rec.config.from_dict``).
        """
        for key in (
            "window_seconds",
            "num_partitions",
            "num_workers",
            "read_batch_rows",
            "output_row_group_size",
        ):
            if getattr(self, key) < 1:
                raise ValueError(f"aggregation.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_exposures_per_sample is not None and self.max_exposures_per_sample < 1:
            raise ValueError(
                "aggregation.max_exposures_per_sample must be >= 1 (or unset), "
                f"got {self.max_exposures_per_sample}"
            )
        if not 0 < self.realtime_split_keep <= 1:
            raise ValueError(
                f"aggregation.realtime_split_keep must be in (0, 1], got {self.realtime_split_keep}"
            )
        if self.realtime_lookback_seconds is not None and self.realtime_lookback_seconds < 0:
            raise ValueError(
                f"aggregation.realtime_lookback_seconds must be >= 0, got {self.realtime_lookback_seconds}"
            )
        for key in ("window_seconds", "realtime_lookback_seconds"):
            value = getattr(self, key)
            if value is not None and value > MAX_DURATION_SECONDS:
                raise ValueError(
                    f"aggregation.{key} must be at most 2**31 s "
                    f"(68 years; window arithmetic stays in int64), got {value}"
                )
        if self.start_method not in START_METHODS:
            raise ValueError(
                f"aggregation.start_method must be one of {START_METHODS}, got {self.start_method!r}"
            )
        if self.engine not in ENGINES:
            raise ValueError(f"aggregation.engine must be one of {ENGINES}, got {self.engine!r}")
        if self.engine != "spark" and (self.spark_master is not None or self.spark_conf):
            raise ValueError(
                "aggregation.spark_master and aggregation.spark_conf are settings of engine=spark, "
                f"but aggregation.engine is {self.engine!r}"
            )
        foreign = sorted(k for k in self.spark_conf if not str(k).startswith("spark."))
        if foreign:
            raise ValueError(f"aggregation.spark_conf keys must be spark.* settings, got {foreign}")


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
    # scenario -> extra training passes per epoch over its samples, in batches of only its
    # exposures, interleaved with the main pass (mtfm_rec.data.mixture); for a sparse scenario
    extra_passes: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.extra_passes.items() if not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"loader.extra_passes values must be integers >= 0, got {bad}")


def check_split_boundaries(eval_after: Optional[int], valid_after: Optional[int], note: str = "") -> None:
    """Refuses ``valid_after >= eval_after``: validation is ``[valid_after, eval_after)``, so it
    would be empty (and the test split would start before validation).

    Args:
        eval_after: ``data.eval_after`` (first test tick) or None.
        valid_after: ``data.valid_after`` (first validation tick) or None.
        note: where the values came from, appended to the message.

    Raises:
        ValueError: naming both keys and values.
    """
    if eval_after is not None and valid_after is not None and valid_after >= eval_after:
        raise ValueError(
            f"data.valid_after={valid_after} must be earlier than data.eval_after={eval_after}: "
            f"validation is valid_after <= ts < eval_after, which would be empty{note}"
        )


# The ``data`` keys that a run fills from the dataset when they are left unset (None).
RECOMMENDED_SPLIT_KEYS = ("eval_after", "valid_after")


def fill_recommended_splits(data: "DataConfig", extra: typing.Mapping[str, typing.Any]) -> List[str]:
    """Sets ``data.eval_after`` / ``data.valid_after`` left unset to the dataset's
    ``recommended_<key>`` (``extra``: the aggregated dataset.yaml's extra keys), in place.

    Returns:
        The keys filled, for messages (see ``mtfm_rec.training.run_checks.filled_note``).
    """
    filled: List[str] = []
    for key in RECOMMENDED_SPLIT_KEYS:
        if getattr(data, key) is None and extra.get(f"recommended_{key}") is not None:
            setattr(data, key, int(extra[f"recommended_{key}"]))
            filled.append(key)
    return filled


@dataclass
class DataConfig:
    raw: str = ""  # root of a raw-contract dataset (path or fsspec URL)
    cache_dir: str = "data/cache"  # aggregated shards of data.raw are cached here
    eval_after: Optional[int] = None  # exposures with ts >= eval_after are the test set
    valid_after: Optional[int] = None  # exposures in [valid_after, eval_after) are validation
    # Train and evaluate on these scenarios' exposures only (samples without one are skipped);
    # empty = all. A per-scenario model (the paper's single-scenario baselines) is one job per
    # scenario with data.scenarios=[<s>]; see mtfm_rec.experiments.
    scenarios: List[str] = field(default_factory=list)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)

    def __post_init__(self) -> None:
        check_split_boundaries(self.eval_after, self.valid_after)
