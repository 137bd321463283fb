"""``data.loader.extra_passes`` through the real Trainer: the epoch holds the extra batches, and
a run resumed from a checkpoint ends with the weights of the uninterrupted one (the mixture's
position is saved and restored exactly)."""

from __future__ import annotations

import os
import sys
from typing import Dict

import pytest
import torch

from mtfm_rec.config import load_config
from mtfm_rec.data.mixture import MixtureLoader
from mtfm_rec.training.trainer import Trainer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from standins import QUIET  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    from mtfm_rec.data.synthetic import generate

    root = str(tmp_path_factory.mktemp("raw"))
    generate(root, num_users=120, num_days=4, seed=3)
    return root


def _trainer(raw: str, run_dir: str, cache: str, *overrides: str) -> Trainer:
    cfg = load_config(
        os.path.join(REPO, "configs", "mtfm_small.yaml"),
        QUIET
        + [
            f"data.raw={raw}",
            f"data.cache_dir={cache}",
            f"train.run_dir={run_dir}",
            "data.loader.batch_size=16",
            "data.loader.extra_passes={coupon: 1}",
            "train.max_steps=8",
            "train.max_minutes=0",
            "train.eval_splits=[]",
            "train.eval_every=0",
            *overrides,
        ],
    )
    return Trainer(cfg)


def _weights(trainer: Trainer) -> Dict[str, torch.Tensor]:
    """Copies of every table (this rank's shard) and dense parameter."""
    out = {}
    for key, value in trainer.model.state_dict().items():
        if hasattr(value, "local_shards"):
            out[key] = value.local_shards()[0].tensor.detach().clone()
        elif value.is_floating_point():
            out[key] = value.detach().clone()
    return out


def test_a_resumed_run_with_extra_passes_ends_where_the_uninterrupted_one_does(raw: str, tmp_path) -> None:
    cache = str(tmp_path / "cache")
    every_3 = ("train.checkpoint_every=3", "train.keep_checkpoints=0")
    full = _trainer(raw, str(tmp_path / "full"), cache, *every_3)
    try:
        loader = full.train_loader
        assert isinstance(loader, MixtureLoader)
        main, coupon = (src.num_batches() for _, src in loader.sources)
        assert coupon > 0 and len(loader) == main + coupon
        full.fit()
        expected = _weights(full)
        end_state = full.train_loader.state_dict()
    finally:
        full.close()
    mid = tmp_path / "full" / "checkpoints" / "step_3"
    assert mid.is_dir(), sorted(os.listdir(tmp_path / "full" / "checkpoints"))
    resumed = _trainer(raw, str(tmp_path / "resumed"), cache, f"train.resume={mid}")
    try:
        assert resumed.maybe_resume() and resumed.step == 3
        resumed.fit()
        got = _weights(resumed)
        assert resumed.train_loader.state_dict()["batches_in_epoch"] == end_state["batches_in_epoch"]
    finally:
        resumed.close()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=key)
