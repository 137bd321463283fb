"""Fixtures of the model tests (helpers live in ``model_helpers.py``)."""

from __future__ import annotations

import pytest

from mtfm_rec.data.schema import DatasetSchema
from mtfm_rec.model.examples import demo_schema


@pytest.fixture(scope="session")
def schema() -> DatasetSchema:
    """Three scenarios with different feature schemas and 1, 2 and 3 funnel tasks."""
    return demo_schema(num_scenarios=3)
