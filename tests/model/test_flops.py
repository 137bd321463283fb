"""The analytic FLOP count (mtfm_rec.model.flops), the matmul peak and the trainer's MFU."""

from __future__ import annotations

import math
from typing import Any, Dict, Iterator, List

import pytest
import torch
from model_helpers import small_config
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mtfm_rec.config import ConfigError, load_config
from mtfm_rec.data.batch import Batch
from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.kernels.hstu_attention.reference import dynamic_mask_padded
from mtfm_rec.kernels.jagged import KeySet, QuerySet, TokenKind
from mtfm_rec.model import MTFM, ModelConfig
from mtfm_rec.model.examples import fixed_size_batch, random_batch
from mtfm_rec.model.flops import layer_flops, model_flops, visible_pairs

TINY_SCHEMA = DatasetSchema.from_dict(
    {
        "name": "tiny",
        "time_unit": "s",
        "sequences": [
            {"name": "orders", "kind": "history", "max_len": 8, "features": {"item": 20, "cat": 5}}
        ],
        "scenarios": [
            {
                "name": "feed",
                "user_features": {"city": 5},
                "item_features": {"item": 20},
                "dense_features": ["price"],
                "tasks": ["click", "order"],
            },
        ],
    }
)
TINY_CONFIG = ModelConfig(
    embedding_dim=4,
    d_model=8,
    tokenizer_hidden=[6],
    num_blocks=1,
    target_layers_per_block=1,
    full_layers_per_block=1,
    num_heads=2,
    num_kv_heads=1,
    num_experts=2,
    expert_dim=3,
    tower_dim=5,
)


def test_count_equals_a_hand_computation() -> None:
    # 2 samples x (3 H + 2 T): N = 10, T = 4. No R tokens, so every query sees the 3 H keys, a T
    # query itself too: full pairs 2 x (3 x 3 + 2 x 4) = 34, target pairs 2 x 2 x 4 = 16.
    batch = fixed_size_batch(TINY_SCHEMA, batch_size=2, history=3, realtime=0, targets=2)
    count = model_flops(TINY_CONFIG, TINY_SCHEMA, batch)
    d, h, g, hd = 8, 2, 1, 4
    tokenizer = 2 * 6 * (2 * 4 * 6 + 6 * 8) + 2 * 4 * ((2 * 4 + 1) * 6 + 6 * 8)  # 6 actions, 4 exposures
    uq, kv, f2 = 2 * d * 2 * h * hd, 2 * d * 2 * g * hd, 2 * h * hd * d  # per row
    per_pair = 2 * 2 * h * hd
    full = 10 * (uq + kv + f2) + per_pair * 34
    target = 10 * kv + 4 * (uq + f2) + per_pair * 16
    heads = 2 * 4 * 8 * 2 * 3 + 2 * 4 * 8 * 2 * 2 + 2 * 4 * 2 * 2 * 3 + 2 * 4 * 2 * (3 * 5 + 5)
    assert count.visible_pairs == (34, 16)
    assert (count.tokenizer, count.heads) == (tokenizer, heads) == (1968, 1056)
    assert [layer.kind for layer in count.layers] == ["full", "target"]
    assert count.forward == tokenizer + full + target + heads == 12560
    assert count.train_step == 3 * 12560
    # padded: [B, max_q, max_tokens] = 2 x 5 x 5 (full) and 2 x 2 x 5 (target) pairs
    assert count.attention_padded == per_pair * (50 + 20)
    assert count.forward_padded == count.forward - per_pair * (34 + 16) + per_pair * 70
    parts = count.by_part()
    assert parts["full/attention"] == per_pair * 34 and parts["target/attention_padded"] == per_pair * 20
    assert sum(v for k, v in parts.items() if not k.endswith("_padded")) == count.forward


@pytest.mark.parametrize("ts_pool", [0, 3])  # 3: many R / T timestamp ties
def test_visible_pairs_equal_the_reference_mask(schema, ts_pool: int) -> None:
    batch = random_batch(schema, 6, seq_len=(0, 9), exposures=(0, 4), seed=5, ts_pool=ts_pool)
    n_self = torch.where(
        batch.token_kind.to(torch.int64) == TokenKind.TARGET, torch.arange(batch.num_tokens), -1
    )
    keys = KeySet.create(batch.token_offsets, batch.token_kind, batch.token_ts, batch.max_tokens)
    full = dynamic_mask_padded(
        QuerySet.create(batch.token_offsets, batch.token_ts, n_self, batch.max_tokens), keys
    )
    target_queries = QuerySet.create(
        batch.target_offsets, batch.token_ts[batch.target_rows], batch.target_rows, batch.max_targets
    )
    target = dynamic_mask_padded(target_queries, keys)
    assert visible_pairs(batch) == (int(full.sum()), int(target.sum()))
    t = int(batch.target_rows.numel())
    assert visible_pairs(batch, use_sequences=False) == (t, t)  # feature-only: each T sees itself


def _measured(model: MTFM, batch: Batch) -> Dict[str, int]:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(batch)
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}


@pytest.mark.parametrize(
    "use_sequences, time_frequencies, time_bias_pairs, time_bias_source, normalisation",
    [
        (True, 0, 0, "query", "visible"),
        (False, 0, 0, "query", "visible"),
        (True, 5, 0, "query", "visible"),
        (False, 5, 0, "query", "visible"),
        (True, 0, 3, "query", "visible"),
        (True, 0, 3, "group", "visible"),
        (True, 0, 3, "query", "segment"),
    ],
)
def test_count_equals_flop_counter_mode_on_the_padded_reference(
    schema,
    use_sequences: bool,
    time_frequencies: int,
    time_bias_pairs: int,
    time_bias_source: str,
    normalisation: str,
) -> None:
    """FlopCounterMode sees the matmuls the reference backend runs: the padded attention (and the
    time encoding's projection when it is on: the feature-only model has none; the time bias's
    query projection and its channels of q . k; the segment normalisation's values of twice the
    width)."""
    config = small_config(
        num_blocks=2,
        attention_backend="reference",
        use_sequences=use_sequences,
        time_frequencies=time_frequencies,
        time_bias_pairs=time_bias_pairs,
        time_bias_source=time_bias_source,
        attention_normalisation=normalisation,
    )
    torch.manual_seed(0)
    model = MTFM(schema, config)
    batch = random_batch(schema, 5, seq_len=(0, 10), exposures=(0, 4), seed=2)
    count = model_flops(config, schema, batch)
    measured = _measured(model, batch)
    assert measured["MTFM.dense.tokenizer"] == count.tokenizer
    for i, layer in enumerate(count.layers):
        assert measured[f"MTFM.dense.hta.layers.{i}"] == layer.projections + layer.attention_padded, (
            layer.kind
        )
    # the towers' output layer is an elementwise product and a sum in heads.py, which
    # FlopCounterMode does not see: 2 FLOPs per (exposure, task, tower unit)
    tower_out = sum(
        2 * int(batch.target_positions[s.name].numel()) * len(s.tasks) * config.tower_dim
        for s in schema.scenarios
    )
    assert measured["MTFM.dense.heads"] == count.heads - tower_out
    assert measured["Global"] == count.forward_padded - tower_out
    assert count.attention < count.attention_padded  # jagged lengths and the mask: less is useful


def test_layer_kind_is_checked() -> None:
    with pytest.raises(ValueError, match="unknown attention layer kind 'fast'; expected 'full' or 'target'"):
        layer_flops("fast", TINY_CONFIG, 10, 2, 1, 1)


# ---------------------------------------------------------------------------- matmul peak
def test_matmul_peak_is_positive_cached_and_checks_the_dtype() -> None:
    from mtfm_rec.bench.peak import matmul_gflops, render

    first = matmul_gflops("fp32", 1, 64, 1)
    assert math.isfinite(first) and first > 0
    assert matmul_gflops("fp32", 1, 64, 1) == first  # measured once per process
    assert torch.get_num_threads() >= 1
    with pytest.raises(ValueError, match=r"dtype 'fp16' unknown; choose one of \['bf16', 'fp32'\]"):
        matmul_gflops("fp16")
    row = {"device": "cpu", "dtype": "fp32", "threads": 1, "size": 64, "gflops": first}
    assert f"| cpu | fp32 | 1 | 64 | {first:.1f} |" in render({"quick": True, "reps": 1, "rows": [row]})


def test_train_peak_gflops_must_be_finite_and_not_negative() -> None:
    assert load_config(None, ["train.peak_gflops=250"]).train.peak_gflops == 250
    for bad in ("-1", "inf"):
        with pytest.raises(ConfigError, match=r"config\.train: peak_gflops must be a finite number >= 0"):
            load_config(None, [f"train.peak_gflops={bad}"])


# ---------------------------------------------------------------------------- the trainer's MFU
class _ListLoader:
    """The given batches in order, epoch after epoch (the trainer's Loader protocol)."""

    def __init__(self, batches: List[Batch]) -> None:
        self.batches, self.pos = batches, 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[Batch]:
        while self.pos < len(self.batches):
            self.pos += 1
            yield self.batches[self.pos - 1]
        self.pos = 0

    def state_dict(self) -> Dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.pos = int(state["pos"])


def test_trainer_logs_model_flops_and_mfu(schema, tmp_path) -> None:
    from mtfm_rec.training.logger import read_log
    from mtfm_rec.training.trainer import Trainer

    batches = [random_batch(schema, 4, seq_len=(1, 8), exposures=(1, 3), seed=s) for s in range(3)]
    config = load_config(
        None,
        [
            f"train.run_dir={tmp_path}/run",
            "train.max_steps=4",
            "train.log_every=2",
            "train.eval_splits=[]",
            "train.peak_gflops=1000",
            "train.progress_bar=false",
            "train.tensorboard=false",
            "train.plots=false",
            "train.sharding.print_plan=false",
            "model.d_model=16",
            "model.num_blocks=1",
            "model.expert_dim=8",
        ],
    )
    trainer = Trainer(
        config,
        model_fn=lambda s: MTFM(s, config.model),
        loader_fn=lambda split: _ListLoader(batches),
        schema=schema,
    )
    try:
        summary = trainer.fit()
    finally:
        trainer.close()
    per_batch = [model_flops(config.model, schema, b).train_step for b in batches]
    assert summary["model_tflops"] == pytest.approx(sum(per_batch[i % 3] for i in range(4)) / 1e12, rel=1e-6)
    assert summary["peak_gflops"] == 1000
    assert summary["mfu"] == pytest.approx(summary["model_gflops_per_s"] / 1000)
    log = read_log(str(tmp_path / "run"))
    assert [step for step, _ in log["perf/mfu"]] == [2, 4]
    for (_, rate), (_, mfu) in zip(log["perf/model_gflops_per_s"], log["perf/mfu"]):
        assert rate > 0 and mfu == pytest.approx(rate / 1000, rel=1e-5)


def test_trainer_counts_no_flops_for_another_model() -> None:
    from mtfm_rec.training.throughput import flop_counter, utilisation

    assert flop_counter(nn.Linear(2, 2)) is None
    assert utilisation(math.nan, 1.0, 100.0) == {}  # some batch was not counted: no wrong rate
    assert utilisation(4e9, 2.0, math.nan) == {"perf/model_gflops_per_s": 2.0}
    assert utilisation(4e9, 2.0, 4.0) == {"perf/model_gflops_per_s": 2.0, "perf/mfu": 0.5}
