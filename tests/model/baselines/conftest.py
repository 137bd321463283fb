"""Fixtures of the baseline tests: one small alignment-free synthetic dataset for all of them."""

from __future__ import annotations

import pytest

from mtfm_rec.data.synthetic import generate


@pytest.fixture(scope="session")
def baseline_raw(tmp_path_factory: pytest.TempPathFactory) -> str:
    """1,000 users x 4 days in the raw contract (feed, search, sparse coupon; the last day is test)."""
    raw = str(tmp_path_factory.mktemp("baseline_raw"))
    generate(raw, num_users=1000, num_days=4, seed=3, shared_embeddings=False)
    return raw
