"""The OneTrans CPU-path benchmark times three paths of one function on an ML-1M-genre-like mix."""

from __future__ import annotations

import torch

from mtfm_rec.bench.onetrans_cpu_path import genre_model, mix_batch, paths, render


def test_the_timed_paths_compute_the_same_t_outputs() -> None:
    model = genre_model().eval()
    batch = mix_batch(12, seed=3)
    x, timed = paths(model, batch)
    outputs = {name: fn(x) for name, fn in timed.items()}
    reference = outputs.pop("masked, one padded call")
    assert reference.shape[0] == int(batch.num_targets.sum())
    for out in outputs.values():
        torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)


def test_the_batch_follows_the_documented_mix() -> None:
    batch = mix_batch(400, seed=0)
    assert 60 < float(batch.num_history.float().mean()) < 72  # H uniform in 0-132
    assert 17 < float(batch.num_realtime.float().mean()) < 23  # R in 0-40
    assert int(batch.num_targets.min()) >= 1 and int(batch.num_targets.max()) <= 12


def test_render_reports_the_speed_up_over_the_masked_path() -> None:
    result = {
        "batch": 4,
        "tokens": 10,
        "longest": 5,
        "mean_h_r_t": [1.0, 0.5, 1.0],
        "rows": [
            {"path": "masked, one padded call", "forward_ms": 2.0, "fwd_bwd_ms": 6.0},
            {"path": "pruned, 8 chunks", "forward_ms": 1.0, "fwd_bwd_ms": 2.0},
        ],
    }
    text = render(result)
    assert "| masked, one padded call | 2.0 | 6.0 | 1.00x |" in text
    assert "| pruned, 8 chunks | 1.0 | 2.0 | 3.00x |" in text
