"""The tokenizer's time encoding: exact phases at epoch scale, a function of each token's own time
only (a later action or exposure never changes an earlier score), a no-op at initialisation."""

from __future__ import annotations

import dataclasses
import math

import torch
from model_helpers import exposure_scores, hidden_from, make_model, sample_rows

from mtfm_rec.kernels.jagged import TokenKind
from mtfm_rec.model.examples import random_batch
from mtfm_rec.model.tokenizer import TimeEncoding


def _trained(enc: TimeEncoding) -> TimeEncoding:
    torch.manual_seed(0)
    torch.nn.init.normal_(enc.proj.weight)  # a trained projection (it starts at zero)
    return enc


def test_features_are_sinusoids_of_each_tokens_own_time_exact_at_epoch_scale() -> None:
    enc = _trained(TimeEncoding(num_frequencies=6, d_model=8, ticks_per_second=1000))  # ms
    base = 1_700_000_000_123  # epoch ms: float32 alone would lose minutes here
    ts = torch.tensor([base, base + 90_000, base + 5, base + 86_400_000], dtype=torch.int64)
    periods = torch.round(
        torch.logspace(math.log10(60.0), math.log10(30 * 86400.0), 6, dtype=torch.float64) * 1000
    )
    angle = (
        2
        * math.pi
        * torch.tensor([float(t % int(p)) for t in ts.tolist() for p in periods]).view(4, 6)
        / periods
    )
    want = torch.cat([torch.sin(angle), torch.cos(angle)], -1) @ enc.proj.weight.double().T
    torch.testing.assert_close(enc(ts).double(), want, rtol=1e-5, atol=1e-5)
    # a token's row depends on its own time only
    moved = ts.clone()
    moved[1:] += 7_777_777
    torch.testing.assert_close(enc(moved)[0], enc(ts)[0], rtol=0, atol=0)


def test_later_timestamps_never_change_an_earlier_score(schema) -> None:
    """Moving every later R token and every other T token further into the future (the order the
    layout needs is kept) leaves a T token's score as it was; the moved T tokens' own scores move,
    so the check can fail (a sample-level time reference, such as the sample's latest token,
    would fail it)."""
    model = make_model(
        schema,
        num_blocks=1,
        target_layers_per_block=1,
        full_layers_per_block=1,
        attention_backend="reference",
        time_frequencies=4,
    )
    _trained(model.dense.tokenizer.time)
    batch = random_batch(schema, 4, seq_len=(1, 8), exposures=(2, 3), seed=5)
    with torch.no_grad():
        base = exposure_scores(model(batch)[1], batch)
    kind = batch.token_kind.tolist()
    checked = changed = 0
    for b in range(batch.batch_size):
        rows = sample_rows(batch, b)
        for i in [r for r in rows if kind[r] == TokenKind.TARGET][:1]:
            later = hidden_from(batch, i)
            moved_ts = batch.token_ts.clone()
            moved_ts[later] += 3_600
            moved = dataclasses.replace(batch, token_ts=moved_ts)
            with torch.no_grad():
                after = exposure_scores(model(moved)[1], moved)
            torch.testing.assert_close(after[i], base[i], rtol=0, atol=1e-6)
            checked += 1
            changed += sum(
                not torch.allclose(after[r], base[r]) for r in later if kind[r] == TokenKind.TARGET
            )
    assert checked >= 3 and changed > 0


def test_starts_as_a_no_op_and_learns() -> None:
    enc = TimeEncoding(num_frequencies=4, d_model=8, ticks_per_second=1)
    out = enc(torch.tensor([1, 50, 3000], dtype=torch.int64))
    assert torch.equal(out, torch.zeros(3, 8))
    out.sum().backward()  # the projection still gets a gradient
    assert enc.proj.weight.grad is not None and enc.proj.weight.grad.abs().sum() > 0
