"""The tokenizer's time encoding: relative to each sample's latest token, exact in float64 terms,
blind to a shift of a sample's clock, and a no-op at initialisation."""

from __future__ import annotations

import math

import torch

from mtfm_rec.model.tokenizer import TimeEncoding


def _encoding(ticks_per_second: int = 1) -> TimeEncoding:
    enc = TimeEncoding(num_frequencies=6, d_model=8, ticks_per_second=ticks_per_second)
    torch.manual_seed(0)
    torch.nn.init.normal_(enc.proj.weight)  # a trained projection (it starts at zero)
    return enc


def test_features_are_sinusoids_of_the_time_before_the_samples_latest_token() -> None:
    enc = _encoding(ticks_per_second=1000)  # milliseconds
    base = 1_700_000_000_000  # epoch ms: float32 alone would lose minutes here
    ts = torch.tensor([base, base + 90_000, base + 30_000, base + 5, base + 86_400_000], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 5])
    latest = [base + 90_000] * 3 + [base + 86_400_000] * 2
    dt_s = torch.tensor([(lat - t) / 1000 for lat, t in zip(latest, ts.tolist())], dtype=torch.float64)
    periods = torch.logspace(math.log10(60.0), math.log10(30 * 86400.0), 6, dtype=torch.float64)
    angle = 2 * math.pi * dt_s[:, None] / periods[None, :]
    want = torch.cat([torch.sin(angle), torch.cos(angle)], -1) @ enc.proj.weight.double().T
    torch.testing.assert_close(enc(ts, offsets).double(), want, rtol=1e-4, atol=1e-4)


def test_shifting_a_samples_clock_changes_nothing() -> None:
    enc = _encoding()
    ts = torch.tensor([100, 160, 4000, 7, 9, 11], dtype=torch.int64)
    offsets = torch.tensor([0, 3, 6])
    shifted = ts + torch.tensor([10**9] * 3 + [-5] * 3)
    torch.testing.assert_close(enc(shifted, offsets), enc(ts, offsets))


def test_starts_as_a_no_op_and_learns() -> None:
    enc = TimeEncoding(num_frequencies=4, d_model=8, ticks_per_second=1)
    ts, offsets = torch.tensor([1, 50, 3000], dtype=torch.int64), torch.tensor([0, 3])
    out = enc(ts, offsets)
    assert torch.equal(out, torch.zeros(3, 8))
    out.sum().backward()  # the projection still gets a gradient
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0
