"""Small random schemas, batches and model configs for the model's tests and benchmarks.

Not a data generator with planted structure (that is ``mtfm_rec.data``'s job): these batches
only exercise shapes, layouts and the mask, through the real ``collate``.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import torch

from mtfm_rec.data import sample_format as fmt
from mtfm_rec.data.batch import Batch, collate
from mtfm_rec.data.schema import DatasetSchema, ScenarioSpec
from mtfm_rec.model.config import ModelConfig
from mtfm_rec.model.time_features import TimeBias


def small_config(**overrides: Any) -> ModelConfig:
    """A small model that still has every part: (1:1) x 1 with GQA (4 heads, 2 kv heads),
    3 experts; ``overrides`` are ModelConfig fields."""
    base: Dict[str, Any] = dict(
        embedding_dim=8,
        d_model=32,
        tokenizer_hidden=[32],
        num_blocks=1,
        target_layers_per_block=1,
        full_layers_per_block=1,
        num_heads=4,
        num_kv_heads=2,
        num_experts=3,
        expert_dim=16,
        tower_dim=8,
    )
    base.update(overrides)
    return ModelConfig(**base)


def trained_time_bias(model: torch.nn.Module, std: float = 0.5, seed: int = 0) -> None:
    """Random time-bias coefficients (weights and biases, seeded) in every layer of ``model``.
    They start at zero, a no-op, where a wrong or a leaked time would go unseen."""
    gen = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, TimeBias):
            with torch.no_grad():
                for param in module.parameters():
                    param.copy_(torch.randn(param.shape, generator=gen) * std)


def demo_schema(num_scenarios: int = 3, vocab: int = 50) -> DatasetSchema:
    """Two history sequences, one real-time sequence, and scenarios with different schemas."""
    scenarios = []
    for i in range(num_scenarios):
        scenarios.append(
            {
                "name": f"sc{i}",
                "user_features": {"city": 7 + i, **({"age": 5} if i % 2 == 0 else {})},
                "item_features": {"item": vocab + i, **({"cat": 9} if i != 1 else {})},
                "cross_features": {"dist": 4} if i != 2 else {},
                "dense_features": [f"price{j}" for j in range(i % 3)],
                "tasks": ["click", "order", "pay"][: 1 + (i % 3)],
            }
        )
    return DatasetSchema.from_dict(
        {
            "name": "demo",
            "time_unit": "s",
            "sequences": [
                {"name": "orders", "kind": "history", "max_len": 64, "features": {"item": vocab, "cat": 9}},
                {"name": "views", "kind": "history", "max_len": 64, "features": {"item": vocab}},
                {
                    "name": "clicks_rt",
                    "kind": "realtime",
                    "max_len": 64,
                    "features": {"item": vocab, "cat": 9},
                },
            ],
            "scenarios": scenarios,
        }
    )


# Every random sample's window is [_WINDOW, 2 * _WINDOW); history timestamps fall in [0, _WINDOW),
# real-time ones in [_WINDOW // 2, 2 * _WINDOW) (overlapping both), exposures in the window.
_WINDOW = 1000
# actions per sample, inclusive: one range for every sequence, or one per sequence name
SequenceLengths = Union[Tuple[int, int], Mapping[str, Tuple[int, int]]]


def _draw_times(rng: np.random.Generator, n: int, low: int, high: int, ts_pool: int) -> List[int]:
    """``n`` sorted timestamps in [low, high); from ``ts_pool`` evenly spaced values when
    ``ts_pool`` > 0 and the range is a real-time / exposure one (starts at ``_WINDOW // 2`` or later)."""
    if ts_pool and low >= _WINDOW // 2:
        pool = np.linspace(low, high - 1, ts_pool).astype(np.int64)
        return sorted(rng.choice(pool, size=n).tolist())
    return sorted(rng.integers(low, high, size=n).tolist())


def _sequence_columns(
    schema: DatasetSchema, batch_size: int, seq_len: SequenceLengths, rng: np.random.Generator, ts_pool: int
) -> Dict[str, List[Any]]:
    """The action sequences' timestamp and feature columns (a sequence at a time, sample-major)."""
    cols: Dict[str, List[Any]] = {}
    for q in schema.sequences:
        ts_col: List[Any] = []
        feat_cols: Dict[str, List[Any]] = {f: [] for f in q.features}
        lo_len, hi_len = seq_len[q.name] if isinstance(seq_len, Mapping) else seq_len
        for _ in range(batch_size):
            n = int(rng.integers(lo_len, hi_len + 1))
            lo, hi = (0, _WINDOW) if q.is_history else (_WINDOW // 2, 2 * _WINDOW)
            ts_col.append(_draw_times(rng, n, lo, hi, ts_pool))
            for f, size in q.features.items():
                feat_cols[f].append(rng.integers(0, size + 1, size=n).tolist())
        cols[fmt.seq_ts(q.name)] = ts_col
        for f in q.features:
            cols[fmt.seq_feature(q.name, f)] = feat_cols[f]
    return cols


def _append_exposures(
    per: Dict[str, List[Any]], s: ScenarioSpec, n: int, rng: np.random.Generator, ts_pool: int
) -> None:
    """Appends one sample's ``n`` random exposures of scenario ``s`` to the scenario's columns:
    features, and funnel labels (each task needs the previous one) with 10% missing."""
    per.setdefault(fmt.exp_ts(s.name), []).append(_draw_times(rng, n, _WINDOW, 2 * _WINDOW, ts_pool))
    per.setdefault(fmt.exp_request_id(s.name), []).append([-1] * n)
    per.setdefault(fmt.exp_split(s.name), []).append([-1] * n)
    for g, c, size in s.categorical():
        per.setdefault(fmt.exp_feature(s.name, g, c), []).append(rng.integers(0, size + 1, size=n).tolist())
    for c in s.dense_features:
        per.setdefault(fmt.exp_dense(s.name, c), []).append(rng.exponential(10.0, size=n).tolist())
    funnel = np.cumprod(rng.random((n, len(s.tasks))) < 0.5, axis=1).astype(np.int64)
    missing = rng.random((n, len(s.tasks))) < 0.1
    funnel[missing] = fmt.MISSING_LABEL
    for i, t in enumerate(s.tasks):
        per.setdefault(fmt.exp_label(s.name, t), []).append(funnel[:, i].tolist())


def _scenario_columns(
    schema: DatasetSchema,
    batch_size: int,
    exposures: Tuple[int, int],
    rng: np.random.Generator,
    only_scenario: Optional[Dict[int, str]],
    ts_pool: int,
) -> Dict[str, List[Any]]:
    """The exposure columns of every scenario (a scenario at a time, sample-major)."""
    cols: Dict[str, List[Any]] = {}
    for s in schema.scenarios:
        per: Dict[str, List[Any]] = {}
        for b in range(batch_size):
            n = int(rng.integers(exposures[0], exposures[1] + 1))
            if only_scenario is not None and b in only_scenario and only_scenario[b] != s.name:
                n = 0
            _append_exposures(per, s, n, rng, ts_pool)
        cols.update(per)
    return cols


def random_table(
    schema: DatasetSchema,
    batch_size: int,
    seq_len: SequenceLengths = (0, 12),
    exposures: Tuple[int, int] = (0, 5),
    seed: int = 0,
    only_scenario: Optional[Dict[int, str]] = None,
    ts_pool: int = 0,
) -> pa.Table:
    """``batch_size`` aggregated samples in ``sample_format`` with random lengths and values.

    Args:
        seq_len / exposures: inclusive ranges of actions per sequence (one range for every
            sequence, or one per sequence name) / of exposures per scenario.
        only_scenario: sample index -> the only scenario that sample has exposures in.
        ts_pool: if > 0, real-time and exposure timestamps are drawn from that many values
            (forces ties between R and T timestamps).
    """
    # One generator drawn in a fixed order (sequences, then scenarios): a seed gives one table.
    rng = np.random.default_rng(seed)
    cols: Dict[str, List[Any]] = {
        fmt.USER_ID: [b + 1 for b in range(batch_size)],
        fmt.WINDOW_START: [_WINDOW] * batch_size,
        fmt.WINDOW_END: [2 * _WINDOW] * batch_size,
    }
    cols.update(_sequence_columns(schema, batch_size, seq_len, rng, ts_pool))
    cols.update(_scenario_columns(schema, batch_size, exposures, rng, only_scenario, ts_pool))
    arrow = fmt.arrow_schema(schema)
    return pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in arrow}, schema=arrow)


def random_batch(schema: DatasetSchema, batch_size: int = 4, **kwargs: object) -> Batch:
    """:func:`random_table` collated into a :class:`Batch`."""
    return collate(random_table(schema, batch_size, **kwargs), schema)  # type: ignore[arg-type]


def long_history_schema(num_scenarios: int = 2, vocab: int = 1000) -> DatasetSchema:
    """The benchmark's schema: one long history, one real-time sequence, a few scenarios."""
    return DatasetSchema.from_dict(
        {
            "name": "bench",
            "sequences": [
                {"name": "hist", "kind": "history", "max_len": 512, "features": {"item": vocab, "cat": 30}},
                {"name": "rt", "kind": "realtime", "max_len": 128, "features": {"item": vocab, "cat": 30}},
            ],
            "scenarios": [
                {
                    "name": f"s{i}",
                    "user_features": {"city": 40},
                    "item_features": {"item": vocab, "shop": 100},
                    "cross_features": {"dist": 10},
                    "dense_features": ["price"],
                    "tasks": ["click", "order"],
                }
                for i in range(num_scenarios)
            ],
        }
    )


def fixed_size_batch(
    schema: DatasetSchema, batch_size: int, history: int, realtime: int, targets: int, seed: int = 0
) -> Batch:
    """Every sample with exactly ``history`` H, ``realtime`` R and ``targets`` T tokens (split
    evenly over scenarios); sizes for benchmarks."""
    table = random_table(schema, batch_size, seq_len=(0, 0), exposures=(0, 0), seed=seed)
    rng = np.random.default_rng(seed)
    n_sc = len(schema.scenarios)
    per = [targets // n_sc + (1 if i < targets % n_sc else 0) for i in range(n_sc)]
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    for q in schema.sequences:
        n = (
            history // max(1, len(schema.history_sequences))
            if q.is_history
            else realtime // max(1, len(schema.realtime_sequences))
        )
        lo, hi = (0, 1000) if q.is_history else (500, 2000)
        cols[fmt.seq_ts(q.name)] = [sorted(rng.integers(lo, hi, n).tolist()) for _ in range(batch_size)]
        for f, size in q.features.items():
            cols[fmt.seq_feature(q.name, f)] = [rng.integers(0, size, n).tolist() for _ in range(batch_size)]
    for s, n in zip(schema.scenarios, per):
        cols[fmt.exp_ts(s.name)] = [sorted(rng.integers(1000, 2000, n).tolist()) for _ in range(batch_size)]
        cols[fmt.exp_request_id(s.name)] = [[-1] * n] * batch_size
        cols[fmt.exp_split(s.name)] = [[-1] * n] * batch_size
        for g, c, size in s.categorical():
            cols[fmt.exp_feature(s.name, g, c)] = [
                rng.integers(0, size, n).tolist() for _ in range(batch_size)
            ]
        for c in s.dense_features:
            cols[fmt.exp_dense(s.name, c)] = [rng.random(n).tolist() for _ in range(batch_size)]
        for t in s.tasks:
            cols[fmt.exp_label(s.name, t)] = [rng.integers(0, 2, n).tolist() for _ in range(batch_size)]
    arrow = fmt.arrow_schema(schema)
    return collate(
        pa.table({f.name: pa.array(cols[f.name], type=f.type) for f in arrow}, schema=arrow), schema
    )


__all__: Sequence[str] = [
    "demo_schema",
    "random_table",
    "random_batch",
    "long_history_schema",
    "fixed_size_batch",
    "small_config",
]
