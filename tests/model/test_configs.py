"""The shipped model configs load and build a model that runs on the demo schema."""

from __future__ import annotations

import pytest
import torch

from mtfm_rec.config import load_config
from mtfm_rec.model import MTFM
from mtfm_rec.model.examples import random_batch


@pytest.mark.parametrize("path", ["configs/mtfm_small.yaml", "configs/mtfm_paper.yaml"])
def test_config_builds_and_runs(schema, path: str) -> None:
    cfg = load_config(path, ["data.raw=/nonexistent"])
    if path.endswith("paper.yaml"):
        m = cfg.model  # the paper's sizes (4.1.3)
        assert (m.d_model, m.num_blocks, m.target_layers_per_block, m.num_heads, m.num_kv_heads) == (
            768,
            4,
            3,
            3,
            1,
        )
    torch.manual_seed(0)
    model = MTFM(schema, cfg.model)
    assert len(model.dense.hta.layers) == cfg.model.num_blocks * (
        cfg.model.target_layers_per_block + cfg.model.full_layers_per_block
    )
    paper = path.endswith("paper.yaml")
    with torch.set_grad_enabled(not paper):  # the 16-layer d=768 model: forward only, keeps it fast
        loss, out = model(random_batch(schema, 2, seq_len=(1, 4), exposures=(1, 2), seed=0))
    if not paper:
        loss.backward()
    assert torch.isfinite(loss)
    assert set(out) >= {s.name for s in schema.scenarios}
