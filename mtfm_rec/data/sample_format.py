"""The aggregated-sample Parquet format: what aggregation writes and the loader reads.

One row = one user x time window (paper 3.1, 3.3.1: scenario parts joined column-wise, then
merged with the shared sequences at user level). All list columns of one group share lengths.

============================  ==============  =====================================================
column                        type            meaning
============================  ==============  =====================================================
user_id                       int64
window_start, window_end      int64           the window ``[start, end)`` in dataset ticks
seq/<q>/ts                    list<int64>     sequence q's kept actions, ascending ts (ties: file,
seq/<q>/<feature>             list<int64>     then row order); ids folded (schema.fold_ids)
exp/<s>/ts                    list<int64>     scenario s's exposures of the window, ascending ts
exp/<s>/request_id            list<int64>     -1 where the raw row had none
exp/<s>/split                 list<int8>      raw ``split`` column (0 train, 1 valid, 2 test) or -1
                                              ("split by time at load")
exp/<s>/<group>/<feature>     list<int64>     group in user | item | cross; ids folded
exp/<s>/dense/<column>        list<float32>   null -> 0.0
exp/<s>/label/<task>          list<int8>      0/1; -1 where the raw label was null (missing)
============================  ==============  =====================================================

Which actions are kept (``lookback`` and ``window`` in dataset ticks, from the aggregation config):

* history sequence: its last ``max_len`` actions with ``ts < window_start``;
* real-time sequence: its most recent ``max_len`` actions with
  ``window_start - lookback <= ts < window_end``; the model's dynamic mask lets a T token see
  only those with a smaller ts than its own.

A dataset directory holds ``part-NNNNN.parquet`` shards (users hash-partitioned), the
``dataset.yaml`` it was built from, ``_stats.json`` and a ``_SUCCESS`` marker written last with
the fingerprint of the inputs and the aggregation config.
"""

from __future__ import annotations

from typing import List

import pyarrow as pa

from mtfm_rec.data.schema import DatasetSchema

USER_ID = "user_id"
WINDOW_START = "window_start"
WINDOW_END = "window_end"
SHARD_GLOB = "part-*.parquet"
SUCCESS_FILE = "_SUCCESS"
STATS_FILE = "_stats.json"
SCHEMA_FILE = "dataset.yaml"
MISSING_LABEL = -1
SPLIT_BY_TIME = -1
SPLIT_TRAIN, SPLIT_VALID, SPLIT_TEST = 0, 1, 2


def shard_name(partition: int) -> str:
    return f"part-{partition:05d}.parquet"


def seq_ts(sequence: str) -> str:
    return f"seq/{sequence}/ts"


def seq_feature(sequence: str, feature: str) -> str:
    return f"seq/{sequence}/{feature}"


def exp_ts(scenario: str) -> str:
    return f"exp/{scenario}/ts"


def exp_request_id(scenario: str) -> str:
    return f"exp/{scenario}/request_id"


def exp_split(scenario: str) -> str:
    return f"exp/{scenario}/split"


def exp_feature(scenario: str, group: str, feature: str) -> str:
    return f"exp/{scenario}/{group}/{feature}"


def exp_dense(scenario: str, column: str) -> str:
    return f"exp/{scenario}/dense/{column}"


def exp_label(scenario: str, task: str) -> str:
    return f"exp/{scenario}/label/{task}"


def arrow_schema(schema: DatasetSchema) -> pa.Schema:
    """The exact Arrow schema of an aggregated shard for ``schema``."""
    fields: List[pa.Field] = [
        pa.field(USER_ID, pa.int64(), nullable=False),
        pa.field(WINDOW_START, pa.int64(), nullable=False),
        pa.field(WINDOW_END, pa.int64(), nullable=False),
    ]
    ints = pa.list_(pa.int64())
    for q in schema.sequences:
        fields.append(pa.field(seq_ts(q.name), ints))
        fields += [pa.field(seq_feature(q.name, f), ints) for f in q.features]
    for s in schema.scenarios:
        fields.append(pa.field(exp_ts(s.name), ints))
        fields.append(pa.field(exp_request_id(s.name), ints))
        fields.append(pa.field(exp_split(s.name), pa.list_(pa.int8())))
        fields += [pa.field(exp_feature(s.name, g, c), ints) for g, c, _ in s.categorical()]
        fields += [pa.field(exp_dense(s.name, c), pa.list_(pa.float32())) for c in s.dense_features]
        fields += [pa.field(exp_label(s.name, t), pa.list_(pa.int8())) for t in s.tasks]
    return pa.schema(fields)
