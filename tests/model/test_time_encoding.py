"""MTFM's time inputs, the tokenizer's encoding and the attention's rotary and time bias: exact
phases at epoch scale, a function of each token's own time only (a later action or exposure never
changes an earlier score), the encoding and the bias no-ops at initialisation, the rotary's and
the bias's q . k a function of the query-key gap."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from model_helpers import exposure_scores, hidden_from, make_model, sample_rows

from mtfm_rec.kernels.jagged import TokenKind
from mtfm_rec.model.examples import random_batch, trained_time_bias
from mtfm_rec.model.time_features import TimeBias, TimeRotary
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


@pytest.mark.parametrize(
    "time_input",
    [
        {"time_frequencies": 4},
        {"time_rotary_pairs": 2},
        {"time_rotary_pairs": 2, "time_rotary_head_share": 0.5},
        {"time_bias_pairs": 3},
        {"time_bias_pairs": 3, "time_bias_source": "group"},
    ],
)
def test_later_timestamps_never_change_an_earlier_score(schema, time_input: dict) -> None:
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
        **time_input,
    )
    if "time_frequencies" in time_input:
        _trained(model.dense.tokenizer.time)
    trained_time_bias(model, std=1.0)
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


def test_rotary_scores_depend_on_the_time_gap_only() -> None:
    """q . k after the rotary is unchanged when the query and the key move by the same time, at
    epoch-scale millisecond timestamps; it changes with the gap; the unrotated dims and every
    norm are kept."""
    rotary = TimeRotary(num_pairs=3, head_dim=8, ticks_per_second=1000)
    torch.manual_seed(0)
    q, k = torch.randn(5, 2, 8, dtype=torch.float64), torch.randn(5, 2, 8, dtype=torch.float64)
    t_q = torch.tensor([1_700_000_000_000 + 997 * i for i in range(5)], dtype=torch.int64)
    t_k = t_q - torch.tensor([0, 1_000, 60_000, 3_600_000, 86_400_000])

    def scores(shift: int) -> torch.Tensor:
        return (rotary(q, t_q + shift) * rotary(k, t_k + shift)).sum(-1)

    torch.testing.assert_close(scores(123_456_789), scores(0), rtol=0, atol=1e-9)
    rq = rotary(q, t_q)
    torch.testing.assert_close(rq.norm(dim=-1), q.norm(dim=-1))
    assert torch.equal(rq[..., 6:], q[..., 6:])
    nearer = (rotary(q, t_q) * rotary(k, t_q - 30_000)).sum(-1)
    assert not torch.allclose(nearer, scores(0))
    assert torch.equal(TimeRotary(0, 8, 1)(q, t_q), q)


def test_rotary_refuses_more_pairs_than_the_head_holds() -> None:
    with pytest.raises(ValueError, match=r"model.time_rotary_pairs=5 must be in \[0, head_dim / 2 = 4\]"):
        TimeRotary(num_pairs=5, head_dim=8, ticks_per_second=1)


def test_a_head_share_turns_the_first_kv_heads_and_their_query_heads_only() -> None:
    """With 2 kv heads and 4 query heads (query heads 0-1 read kv head 0, as the kernels group
    them), a share of 0.5 rotates kv head 0 and query heads 0-1; the others are left as they are."""
    rotary = TimeRotary(num_pairs=4, head_dim=8, ticks_per_second=1, head_share=0.5)
    torch.manual_seed(1)
    q, k = torch.randn(3, 4, 8), torch.randn(3, 2, 8)
    ts = torch.tensor([100, 5_000, 90_000], dtype=torch.int64)
    rq, rk = rotary(q, ts), rotary(k, ts)
    assert torch.equal(rq[:, 2:], q[:, 2:]) and torch.equal(rk[:, 1:], k[:, 1:])
    assert not torch.allclose(rq[:, :2], q[:, :2]) and not torch.allclose(rk[:, :1], k[:, :1])
    torch.testing.assert_close(rq[:, :2], TimeRotary(4, 8, 1)(q[:, :2], ts))
    with pytest.raises(ValueError, match=r"model.time_rotary_head_share=0.0 must be in \(0, 1\]"):
        TimeRotary(num_pairs=1, head_dim=8, ticks_per_second=1, head_share=0.0)


def _bias_inputs(num_heads: int = 2, d_model: int = 6) -> tuple:
    torch.manual_seed(2)
    bias = TimeBias(num_pairs=3, d_model=d_model, num_heads=num_heads, ticks_per_second=1000).double()
    trained_time_bias(bias, std=1.0)
    x = torch.randn(5, d_model, dtype=torch.float64)
    q, k = torch.randn(5, num_heads, 4, dtype=torch.float64), torch.randn(5, 1, 4, dtype=torch.float64)
    t_q = torch.tensor([1_700_000_000_000 + 997 * i for i in range(5)], dtype=torch.int64)
    return bias, x, q, k, t_q


def test_time_bias_is_a_fourier_series_of_the_gap_chosen_by_the_query() -> None:
    """The appended channels add ``sum_j a_j(x) cos(w_j gap) - b_j(x) sin(w_j gap)`` to ``q . k``
    (``(a, b)`` the query's projection), at epoch-scale millisecond times; the content dims are
    kept; moving the query and the key by the same time changes nothing."""
    bias, x, q, k, t_q = _bias_inputs()
    t_k = t_q - torch.tensor([0, 1_000, 60_000, 3_600_000, 86_400_000])
    group = torch.zeros(5, dtype=torch.int64)
    bq, bk = bias.query(q, x, t_q, group), bias.key(k, t_k)
    assert bq.shape == (5, 2, 10) and bk.shape == (5, 1, 10)
    assert torch.equal(bq[..., :4], q) and torch.equal(bk[..., :4], k)
    coef = bias.coefficients(x).view(5, 2, 6)
    gap = (t_q - t_k).to(torch.float64)[:, None, None]
    w = 2 * math.pi / bias.periods.to(torch.float64)
    want = (coef[..., :3] * torch.cos(w * gap) - coef[..., 3:] * torch.sin(w * gap)).sum(-1)
    torch.testing.assert_close((bq[..., 4:] * bk[..., 4:]).sum(-1), want, rtol=0, atol=1e-6)
    shift = 123_456_789
    moved = (bias.query(q, x, t_q + shift, group) * bias.key(k, t_k + shift)).sum(-1)
    torch.testing.assert_close(moved, (bq * bk).sum(-1), rtol=0, atol=1e-6)


def test_time_bias_starts_as_a_no_op_and_keeps_any_leading_shape() -> None:
    bias = TimeBias(num_pairs=2, d_model=6, num_heads=2, ticks_per_second=1)
    x, q, k = torch.randn(3, 4, 6), torch.randn(3, 4, 2, 5), torch.randn(3, 4, 1, 5)
    ts, group = torch.randint(0, 10**6, (3, 4)), torch.zeros(3, 4, dtype=torch.int64)
    bq, bk = bias.query(q, x, ts, group), bias.key(k, ts)
    assert bq.shape == (3, 4, 2, 9) and bk.shape == (3, 4, 1, 9)
    assert torch.equal(bq[..., :5], q) and torch.equal(bq[..., 5:], torch.zeros(3, 4, 2, 4))
    torch.testing.assert_close((bq * bk).sum(-1), (q * k).sum(-1))
    (bq * bk).sum().backward()  # the coefficients still get a gradient
    assert bias.coefficients is not None and bias.coefficients.weight.grad.abs().sum() > 0
    off = TimeBias(num_pairs=0, d_model=6, num_heads=2, ticks_per_second=1)
    assert off.query(q, x, ts, group) is q and off.key(k, ts) is k
    with pytest.raises(ValueError, match=r"model.time_bias_pairs=-1 must be >= 0"):
        TimeBias(num_pairs=-1, d_model=6, num_heads=2, ticks_per_second=1)


def test_a_group_time_bias_gives_each_group_its_own_profile_whatever_the_query() -> None:
    """``source="group"``: a query's coefficients are its token group's row, whatever its input,
    so the bias's gradient reaches only the groups that asked for it."""
    bias = TimeBias(num_pairs=3, d_model=6, num_heads=2, ticks_per_second=1000, source="group", num_groups=4)
    bias = bias.double()
    trained_time_bias(bias, std=1.0)
    _, x, q, k, t_q = _bias_inputs()
    group = torch.tensor([0, 2, 2, 3, 0])
    t_k = t_q - torch.tensor([0, 1_000, 60_000, 3_600_000, 86_400_000])
    bq, bk = bias.query(q, x, t_q, group), bias.query(q, torch.randn_like(x), t_q, group)
    torch.testing.assert_close(bq, bk, rtol=0, atol=0)  # the input does not matter
    assert bias.group_coefficients is not None
    coef = bias.group_coefficients[group].view(5, 2, 6)
    gap = (t_q - t_k).to(torch.float64)[:, None, None]
    w = 2 * math.pi / bias.periods.to(torch.float64)
    want = (coef[..., :3] * torch.cos(w * gap) - coef[..., 3:] * torch.sin(w * gap)).sum(-1)
    torch.testing.assert_close((bq[..., 4:] * bias.key(k, t_k)[..., 4:]).sum(-1), want, rtol=0, atol=1e-6)
    bias.query(q, x, t_q, group).sum().backward()
    grad = bias.group_coefficients.grad
    assert grad is not None and grad[1].abs().sum() == 0 and grad[2].abs().sum() > 0
    # a 0-d group (one scenario's candidates at serving) broadcasts over every query
    torch.testing.assert_close(
        bias.query(q, x, t_q, torch.tensor(2)), bias.query(q, x, t_q, torch.full((5,), 2))
    )
    with pytest.raises(ValueError, match=r"time_bias_source='scenario' must be one of \('query', 'group'\)"):
        TimeBias(num_pairs=1, d_model=6, num_heads=2, ticks_per_second=1, source="scenario")
